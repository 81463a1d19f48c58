"""The console scripts run as a user runs them (real processes, the same interpreter) or, for the many cases of a
message, their entry points in this process; and what a refused run must print."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.config import REPO, SOURCE_ONLY, TESTS, TINY

# The environment of the runs started by start_and_wait and cli: this worktree's package and the test callbacks
# (helpers.callbacks) importable, Hydra's short error reports.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")])}
ENV.pop("HYDRA_FULL_ERROR", None)


def run_cli(
    *args: str, cwd: Path | None = None, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run a console script as a user would (same interpreter, real process); `env`: variables to set for it."""
    script = Path(sys.executable).parent / args[0]
    proc = subprocess.run(
        [str(script), *args[1:]],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=900,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
        )
    return proc


def transferlab(run_dir: Path, *overrides: str, check: bool = False) -> subprocess.CompletedProcess:
    """The CLI with the tiny sizes, less those of a data group that `overrides` replace (data/source=...)."""
    replaced = [o.split("=")[0].replace("/", ".") + "." for o in overrides if o.startswith("data/")]
    tiny = [o for o in TINY if not any(o.startswith(prefix) for prefix in replaced)]
    return run_cli("transferlab", *tiny, *overrides, f"hydra.run.dir={run_dir}", check=check)


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> str:
    """Exit code, one `transferlab: error:` paragraph naming the problem, and no traceback."""
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    message = proc.stderr.split("transferlab: error: ", 1)[1].strip() if code == 2 else proc.stderr
    for fragment in fragments:
        assert fragment in message, message
    if os.environ.get("TRANSFERLAB_MESSAGES"):  # collects the real messages for docs/reliability.md
        with open(os.environ["TRANSFERLAB_MESSAGES"], "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}\t{proc.returncode}\t{message}\n")
    return message


def in_process(entry, capsys, monkeypatch, args: list[str]) -> subprocess.CompletedProcess:
    """A console script's entry point (`cli.main` or `eval_command.main`: the Hydra app and its error reporting) run in
    this process: the same code as the installed script, without its seconds of start-up for each of the cases."""
    monkeypatch.setattr(sys, "argv", [entry.__name__, *args])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as stopped:
        entry()
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, stopped.value.code, out.out, out.err)


def start_and_wait(
    run_dir: Path, step: int = 20, extra: list[str] = (), base: list[str] = SOURCE_ONLY
) -> subprocess.Popen:
    """Start the CLI (source stage only) and return once it waits at global step `step` of the source stage (14
    steps an epoch: step 20 is in epoch 1, after epoch 0's last.ckpt)."""
    marker = run_dir.parent / f"marker-{run_dir.name}-{time.time_ns()}"
    args = [
        str(Path(sys.executable).parent / "transferlab"),
        *base,
        *extra,
        f"hydra.run.dir={run_dir}",
        "+callbacks.wait._target_=helpers.callbacks.MarkAndWaitAtStep",
        "+callbacks.wait.stage=source",
        f"+callbacks.wait.step={step}",
        f"+callbacks.wait.marker={marker}",
    ]
    proc = start_as_shell_job(args)
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, f"the run ended before step {step}: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline
        time.sleep(0.05)
    return proc


def start_as_shell_job(args: list[str], env: dict | None = None) -> subprocess.Popen:
    """A command in its own process group, as a shell job: Ctrl-C (SIGINT to the group) can be sent."""
    return subprocess.Popen(
        args,
        cwd=REPO,
        env=env or ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # as from an interactive shell: pytest started in the background by a script inherits SIGINT ignored
        # (POSIX), and a run started with SIGINT ignored rightly keeps ignoring it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A console script in its own process, with ENV (or `env`) as its whole environment; never raises on its exit."""
    script = Path(sys.executable).parent / args[0]
    return subprocess.run(
        [str(script), *args[1:]], capture_output=True, text=True, cwd=REPO, env=env or ENV, timeout=600
    )


def error_line(proc: subprocess.CompletedProcess, code: int) -> str:
    """The one `transferlab: ...` line of a run that exited `code`, without a traceback."""
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("transferlab: ")]
    if os.environ.get("TRANSFERLAB_MESSAGES"):  # collects the real messages for docs/reliability.md
        with open(os.environ["TRANSFERLAB_MESSAGES"], "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}\t{code}\t{line}\n")
    return line
