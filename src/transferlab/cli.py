"""Entry points: `transferlab` (the pipeline) and `transferlab-eval` (test one checkpoint). Thin on purpose:
compose the config, run, print, return the metric a sweeper optimises."""

import functools
import logging
import math
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from transferlab import CONF_DIR
from transferlab.errors import UserError, user_message
from transferlab.fileio import disk_full
from transferlab.speed import resolve_channels_last, resolve_precision

log = logging.getLogger("transferlab")
OmegaConf.register_new_resolver("add", lambda *xs: sum(xs), replace=True)
OmegaConf.register_new_resolver("resolve_precision", resolve_precision, replace=True)  # precision=auto
OmegaConf.register_new_resolver("resolve_channels_last", resolve_channels_last, replace=True)  # channels_last=auto


def objective(results: dict, name: str) -> float:
    """The metric returned to sweepers; a missing one is an error that lists what exists."""
    metrics = results["metrics"]
    if name not in metrics:
        raise UserError(
            f"objective={name!r} is not among this run's metrics: {', '.join(sorted(metrics)) or 'none'}. "
            "Set objective= to one of them."
        )
    value = float(metrics[name])
    if math.isnan(value):
        raise UserError(f"objective {name!r} is NaN: the run diverged or its metric could not be computed.")
    return value


FAILED_JOBS: list[str] = []  # sweep jobs of this process that failed with a UserError


def _report_user_errors(task):
    """Print a UserError as one message and exit 2. In a local sweep, the job's manifest records the failure,
    the job returns NaN (or the worst value, to Optuna) and the sweep goes on; `main` exits 1 at its end.
    A SLURM job (submitit) raises instead: its array runs to the end, then Hydra reports the failed job."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig):
        from transferlab.console import FILE_ONLY  # these import Lightning: not at the CLI's import (--help)
        from transferlab.interrupt import Interrupted

        try:
            return task(cfg)
        except Interrupted as stop:
            _exit_interrupted(stop, cfg)
        except Exception as caught:
            full = disk_full(caught)
            if not isinstance(caught, (UserError, OmegaConfBaseException)) and full is None:
                raise  # a bug: Hydra shows its traceback
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            err = _message(caught, full, cfg)
            log.error("%s", err, extra=FILE_ONLY)  # in the run's log file; the console gets the line printed below
            if HydraConfig.get().mode == RunMode.MULTIRUN:
                hydra_cfg = HydraConfig.get()
                direction = hydra_cfg.sweeper.get("direction")
                if direction is None and "submitit" in str(hydra_cfg.launcher.get("_target_")):
                    raise  # a job of its own (SLURM): Hydra reports it once the whole array has run
                FAILED_JOBS.append(f"job {hydra_cfg.job.num} ({hydra_cfg.runtime.output_dir}): {err}")
                print(f"\ntransferlab: job {hydra_cfg.job.num} failed: {err}", file=sys.stderr)
                return _failed_value(direction)
            print(f"\ntransferlab: error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapped


def _message(caught: Exception, full: OSError | None, cfg: DictConfig) -> str:
    """One line for a user's mistake, a config error or a full disk."""
    if isinstance(caught, UserError):
        return user_message(caught)
    if isinstance(caught, OmegaConfBaseException):  # e.g. an interpolation left dangling by an override
        text = " ".join(line.strip() for line in str(caught).splitlines())
        return (
            f"Config error: {text}. Fix the override or config file that sets this key (transferlab --cfg job "
            "prints the composed config)."
        )
    paths = cfg.get("paths") or {}
    return (
        f"The disk holding {full.filename or paths.get('run_dir')} is full ({full.strerror}). Free space on it (old "
        f"run folders under {paths.get('output_root')} and the stage cache {paths.get('cache_dir')} can go), then "
        f"re-run the same command into the same folder (hydra.run.dir={paths.get('run_dir')}): what was trained "
        "is kept, finished stages are skipped and the unfinished one resumes from its last checkpoint."
    )


def _exit_interrupted(stop, cfg: DictConfig) -> None:
    """SIGTERM/SIGINT: one line and exit 128 + signal (143, 130), also in a sweep (the rest of it is not run)
    and on every DDP rank."""
    run_dir = cfg.paths.run_dir
    where = (
        f"stage {stop.stage!r} is marked interrupted in {run_dir}/manifest.json"
        if stop.stage
        else f"no stage was running in {run_dir}"
    )
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank == 0:  # under DDP every rank stops (rank 0 forwards the signal): one line, not one each
        print(
            f"\ntransferlab: {stop}: {where}. Re-run the same command into that folder (hydra.run.dir={run_dir}) "
            "to resume.",
            file=sys.stderr,
        )
    sys.exit(stop.exit_code)


def _failed_value(direction) -> float:
    """What a failed sweep job returns: NaN to Hydra's basic sweeper; the worst value to Optuna, which aborts
    the whole search on a NaN (optuna 2.10 raises in `study.tell`)."""
    if direction in ("maximize", ["maximize"]):
        return -math.inf
    if direction in ("minimize", ["minimize"]):
        return math.inf
    return math.nan


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
@_report_user_errors
def _main(cfg: DictConfig) -> float:
    from transferlab import console, runlock
    from transferlab.interrupt import stop_on_signals
    from transferlab.pipeline import run
    from transferlab.slurm import check_slurm_tasks
    from transferlab.validation import check_objective

    console.configure(verbose=bool(cfg.get("verbose") or HydraConfig.get().verbose))
    check_slurm_tasks(cfg.trainer)  # under SLURM: one task per device, or fail before training
    check_objective(cfg)  # the metric a sweeper gets must be one the stages will produce (the rest: in run)
    with stop_on_signals(), runlock.hold(cfg.paths.run_dir):  # SIGTERM/SIGINT stop; one writer per folder
        return objective(run(cfg), cfg.objective)


def main() -> None:
    """`transferlab`: a run, or a sweep (-m) that exits 1 when any of its jobs failed."""
    from transferlab.validation import check_optuna_installed, check_stage_overrides

    try:  # before Hydra, whose messages would not name the valid keys or the missing extra
        check_stage_overrides(sys.argv[1:])
        check_optuna_installed(sys.argv[1:])
    except UserError as err:
        print(f"\ntransferlab: error: {err}", file=sys.stderr)
        sys.exit(2)
    _main()
    if FAILED_JOBS:
        print(
            f"\ntransferlab: {len(FAILED_JOBS)} sweep job(s) failed (see each job's manifest.json):\n  "
            + "\n  ".join(FAILED_JOBS),
            file=sys.stderr,
        )
        sys.exit(1)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
@_report_user_errors
def evaluate(cfg: DictConfig) -> dict:
    from transferlab import console
    from transferlab.evaluate import evaluate_checkpoint

    console.configure(verbose=bool(cfg.get("verbose") or HydraConfig.get().verbose))
    return evaluate_checkpoint(cfg)


if __name__ == "__main__":
    from transferlab.entry import run

    run(main)
