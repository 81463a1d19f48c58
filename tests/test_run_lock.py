"""One writer per run folder: a second run into a folder that a live run holds is refused before it trains or
writes anything, also when the lock file was deleted; a killed holder, or a live PID that is not the holder,
does not block. Two real processes on one run folder."""

import json
import socket
import subprocess
import time

from helpers.cli import cli, error_line, start_and_wait
from helpers.config import SOURCE_ONLY
from helpers.run_folder import stages


def test_second_run_into_a_folder_in_use_is_refused_and_a_killed_holder_does_not_block(tmp_path):
    run_dir = tmp_path / "run"
    holder = start_and_wait(run_dir)
    try:
        started = time.time()
        config = (run_dir / ".hydra" / "config.yaml").read_text()
        second = cli("transferlab", *SOURCE_ONLY, "stages.source.optimizer.lr=0.05", f"hydra.run.dir={run_dir}")
        line = error_line(second, 2)
        assert f"{run_dir} is in use by another transferlab run (host {socket.gethostname()}, PID {holder.pid}," in line
        assert "wait for it to end (or stop it), or run into another folder (hydra.run.dir=...)" in line
        assert time.time() - started < 60 and "Stage source" not in second.stdout + second.stderr  # trained nothing
        assert holder.poll() is None and stages(run_dir)["source"]["status"] == "running"  # the holder's record
        assert stages(run_dir)["source"]["attempts"] == [1]  # the refused run began no attempt
        assert (run_dir / ".hydra" / "config.yaml").read_text() == config  # the folder shows the holder's config
    finally:
        holder.kill()  # SIGKILL: the lock it held, and its owner file, stay behind
        holder.communicate()
    assert json.loads((run_dir / ".transferlab.owner.json").read_text())["pid"] == holder.pid
    after = cli("transferlab", *SOURCE_ONLY, f"hydra.run.dir={run_dir}")
    assert after.returncode == 0, after.stderr[-3000:]
    assert "resuming from" in after.stdout + after.stderr and stages(run_dir)["source"]["status"] == "done"


def test_deleting_the_lock_file_of_a_running_run_does_not_let_a_second_one_in(tmp_path):
    """`rm .transferlab.lock` (by hand, a clean-up script) while a run holds it: a second run took a new lock file
    and trained into the same folder, both exiting 0. The owner file names the live holder: refused."""
    run_dir = tmp_path / "run"
    holder = start_and_wait(run_dir)
    try:
        (run_dir / ".transferlab.lock").unlink()
        second = cli("transferlab", *SOURCE_ONLY, f"hydra.run.dir={run_dir}")
        line = error_line(second, 2)
        assert f"is in use by another transferlab run (host {socket.gethostname()}, PID {holder.pid}," in line
        assert "whose lock file .transferlab.lock was deleted while it runs" in line
        assert holder.poll() is None and stages(run_dir)["source"]["attempts"] == [1]
        assert json.loads((run_dir / ".transferlab.owner.json").read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.communicate()
    # a PID that is alive but is not the holder (the PID reused after a reboot, another program) does not block
    owner = run_dir / ".transferlab.owner.json"
    info = json.loads(owner.read_text())
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        owner.write_text(json.dumps({**info, "pid": sleeper.pid}))
        after = cli("transferlab", *SOURCE_ONLY, f"hydra.run.dir={run_dir}")
        assert after.returncode == 0, after.stderr[-3000:]
        assert stages(run_dir)["source"]["status"] == "done"
    finally:
        sleeper.kill()
        sleeper.wait()
