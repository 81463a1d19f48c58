"""A Hydra callback (conf/hydra/default.yaml) that checks the output folder before Hydra creates it: a run or
sweep folder that is a file, lies under a file, or cannot be written gets one message and exit 2, instead of
Hydra's traceback from its own mkdir."""

import sys

from hydra.experimental.callback import Callback

from transferlab.errors import UserError
from transferlab.fileio import writable_dir


class CheckOutputFolder(Callback):
    def on_run_start(self, config, **kwargs) -> None:
        _check(config.hydra.run.dir, "The run folder (hydra.run.dir)")

    def on_multirun_start(self, config, **kwargs) -> None:
        _check(config.hydra.sweep.dir, "The sweep folder (hydra.sweep.dir)")


def _check(path: str, what: str) -> None:
    try:
        writable_dir(path, what)
    except UserError as err:
        print(f"\ntransferlab: error: {err}", file=sys.stderr)
        sys.exit(2)
