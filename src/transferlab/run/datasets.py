"""The data modules of a run's tasks, built once: their content hashes for the stage plans, the check of the data
of the stages to train before any of them trains, and each stage's module."""

from omegaconf import DictConfig

from transferlab.core.checks import config_dict
from transferlab.core.errors import UserError
from transferlab.data.fingerprint import files_digest
from transferlab.data.unlabeled import UnlabeledBatches, UnlabeledImages, unlabeled_images
from transferlab.models import model_input
from transferlab.run.plan import StagePlan
from transferlab.train.factories import build
from transferlab.train.unlabeled import VIEWS


class Datasets:
    """The data modules of the run's tasks. Their content hashes go into the stage hashes (the cache and resume
    follow the data's bytes, not only its config); the data of the stages to train is checked up front, so that
    a missing root or a bad file stops the run before any training. A task's first stage gets the loaded
    module, later ones a fresh one."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.model_input = model_input(config_dict(cfg.model))  # a timm model's size and normalisation, or None
        trained = [stage for stage in cfg.stages.values() if not stage.get("result_ckpt")]
        self.uses_unlabeled = any(s.unlabeled.method != "none" for s in trained)
        tasks = {s.task for s in trained} | {s.test_task for s in trained if s.test_task}
        tasks |= {"target"} if self.uses_unlabeled else set()
        self.loaded = {task: self.build(task) for task in sorted(tasks)}
        self._unlabeled: dict[bool, UnlabeledImages] = {}
        # the unlabeled images are selected from the loaded target once (`unlabeled_for`), before it trains a stage
        self._unlabeled_source = self.loaded["target"] if self.uses_unlabeled else None

    def build(self, task: str):
        return build(self.cfg.data[task], model_input=self.model_input)

    def hashes(self) -> dict[str, str]:
        hashes = {task: module.data_hash() for task, module in self.loaded.items()}
        if self.uses_unlabeled:  # `rest` is chosen by the target's settings: its data hash says which images
            source = self._unlabeled_source
            assert source is not None  # built with uses_unlabeled
            folder = source.unlabeled not in (None, "rest")
            files = unlabeled_images(source, include_train=False).files if folder else None
            hashes["target unlabeled"] = files_digest(files, source.cache_dir)[0] if files else hashes["target"]
        return hashes

    def check(self, plans: list[StagePlan]) -> None:
        for plan in plans:
            task, test = plan.stage.task, plan.stage.test_task
            if test and test != task:
                check_same_classes(plan.name, self.loaded[task], self.loaded[test], f"stages.{plan.name}.test_task")
            if plan.stage.unlabeled.method != "none":
                self.unlabeled_for(task)  # none left (`rest` with every label kept): said before any stage trains
                if task != "target":
                    check_same_classes(
                        plan.name, self.loaded[task], self._unlabeled_source, f"stages.{plan.name}.unlabeled"
                    )
            if self.loaded[task].split_sizes()["val"] == 0:
                raise UserError(
                    f"Stage {plan.name!r}: the validation split is empty; the best checkpoint is chosen on "
                    f"it, so set data.{task}.val_fraction above 0 (or give more training samples)."
                )

    def take(self, task: str):
        return self.loaded.pop(task, None) or self.build(task)

    def unlabeled_for(self, task: str) -> UnlabeledImages:
        """The target's unlabeled images for a stage on `task` (adapting from the source: every target training
        image), selected once."""
        include_train = task != "target"
        if include_train not in self._unlabeled:
            assert self._unlabeled_source is not None  # built when a stage trains on unlabeled images
            self._unlabeled[include_train] = unlabeled_images(self._unlabeled_source, include_train)
        return self._unlabeled[include_train]

    def for_stage(self, plan: StagePlan):
        """The stage's data module, with the target's unlabeled images attached where its method trains on them, and
        the data module it is tested on (the same one unless `test_task` names the other task)."""
        stage = plan.stage
        datamodule = self.take(stage.task)
        method = stage.unlabeled.method
        if method != "none":
            images = self.unlabeled_for(stage.task)
            datamodule.unlabeled_batches = UnlabeledBatches(images, stage.unlabeled.ratio, VIEWS[method], plan.seed)
        test = stage.test_task or stage.task
        return datamodule, datamodule if test == stage.task else self.take(test)


def check_same_classes(stage: str, labelled, other, what: str) -> None:
    """Domain adaptation and testing on the other task need the same classes, in the same order, on both."""
    names = lambda dm: [dm.class_names()[i] for i in dm.class_ids] if dm.class_names() else dm.num_classes
    if names(labelled) != names(other):
        raise UserError(
            f"Stage {stage!r}: {what} needs the same classes on data.{labelled.key.split('.')[-1]} and "
            f"data.{other.key.split('.')[-1]}, in the same order; they have {names(labelled)} and {names(other)}. "
            "Select the same classes on both (data.<task>.classes=[...]), or use a data pair of one class set "
            "(e.g. data=cifar10_shifted)."
        )
