"""What every console script shares: the config resolvers, one message (exit 2) for a user's mistake, and the fast
exit. `hydra_task` wraps each Hydra app (`transferlab`, `-eval`, `-rank`); `script` is what a console script runs.

A normal exit tears down every imported module: with torch and Lightning loaded that takes about a second after
`transferlab` has printed its last line, on every run and every DDP rank (docs/performance.md). `exit_now`
does what an exit must do (join the threads that are not daemons, run the atexit handlers: logging's flush,
Lightning's process-group teardown, multiprocessing's clean-up of workers; flush stdout and stderr) and then ends
the process with its exit status. The entry points themselves (`main.main`, ...) stay plain functions for callers
in a Python process, such as the tests.
"""

import atexit
import functools
import logging
import math
import os
import sys
import threading
from collections.abc import Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from transferlab import CONF_DIR
from transferlab.core.errors import UserError, user_message
from transferlab.core.fileio import disk_full
from transferlab.train.speed import resolve_channels_last, resolve_precision

log = logging.getLogger("transferlab")
OmegaConf.register_new_resolver("add", lambda *xs: sum(xs), replace=True)
OmegaConf.register_new_resolver("resolve_precision", resolve_precision, replace=True)  # precision=auto
OmegaConf.register_new_resolver("resolve_channels_last", resolve_channels_last, replace=True)  # channels_last=auto
FAILED_JOBS: list[str] = []  # sweep jobs of this process that failed with a UserError


def hydra_app(config_name: str, task: Callable[[DictConfig], object]) -> Callable[[], object]:
    """The Hydra app of a console script: `conf/<config_name>.yaml` composed with the command line, then `task(cfg)`
    under `hydra_task`."""
    return hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)(hydra_task(task))


def hydra_task(task):
    """Set up the console for the run or sweep job, then run `task(cfg)`; a UserError (or a config error, or a full
    disk) is one message and exit 2. In a local sweep, the job's manifest records the failure, the job returns NaN
    (or the worst value, to Optuna) and the sweep goes on; `transferlab` exits 1 at its end. A SLURM job (submitit)
    raises instead: its array runs to the end, then Hydra reports the failed job."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig):
        from transferlab.core import console  # these import Lightning: not at the CLI's import (--help)
        from transferlab.run.interrupt import Interrupted

        console.configure(verbose=bool(cfg.get("verbose") or HydraConfig.get().verbose))
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
            log.error("%s", err, extra=console.FILE_ONLY)  # the run's log file; the console gets the line below
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
    assert full is not None  # not a user or config error: a full disk (hydra_task re-raises the rest)
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
    from transferlab.core.console import global_rank

    folder = (  # a sweep's job resumes when the sweep is re-run into its folder
        f"hydra.sweep.dir={HydraConfig.get().sweep.dir}"
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
        else f"hydra.run.dir={run_dir}"
    )
    if global_rank() == 0:  # under DDP every rank stops (rank 0 forwards the signal): one line, not one each
        print(
            f"\ntransferlab: {stop}: {where}. Re-run the same command into that folder ({folder}) to resume.",
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


def exit_now(code: object = 0) -> None:
    """End the process as `sys.exit(code)` would, skipping only the teardown of imported modules."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # CPython's own exit runs these the same way, before the module teardown
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to say
            pass
    os._exit(status)


def script(entry: Callable[[], object]) -> None:
    """Run a console script's entry point and exit with its status (an exception still prints its traceback)."""
    try:
        entry()
    except SystemExit as stop:
        exit_now(stop.code)
    exit_now(0)
