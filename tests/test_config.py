"""The real config tree composes for every option of every group, and bad choices fail clearly; the configs
compose instead of copying: the composed recipes equal the explicit ones they replace, a stage is the default stage
plus what differs, the data pairs share their settings, the presets compose."""

from pathlib import Path

import pytest
from helpers.cli import run_cli
from helpers.config import STAGE_KEYS, compose_config
from omegaconf import OmegaConf

from transferlab import CONF_DIR
from transferlab.config import validation
from transferlab.train import methods

GROUPS = ["data", "model", "recipe", "trainer", "logger", "callbacks", "paths", "experiment", "debug"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_resolves(tmp_path, group, option):
    cfg = compose_config(tmp_path, [f"{group}={option}"])
    plain = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert "source" in plain["stages"] and plain["objective"].split("/")[0] in plain["stages"]
    if group != "recipe" or option not in ("source_only", "dann", "mcc", "self_training"):  # the source -> target chain
        assert set(plain["stages"]) >= {"source", "pretrain", "finetune"}
    assert plain["trainer"]["_target_"] == "lightning.pytorch.Trainer"
    for task in ("source", "target"):
        assert plain["data"][task]["_target_"].startswith("transferlab.data.")


def test_mission_recipe_is_the_default():
    cfg = compose_config(Path("/tmp/unused"))
    stages = cfg.stages
    assert list(stages) == ["source", "pretrain", "finetune", "scratch"]
    assert [stages[s].optimizer.name for s in stages] == ["sgd"] * 4
    assert [stages[s].optimizer.lr for s in ("source", "pretrain", "finetune")] == [0.01, 0.01, 0.001]
    assert [stages[s].epochs for s in ("source", "pretrain", "finetune")] == [10, 10, 10]
    assert stages.scratch.epochs == 20 and stages.scratch.init is None  # same target budget as pretrain + finetune
    assert (stages.pretrain.init, stages.pretrain.init_head) == ("source", "new")
    assert (stages.finetune.init, stages.finetune.init_head) == ("pretrain", "keep")
    assert cfg.model.name == "convnet" and cfg.data.name == "builtin"


def test_lp_ft_recipe_freezes_the_backbone_for_the_probe():
    cfg = compose_config(Path("/tmp/unused"), ["recipe=lp_ft"])
    assert cfg.stages.pretrain.trainable == "head" and cfg.stages.finetune.trainable == "all"


def test_eval_config_composes(tmp_path):
    cfg = compose_config(tmp_path, ["ckpt=/some/best.ckpt", "data=imagenet_cifar10"], config_name="eval")
    assert cfg.ckpt == "/some/best.ckpt" and cfg.task == "target"


def test_unknown_group_option_lists_the_available_ones(tmp_path):
    proc = run_cli("transferlab", "model=resnet1000", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode != 0
    assert "Could not find 'model/resnet1000'" in proc.stderr
    for name in ("convnet", "resnet18", "resnet50"):
        assert name in proc.stderr


# -- composed configs ----------------------------------------------------------------------------------------
def _explicit(
    task, init, init_head, lr, epochs=10, train="all", momentum=0.0, weight_decay=0.0, scheduler="none", weights=True
):
    """A stage as conf/recipe/seed.yaml spelled it out before the stage schema (ckpt now result_ckpt; model_weights
    added with the timm backbones: scratch never starts from the model's pretrained weights)."""
    return {
        "task": task,
        "init": init,
        "init_ckpt": None,
        "init_head": init_head,
        "model_weights": weights,
        "trainable": train,
        "unfreeze_every": 0,
        "backbone_lr_mult": 1.0,
        "layer_decay": 1.0,
        "decay_norm_bias": True,
        "label_smoothing": 0.0,
        "l2sp": {"alpha": 0.0, "beta": 0.0},
        "bss": {"weight": 0.0, "k": 1},
        "ema_decay": 0.0,
        "unlabeled": {
            "method": "none",
            "weight": 1.0,
            "ratio": 7,
            "threshold": 0.95,
            "temperature": 2.5,
            "teacher": None,
        },
        "test_task": None,
        "result_ckpt": None,
        "epochs": epochs,
        "seed": None,
        "scheduler": {"name": scheduler, "warmup_epochs": 0, "interval": "epoch"},
        "optimizer": {"name": "sgd", "lr": lr, "momentum": momentum, "weight_decay": weight_decay},
    }


def _mission(pretrain_train="all", **every_stage):
    return {
        "source": _explicit("source", None, "new", 0.01, **every_stage),
        "pretrain": _explicit("target", "source", "new", 0.01, train=pretrain_train, **every_stage),
        "finetune": _explicit("target", "pretrain", "keep", 0.001, **every_stage),
        "scratch": _explicit("target", None, "new", 0.01, epochs=20, weights=False, **every_stage),
    }


@pytest.mark.parametrize(
    "recipe,expected",
    [
        ("mission", _mission()),
        ("lp_ft", _mission(pretrain_train="head")),
        ("sgd_momentum", _mission(momentum=0.9, weight_decay=5.0e-4, scheduler="cosine")),
    ],
)
def test_composed_recipes_equal_the_explicit_ones(recipe, expected):
    stages = OmegaConf.to_container(compose_config(Path("/tmp/unused"), [f"recipe={recipe}"]).stages, resolve=True)
    assert {n: {k: v for k, v in s.items() if k not in validation.RENAMED} for n, s in stages.items()} == expected
    assert all(s["ckpt"] is None and s["train"] is None for s in stages.values())  # old names: null placeholders


def test_a_stage_key_is_one_line_in_the_default_stage():
    default = OmegaConf.load(methods.STAGE_SCHEMA)
    assert validation.stage_keys() == [k for k in default if k not in validation.RENAMED] == STAGE_KEYS.split(", ")


def test_a_stage_added_from_the_default_stage_is_valid(tmp_path):
    cfg = compose_config(tmp_path, ["+stage@stages.extra=default", "stages.extra.init=finetune"])
    validation.validate(cfg)
    assert list(cfg.stages)[-1] == "extra" and cfg.stages.extra.optimizer.lr == 0.01


@pytest.mark.parametrize(
    "data,workers", [("builtin", 0), ("builtin_cifar10", 2), ("imagenet32_cifar10", 0), ("imagenet_cifar10", 4)]
)
def test_data_pairs_share_batch_size_seed_and_workers(tmp_path, data, workers):
    plain = OmegaConf.to_container(
        compose_config(tmp_path, [f"data={data}", "seed=7", "data.batch_size=32"]).data, resolve=True
    )
    assert (plain["batch_size"], plain["num_workers"]) == (32, workers)
    for task in ("source", "target"):
        assert (plain[task]["batch_size"], plain[task]["seed"], plain[task]["num_workers"]) == (32, 7, workers)


def test_logger_and_debug_presets_compose(tmp_path):
    assert (
        OmegaConf.to_container(compose_config(tmp_path, ["logger=default"]).logger)["csv"]
        == OmegaConf.to_container(compose_config(tmp_path, ["logger=csv"]).logger)["csv"]
    )
    for preset, cap in (("limit", 1), ("fdr", 1), ("overfit", None)):
        cfg = compose_config(tmp_path, [f"debug={preset}"])
        assert cfg.cache is False and cfg.trainer.max_epochs_per_stage == cap
