"""Parallel sweep jobs on one machine: `transferlab -m hydra/launcher=joblib hydra.launcher.n_jobs=N ...`.

hydra-joblib-launcher runs the sweep's jobs in N loky worker processes (real processes, so Lightning, the signal
handlers and the run lock behave as in a run of their own). This module gives each running job a **slot**: GPU k
of the machine where the trainer uses GPUs (never two jobs on one GPU), else cores // N torch threads (and the
OpenMP/BLAS variables that data workers inherit), so N jobs do not oversubscribe the cores. It also refuses what
cannot work, before any job starts, and carries a failed job back to the process that launched the sweep.

Why a slot is a lock file, taken per job: a loky worker runs several jobs one after another, and they finish out
of order (a job whose stages are all cached ends in seconds), so neither the job number nor the worker says
which GPU is free. A job takes the first free `<sweep>/.transferlab-slot-<k>.lock` (k < N) and holds it until it
ends; the kernel releases it if the worker dies. At most N jobs run at once, so one is always free.

Why `trainer.devices=[k]` and not CUDA_VISIBLE_DEVICES: the variable is read once, when CUDA initialises in the
process, and the worker's earlier jobs have initialised it; a device index works in every job of the worker. The
job also calls `torch.cuda.set_device(k)`, so anything that touches CUDA before the Trainer (the precision check)
lands on its GPU. The stage hash counts one device as one device whatever its index (`run.plan`), so the shared
stages of the sweep are trained once, not once per GPU.
"""

import functools
import importlib.util
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

from transferlab.core.console import FILE_ONLY
from transferlab.core.errors import UserError, user_message
from transferlab.core.fileio import Timeout, lock
from transferlab.run.interrupt import SIGNALS, Interrupted

log = logging.getLogger(__name__)

PLUGIN = "hydra_plugins.hydra_joblib_launcher"
INSTALL = (  # a dependency of transferlab: missing only from an install older than hydra/launcher=joblib
    "pip install hydra-joblib-launcher (or reinstall transferlab: pip install -e . from a checkout)"
)
SLOT, FAILED = ".transferlab-slot-{}.lock", ".transferlab-failed-{}.txt"  # in the sweep folder
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
GPUS = ("gpu", "cuda")
_launched: list[Path] = []  # the joblib sweeps this process launched (their folders): it is the sweep's parent
_stopping: list[int] = []  # the signal that is stopping the sweep, once one has arrived
JOBS_STOP_S = 120  # how long a stopped sweep waits for its running jobs to mark their stages interrupted


def asked_for(overrides: list[str]) -> bool:
    return any(o.lstrip("+").split("=", 1) == ["hydra/launcher", "joblib"] for o in overrides)


def check_installed(overrides: list[str]) -> None:
    """Before Hydra: without the plugin, Hydra would fail when it instantiates the launcher, with a traceback."""
    if not asked_for(overrides):
        return
    try:
        installed = importlib.util.find_spec(PLUGIN) is not None
    except ImportError:  # not even the hydra_plugins namespace
        installed = False
    if not installed:
        raise UserError(
            f"hydra/launcher=joblib needs the hydra-joblib-launcher plugin, which is not installed: {INSTALL}."
        )


def cores() -> int:
    """The cores this process may run on (its affinity: a container's or taskset's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _uses_gpus(accelerator) -> bool:
    import torch

    return accelerator in GPUS or (accelerator == "auto" and torch.cuda.device_count() > 0)


def default_jobs(accelerator) -> int:
    """`hydra.launcher.n_jobs`'s default: one job per visible GPU with a GPU trainer, else two (each half the
    cores; more jobs on few cores only share them thinner)."""
    import torch

    if _uses_gpus(accelerator):
        return max(torch.cuda.device_count(), 1)
    return min(2, cores())


OmegaConf.register_new_resolver("parallel_jobs", default_jobs, replace=True)
# conf/hydra/launcher/joblib.yaml sets two keys of the plugin's `joblib` launcher config, which Hydra then validates
# against the plugin's schema of that name, as intended; Hydra calls that deprecated on every composition (here and
# in each worker), though 1.3 still does it. Only this one warning is silenced.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/joblib' is validated against ConfigStore schema")


class CheckParallelSweep(Callback):
    """In the process that launches a joblib sweep (conf/hydra/default.yaml), before any job: refuse what cannot
    run (one message, exit 2, nothing written: it runs before the output-folder check creates the sweep folder),
    and remember the sweep folder for `finish`. Other launchers: nothing."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if PLUGIN not in str(config.hydra.launcher.get("_target_")):
            return
        try:
            check(config)
        except UserError as err:
            print(f"\ntransferlab: error: {err}", file=sys.stderr)
            sys.exit(2)
        sweep = Path(config.hydra.sweep.dir)
        for stale in sweep.glob(FAILED.format("*")):  # an earlier sweep into this folder
            stale.unlink(missing_ok=True)
        _launched.append(sweep)
        _stopping.clear()
        for signum in SIGNALS:
            signal.signal(signum, _stop_sweep)


