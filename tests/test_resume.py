"""Kill and resume: a run killed (SIGKILL) at any step, or while it writes a checkpoint, is resumed by the same
command to the same numbers, its finished stages skipped untouched; a re-run under another config, or over
checkpoints whose config the manifest does not record, is refused. Real CLI runs on the tiny built-in data."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.cli import assert_user_error, run_cli
from helpers.config import CACHED_SOURCE, DETERMINISTIC, ONLY_SOURCE, REPO
from helpers.run_folder import cache_entries, manifest, snapshot

from transferlab.analysis import sweep_report

pytestmark = pytest.mark.usefixtures("helpers_on_path")  # runs in other processes: this src, helpers.callbacks


# -- kill and resume -----------------------------------------------------------------------------------------
STEPS = {"source": 14, "pretrain": 5, "finetune": 5, "scratch": 5}  # optimizer steps per epoch of each tiny stage
EPOCHS = {"source": 2, "pretrain": 2, "finetune": 2, "scratch": 4}


def kill_when_marked(run_dir: Path, overrides: list[str], callback: str, **params) -> Path:
    """Start the CLI with test callback `helpers.callbacks.<callback>`, which writes a marker file and waits at a chosen
    point; SIGKILL the process as soon as the marker appears. Returns the marker (it says where it stopped)."""
    marker = run_dir.parent / f"marker-{run_dir.name}"
    injected = [
        f"+callbacks.kill._target_=helpers.callbacks.{callback}",
        f"+callbacks.kill.marker={marker}",
        *(f"+callbacks.kill.{k}={v}" for k, v in params.items()),
    ]
    args = [
        str(Path(sys.executable).parent / "transferlab"),
        *DETERMINISTIC,
        *overrides,
        *injected,
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, f"the run ended before {params}: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return marker


def resume(run_dir: Path, stage: str, overrides: list[str]) -> dict:
    """Re-run into the killed run's folder: finished stages are skipped untouched, `stage` resumes."""
    recorded = manifest(run_dir)["stages"] if (run_dir / "manifest.json").exists() else {}
    before = {name: s for name, s in recorded.items() if s["status"] == "done"}  # the killed one is "running"
    mtimes = {name: (run_dir / s["best_ckpt"]).stat().st_mtime_ns for name, s in before.items()}
    resumed = run_cli("transferlab", *DETERMINISTIC, *overrides, f"hydra.run.dir={run_dir}")
    log = resumed.stdout + resumed.stderr + (run_dir / "transferlab.log").read_text()
    assert f"Stage {stage}: resuming from {run_dir / stage / 'checkpoints' / 'last.ckpt'}" in log
    for name in before:
        assert f"Stage {name}: done in an earlier run, skipped" in log
        assert (run_dir / before[name]["best_ckpt"]).stat().st_mtime_ns == mtimes[name]
    assert not list(run_dir.rglob("*.tmp"))
    return manifest(run_dir)["stages"]


def assert_same_results(expected: dict, got: dict, where: str) -> None:
    assert list(got) == list(expected)
    for name in expected:
        assert got[name]["status"] == "done"
        assert got[name]["test"] == expected[name]["test"], f"{name} differs after a kill at {where}"
        assert got[name]["best_val"] == expected[name]["best_val"], f"{name} differs after a kill at {where}"


