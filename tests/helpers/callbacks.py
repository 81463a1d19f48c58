"""Lightning callbacks the tests inject into real runs through the real config:
`+callbacks.<name>._target_=helpers.callbacks.<Class>` (and `+callbacks.<name>.<arg>=<value>` for its arguments).
A run in another process finds them with tests/ on its PYTHONPATH."""

import errno
import os
import time
from pathlib import Path

import lightning as L
import torch


class CrashAtEpoch(L.Callback):
    """Raise at the start of `epoch` of the stage whose folder is named `stage`: an interrupted run."""

    def __init__(self, stage: str, epoch: int):
        self.stage, self.epoch = stage, epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if Path(trainer.default_root_dir).name == self.stage and trainer.current_epoch == self.epoch:
            raise RuntimeError(f"simulated kill of {self.stage} at epoch {self.epoch}")


class RecordTestMetrics(L.Callback):
    """Each rank writes the test metrics it saw to `<stage>/test_metrics_rank<N>.json`."""

    def on_test_end(self, trainer, pl_module):
        import json

        metrics = {
            k.removeprefix("test/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")
        }
        path = Path(trainer.default_root_dir) / f"test_metrics_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(metrics))


class MarkAndWaitAtStep(L.Callback):
    """At global step `step` of stage `stage`, write `marker` and wait there to be killed (SIGKILL by the test)."""

    def __init__(self, stage: str, step: int, marker: str):
        self.stage, self.step, self.marker = stage, step, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if Path(trainer.default_root_dir).name == self.stage and trainer.global_step == self.step:
            Path(self.marker).write_text(f"{self.stage} epoch {trainer.current_epoch} step {trainer.global_step}")
            time.sleep(120)


class PoisonAtEpoch(L.Callback):
    """Make the weights of stage `stage` NaN at the start of `epoch`: a real divergence, on cue."""

    def __init__(self, stage: str, epoch: int):
        self.stage, self.epoch = stage, epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if Path(trainer.default_root_dir).name == self.stage and trainer.current_epoch == self.epoch:
            with torch.no_grad():
                pl_module.head.weight.fill_(float("nan"))


class DiskFullInStage(L.Callback):
    """Simulate a full disk while stage `stage` writes a checkpoint: half the bytes land, then ENOSPC."""

    def __init__(self, stage: str):
        self.stage = stage

    def setup(self, trainer, pl_module, stage):
        if Path(trainer.default_root_dir).name != self.stage:
            return

        def write(data, path):
            with open(path, "wb") as f:
                f.write(bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        trainer.strategy.checkpoint_io._write = write


class MarkAndWaitInCheckpointWrite(L.Callback):
    """In epoch `epoch` of stage `stage`, the first checkpoint write stops half-way (its partial file's path
    goes to `marker`) and waits there to be killed."""

    def __init__(self, stage: str, epoch: int, marker: str):
        self.stage, self.epoch, self.marker = stage, epoch, marker

    def setup(self, trainer, pl_module, stage):
        if Path(trainer.default_root_dir).name != self.stage:
            return
        io, write = trainer.strategy.checkpoint_io, trainer.strategy.checkpoint_io._write

        def half_then_wait(data, path):
            if trainer.current_epoch != self.epoch:
                return write(data, path)
            with open(path, "wb") as f:
                f.write(bytes(data)[: len(data) // 2])
            Path(self.marker).write_text(str(path))
            time.sleep(120)

        io._write = half_then_wait


class SaveRankWeights(L.Callback):
    """Each rank saves its model's weights at the end of training to `<stage>/weights_rank<N>.pt`."""

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.state_dict(), Path(trainer.default_root_dir) / f"weights_rank{trainer.global_rank}.pt")


class SaveInitialHead(L.Callback):
    """Save the head's weights as the stage starts training (after any init from another stage), to
    <stage dir>/initial_head.pt."""

    def on_train_start(self, trainer, pl_module):
        torch.save(pl_module.head.weight.detach().clone(), Path(trainer.default_root_dir) / "initial_head.pt")


class FillDiskAt(L.Callback):
    """Fill the file system of the run folder (a small tmpfs in the tests) with `<run>/filler` when stage `stage`
    reaches `hook` (a callback hook name, e.g. on_train_epoch_end: after the epoch's checkpoints were written)."""

    def __init__(self, stage: str, hook: str = "on_train_epoch_end", epoch: int = 0):
        self.stage, self.epoch = stage, epoch
        setattr(self, hook, self._fill)

    def _fill(self, trainer, *args, **kwargs):
        stage_dir = Path(trainer.default_root_dir)
        if stage_dir.name != self.stage or trainer.current_epoch != self.epoch:
            return
        try:
            with open(stage_dir.parent / "filler", "ab") as f:
                while True:
                    f.write(b"\0" * (1 << 16))
                    f.flush()
        except OSError:
            pass


class SlowEpochs(L.Callback):
    """Sleep `seconds` after each training epoch: a stage that lasts long enough to be interrupted mid-way."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_epoch_end(self, trainer, pl_module):
        time.sleep(self.seconds)


class RecordImported(L.Callback):
    """Each rank writes which of `modules` it has imported by the end of training to `<stage>/imported_rank<N>.json`
    (a tracker's library, imported only where the tracker reports)."""

    def __init__(self, modules: str):
        self.modules = modules.split(",")

    def on_train_end(self, trainer, pl_module):
        import json
        import sys

        path = Path(trainer.default_root_dir) / f"imported_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(sorted(m for m in self.modules if m in sys.modules)))
