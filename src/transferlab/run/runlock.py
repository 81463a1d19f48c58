"""One writer per run folder: a second `transferlab` into a folder in use is refused at once, naming the host
and PID of the run that holds it.

The lock is a `filelock` lock (`fileio.lock`): the kernel releases it when its holder dies, so a run killed
with SIGKILL never blocks the next one. The holder's host, PID and command are in a small owner file next to
it, for the message. Only rank zero takes it: under DDP, Lightning's child processes and SLURM's tasks
re-execute the CLI into the same folder (their rank comes from RANK / LOCAL_RANK / SLURM_PROCID).
"""

import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from transferlab.core.console import global_rank
from transferlab.core.errors import UserError
from transferlab.core.fileio import Timeout, lock, read_json, write_json_atomic
from transferlab.run import attempts

LOCK, OWNER = ".transferlab.lock", ".transferlab.owner.json"


@contextmanager
def hold(run_dir: str | Path):
    """Hold `run_dir`'s lock (rank zero only) for the duration; refuse with a UserError when another run has it."""
    if global_rank() != 0:
        yield
        return
    run_dir = Path(run_dir)
    try:
        held = lock(run_dir / LOCK, timeout=0)
        held.acquire()
    except Timeout:
        attempts.restore_latest(run_dir)  # Hydra wrote this refused run's config over the holder's
        raise UserError(
            f"{run_dir} is in use by another transferlab run ({_describe(run_dir / OWNER)}). One run "
            "writes into a folder at a time: wait for it to end (or stop it), or run into another folder "
            "(hydra.run.dir=...)."
        ) from None
    owner = run_dir / OWNER
    if _live_owner(owner):  # its lock file was deleted (by hand, a clean-up script) while it runs
        held.release()
        attempts.restore_latest(run_dir)
        raise UserError(
            f"{run_dir} is in use by another transferlab run ({_describe(owner)}), whose lock file {LOCK} was "
            "deleted while it runs. One run writes into a folder at a time: wait for it to end (or stop it), or "
            "run into another folder (hydra.run.dir=...)."
        )
    try:
        write_json_atomic(
            owner,
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": _start_time(os.getpid()),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": sys.argv,
            },
        )
        yield
    finally:
        owner.unlink(missing_ok=True)
        held.release()


def _live_owner(owner: Path) -> bool:
    """Whether the owner file names another process of this host that is still running (the same PID and start
    time: a PID reused by another program is not the run). A holder on another host cannot be checked from here:
    there only the lock file protects the folder."""
    try:
        info = read_json(owner)
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict) or info.get("host") != socket.gethostname() or info.get("pid") == os.getpid():
        return False
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return info.get("started") is None or info.get("started") == _start_time(pid)


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat), or None where there is no /proc."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _describe(owner: Path) -> str:
    try:
        info = read_json(owner)
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict):
        return "its host and PID are not recorded yet"
    command = " ".join(info.get("command", []))
    return f"host {info.get('host')}, PID {info.get('pid')}, since {info.get('since')}: {command}"


def held(run_dir: str | Path) -> bool:
    """Whether a live run holds `run_dir`'s lock (for `transferlab-report`): tried without waiting, and without
    creating a lock file where no run ever started. A holder killed even with SIGKILL no longer holds it; a lock
    file that cannot be opened for writing (a read-only copy of the folder) is taken as not held."""
    path = Path(run_dir) / LOCK
    if not path.is_file():
        return False
    probe = lock(path, timeout=0)
    try:
        probe.acquire()
    except Timeout:
        return True
    except OSError:
        return False
    probe.release()
    return False
