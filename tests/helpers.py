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


class RecordTestMetrics(L.Callback):
    """Each rank writes the test metrics it saw to `<stage>/test_metrics_rank<N>.json`."""

    def on_test_end(self, trainer, pl_module):
        import json
        metrics = {k.removeprefix("test/"): float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith("test/")}
        path = Path(trainer.default_root_dir) / f"test_metrics_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(metrics))
