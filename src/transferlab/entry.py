"""The console scripts (`transferlab`, `-eval`, `-report`, `-rank`): each runs its entry point, then exits without
Python's module teardown.

A normal exit tears down every imported module: with torch and Lightning loaded that took 1.25 s after
`transferlab` had printed its last line (0.5 s of it for torch alone), on every run and every DDP rank. `exit_now`
does what an exit must do (join the threads that are not daemons, run the atexit handlers: logging's flush,
Lightning's process-group teardown, multiprocessing's clean-up of workers; flush stdout and stderr) and then ends
the process with its exit status. The entry points themselves (`cli.main`, ...) stay plain functions for callers
in a Python process, such as the tests.
"""

import atexit
import os
import sys
import threading
from collections.abc import Callable


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


def run(entry: Callable[[], object]) -> None:
    """Run a console script's entry point and exit with its status (an exception still prints its traceback)."""
    try:
        entry()
    except SystemExit as stop:
        exit_now(stop.code)
    exit_now(0)


def transferlab() -> None:
    from transferlab.cli import main

    run(main)


def transferlab_eval() -> None:
    from transferlab.cli import evaluate

    run(evaluate)


def transferlab_report() -> None:
    from transferlab.sweep_report import main

    run(main)


def transferlab_rank() -> None:
    from transferlab.rank import main

    run(main)
