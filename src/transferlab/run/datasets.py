"""The data modules of a run's tasks, built once: their content hashes for the stage plans, the check of the data
of the stages to train before any of them trains, and each stage's module."""

from omegaconf import DictConfig

from transferlab.core.checks import config_dict
from transferlab.core.errors import UserError
from transferlab.models import model_input
from transferlab.run.plan import StagePlan
from transferlab.train.factories import build


class Datasets:
    """The data modules of the run's tasks. Their content hashes go into the stage hashes (the cache and resume
    follow the data's bytes, not only its config); the data of the stages to train is checked up front, so that
    a missing root or a bad file stops the run before any training. A task's first stage gets the loaded
    module, later ones a fresh one."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.model_input = model_input(config_dict(cfg.model))  # a timm model's size and normalisation, or None
        tasks = {stage.task for stage in cfg.stages.values() if not stage.get("result_ckpt")}
        self.loaded = {task: self.build(task) for task in sorted(tasks)}

    def build(self, task: str):
        return build(self.cfg.data[task], model_input=self.model_input)

    def hashes(self) -> dict[str, str]:
        return {task: module.data_hash() for task, module in self.loaded.items()}

    def check(self, plans: list[StagePlan]) -> None:
        for plan in plans:
            task = plan.stage.task
            if self.loaded[task].split_sizes()["val"] == 0:
                raise UserError(
                    f"Stage {plan.name!r}: the validation split is empty; the best checkpoint is chosen on "
                    f"it, so set data.{task}.val_fraction above 0 (or give more training samples)."
                )

    def take(self, task: str):
        return self.loaded.pop(task, None) or self.build(task)
