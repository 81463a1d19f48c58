"""The real config tree composes for every option of every group, and bad choices fail clearly."""

from pathlib import Path

import pytest
from conftest import compose_config, run_cli
from omegaconf import OmegaConf

from transferlab import CONF_DIR

GROUPS = ["data", "model", "recipe", "trainer", "logger", "callbacks", "paths", "experiment", "debug"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_resolves(tmp_path, group, option):
    cfg = compose_config(tmp_path, [f"{group}={option}"])
    plain = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
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
