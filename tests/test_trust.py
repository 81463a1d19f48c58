"""Issue 8: results you can trust. A re-run never continues, skips or publishes a stage under another config;
the folder keeps which config produced what; the cache and run folders share no file; a cached stage keeps
its trainer's provenance; bad input around the run folder is one message; one diverging step fails the stage.
Each test runs the real CLI (real Hydra, real Trainer, real SIGKILL) on the tiny built-in data."""

import json
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli
from test_reliability import (  # noqa: F401  (helpers_on_path: autouse fixture)
    DETERMINISTIC,
    ONLY_SOURCE,
    STEPS,
    assert_user_error,
    helpers_on_path,
    kill_when_marked,
    manifest,
    save_module_checkpoint,
    transferlab,
)

from transferlab.analysis import sweep_report

CACHED_SOURCE = [*ONLY_SOURCE, "cache=true"]


def cache_entries(tmp_path: Path, stage: str = "source") -> list[Path]:
    return sorted(p for p in (tmp_path / "outputs" / "cache" / "stages").glob(f"{stage}-*") if p.is_dir())


def snapshot(root: Path, leave_out: str = "attempts") -> dict:
    """Every file under `root` and its bytes, but logs, the run lock's files (`.transferlab.*`: who holds the
    folder now) and `leave_out` (the record of attempts grows by design; a first attempt's `.hydra/` is new)."""
    return {
        p: p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and leave_out not in p.parts and p.suffix != ".log" and not p.name.startswith(".transferlab.")
    }


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


def test_cache_and_runs_share_no_file_and_a_reused_stage_keeps_its_provenance(tmp_path):
    """Items 7 and 8: the cache publishes and fetches by copy (its files read-only), so overwriting a run's
    checkpoint changes neither another run's nor the cache's; a reused stage names the cache entry and the run
    that trained it, and carries that run's provenance."""
    a, b = tmp_path / "a", tmp_path / "b"
    for run_dir in (a, b):
        transferlab(run_dir, *CACHED_SOURCE, check=True)
    [entry] = cache_entries(tmp_path)
    in_a, in_b, cached = a / "source/checkpoints/best.ckpt", b / "source/checkpoints/best.ckpt", entry / "best.ckpt"
    assert len({p.stat().st_ino for p in (in_a, in_b, cached)}) == 3
    assert stat.S_IMODE(cached.stat().st_mode) == 0o444
    before = {p: p.read_bytes() for p in (in_b, cached)}
    other = tmp_path / "other.ckpt"
    other.write_bytes(b"another file")
    subprocess.run(["cp", str(other), str(in_a)], check=True)
    assert in_a.read_bytes() == b"another file" and {p: p.read_bytes() for p in (in_b, cached)} == before

    trained, reused = manifest(a)["stages"]["source"], manifest(b)["stages"]["source"]
    assert not trained["cached"] and trained["trained_in"] is None
    assert reused["cached"] and reused["cached_from"] == str(entry.resolve()) and reused["trained_in"] == str(a)
    assert reused["provenance"] == trained["provenance"] != manifest(b)["provenance"]
    assert f"hydra.run.dir={a}" in reused["provenance"]["command"]


def bad_manifest(text: str):
    def setup(run_dir: Path, tmp_path: Path) -> list[str]:
        run_dir.mkdir(parents=True)
        (run_dir / "manifest.json").write_text(text)
        return []

    return setup


def a_file(run_dir: Path, tmp_path: Path) -> Path:
    (tmp_path / "file").write_text("a file, not a folder\n")
    return tmp_path / "file"


