"""Entry points: `transferlab` (the pipeline) and `transferlab-eval` (test one checkpoint). Thin on purpose:
compose the config, run, print, return the metric a sweeper optimises."""

import functools
import logging
import math
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from transferlab.errors import UserError

log = logging.getLogger("transferlab")
OmegaConf.register_new_resolver("add", lambda *xs: sum(xs), replace=True)


def _conf_dir() -> str:
    """`conf/` next to `src/` in a checkout, or `transferlab/conf` inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"transferlab's conf/ folder is missing (looked next to {here})")


CONF_DIR = _conf_dir()


def objective(results: dict, name: str) -> float:
    """The metric returned to sweepers; a missing one is an error that lists what exists."""
    metrics = results["metrics"]
    if name not in metrics:
        raise UserError(f"objective={name!r} is not among this run's metrics: {', '.join(sorted(metrics)) or 'none'}. "
                        "Set objective= to one of them.")
    value = float(metrics[name])
    if math.isnan(value):
        raise UserError(f"objective {name!r} is NaN: the run diverged or its metric could not be computed.")
    return value


def _report_user_errors(task):
    """Print a UserError as one message and exit 2 (single run); let sweeps record it as a failed job."""
    @functools.wraps(task)
    def wrapped(cfg: DictConfig):
        try:
            return task(cfg)
        except UserError as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1" or HydraConfig.get().mode == RunMode.MULTIRUN:
                raise
            log.error("%s", err)
            print(f"\ntransferlab: error: {err}", file=sys.stderr)
            sys.exit(2)
    return wrapped


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
@_report_user_errors
def main(cfg: DictConfig) -> float:
    from transferlab.pipeline import run
    from transferlab.slurm import check_slurm_tasks
    check_slurm_tasks(cfg.trainer)  # under SLURM: one task per device, or fail before training
    return objective(run(cfg), cfg.objective)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
@_report_user_errors
def evaluate(cfg: DictConfig) -> dict:
    from transferlab.evaluate import evaluate_checkpoint
    return evaluate_checkpoint(cfg)


if __name__ == "__main__":
    main()
