"""`transferlab-eval ckpt=<path> data=<...> task=target`: the test metrics of one checkpoint."""

import json
from pathlib import Path

from omegaconf import DictConfig

from transferlab import validation
from transferlab.errors import UserError
from transferlab.factories import build, make_trainer
from transferlab.module import ClassifierModule
from transferlab.transfer import load_checkpoint


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    validation.validate_eval(cfg)
    checkpoint = load_checkpoint(cfg.ckpt)  # weights only: a checkpoint from elsewhere runs no code
    hparams = checkpoint.get("hyper_parameters")
    if not hparams or "model" not in hparams:
        raise UserError(f"{cfg.ckpt} is not a transferlab ClassifierModule checkpoint (no model hyperparameters).")
    datamodule = build(cfg.data[cfg.task])
    if datamodule.num_classes != hparams["num_classes"]:
        raise UserError(
            f"{cfg.ckpt} classifies {hparams['num_classes']} classes but data.{cfg.task} has "
            f"{datamodule.num_classes}: pick the task (task=source|target) and data it was trained on."
        )
    module = ClassifierModule.from_hparams(hparams)
    module.load_state_dict(checkpoint["state_dict"])
    trainer = make_trainer(cfg, logger=False, default_root_dir=cfg.paths.run_dir)
    [metrics] = trainer.test(module, datamodule=datamodule, verbose=False)
    metrics = {k.removeprefix("test/"): float(v) for k, v in metrics.items()}
    out = Path(cfg.paths.run_dir) / "eval.json"
    out.write_text(json.dumps({"ckpt": str(cfg.ckpt), "task": cfg.task, "test": metrics}, indent=2))
    print("\n".join(f"test/{k}: {v:.4f}" for k, v in metrics.items()))
    return metrics
