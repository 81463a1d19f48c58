"""`transferlab-eval` on checkpoints as users hand them over: damaged or edited ones get one message (exit 2, no
traceback), a diverged one is refused, and a checkpoint is tested under the precision its run tested it with, so
a user who re-evaluates it gets the numbers the run printed."""

import json

import pytest
import torch
from helpers.cli import in_process, run_cli
from helpers.config import TINY

from transferlab.commands import evaluate as eval_command

ONLY_SOURCE = [*TINY, "~stages.pretrain", "~stages.finetune", "~stages.scratch", "objective=source/test/acc"]
SOURCE_DATA = [o for o in TINY if o.startswith("data.")]


@pytest.fixture(scope="module")
def source_ckpt(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    run_cli("transferlab", *ONLY_SOURCE, f"hydra.run.dir={run_dir}")
    return run_dir / "source" / "checkpoints" / "best.ckpt"


def spoil(checkpoint: dict, how: str) -> dict:
    state = checkpoint["state_dict"]
    if how == "extra tensor":
        state["backbone.9.weight"] = torch.zeros(3)
    elif how == "missing tensor":
        del state["backbone.3.weight"]
    elif how == "mis-shaped tensor":
        state["backbone.7.weight"] = torch.zeros(64, 4096)
    elif how == "head for another class count":
        checkpoint["hyper_parameters"]["num_classes"] = 10
    elif how == "no state_dict":
        del checkpoint["state_dict"]
    elif how == "not a module's hyperparameters":
        checkpoint["hyper_parameters"]["wings"] = 2
    elif how == "NaN weights":
        state["head.weight"].fill_(float("nan"))
    return checkpoint


CASES = {
    "extra tensor": "its weights do not fit the model its hyperparameters describe (unexpected: backbone.9.weight",
    "missing tensor": "its weights do not fit the model its hyperparameters describe (missing: backbone.3.weight",
    "mis-shaped tensor": "shape mismatch (checkpoint vs model): backbone.7.weight (64, 4096) vs (128, 4096)",
    "head for another class count": "shape mismatch (checkpoint vs model): head.weight (6, 128) vs (10, 128)",
    "no state_dict": "is not a transferlab ClassifierModule checkpoint (it has no model hyperparameters or no "
    "state_dict)",
    "not a module's hyperparameters": "its hyperparameters do not describe a model transferlab can build "
    "(TypeError: ClassifierModule.__init__() got an unexpected keyword argument 'wings')",
    "NaN weights": "holds weights that are NaN or infinite (head.weight): the stage that wrote it diverged",
}


@pytest.mark.parametrize("how", list(CASES))
def test_a_damaged_or_edited_checkpoint_is_one_message(source_ckpt, tmp_path, capsys, monkeypatch, how):
    """Each was a traceback from inside torch (or, for NaN weights, metrics printed without a word)."""
    path = tmp_path / "given.ckpt"
    torch.save(spoil(torch.load(source_ckpt, weights_only=True), how), path)
    proc = in_process(
        eval_command.main,
        capsys,
        monkeypatch,
        [f"ckpt={path}", "task=source", *SOURCE_DATA, f"hydra.run.dir={tmp_path}"],
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert CASES[how] in proc.stderr, proc.stderr
    assert not (tmp_path / "eval.json").exists()


def test_the_installed_eval_script_refuses_the_same(source_ckpt, tmp_path):
    path = tmp_path / "given.ckpt"
    torch.save(spoil(torch.load(source_ckpt, weights_only=True), "mis-shaped tensor"), path)
    proc = run_cli(
        "transferlab-eval", f"ckpt={path}", "task=source", *SOURCE_DATA, f"hydra.run.dir={tmp_path}", check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count(CASES["mis-shaped tensor"]) == 1


def test_eval_tests_under_the_precision_the_run_tested_with(tmp_path):
    """transferlab-eval tested at 32-true whatever the run had used: on a CPU where precision=auto picked
    bf16-mixed, it reported top-5 0.53 where the run's own test said 0.54. `precision=auto` (eval's default) now
    takes the precision recorded in the checkpoint; an explicit one is used as given."""
    run_dir = tmp_path / "run"
    run_cli("transferlab", *ONLY_SOURCE, "precision=bf16-mixed", f"hydra.run.dir={run_dir}")
    stage = json.loads((run_dir / "manifest.json").read_text())["stages"]["source"]
    ckpt = run_dir / stage["best_ckpt"]
    assert torch.load(ckpt, weights_only=True)["precision"] == "bf16-mixed"
    tested = {}
    for precision in ("auto", "32-true"):
        out = tmp_path / f"eval-{precision}"
        run_cli(
            "transferlab-eval",
            f"ckpt={ckpt}",
            "task=source",
            *SOURCE_DATA,
            f"precision={precision}",
            f"hydra.run.dir={out}",
        )
        tested[precision] = json.loads((out / "eval.json").read_text())
    assert tested["auto"]["precision"] == "bf16-mixed" and tested["auto"]["test"] == stage["test"]  # to the bit
    assert tested["32-true"]["precision"] == "32-true" and tested["32-true"]["test"]["loss"] != stage["test"]["loss"]
