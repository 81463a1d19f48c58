"""SIGTERM and SIGINT stop a run as a failure that a scheduler or a `transferlab && next` chain can see: the
stage in progress is marked `interrupted` in the manifest, the CLI prints one line and exits 128 + the signal
number (143, 130); a re-run into the same folder resumes the stage from its last checkpoint.

Without this, Lightning turns SIGTERM into a flag that ends `fit` at the next batch with `SystemExit()` (exit
0, one INFO line) and Ctrl-C into `sys.exit(1)`, and the manifest says nothing of the stage.
"""

import signal
import threading
from contextlib import contextmanager

from lightning.pytorch.utilities.exceptions import SIGTERMException

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """Raised in the main thread by SIGTERM or SIGINT. A BaseException like KeyboardInterrupt, so that no
    `except Exception` swallows it, but not a KeyboardInterrupt, which Lightning turns into `sys.exit(1)`."""

    def __init__(self, signum: int):
        self.signum = signum
        self.stage: str | None = None  # the stage it stopped (`outcome` sets it)
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


# What stops a stage from outside: our signal, Lightning's SIGTERM flag (when another handler owns SIGTERM, e.g.
# submitit's), or Ctrl-C where our handler is not installed (the pipeline used as a library).
INTERRUPTIONS = (Interrupted, SIGTERMException, KeyboardInterrupt)


_received: list[int] = []


def _raise(signum, frame):
    if _received:  # a second signal must not cut the shutdown short (the manifest write); SIGKILL still ends it
        return
    _received.append(signum)
    raise Interrupted(signum)


@contextmanager
def stop_on_signals():
    """Within: SIGTERM and SIGINT raise `Interrupted`. A handler set by someone else is left alone: under
    submitit (hydra/launcher=slurm), SIGTERM and SIGUSR2 are its own, to requeue a preempted or timed-out job.
    Lightning's Trainer calls the SIGTERM handler it finds after its own, so this one works inside `fit` too."""
    previous = {}
    _received.clear()
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            current = signal.getsignal(s)
            if current in (signal.SIG_DFL, signal.default_int_handler):
                previous[s] = current
                signal.signal(s, _raise)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def outcome(err: BaseException, stage: str) -> str:
    """The manifest status of a stage that raised `err`: `interrupted` (the stage is noted on the exception, for
    the CLI's message) or `failed`."""
    if isinstance(err, INTERRUPTIONS):
        if isinstance(err, Interrupted) and err.stage is None:
            err.stage = stage
        return "interrupted"
    return "failed"
