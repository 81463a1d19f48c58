"""Callbacks of the pipeline (configured in conf/callbacks/)."""

from pathlib import Path

import lightning as L
import torch

from transferlab.errors import UserError


class NonFiniteLossError(UserError):
    """Training diverged: the loss became NaN or infinite."""


class StopOnNonFiniteLoss(L.Callback):
    """Stop a stage at the first NaN/inf training loss, before its gradients reach the weights.

    The error names the stage (its folder), epoch and step; checkpoints already written stay as they are
    (no checkpoint is written on the way out), so `last.ckpt` is the last good state. Costs one small
    all-reduce per step under DDP.
    """

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        # every rank stops together (under DDP a rank that stopped alone would leave the others waiting)
        if not trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss).all()), all=False):
            return
        stage = Path(trainer.default_root_dir).name
        batch = trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1
        last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        kept = f"the last good checkpoint {last} is kept" if last.is_file() else "no checkpoint of it was written yet"
        raise NonFiniteLossError(
            f"Stage {stage!r}: the training loss is {loss.item()} at epoch {trainer.current_epoch}, step "
            f"{trainer.global_step} (batch {batch} of the epoch); training diverged and was stopped ({kept}). "
            f"Lower stages.{stage}.optimizer.lr, add a scheduler or check the data for bad values.")
