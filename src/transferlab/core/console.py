"""What a run prints: one header line per stage, a progress bar named after its stage, Lightning's banner lines
once per run, plain message lines, from rank 0 only under DDP (but in each SLURM task's own log).
`verbose=true` (or `hydra.verbose=true`) shows everything, in Hydra's format.

The log file of a run (`<run>/transferlab.log`) always keeps every line: only the console is filtered."""

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, cast

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import ProcessingSpeedColumn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from rich.text import Text

from transferlab.core.fileio import disk_full

ONCE = (
    "GPU available",
    "TPU available",
    "HPU available",
    "Using bfloat16",
    "Using 16bit",
    "You are using a CUDA device",
    "Initializing distributed",
    "----",
    "distributed_backend",
)  # once per run
HIDDEN = (
    "💡 Tip",
    "`Trainer.fit` stopped",
    "Restoring states from the checkpoint path",
    "Loaded model weights from the checkpoint",
    "LOCAL_RANK",
    "Loading `train_dataloader` to estimate number of stepping batches",
)  # debugging detail: verbose only
FILE_ONLY = {"file_only": True}  # `log.error(..., extra=FILE_ONLY)`: for the run's log file, not the console


def global_rank() -> int:
    """This process's global rank under DDP (0 without it), as Lightning keeps it: `rank_zero_only.rank`, an
    attribute that Lightning sets on that decorator function and its types do not declare."""
    return cast(Any, rank_zero_only).rank


class _Banner(logging.Filter):
    """Drops records meant for the log file only (`FILE_ONLY`: an error the CLI prints itself), and unless
    `verbose`: Lightning's repeated banner lines (each `ONCE` line passes the first time) and its `HIDDEN` lines;
    under DDP on one console, the info lines of every rank but 0 (rank 0 speaks for all; warnings and errors of
    every rank still show). Under submitit (hydra/launcher=slurm) each task writes a log file of its own, which
    keeps its lines."""

    def __init__(self, verbose: bool = False):
        super().__init__()
        self.seen: set[str] = set()
        self.own_log = "SUBMITIT_FOLDER" in os.environ
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "file_only", False):
            return False
        if self.verbose:
            return True
        if record.levelno <= logging.INFO and global_rank() != 0 and not self.own_log:
            return False
        if not record.name.startswith("lightning"):
            return True
        message = record.getMessage()
        if message.startswith(HIDDEN):
            return False
        first = next((p for p in ONCE if message.startswith(p)), None)
        if first is None:
            return True
        new = first not in self.seen
        self.seen.add(first)
        return new


class _Plain(logging.Formatter):
    """Info lines as they are; warnings and errors with their level."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno <= logging.INFO else f"{record.levelname.lower()}: {text}"


def configure(verbose: bool = False) -> None:
    """Set up the console handlers (Hydra's, on the root logger) for one run or sweep job. Lightning gives its
    loggers a stderr handler of their own (and stops them propagating) when it is imported before Hydra sets up
    logging, e.g. by the checks that run before Hydra composes: route them back to the root logger."""
    logging.raiseExceptions = False  # a log file that cannot be written (full disk) prints no traceback per line
    threading.excepthook = _thread_error
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
            continue
        for old in [f for f in handler.filters if isinstance(f, _Banner)]:
            handler.removeFilter(old)
        # the handler's first formatter (Hydra's), kept on it for the next call
        own = vars(handler).setdefault("_transferlab_formatter", handler.formatter)
        handler.addFilter(_Banner(verbose))
        handler.setFormatter(own if verbose else _Plain())


def _thread_error(args) -> None:
    """A helper thread's full disk (TensorBoard's event writer) is one line; the run reports it as it stops."""
    if disk_full(args.exc_value) is not None:
        logging.getLogger("transferlab").warning(
            "%s: %s", args.thread.name if args.thread else "a thread", args.exc_value
        )
    else:
        threading.__excepthook__(args)


def stage_header(cfg, name: str, datamodule, trainer, optimizer: dict, resume: bool, init) -> str:
    """`stage 2/4 pretrain · target BuiltinDataModule 10 classes · 240 train / 60 val · init source best.ckpt
    (new head) · 10 epochs · sgd lr 0.01`"""
    stage, names = cfg.stages[name], list(cfg.stages)
    sizes = datamodule.split_sizes()
    if resume:
        start = "resume last.ckpt"
    elif stage.init:
        start = f"init {stage.init} {Path(init).name} ({stage.init_head} head)"
    elif stage.get("init_ckpt"):
        start = f"init {stage.init_ckpt} ({stage.init_head} head)"
    elif init is not None:
        start = f"backbone weights {Path(init).name} (new head)"
    else:
        start = "random init"
    opt = f"{optimizer.get('name', 'sgd')} lr {optimizer['lr']:g}"
    if stage.scheduler.get("name", "none") != "none":
        opt += f" {stage.scheduler.name}"
    epochs = f"{trainer.max_epochs} epoch{'s' if trainer.max_epochs != 1 else ''}"
    parts = [
        f"stage {names.index(name) + 1}/{len(names)} {name}",
        f"{stage.task} {datamodule.describe()} {datamodule.num_classes} classes",
        f"{sizes.get('train', 0):,} train / {sizes.get('val', 0):,} val",
        *(
            [_unlabeled_note(stage, datamodule.unlabeled_batches)]
            if getattr(datamodule, "unlabeled_batches", None)
            else []
        ),
        *([f"tested on {stage.test_task}"] if stage.get("test_task") not in (None, stage.task) else []),
        *([_input_note(cfg, datamodule)] if getattr(datamodule, "model_input", None) else []),
        start,
        epochs + (" (head only)" if stage.get("trainable") == "head" else ""),
        opt,
    ]
    return " · ".join(parts)


def _unlabeled_note(stage, batches) -> str:
    """`+ 22,000 unlabeled (fixmatch, 7 per labelled image)`"""
    return f"+ {len(batches.images):,} unlabeled ({stage.unlabeled.method}, {batches.ratio} per labelled image)"


def _input_note(cfg, datamodule) -> str:
    """`input 32 -> 160 px, normalised for test_vit`: the model's input, where it is not the data's own."""
    wanted = datamodule.model_input
    return f"input {datamodule.image_size} -> {wanted['size']} px, normalised for {cfg.model.name}"


def progress_bars(cfg, name: str) -> list:
    """The stage's progress bar as a callback list (empty when `trainer.enable_progress_bar` is false)."""
    if not cfg.trainer.get("enable_progress_bar", True):
        return []
    names = list(cfg.stages)
    return [StageProgressBar(f"{name} {names.index(name) + 1}/{len(names)}" if name in names else name)]


