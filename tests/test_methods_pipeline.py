"""Fine-tuning methods through the real config and pipeline: option checks, the ready recipes end to end, L2-SP
across a resume, gradual unfreezing under DDP."""

import json
import os

import pytest
import torch
from helpers.cli import run_cli
from helpers.config import REPO, TINY, compose_config

from transferlab.config.validation import validate
from transferlab.core.errors import UserError
from transferlab.run.pipeline import run
from transferlab.train import methods
from transferlab.train.module import ClassifierModule
from transferlab.train.weights import load_checkpoint

CONVNET = {"name": "convnet"}


@pytest.mark.parametrize(
    "override,message",
    [
        ("stages.pretrain.train=head", "stages.pretrain.train was renamed stages.pretrain.trainable"),
        ("stages.pretrain.trainable=[layer4,head]", r"names no block of convnet \(layer4\).*conv1, conv2, fc, head"),
        ("stages.finetune.layer_decay=1.5", r"layer_decay=1.5: must be a number in \(0, 1\]"),
        ("stages.finetune.scheduler.warmup_epochs=2", "leaves no epoch after the warm-up"),
        ("+stages.finetune.optimizer.nesterov=true", "nesterov=true needs momentum > 0"),
        ("+stages.finetune.l2sp.gamma=1", r"give \{alpha, beta\} only"),
        ("stages.finetune.scheduler.interval=batch", "use epoch or step"),
    ],
)
def test_bad_method_options_are_named_before_training(tmp_path, override, message):
    cfg = compose_config(tmp_path / "run", [*TINY, override])
    with pytest.raises(UserError, match=message):
        validate(cfg)


@pytest.mark.slow
def test_gradual_unfreezing_under_ddp_keeps_the_ranks_in_step(tmp_path, monkeypatch):
    """Blocks unfrozen after DDP wrapped the model are all-reduced like the others: both ranks end equal."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "src"), str(REPO / "tests")]))  # for helpers
    only_source = ["~stages.pretrain", "~stages.finetune", "~stages.scratch", "objective=source/test/acc"]
    run_cli(
        "transferlab",
        *TINY,
        *only_source,
        "trainer=ddp_cpu",
        "stages.source.unfreeze_every=1",
        "stages.source.epochs=3",
        "+callbacks.weights._target_=helpers.callbacks.SaveRankWeights",
        f"hydra.run.dir={tmp_path}",
    )
    rank0, rank1 = (torch.load(tmp_path / "source" / f"weights_rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def test_strong_recipe_builds_its_optimizer_schedule_and_loss(tmp_path):
    cfg = compose_config(tmp_path / "run", [*TINY, "recipe=strong"])
    stage = cfg.stages.finetune
    module = ClassifierModule(
        model=CONVNET,
        num_classes=4,
        optimizer=dict(stage.optimizer),
        scheduler=dict(stage.scheduler),
        **methods.options(stage),
    )
    groups = module.configure_optimizers()["optimizer"].param_groups
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in groups)
    assert {g["name"]: g["weight_decay"] for g in groups} == {
        "conv1": 5e-4,
        "conv1/no_decay": 0,
        "conv2": 5e-4,
        "conv2/no_decay": 0,
        "fc": 5e-4,
        "fc/no_decay": 0,
        "head": 5e-4,
        "head/no_decay": 0,
    }
    assert module.hparams.label_smoothing == 0.1 and stage.scheduler.warmup_epochs == 1


@pytest.mark.slow
def test_l2sp_starting_point_survives_a_resume(tmp_path):
    """w0 is the stage's initialising weights, also after the stage is interrupted and resumed (it is saved in the
    checkpoint, which still loads weights-only)."""
    overrides = [*TINY, "recipe=l2sp", "~stages.scratch"]
    crash = [
        "+callbacks.crash._target_=helpers.callbacks.CrashAtEpoch",
        "+callbacks.crash.stage=finetune",
        "+callbacks.crash.epoch=1",
    ]
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(compose_config(tmp_path / "run", [*overrides, *crash]))
    run(compose_config(tmp_path / "run", overrides))
    pretrain = load_checkpoint(tmp_path / "run" / "pretrain" / "checkpoints" / "best.ckpt")["state_dict"]
    finetune = load_checkpoint(tmp_path / "run" / "finetune" / "checkpoints" / "last.ckpt")
    assert finetune["hyper_parameters"]["l2sp"] == {"alpha": 0.01, "beta": 0.01}
    assert all(torch.equal(w, pretrain[f"backbone.{n}"]) for n, w in finetune["l2sp_w0"].items())


@pytest.mark.slow
def test_each_ready_recipe_runs_end_to_end(tmp_path):
    """One multirun over the ready recipes; the lr monitor shows the discriminative groups, the loss terms log."""
    tiny = [o for o in TINY if o != "~callbacks.lr_monitor"]
    recipes = ["strong", "l2sp", "discriminative", "bss"]
    run_cli(
        "transferlab",
        "-m",
        f"recipe={','.join(recipes)}",
        *tiny,
        "~stages.scratch",
        "objective=finetune/test/acc",
        f"hydra.sweep.dir={tmp_path}/sweep",
    )
    for job, recipe in enumerate(recipes):
        folder = tmp_path / "sweep" / str(job)
        manifest = json.loads((folder / "manifest.json").read_text())
        assert [v["status"] for v in manifest["stages"].values()] == ["done"] * 3, recipe
        [csv] = (folder / "pretrain" / "csv").glob("version_*/metrics.csv")
        header = csv.read_text().splitlines()[0].split(",")
        assert {"l2sp": "train/l2sp" in header, "bss": "train/bss" in header}.get(recipe, True), (recipe, header)
        if recipe == "discriminative":
            assert {"lr-SGD/conv1", "lr-SGD/head"} <= set(header)


def test_adamw_runs_in_the_recipes_without_momentum_and_is_refused_up_front_in_those_with(tmp_path):
    """`optimizer.name=adamw` failed in every shipped recipe (the default stage's SGD `momentum: 0.0` reached
    AdamW) after the earlier stages had trained; now an SGD option that is off is left out for AdamW, and one that
    is set (sgd_momentum, strong) is refused before anything trains."""
    for recipe in ("mission", "lp_ft", "l2sp", "bss", "discriminative", "sgd_momentum", "strong"):
        cfg = compose_config(tmp_path / recipe, [*TINY, f"recipe={recipe}", "stages.finetune.optimizer.name=adamw"])
        if recipe in ("sgd_momentum", "strong"):
            with pytest.raises(UserError, match="stages.finetune.optimizer.name=adamw .AdamW. takes no momentum"):
                validate(cfg)
        else:
            validate(cfg)
    cfg = compose_config(
        tmp_path / "run",
        [
            *TINY,
            "~stages.scratch",
            "stages.finetune.optimizer.name=adamw",
            "+stages.finetune.optimizer.betas=[0.8,0.9]",
        ],
    )
    run(cfg)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["finetune"]["status"] == "done"
    states = load_checkpoint(tmp_path / "run" / "finetune" / "checkpoints" / "last.ckpt")["optimizer_states"]
    [group] = states[0]["param_groups"]
    assert group["betas"] == (0.8, 0.9) and "momentum" not in group  # AdamW, with the given betas
