"""DDP with real processes (trainer=ddp_cpu: 2 ranks, gloo on CPU) through the real CLI: one manifest holding
the metrics every rank saw and one console, with the defaults as shipped; the stages every rank takes from
the stage cache are the same."""

import json
import os

import pytest
from helpers.cli import run_cli
from helpers.config import ONE_EPOCH, REPO, SIZES


def test_ddp_two_processes_one_manifest_with_the_metrics_every_rank_saw_and_one_console(tmp_path):
    """The README's multi-GPU command as a user runs it (trainer=ddp_cpu: gloo on CPU), with the default console:
    rank 1's progress bar asked Lightning for the current eval dataloader's size, which only rank 0's bar sets, and
    the run died at the first validation (AssertionError on rank 1, gloo's connection reset on rank 0)."""
    tmp_path = tmp_path / "run"  # outputs/ (the stage cache) stays beside it
    proc = run_cli(
        "transferlab",
        *SIZES,
        "trainer=ddp_cpu",
        f"hydra.run.dir={tmp_path}",
        "+callbacks.record._target_=helpers.callbacks.RecordTestMetrics",
        env={"PYTHONPATH": f"{REPO / 'tests'}:{os.environ.get('PYTHONPATH', '')}"},
    )
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["manifest.json", "results.json"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())["stages"]
    assert list(manifest) == ["source", "pretrain", "finetune", "scratch"]
    for name, stage in manifest.items():
        seen = [json.loads((tmp_path / name / f"test_metrics_rank{r}.json").read_text()) for r in (0, 1)]
        assert seen[0] == seen[1], name  # torchmetrics synced across ranks
        for key, value in seen[0].items():
            assert stage["test"][key] == pytest.approx(value, abs=1e-6), (name, key)
    assert (tmp_path / "train_ddp_process_1.log").is_file()  # Lightning's rank-1 log, in the same folder
    console = proc.stdout + proc.stderr  # rank 0 speaks for both ranks: one header per stage, one banner
    for n, name in enumerate(manifest, 1):
        assert console.count(f"stage {n}/4 {name} ·") == 1, console
    for line in ("GPU available", "Initializing distributed", "distributed_backend", "Results ("):
        assert console.count(line) == 1, (line, console)
    for n, name in enumerate(manifest, 1):  # rank 0's bar, named after the stage; rank 1 draws none
        assert console.count(f"{name} {n}/4 · test") == 1, console
    assert not any(p.is_dir() and p.name not in manifest and p.name != ".hydra" for p in tmp_path.iterdir())


@pytest.mark.slow
def test_ddp_runs_reuse_cached_stages_on_every_rank(tmp_path):
    """Rank zero decides what comes from the cache and broadcasts it: both ranks skip the same stages."""
    common = [
        *(o for o in ONE_EPOCH if o != "cache=false"),
        "~stages.scratch",
        "trainer=ddp_cpu",
        f"paths.output_root={tmp_path}",
    ]
    run_cli("transferlab", *common, f"hydra.run.dir={tmp_path / 'a'}")
    run_cli("transferlab", *common, "stages.finetune.optimizer.lr=0.05", f"hydra.run.dir={tmp_path / 'b'}")
    stages = json.loads((tmp_path / "b" / "manifest.json").read_text())["stages"]
    assert [stages[s]["cached"] for s in ("source", "pretrain", "finetune")] == [True, True, False]
    assert not (tmp_path / "b" / "source" / "csv").exists() and (tmp_path / "b" / "finetune" / "csv").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, extra",
    [
        ("l2sp", []),
        ("fixmatch", ["data.target.samples_per_class=4", "stages.finetune.ema_decay=0.9"]),
    ],
)
def test_ddp_stages_with_added_loss_terms_under_the_default_console(tmp_path, recipe, extra):
    """A stage that logs a term of its loss (L2-SP's, FixMatch's) under DDP with the default console: the term was
    logged with sync_dist=True and reduced when rank 0's progress bar first read it at the epoch's end, a
    collective that rank 1 (no bar) never joined: `recipe=l2sp trainer=ddp_cpu` hung at pretrain's first epoch.
    FixMatch + EMA on top: each rank its own shard of the unlabeled images, the EMA the result on both ranks."""
    run_dir = tmp_path / "run"
    run_cli(
        "transferlab",
        *SIZES,
        f"recipe={recipe}",
        *extra,
        "~stages.scratch",
        "objective=finetune/test/acc",
        "trainer=ddp_cpu",
        f"hydra.run.dir={run_dir}",
        "+callbacks.record._target_=helpers.callbacks.RecordTestMetrics",
        env={"PYTHONPATH": f"{REPO / 'tests'}:{os.environ.get('PYTHONPATH', '')}"},
    )
    finetune = json.loads((run_dir / "manifest.json").read_text())["stages"]["finetune"]
    assert finetune["status"] == "done"
    seen = [json.loads((run_dir / "finetune" / f"test_metrics_rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] == seen[1]
    assert finetune["test"]["acc"] == pytest.approx(seen[0]["acc"], abs=1e-6)
    term = "train/l2sp" if recipe == "l2sp" else "train/unlabeled_loss"
    assert term in (run_dir / "finetune" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    if recipe == "fixmatch":
        assert finetune["data"]["unlabeled"]["images"] == 40
