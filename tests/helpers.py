"""Callbacks the tests inject through the real config (`+callbacks.<name>._target_=helpers.<Class>`)."""

from pathlib import Path

import lightning as L


class CrashAtEpoch(L.Callback):
    """Raise at the start of `epoch` of the stage whose folder is named `stage`: an interrupted run."""

    def __init__(self, stage: str, epoch: int):
        self.stage, self.epoch = stage, epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if Path(trainer.default_root_dir).name == self.stage and trainer.current_epoch == self.epoch:
            raise RuntimeError(f"simulated kill of {self.stage} at epoch {self.epoch}")
