"""`transferlab`: compose the config, run the stages, print the results table, return the metric a sweeper
optimises. Thin on purpose: the run is `run.pipeline`."""

import math
import sys

from omegaconf import DictConfig

from transferlab.commands.common import FAILED_JOBS, hydra_app, script
from transferlab.core.errors import UserError
from transferlab.run import parallel
from transferlab.run.interrupt import Interrupted


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


def run_and_score(cfg: DictConfig) -> float:
    """The run of one composed config; its objective, for a sweeper."""
    from transferlab.config.validation import check_objective
    from transferlab.run import runlock
    from transferlab.run.interrupt import stop_on_signals
    from transferlab.run.pipeline import run
    from transferlab.run.slurm import check_slurm_tasks

    check_slurm_tasks(cfg.trainer)  # under SLURM: one task per device, or fail before training
    check_objective(cfg)  # the metric a sweeper gets must be one the stages will produce (the rest: in run)
    with stop_on_signals(), runlock.hold(cfg.paths.run_dir):  # SIGTERM/SIGINT stop; one writer per folder
        return objective(run(cfg), cfg.objective)


_main = hydra_app("config", parallel.in_a_slot(run_and_score))  # a joblib sweep job: its GPU or share of the cores


def main() -> None:
    """`transferlab`: a run, or a sweep (-m) that exits 1 when any of its jobs failed."""
    from transferlab.config.validation import check_optuna_installed, check_stage_overrides, check_trackers_installed

    try:  # before Hydra, whose messages would not name the valid keys or the missing extra
        check_stage_overrides(sys.argv[1:])
        check_optuna_installed(sys.argv[1:])
        check_trackers_installed(sys.argv[1:])  # logger=mlflow, logger=[csv,wandb], ...: their extras
        parallel.check_installed(sys.argv[1:])
    except UserError as err:
        print(f"\ntransferlab: error: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        _main()
    except Interrupted as stop:  # a joblib sweep stopped by a signal (raised in this process by run.parallel only)
        print(f"\ntransferlab: {parallel.stopped_message(stop)}", file=sys.stderr)
        sys.exit(stop.exit_code)
    finally:  # joblib sweeps: their worker processes stopped, the jobs that failed in them
        FAILED_JOBS.extend(parallel.finish())
    if FAILED_JOBS:
        print(
            f"\ntransferlab: {len(FAILED_JOBS)} sweep job(s) failed (see each job's manifest.json):\n  "
            + "\n  ".join(FAILED_JOBS),
            file=sys.stderr,
        )
        sys.exit(1)


def console_script() -> None:
    script(main)


if __name__ == "__main__":
    console_script()