BAD_FOLDERS = {  # what is wrong: (set it up, returning overrides), the message
    "manifest.json not JSON": (bad_manifest("{stages: "), "is not a transferlab manifest (Expecting property name"),
    "empty manifest.json": (bad_manifest(""), "is not a transferlab manifest (Expecting value"),
    "manifest.json holding []": (bad_manifest("[]"), "(expected an object with a 'stages' object)"),
    "a stage record that is not one": (
        bad_manifest('{"stages": {"source": {"status": "finished"}}}'),
        "stage 'source' is not a stage record",
    ),
    "run folder is a file": (
        lambda r, t: [f"hydra.run.dir={a_file(r, t)}"],
        "The run folder (hydra.run.dir) {tmp}/file cannot be written to (File exists",
    ),
    "run folder under a file": (
        lambda r, t: [f"hydra.run.dir={a_file(r, t)}/run"],
        "The run folder (hydra.run.dir) {tmp}/file/run cannot be written to (Not a directory",
    ),
    "run folder where no file can be created": (
        lambda r, t: ["hydra.run.dir=/sys/transferlab-run"],
        "cannot be written to (Operation not permitted: /sys/transferlab-run)",
    ),
    "cache folder is a file": (
        lambda r, t: ["cache=true", f"paths.cache_dir={a_file(r, t)}"],
        "The stage cache folder (paths.cache_dir) {tmp}/file/stages cannot be written to",
    ),
    "cache folder where no file can be created": (
        lambda r, t: ["cache=true", "paths.cache_dir=/sys/transferlab"],
        "cannot be written to (Operation not permitted",
    ),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_bad_run_or_cache_folder_is_one_message_and_changes_nothing(tmp_path, case):
    setup, message = BAD_FOLDERS[case]
    run_dir = tmp_path / "run"
    overrides = setup(run_dir, tmp_path)
    before = snapshot(tmp_path, ".hydra")
    proc = run_cli("transferlab", *DETERMINISTIC, *ONLY_SOURCE, f"hydra.run.dir={run_dir}", *overrides, check=False)
    assert_user_error(proc, message.format(tmp=tmp_path))
    assert snapshot(tmp_path, ".hydra") == before and not (run_dir / "source").exists()


def test_a_given_checkpoint_is_checked_before_its_stage_is_done(tmp_path):
    """Item 6: a bad `stages.source.result_ckpt` (here one copied half-way) fails the stage instead of being marked
    done, so replacing the file is enough to go on."""
    given, run_dir = tmp_path / "given.ckpt", tmp_path / "run"
    whole = save_module_checkpoint(tmp_path / "real.ckpt", {"name": "convnet"}, 6)
    given.write_bytes(whole.read_bytes()[:5000])
    args = [
        "~stages.finetune",
        "~stages.scratch",
        "objective=pretrain/test/acc",
        f"stages.source.result_ckpt={given}",
        "trainer.max_epochs_per_stage=1",
    ]
    assert_user_error(transferlab(run_dir, *args), f"stages.source.result_ckpt: {given} is truncated or corrupt")
    assert manifest(run_dir)["stages"]["source"]["status"] == "failed" and not (run_dir / "pretrain").exists()
    shutil.copyfile(whole, given)
    transferlab(run_dir, *args, check=True)
    stages = manifest(run_dir)["stages"]
    assert stages["source"]["status"] == "done" and stages["source"]["given_ckpt"]
    assert stages["pretrain"]["status"] == "done"


def test_one_diverging_step_fails_the_stage(tmp_path):
    """Item 10: lr 1e6 with one batch per epoch never gives a NaN loss, but a test loss of ~1e20."""
    run_dir = tmp_path / "run"
    proc = transferlab(run_dir, "stages.finetune.optimizer.lr=1e6", "debug=fdr")
    assert_user_error(
        proc,
        "Stage 'finetune': the val loss is ",
        "over 1000 x ln(10) = 2303 (a uniform guess scores 2.30): training diverged",
        "Lower stages.finetune.optimizer.lr",
        f"delete {run_dir / 'finetune'}",
    )
    stages = manifest(run_dir)["stages"]
    assert stages["finetune"]["status"] == "failed" and "training diverged" in stages["finetune"]["reason"]
    assert "scratch" not in stages and not (run_dir / "results.json").exists()


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
