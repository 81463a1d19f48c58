"""SIGTERM and SIGINT to a real run (`kill PID`, Ctrl-C; under DDP too): it stops with exit 143 or 130 and one
line, marks its stage interrupted, leaves no process behind, and the same command resumes it."""

import os
import signal
import subprocess
import time
from pathlib import Path

import torch
from helpers.cli import ENV, cli, error_line, start_and_wait
from helpers.config import SOURCE_ONLY, SOURCE_ONLY_DEFAULTS
from helpers.run_folder import stages


def test_sigterm_and_sigint_stop_with_143_and_130_mark_the_stage_interrupted_and_a_rerun_resumes(tmp_path):
    """SIGTERM mid-stage (Lightning alone exits 0 here), then SIGINT in the resumed run, then a run that finishes."""
    run_dir = tmp_path / "run"
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        proc = start_and_wait(run_dir)
        os.kill(proc.pid, sig)
        _, stderr = proc.communicate(timeout=120)
        line = error_line(subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr), code)
        assert line == (
            f"transferlab: stopped by {sig.name}: stage 'source' is marked interrupted in {run_dir}/"
            f"manifest.json. Re-run the same command into that folder (hydra.run.dir={run_dir}) to resume."
        )
        source = stages(run_dir)["source"]
        assert source["status"] == "interrupted" and source["reason"] == f"Interrupted: stopped by {sig.name}"
        assert source["last_ckpt"] == "source/checkpoints/last.ckpt"
        assert torch.load(run_dir / source["last_ckpt"], weights_only=True)["epoch"] == 0
        assert not (run_dir / ".transferlab.owner.json").exists()
    done = cli("transferlab", *SOURCE_ONLY, f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    last = run_dir / "source" / "checkpoints" / "last.ckpt"
    assert f"Stage source: resuming from {last}" in done.stdout + done.stderr
    source = stages(run_dir)["source"]
    assert source["status"] == "done" and source["epochs"] == 2 and source["test"]["acc"] > 0


def test_with_the_defaults_a_stopped_run_resumes_and_its_stage_reaches_the_cache_once_done(tmp_path):
    """The same stop and resume as a user runs it (progress bar on, stage cache on): SIGTERM in epoch 1, then a
    re-run that resumes from last.ckpt; the interrupted stage was not published, the finished one is."""
    run_dir, cache = tmp_path / "run", tmp_path / "outputs" / "cache" / "stages"
    proc = start_and_wait(run_dir, base=SOURCE_ONLY_DEFAULTS)
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert "stage 'source' is marked interrupted" in error_line(
        subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr), 143
    )
    assert not list(cache.glob("source-*/entry.json"))  # a partly trained stage is never published
    env = {**ENV, "TRANSFERLAB_OUTPUT_ROOT": str(tmp_path / "outputs")}
    done = cli("transferlab", *SOURCE_ONLY_DEFAULTS, f"hydra.run.dir={run_dir}", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout + done.stderr and "source 1/1 · epoch 2/2" in done.stdout
    source = stages(run_dir)["source"]
    assert source["status"] == "done" and source["epochs"] == 2 and source["attempts"] == [1, 2]
    assert len(list(cache.glob("source-*/entry.json"))) == 1


def test_signals_under_ddp_stop_every_rank_with_one_line_and_a_rerun_resumes(tmp_path):
    """A 2-process DDP run (gloo): SIGTERM to the launching process only (`kill PID`; rank 0 forwards it to rank
    1 through Lightning's launcher), then, in the resumed run, SIGINT to the whole process group (Ctrl-C in a
    terminal). Each time every rank stops, one line is printed (not one per rank), no process is left behind and
    the stage is `interrupted`; the same command then resumes and finishes under DDP."""
    run_dir, ddp = tmp_path / "run", ["trainer=ddp_cpu"]
    for sig, to_group in ((signal.SIGTERM, False), (signal.SIGINT, True)):
        proc = start_and_wait(run_dir, step=10, extra=ddp)  # each rank has half the batches: 7 steps an epoch
        children = child_pids(proc.pid)
        assert children, "DDP started no second process"
        os.killpg(proc.pid, sig) if to_group else os.kill(proc.pid, sig)
        _, stderr = proc.communicate(timeout=120)
        line = error_line(subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr), 128 + sig)
        assert line.startswith(f"transferlab: stopped by {sig.name}: stage 'source' is marked interrupted")
        deadline = time.time() + 30
        while any(Path(f"/proc/{pid}").exists() for pid in children) and time.time() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in children if Path(f"/proc/{pid}").exists()], "a DDP rank outlived the run"
        assert stages(run_dir)["source"]["status"] == "interrupted"
    done = cli("transferlab", *SOURCE_ONLY, *ddp, f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Stage source: resuming from" in done.stdout + done.stderr
    source = stages(run_dir)["source"]
    assert source["status"] == "done" and source["epochs"] == 2


def child_pids(pid: int) -> list[int]:
    """The processes `pid` started (from /proc: Linux, as the DDP launcher's children are)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found
