"""The low-data study preset: it composes with the real config, and a tiny version of its sweep runs, trains
the source once for every seed (its own seed, the stage cache) and ends with the report."""

import csv
import json

import pytest
from helpers.cli import run_cli
from helpers.config import REPO, TINY
from helpers.datasets import write_cifar10
from hydra import compose, initialize_config_dir

from transferlab import CONF_DIR

STUDY_RECIPES = ["mission", "lp_ft", "l2sp", "discriminative", "strong"]


def study_cfg(*overrides: str):
    data = [] if (REPO / "conf" / "data" / "cifar10_split.yaml").is_file() else ["data=builtin_cifar10"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=["experiment=lowdata_study", *data, *overrides], return_hydra_config=True)


def test_the_study_sweeps_labels_recipes_and_seeds_and_ends_with_the_report():
    cfg = study_cfg()
    params = cfg.hydra.sweeper.params
    assert params["data.target.samples_per_class"] == "10,25,100,500"
    assert params.recipe.split(",") == STUDY_RECIPES and params.seed == "0,1,2"
    assert cfg.hydra.callbacks.report._target_ == "transferlab.analysis.sweep_report.ReportAtEnd"
    assert "lowdata_study" in cfg.hydra.sweep.dir


def test_every_recipe_of_the_study_composes_with_it():
    for name in STUDY_RECIPES:
        cfg = study_cfg(f"recipe={name}", "data.target.samples_per_class=10")
        assert cfg.data.target.samples_per_class == 10 and set(cfg.stages) >= {"finetune", "scratch"}
    cfg = study_cfg()
    assert cfg.data.source._target_.endswith("CIFAR10DataModule")
    assert not set(cfg.data.source.classes) & set(cfg.data.target.classes)  # disjoint class split


@pytest.mark.slow
def test_a_tiny_study_trains_the_source_once_and_reports_mean_and_std(tmp_path):
    """The study's sweep, narrowed to 2 sizes x 2 recipes x 2 seeds (8 jobs), on a built-in source and a small
    CIFAR-10-layout target (the data=cifar10_split preset's shape, at test size)."""
    sweep, cifar = tmp_path / "sweep", write_cifar10(tmp_path / "cifar", n_train=400, n_test=100)
    recipes = ["mission", "lp_ft"]
    proc = run_cli(
        "transferlab",
        "-m",
        "experiment=lowdata_study",
        "data=builtin_cifar10",
        f"data.target.root={cifar}",
        "data.target.classes=5",
        "data.target.val_fraction=0.25",
        *[o for o in TINY if o != "cache=false" and not o.startswith("data.target.")],
        f"paths.output_root={tmp_path}",
        "data.target.samples_per_class=3,6",
        f"recipe={','.join(recipes)}",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
    )
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    assert len(jobs) == 8
    manifests = [json.loads((j / "manifest.json").read_text())["stages"] for j in jobs]
    assert sum(not m["source"]["cached"] for m in manifests) == 1  # once: its own seed (stages.source.seed)
    assert sum(not m["scratch"]["cached"] for m in manifests) == 4  # per seed and size, shared by the recipes
    with open(sweep / "report_cells.csv") as f:
        cells = list(csv.DictReader(f))
    assert len(cells) == 4 and {c["jobs"] for c in cells} == {"2"} and {c["gain/acc n"] for c in cells} == {"2"}
    assert "## Mean ± standard deviation over `seed`" in proc.stdout  # the report printed at the end
    assert (sweep / "gain_acc_vs_data.target.samples_per_class.png").is_file()
