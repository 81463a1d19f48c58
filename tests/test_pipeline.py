"""The pipeline end to end with real Trainers on tiny built-in data: outputs, init, freezing, resume, the transfer
gain; and the default pipeline as a user runs it (full size, slow): transfer must help."""

import json
from pathlib import Path

import pytest
import torch
from helpers.cli import run_cli
from helpers.config import TINY, compose_config

from transferlab.core.errors import UserError
from transferlab.run import results as report
from transferlab.run.manifest import StageRecord
from transferlab.run.pipeline import run
from transferlab.train.module import ClassifierModule
from transferlab.train.weights import init_from_checkpoint, load_checkpoint


def backbone_state(path) -> dict:
    return {k: v for k, v in load_checkpoint(path)["state_dict"].items() if k.startswith("backbone.")}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One tiny four-stage run, shared by the tests that only read its outputs."""
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    cfg = compose_config(run_dir, TINY)
    return run_dir, run(cfg)


def test_run_writes_manifest_results_and_stage_folders(finished_run):
    run_dir, results = finished_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert list(manifest["stages"]) == ["source", "pretrain", "finetune", "scratch"]
    for name, stage in manifest["stages"].items():
        assert stage["status"] == "done"
        assert (run_dir / stage["best_ckpt"]).is_file() and (run_dir / stage["last_ckpt"]).is_file()
        assert stage["best_ckpt"] == f"{name}/checkpoints/best.ckpt"
        assert (run_dir / name / "csv" / "version_0" / "metrics.csv").is_file()
        assert set(stage["test"]) >= {"acc", "acc_top5", "f1", "auroc", "loss"}
        assert 0 <= stage["test"]["acc"] <= 1
    assert manifest["stages"]["scratch"]["epochs"] == 4  # pretrain + finetune epochs
    assert manifest["stages"]["source"]["splits"]["test"] == 60  # source tested on its own held-out split
    flat = json.loads((run_dir / "results.json").read_text())
    assert flat == results["metrics"]
    assert flat["gain/acc"] == pytest.approx(flat["finetune/test/acc"] - flat["scratch/test/acc"])
    table = (run_dir / "results.md").read_text()
    assert "| finetune | target | pretrain |" in table and "Transfer gain" in table


def test_pretrain_starts_from_source_backbone_with_a_new_head(finished_run):
    run_dir, _ = finished_run
    source_best = run_dir / "source" / "checkpoints" / "best.ckpt"
    hparams = load_checkpoint(run_dir / "pretrain" / "checkpoints" / "best.ckpt")["hyper_parameters"]
    module = ClassifierModule(**hparams)
    init_from_checkpoint(module, source_best, new_head=True)
    for key, value in backbone_state(source_best).items():
        assert torch.equal(module.state_dict()[key], value), key
    assert module.head.out_features == 10 and hparams["num_classes"] == 10


def test_head_stage_keeps_the_source_backbone_exactly(tiny_cfg):
    """With trainable=head (linear probe), pretrain's best checkpoint must hold source's backbone unchanged:
    this proves both that pretrain was initialised from source's best and that freezing works."""
    cfg = tiny_cfg("recipe=lp_ft", "~stages.finetune", "~stages.scratch", "objective=pretrain/test/acc")
    run(cfg)
    run_dir = cfg.paths.run_dir
    source = backbone_state(f"{run_dir}/source/checkpoints/best.ckpt")
    probe = backbone_state(f"{run_dir}/pretrain/checkpoints/best.ckpt")
    assert source.keys() == probe.keys() and len(source) == 6
    assert all(torch.equal(source[k], probe[k]) for k in source)
    head = load_checkpoint(f"{run_dir}/pretrain/checkpoints/best.ckpt")["state_dict"]["head.weight"]
    assert head.shape == (10, 128)