class StageProgressBar(RichProgressBar):
    """Lightning's rich bar, named after the stage (`pretrain 2/4 · epoch 3/10`), without the logger version,
    redrawn at most `refresh_per_second` times a second whatever the step time: a redraw per step costs a large
    share of a CPU step, and would cost more than the step itself on a GPU.

    Lightning's refresh thread sleeps 1 / refresh_rate between looks for a pending redraw, and stopping the bar (at
    the end of fit and of test) waits out that sleep. It looks `POLLS_PER_SECOND` times a second instead (a look
    that finds nothing to draw costs microseconds); redraws stay throttled by `_due`. The measured costs:
    docs/performance.md (Measured figures)."""

    POLLS_PER_SECOND = 20

    def __init__(self, stage: str, refresh_per_second: float = 2.0, **kwargs):
        super().__init__(refresh_rate=self.POLLS_PER_SECOND, **kwargs)
        self.stage, self.interval, self._next = stage, 1.0 / refresh_per_second, 0.0

    def _due(self, current: int, total) -> bool:
        now = time.monotonic()
        if now < self._next and current != total:
            return False
        self._next = now + self.interval
        return True

    def _get_train_description(self, current_epoch: int) -> str:
        epochs = self.trainer.max_epochs
        return f"{self.stage} · epoch {current_epoch + 1}" + (f"/{epochs}" if epochs and epochs > 0 else "")

    @property
    def validation_description(self) -> str:
        return f"{self.stage} · val"

    @property
    def test_description(self) -> str:
        return f"{self.stage} · test"

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    # A disabled bar (every DDP rank but 0) draws nothing and has no current eval dataloader, whose batch count
    # Lightning asserts: it must not ask for it.
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.is_enabled and self._due(batch_idx + 1, self.total_train_batches):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.is_enabled and self._due(batch_idx + 1, self.total_val_batches_current_dataloader):
            super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.is_enabled and self._due(batch_idx + 1, self.total_test_batches_current_dataloader):
            super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def configure_columns(self, trainer) -> list:
        columns = super().configure_columns(trainer)
        return [_Speed(c.style) if isinstance(c, ProcessingSpeedColumn) else c for c in columns]


class _Speed(ProcessingSpeedColumn):
    """it/s over the whole task where rich has no estimate yet: rich estimates speed from the redraws' samples, and
    a short stage, redrawn once at its end, showed `0.00it/s`."""

    def render(self, task):
        speed = task.speed if task.speed is not None else (task.completed / task.elapsed if task.elapsed else None)
        return Text("" if speed is None else f"{speed:.2f}it/s", style=self.style)