@pytest.fixture(scope="module")
def source_reference(tmp_path_factory) -> dict:
    """An uninterrupted deterministic one-stage run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_cli("transferlab", *DETERMINISTIC, *ONLY_SOURCE, f"hydra.run.dir={run_dir}")
    return manifest(run_dir)["stages"]


def test_killed_stage_resumes_from_last_ckpt_with_identical_metrics(tmp_path, source_reference):
    """SIGKILL at a random step after the first checkpoint; the re-run resumes and ends with the same numbers."""
    step = random.randrange(STEPS["source"] + 1, STEPS["source"] * EPOCHS["source"] + 1)
    kill_when_marked(tmp_path / "run", ONLY_SOURCE, "MarkAndWaitAtStep", stage="source", step=step)
    assert_same_results(source_reference, resume(tmp_path / "run", "source", ONLY_SOURCE), f"step {step}")


def test_kill_while_writing_a_checkpoint_leaves_the_previous_one_whole(tmp_path, source_reference):
    """SIGKILL half-way through writing the epoch-1 checkpoint: last.ckpt is still epoch 0's, whole; the
    partial file is a `.tmp` that nothing loads; the re-run resumes from epoch 0 to the same numbers."""
    run_dir = tmp_path / "run"
    marker = kill_when_marked(run_dir, ONLY_SOURCE, "MarkAndWaitInCheckpointWrite", stage="source", epoch=1)
    partial = Path(marker.read_text())
    assert partial.suffix == ".tmp" and partial.stat().st_size > 0
    last = torch.load(run_dir / "source" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0
    assert_same_results(source_reference, resume(run_dir, "source", ONLY_SOURCE), "a checkpoint write")


@pytest.fixture(scope="module")
def pipeline_reference(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_cli("transferlab", *DETERMINISTIC, "recipe=sgd_momentum", f"hydra.run.dir={run_dir}")
    return manifest(run_dir)["stages"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "finetune", "scratch"])
def test_killed_pipeline_resumes_and_skips_finished_stages(tmp_path, pipeline_reference, stage):
    """The whole pipeline, with momentum and a cosine schedule (optimizer and scheduler state must resume too)."""
    step = random.randrange(STEPS[stage] + 1, STEPS[stage] * EPOCHS[stage] + 1)
    overrides = ["recipe=sgd_momentum"]
    kill_when_marked(tmp_path / "run", overrides, "MarkAndWaitAtStep", stage=stage, step=step)
    assert_same_results(pipeline_reference, resume(tmp_path / "run", stage, overrides), f"{stage} step {step}")


# -- a re-run checks the config of what it would skip or resume ----------------------------------------------
def killed_during_source(run_dir: Path) -> str:
    kill_when_marked(run_dir, CACHED_SOURCE, "MarkAndWaitAtStep", stage="source", step=STEPS["source"] + 2)
    return "was partly trained (status running)"


def source_done(run_dir: Path) -> str:
    run_cli("transferlab", *DETERMINISTIC, *CACHED_SOURCE, f"hydra.run.dir={run_dir}")
    return "was run"


@pytest.mark.parametrize("leave", [killed_during_source, source_done])
def test_rerun_under_another_config_is_refused_and_the_folder_keeps_its_config(tmp_path, leave):
    """Items 1 and 6: a stage, done or partly trained, is checked against its config hash before it is skipped
    or resumed; the refusal names the changed key with both values, changes nothing (the top-level .hydra/
    config is the one that trained), publishes nothing, and keeps the refused attempt's config aside."""
    run_dir = tmp_path / "sweep" / "0"
    how = leave(run_dir)
    published, before = cache_entries(tmp_path), snapshot(run_dir)
    proc = run_cli(
        "transferlab",
        *DETERMINISTIC,
        *CACHED_SOURCE,
        "stages.source.optimizer.lr=0.5",
        f"hydra.run.dir={run_dir}",
        check=False,
    )
    assert_user_error(
        proc,
        f"Stage 'source' in {run_dir} {how} with another configuration; changed: "
        "stages.source.optimizer.lr: 0.01 -> 0.5.",
        "use a new run folder (hydra.run.dir=...)",
        f"delete {run_dir / 'source'} and its entry in manifest.json",
    )
    assert snapshot(run_dir) == before and cache_entries(tmp_path) == published
    refused = run_dir / ".hydra" / "attempts" / "2"
    assert "stages.source.optimizer.lr=0.5" in (refused / "overrides.yaml").read_text()
    assert json.loads((refused / "outcome.json").read_text())["outcome"] == "refused (trained nothing)"
    [row] = sweep_report.collect(run_dir.parent)  # transferlab-report reads the config that trained the folder
    assert "stages.source.optimizer.lr" not in row["overrides"]

    if leave is killed_during_source:  # nothing was published; resumed under its own config, it is
        assert published == []
        run_cli("transferlab", *DETERMINISTIC, *CACHED_SOURCE, f"hydra.run.dir={run_dir}")
        record = manifest(run_dir)["stages"]["source"]
        assert record["status"] == "done" and record["attempts"] == [1, 3]  # trained by attempts 1 and 3
        assert [p.name for p in cache_entries(tmp_path)] == [f"source-{record['config_hash']}"]
    else:
        report = run_cli("transferlab-report", str(run_dir.parent))
        assert f"| 0 | done | {row['objective']:.4f} |" in report.stdout


def test_a_last_checkpoint_without_a_record_of_its_config_is_not_resumed(tiny_cfg):
    """Item 1: checkpoints whose config the manifest does not name (its entry was deleted, the folder kept)
    could have been trained under other values: refused, not resumed."""
    from transferlab.core.errors import UserError
    from transferlab.run.pipeline import run

    cfg = tiny_cfg(*ONLY_SOURCE, "trainer.max_epochs_per_stage=1")
    run(cfg)
    path = Path(cfg.paths.run_dir) / "manifest.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"stages": {}}))
    with pytest.raises(UserError, match="last.ckpt has no record in manifest.json of the config that trained it"):
        run(tiny_cfg(*ONLY_SOURCE, "trainer.max_epochs_per_stage=1", "stages.source.optimizer.lr=0.5"))