def _stop_sweep(signum: int, frame) -> None:
    """SIGINT or SIGTERM in the process that launched a joblib sweep. Ctrl-C reaches the workers too, but a
    `kill` of this process (a scheduler's) reaches only it: the signal is passed on to every worker. Then wait
    until the running jobs have marked their stages interrupted and let go of their slots, and only then stop the
    sweep: joblib's abort kills its workers, and a job killed before it wrote its manifest would be left
    `running`. The jobs not started are not run; the same command resumes the sweep (`commands.main`)."""
    if _stopping:  # a second signal: the first is being handled (SIGKILL still ends the process)
        return
    _stopping.append(signum)
    executor = getattr(sys.modules.get("joblib.externals.loky.reusable_executor"), "_executor", None)
    workers = list(getattr(executor, "_processes", None) or {})
    if not workers:  # n_jobs=1: joblib runs the job in this process, which stops it as any run
        raise Interrupted(signum)
    for pid in workers:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + JOBS_STOP_S
    for sweep in _launched:
        for slot in sweep.glob(SLOT.format("*")):
            held = lock(slot, timeout=max(0.0, deadline - time.monotonic()))
            try:
                held.acquire()
                held.release()
            except Timeout:
                log.warning("A job of the sweep still held %s after %d s; stopping it anyway.", slot, JOBS_STOP_S)
    raise Interrupted(signum)


def stopped_message(stop: Interrupted) -> str:
    """The line of a joblib sweep stopped by a signal (`_stop_sweep`)."""
    sweeps = ", ".join(str(sweep) for sweep in _launched)
    return (
        f"{stop}: the sweep in {sweeps} is stopped; its running jobs marked their stages interrupted (each job's "
        f"manifest.json). Re-run the same command (hydra.sweep.dir={sweeps}) to resume: finished stages are "
        "reused and interrupted ones resume from their last checkpoint."
    )


def check(config: DictConfig) -> None:
    """n_jobs a whole number >= 1; one device per job and no DDP; with GPUs, one GPU per job."""
    import torch

    n_jobs, trainer = config.hydra.launcher.n_jobs, config.trainer
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs < 1:
        raise UserError(
            f"hydra.launcher.n_jobs={n_jobs!r}: give the number of jobs to run at once, a whole number of 1 or more "
            f"(default: one per visible GPU with trainer=gpu, else {min(2, cores())})."
        )
    strategy, devices = str(trainer.get("strategy", "auto")), trainer.get("devices", 1)
    if any(name in strategy for name in ("ddp", "fsdp", "deepspeed")) or _device_count(devices) != 1:
        raise UserError(
            f"trainer.strategy={strategy}, trainer.devices={devices}: a joblib job runs on one device (more than "
            "one is DDP). DDP cannot run inside a joblib job: Lightning starts DDP's other ranks by running the "
            "command line again, which for a joblib job is the whole sweep (its rank 1 launches the sweep anew and "
            "the job hangs). Use "
            "trainer=gpu or trainer=cpu (one device per job, the launcher gives each its own GPU), or run DDP jobs "
            "one at a time with the basic launcher (drop hydra/launcher=joblib) or on SLURM (hydra/launcher=slurm)."
        )
    if _uses_gpus(trainer.get("accelerator")) and n_jobs > torch.cuda.device_count():
        raise UserError(
            f"hydra.launcher.n_jobs={n_jobs} runs {n_jobs} jobs at once, each on a GPU of its own, but this machine "
            f"has {torch.cuda.device_count()} visible GPU(s) (torch.cuda.device_count(); CUDA_VISIBLE_DEVICES limits "
            f"it): set hydra.launcher.n_jobs to at most {torch.cuda.device_count()}, or use trainer=cpu."
        )
    if not _uses_gpus(trainer.get("accelerator")) and n_jobs > cores():
        log.warning(
            "hydra.launcher.n_jobs=%d on %d cores: each job gets 1 thread and the jobs share the cores.",
            n_jobs,
            cores(),
        )


