"""A callback the SLURM tests inject through the real config (`+callbacks.slow._target_=slurm_helpers.SlowEpochs`)."""

import time

import lightning as L


class SlowEpochs(L.Callback):
    """Sleep `seconds` after each training epoch: a stage that lasts long enough to be interrupted mid-way."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_epoch_end(self, trainer, pl_module):
        time.sleep(self.seconds)
