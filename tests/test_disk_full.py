"""A disk that fills up: real file systems (a small tmpfs mounted for the test) filled by a real file at a chosen
point of a real run. The run stops with one message saying what to free, keeps what it trained, and the same
command resumes once there is space; a full stage-cache folder costs the reuse, never the stage. And a full disk
simulated in a checkpoint write (half the bytes land, then ENOSPC): the stage fails with one message."""

import subprocess
from pathlib import Path

import pytest
from helpers.cli import assert_user_error, run_cli, transferlab
from helpers.config import REPO, TINY
from helpers.datasets import write_cifar10
from helpers.run_folder import stages

from transferlab.data.fingerprint import files_digest

ENV = {"PYTHONPATH": str(REPO / "tests")}  # the test callback helpers.callbacks.FillDiskAt
FILL = ["+callbacks.fill._target_=helpers.callbacks.FillDiskAt", "+callbacks.fill.stage=pretrain"]


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs of the given size (MiB) at tmp_path/<name>; unmounted at the end."""
    mounted = []

    def mount(name: str, size_mib: int) -> Path:
        where = tmp_path / name
        where.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(where)], capture_output=True
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def one_message(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out and "you tried to log" not in out, out[-3000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("transferlab: error: ")]
    return line


@pytest.mark.parametrize(
    "when, message",
    [
        # after the stage's last checkpoint: TensorBoard's writer failed first, with a misleading ValueError
        ("on_train_end", "is full (No space left on device). Free space on it"),
        ("on_train_epoch_start", "checkpoints/best.ckpt is full (No space left on device)"),  # epoch 1's checkpoint
    ],
)
def test_a_full_run_disk_stops_with_one_message_and_the_same_command_resumes(tmpfs, tmp_path, when, message):
    disk = tmpfs("disk", 24)
    run_dir = disk / "run"
    common = [*TINY, "~stages.scratch", f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}"]
    fill = [*FILL, f"+callbacks.fill.hook={when}", f"+callbacks.fill.epoch={2 if when == 'on_train_end' else 1}"]
    proc = run_cli("transferlab", *common, "logger=default", *fill, check=False, env=ENV)
    line = one_message(proc)
    assert message in line and f"hydra.run.dir={run_dir}" in line and "resume" in line, line
    recorded = stages(run_dir)
    assert recorded["source"]["status"] == "done"
    assert recorded["pretrain"]["status"] in ("running", "failed")  # whatever the full disk let it write
    kept = sorted(p.name for p in (run_dir / "pretrain" / "checkpoints").glob("*.ckpt"))
    assert kept == ["best.ckpt", "last.ckpt"], kept  # what it trained so far
    (run_dir / "filler").unlink()  # the user frees space, then runs the same command
    again = run_cli("transferlab", *common, "logger=default", env=ENV)
    assert "Stage source: done in an earlier run, skipped" in again.stdout + again.stderr
    assert "Stage pretrain: resuming from" in again.stdout + again.stderr
    assert [s["status"] for s in stages(run_dir).values()] == ["done"] * 3


def test_a_full_stage_cache_costs_the_reuse_not_the_stage(tmpfs, tmp_path):
    """A stage that trained and tested was marked failed with a raw OSError when its copy into the cache failed."""
    cache = tmpfs("cache", 1)  # a checkpoint of the ConvNet is 2.1 MB
    run_dir = tmp_path / "run"
    proc = run_cli(
        "transferlab",
        *[o for o in TINY if o != "cache=false"],
        "~stages.scratch",
        f"paths.cache_dir={cache}",
        f"hydra.run.dir={run_dir}",
    )
    assert [s["status"] for s in stages(run_dir).values()] == ["done"] * 3
    out = proc.stdout + proc.stderr
    assert "Stage source is done but could not be added to the stage cache (No space left on device" in out, out
    assert f"Free space in {cache / 'stages'}" in out and "Traceback" not in out
    assert not list((cache / "stages").glob("*/entry.json")) and not list((cache / "stages").glob(".*.tmp"))


@pytest.mark.parametrize("kind", ["full", "read-only"])
def test_a_data_cache_folder_that_cannot_be_written_costs_only_the_index(tmpfs, tmp_path, caplog, kind):
    """The fingerprint index (which data files were hashed already) lives in the data cache folder; a full or
    read-only one made every run stop with a traceback (or a 'cannot read <index>' message about the data)."""
    folder = write_cifar10(tmp_path / "cifar") / "cifar-10-batches-py"
    files = [folder / f"data_batch_{i}" for i in range(1, 6)]
    cache = tmpfs("cache", 1)
    if kind == "full":
        _fill(cache)
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(cache)], check=True)
    with caplog.at_level("WARNING"):
        digest = files_digest(files, cache / "data")
    assert digest == files_digest(files, None)  # the same content hash, without an index
    assert "Fingerprint index" in caplog.text and "Traceback" not in caplog.text


def _fill(folder: Path) -> None:
    try:
        with open(folder / "filler", "wb") as f:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
    except OSError:
        pass


@pytest.mark.usefixtures("helpers_on_path")  # its run imports helpers.callbacks
def test_full_disk_while_writing_a_checkpoint(after_source):
    run_dir, source_intact = after_source
    proc = transferlab(
        run_dir, "+callbacks.full._target_=helpers.callbacks.DiskFullInStage", "+callbacks.full.stage=pretrain"
    )
    folder = run_dir / "pretrain" / "checkpoints"
    assert_user_error(
        proc,
        f"The disk holding {folder}/",
        "is full (No space left on device). Free space on it",
        f"re-run the same command into the same folder (hydra.run.dir={run_dir})",
    )
    stages = source_intact()  # also: no partial *.tmp left
    assert stages["pretrain"]["status"] == "failed" and "No space left" in stages["pretrain"]["reason"]
    assert not list(folder.glob("*.ckpt"))