def _device_count(devices) -> int | None:
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices)
    if isinstance(devices, str) and devices.lstrip("-").isdigit():
        devices = int(devices)
    return devices if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0 else None


def in_a_slot(task: Callable[[DictConfig], float]) -> Callable[[DictConfig], float]:
    """`task` (the run of one config) inside `job_slot`."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> float:
        with job_slot(cfg):
            return task(cfg)

    return wrapped


def _joblib_job() -> bool:
    if not HydraConfig.initialized():
        return False
    hydra = HydraConfig.get()
    return hydra.mode == RunMode.MULTIRUN and PLUGIN in str(hydra.launcher.get("_target_"))


@contextmanager
def job_slot(cfg: DictConfig) -> Iterator[int | None]:
    """A joblib sweep job holds a slot for its lifetime: its GPU (`trainer.devices=[slot]`), or its share of the
    cores as torch threads. A job that fails in a worker leaves a line in the sweep folder for `finish` (the
    worker's FAILED_JOBS is not the launching process's). Outside a joblib sweep: nothing."""
    if not _joblib_job():
        yield None
        return
    import torch

    hydra = HydraConfig.get()
    sweep, number, n_jobs = Path(hydra.sweep.dir), hydra.job.num, int(hydra.launcher.n_jobs)
    failed = sweep / FAILED.format(number)
    failed.unlink(missing_ok=True)
    with _take_slot(sweep, n_jobs) as slot:
        threads = max(1, cores() // n_jobs)
        torch.set_num_threads(threads)
        os.environ.update({name: str(threads) for name in THREAD_VARIABLES})  # data workers, OpenMP, BLAS
        device = "CPU"
        if _uses_gpus(cfg.trainer.get("accelerator")):
            cfg.trainer.devices = [slot]
            torch.cuda.set_device(slot)
            device = f"GPU {slot} ({torch.cuda.get_device_name(slot)})"
        log.info(
            "Parallel sweep job %s: slot %d of %d (pid %d), %d torch thread(s) (%d cores // %d jobs), %s",
            *(number, slot, n_jobs, os.getpid(), threads, cores(), n_jobs, device),
        )
        try:
            yield slot
        except Exception as err:
            if not _launched:  # in a worker; in the launching process (n_jobs=1) FAILED_JOBS already has it
                failed.write_text(f"job {number} ({cfg.paths.run_dir}): {user_message(err)}")
            raise
        finally:
            if device != "CPU":
                torch.cuda.empty_cache()  # the next job of this worker may be on another GPU
            log.info("Parallel sweep job %s: slot %d released", number, slot, extra=FILE_ONLY)  # the log file only


@contextmanager
def _take_slot(sweep: Path, n_jobs: int) -> Iterator[int]:
    """The first free slot, held until the job ends; waits if all are held (another sweep into this folder)."""
    while True:
        for slot in range(n_jobs):
            held = lock(sweep / SLOT.format(slot), timeout=0)
            try:
                held.acquire()
            except Timeout:
                continue
            try:
                yield slot
            finally:
                held.release()
            return
        time.sleep(0.2)


def finish() -> list[str]:
    """In the process that launched joblib sweeps, once Hydra returns: stop loky's worker processes (its manager
    thread is not a daemon, and `commands.common.exit_now` would wait for it), and return the lines of the jobs
    that failed in them."""
    executors = sys.modules.get("joblib.externals.loky.reusable_executor")
    executor = getattr(executors, "_executor", None)
    if executor is not None:
        executor.shutdown(wait=True)
    lines = []
    for sweep in _launched:
        records = sorted(sweep.glob(FAILED.format("*")), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
        lines += [record.read_text() for record in records]
    _launched.clear()
    return lines
