"""Callbacks of the pipeline (configured in conf/callbacks/, and SpeedSettings, added by make_trainer)."""

import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn

from transferlab.core.errors import UserError


class NonFiniteLossError(UserError):
    """Training diverged: a loss became NaN, infinite or absurdly large."""


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
            f"Lower stages.{stage}.optimizer.lr, add a scheduler or check the data for bad values."
        )


def check_losses(stage: str, stage_dir: Path, num_classes: int, **losses) -> None:
    """A stage whose last training, validation or test loss is not finite, or over 1000 x ln(classes), failed.

    ln(classes) is the cross-entropy of a uniform guess; no model that learned anything scores a thousand times
    worse, but one diverging step (e.g. a huge lr with one batch per epoch) does, without ever a NaN."""
    chance = math.log(max(num_classes, 2))
    for split, value in losses.items():
        value = None if value is None else float(value)
        if value is not None and not (math.isfinite(value) and value <= 1000 * chance):
            why = (
                "not finite"
                if not math.isfinite(value)
                else (f"over 1000 x ln({num_classes}) = {1000 * chance:.0f} (a uniform guess scores {chance:.2f})")
            )
            raise NonFiniteLossError(
                f"Stage {stage!r}: the {split} loss is {value:.3g}, {why}: training diverged, so the stage is marked "
                f"failed and its results are not used. Lower stages.{stage}.optimizer.lr (or add a scheduler), then "
                f"delete {stage_dir} (its checkpoints were trained at the old lr) and re-run, or use a new run folder."
            )


class SpeedSettings(L.Callback):
    """Applies `trainer.channels_last` and `trainer.compile` to the module before it runs (fit, validate, test)."""

    def __init__(self, channels_last: bool = False, compile: bool = False):
        self.channels_last, self.compile = channels_last, compile

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.channels_last:  # convolutions follow the weights' layout; inputs are converted by them
            pl_module.to(memory_format=torch.channels_last)
        if self.compile and getattr(pl_module.backbone, "_compiled_call_impl", None) is None:
            pl_module.backbone.compile()  # in place: the state dict's keys stay as they are


def ema_average(decay: float):
    """AveragedModel's avg_fn for an EMA with the usual warm-up of its decay (TensorFlow's and timm's
    ExponentialMovingAverage with num_updates): after n updates, decay_n = min(decay, (1 + n) / (10 + n)), so that a
    stage of a few hundred steps is not left averaging mostly its starting weights (0.999^500 = 0.61)."""

    def average(ema: torch.Tensor, param: torch.Tensor, updates) -> torch.Tensor:
        n = float(updates)
        rate = min(decay, (1 + n) / (10 + n))
        return ema * rate + param * (1 - rate)

    return average


class EMAWeights(WeightAveraging):
    """An EMA of the module's weights, updated after every optimizer step (`ema_average`); Lightning's
    WeightAveraging validates and saves it (best.ckpt, last.ckpt hold the EMA weights, the training weights ride
    along for resume) and leaves it in the module when training ends."""

    def __init__(self, decay: float):
        super().__init__(avg_fn=ema_average(decay))

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Resuming a fit: the EMA and the training weights both come back. Testing a checkpoint: its state_dict,
        already loaded, is the EMA; WeightAveraging would put the training weights back (after a fit, the callback
        still holds an average) or warn that it cannot."""
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    @property
    def model(self) -> torch.nn.Module:
        """The averaged copy of the module (mean teacher's teacher), from fit's start."""
        assert self._average_model is not None, "made when fit starts"
        return self._average_model.module