def test_rerun_skips_done_stages_and_resumes_an_interrupted_one(tiny_cfg):
    crash = [
        "+callbacks.crash._target_=helpers.callbacks.CrashAtEpoch",
        "+callbacks.crash.stage=finetune",
        "+callbacks.crash.epoch=1",
    ]
    with pytest.raises(RuntimeError, match="simulated kill of finetune"):
        run(tiny_cfg(*crash))
    cfg = tiny_cfg()
    run_dir = Path(cfg.paths.run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [s for s, v in manifest["stages"].items() if v["status"] == "done"] == ["source", "pretrain"]
    last = run_dir / "finetune" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["epoch"] == 0  # the interrupted stage kept its first epoch
    source_ckpt = run_dir / "source" / "checkpoints" / "best.ckpt"
    source_mtime = source_ckpt.stat().st_mtime_ns

    run(cfg)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert all(v["status"] == "done" for v in manifest["stages"].values())
    assert source_ckpt.stat().st_mtime_ns == source_mtime  # not trained again
    assert manifest["stages"]["finetune"]["epochs"] == 2
    epochs = [validated_epochs(run_dir / "finetune" / "csv" / f"version_{v}" / "metrics.csv") for v in (0, 1)]
    assert epochs == [["0"], ["1"]]  # epoch 0 in the first attempt, epoch 1 after resuming: none trained twice


def validated_epochs(metrics_csv: Path) -> list[str]:
    rows = [row.split(",") for row in metrics_csv.read_text().splitlines()]
    epoch, val = rows[0].index("epoch"), rows[0].index("val/acc")
    return [row[epoch] for row in rows[1:] if row[val]]


def test_rerun_with_another_config_is_refused(finished_run):
    run_dir, _ = finished_run
    cfg = compose_config(run_dir, [*TINY, "stages.finetune.optimizer.lr=0.5"])
    with pytest.raises(UserError, match="Stage 'finetune' .* was run with another configuration"):
        run(cfg)


@pytest.mark.parametrize(
    "override,message",
    [
        ("stages.pretrain.init=finetune", "must name an earlier stage"),
        ("stages.source.task=extra", "has no such task"),
        ("stages.pretrain.init_head=maybe", "use 'new' or 'keep'"),
        ("data.target.val_fraction=0.0", "validation split is empty"),
        ("stages.finetune.init_head=new", None),  # valid: a fresh head on pretrain's backbone
    ],
)
def test_invalid_stage_settings_are_named(tiny_cfg, override, message):
    cfg = tiny_cfg(override, "~stages.scratch", "trainer.max_epochs_per_stage=1", "trainer.limit_train_batches=1")
    if message is None:
        assert "finetune/test/acc" in run(cfg)["metrics"]
    else:
        with pytest.raises(UserError, match=message):
            run(cfg)


def test_keep_head_with_another_class_count_is_refused(tiny_cfg):
    cfg = tiny_cfg(
        "stages.pretrain.init_head=keep", "~stages.finetune", "~stages.scratch", "trainer.max_epochs_per_stage=1"
    )
    with pytest.raises(UserError, match="head for another class count.*init_head=new"):
        run(cfg)


def test_checkpoint_of_another_architecture_names_the_keys(finished_run):
    run_dir, _ = finished_run
    resnet = ClassifierModule(
        model={"name": "resnet18", "small_input": True}, num_classes=10, optimizer={"name": "sgd", "lr": 0.1}
    )
    with pytest.raises(UserError) as err:
        init_from_checkpoint(resnet, run_dir / "finetune" / "checkpoints" / "best.ckpt", new_head=False)
    message = str(err.value)
    assert "backbone.conv1.weight" in message and "{'name': 'convnet'}" in message


def test_missing_checkpoint_is_named(tmp_path):
    module = ClassifierModule(model={"name": "convnet"}, num_classes=10, optimizer={"name": "sgd", "lr": 0.1})
    with pytest.raises(UserError, match="nothing.ckpt does not exist"):
        init_from_checkpoint(module, tmp_path / "nothing.ckpt", new_head=True)


def test_the_gain_compares_the_stages_named_in_the_config(finished_run, tmp_path):
    """`gain: {compare, baseline}` is config: re-run a copy of the finished run (every stage done, none trains)."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)
    flat = run(compose_config(run_dir, [*TINY, "gain.compare=pretrain"]))["metrics"]
    assert flat["gain/acc"] == pytest.approx(flat["pretrain/test/acc"] - flat["scratch/test/acc"])
    assert "**Transfer gain** (pretrain − scratch, test accuracy)" in (run_dir / "results.md").read_text()
    # a gain stage that is not in the run: the line says why it is missing (it was dropped without a word)
    flat = run(compose_config(run_dir, [*TINY, "gain.baseline=source"]))["metrics"]
    assert "gain/acc" in flat  # source was tested too (another task: the user's choice)
    run(compose_config(run_dir, [*TINY, "gain.baseline=extra"]))
    assert "No transfer gain: gain.baseline=extra is not a stage of this run" in (run_dir / "results.md").read_text()


def test_a_new_head_is_its_own_draw_not_a_replay_of_the_source_heads_init(tmp_path):
    """Seeded alike, source and pretrain built the same modules in the same order, so pretrain's "new" head
    repeated the source head's initial rows (the same fan-in): target class i started tied to source class i.
    Now it is drawn from its own stream (seed, stage name): unrelated to the source head, the same on a re-run."""
    only = ["~stages.finetune", "~stages.scratch", "objective=pretrain/test/acc"]
    heads = []
    for attempt in ("a", "b"):
        cfg = compose_config(
            tmp_path / attempt, [*TINY, *only, "+callbacks.head._target_=helpers.callbacks.SaveInitialHead"]
        )
        run(cfg)
        heads.append({s: torch.load(tmp_path / attempt / s / "initial_head.pt") for s in ("source", "pretrain")})
    source, pretrain = heads[0]["source"], heads[0]["pretrain"]  # 6 source classes, 10 target classes
    assert source.shape == (6, 128) and pretrain.shape == (10, 128)
    corr = torch.corrcoef(torch.stack([source.flatten(), pretrain[:6].flatten()]))[0, 1]
    assert abs(corr) < 0.1, f"pretrain's new head correlates {corr:.2f} with the source head's init"
    assert torch.equal(heads[1]["pretrain"], pretrain)  # deterministic: a re-run draws the same head


def test_the_gain_compares_the_configured_stages():
    stages = {
        name: StageRecord("done", best_ckpt=f"{name}/checkpoints/best.ckpt", test={"acc": acc})
        for name, acc in (("pretrain", 0.9), ("finetune", 0.8), ("scratch", 0.5))
    }
    assert report.summarise(stages, "finetune", "scratch")["metrics"]["gain/acc"] == pytest.approx(0.3)
    results = report.summarise(stages, compare="pretrain", baseline="scratch")
    assert results["metrics"]["gain/acc"] == pytest.approx(0.4)
    assert "**Transfer gain** (pretrain − scratch, test accuracy): **+40.00 points**" in report.table(results)
    assert "gain/acc" not in report.summarise(stages)["metrics"]  # gain=null


@pytest.mark.slow
def test_default_pipeline_shows_a_clear_transfer_gain(tmp_path):
    """`transferlab` with no overrides (the mission's recipe on the built-in data): transfer must help."""
    proc = run_cli("transferlab", f"hydra.run.dir={tmp_path}", "trainer.enable_progress_bar=false")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["source/test/acc"] > 0.9  # the source task is learnt
    assert results["gain/acc"] > 0.2, results  # finetune beats scratch by more than 20 points
    assert "Transfer gain" in proc.stdout
