"""A Hydra callback (conf/hydra/default.yaml) that checks the output folder before Hydra creates it: a run or
sweep folder that is a file, lies under a file, or cannot be written gets one message and exit 2, instead of
Hydra's traceback from its own mkdir. So does a sweep into the folder of a finished Optuna search."""

import sys
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback

from transferlab.core.errors import UserError
from transferlab.core.fileio import writable_dir


class CheckOutputFolder(Callback):
    def on_run_start(self, config, **kwargs) -> None:
        _check(config.hydra.run.dir, "The run folder (hydra.run.dir)")

    def on_multirun_start(self, config, **kwargs) -> None:
        _check(config.hydra.sweep.dir, "The sweep folder (hydra.sweep.dir)", sweep=True)


def _check(path: str, what: str, sweep: bool = False) -> None:
    try:
        if sweep:
            finished_search(path)
        writable_dir(path, what)
    except UserError as err:
        print(f"\ntransferlab: error: {err}", file=sys.stderr)
        sys.exit(2)


def finished_search(sweep_dir: str) -> None:
    """Refuse a sweep into the folder of a finished Optuna search, before any trial. Its trial folders hold other
    configs, so a search with other settings (sampler seed, ranges) would have every trial refused, then the
    sweeper would overwrite optimization_results.yaml with parameters that never trained and best_value -inf.
    The same settings are refused too: their trials would retrain nothing and rewrite the same file."""
    results = Path(sweep_dir) / "optimization_results.yaml"
    if not results.is_file():
        return
    try:
        saved = yaml.safe_load(results.read_text())
    except (OSError, yaml.YAMLError):
        saved = None
    best = saved.get("best_value", "not recorded") if isinstance(saved, dict) else "unreadable"
    raise UserError(
        f"The sweep folder (hydra.sweep.dir) {sweep_dir} holds a finished Optuna search ({results}: best value "
        f"{best}); another search there would have every trial refused by the trial folders (they hold other "
        "configs), then overwrite that file with parameters that never trained. Sweep into another folder "
        "(hydra.sweep.dir=...), or, to repeat this very search (same settings: its trials are found done, nothing "
        f"retrains), move {results.name} away first."
    )
