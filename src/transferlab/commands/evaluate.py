"""`transferlab-eval ckpt=<path> data=<...> task=target`: the test metrics of one checkpoint, under the precision its
run tested it with."""

import json
from pathlib import Path

import torch
from omegaconf import DictConfig

from transferlab.commands.common import hydra_app, script
from transferlab.config import validation
from transferlab.core.errors import UserError
from transferlab.core.fileio import atomic_write
from transferlab.models import model_input
from transferlab.train.factories import build, make_trainer
from transferlab.train.metrics import metric_key, split_metrics
from transferlab.train.weights import load_module


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    validation.validate_eval(cfg)
    module, checkpoint = load_module(cfg.ckpt)  # weights only: a checkpoint from elsewhere runs no code
    nonfinite = [k for k, v in module.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise UserError(
            f"{cfg.ckpt} holds weights that are NaN or infinite ({', '.join(nonfinite[:6])}): the stage that "
            "wrote it diverged, so its metrics would mean nothing. Evaluate a checkpoint of a stage that finished."
        )
    datamodule = build(cfg.data[cfg.task], model_input=model_input(module.hparams["model"]))  # as it was trained
    if datamodule.num_classes != module.hparams["num_classes"]:
        raise UserError(
            f"{cfg.ckpt} classifies {module.hparams['num_classes']} classes but data.{cfg.task} has "
            f"{datamodule.num_classes}: pick the task (task=source|target) and data it was trained on."
        )
    if cfg.precision == "auto" and checkpoint.get("precision"):  # the run's test used it: the same numbers
        cfg.trainer.precision = checkpoint["precision"]
    trainer = make_trainer(cfg, logger=False, default_root_dir=cfg.paths.run_dir)
    [metrics] = trainer.test(module, datamodule=datamodule, verbose=False)
    metrics = split_metrics(metrics, "test")
    report = {"ckpt": str(cfg.ckpt), "task": cfg.task, "precision": trainer.precision, "test": metrics}
    atomic_write(Path(cfg.paths.run_dir) / "eval.json", json.dumps(report, indent=2))
    print("\n".join(f"{metric_key('test', k)}: {v:.4f}" for k, v in metrics.items()))
    return metrics


main = hydra_app("eval", evaluate_checkpoint)


def console_script() -> None:
    script(main)


if __name__ == "__main__":
    console_script()
