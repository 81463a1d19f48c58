"""A stage that diverges (a NaN training loss, a val loss beyond any guess) stops with one message, is marked
failed and keeps its last good checkpoint; in a sweep the diverging job fails alone and the others finish."""

import json

import pytest
import torch
from helpers.cli import assert_user_error, run_cli, transferlab
from helpers.config import ONLY_SOURCE, TINY
from helpers.run_folder import manifest

pytestmark = pytest.mark.usefixtures("helpers_on_path")  # runs in other processes: this src, helpers.callbacks


def test_nan_loss_stops_the_stage_marks_it_failed_and_keeps_the_last_good_checkpoint(after_source):
    run_dir, source_intact = after_source
    proc = transferlab(
        run_dir,
        "+callbacks.poison._target_=helpers.callbacks.PoisonAtEpoch",
        "+callbacks.poison.stage=pretrain",
        "+callbacks.poison.epoch=1",
    )
    assert_user_error(
        proc,
        "Stage 'pretrain': the training loss is nan at epoch 1, step 5",
        f"the last good checkpoint {run_dir / 'pretrain' / 'checkpoints' / 'last.ckpt'} is kept",
        "Lower stages.pretrain.optimizer.lr",
    )
    stages = source_intact()
    assert stages["pretrain"]["status"] == "failed"
    assert "NonFiniteLossError: Stage 'pretrain': the training loss is nan at epoch 1" in stages["pretrain"]["reason"]
    assert "finetune" not in stages
    last = torch.load(run_dir / "pretrain" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0 and all(torch.isfinite(v).all() for v in last["state_dict"].values())


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


def test_diverging_sweep_job_fails_alone_and_the_others_finish(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "transferlab",
        "-m",
        *TINY,
        *ONLY_SOURCE,
        "stages.source.optimizer.lr=1e6,0.01",
        f"hydra.sweep.dir={sweep}",
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "transferlab: job 0 failed: Stage 'source': the training loss is" in proc.stderr
    assert "1 sweep job(s) failed" in proc.stderr and f"job 0 ({sweep / '0'}): Stage 'source'" in proc.stderr
    failed, done = manifest(sweep / "0")["stages"]["source"], manifest(sweep / "1")["stages"]["source"]
    assert failed["status"] == "failed" and "training diverged" in failed["reason"]
    assert done["status"] == "done" and done["test"]["acc"] > 0
    assert json.loads((sweep / "1" / "results.json").read_text())["source/test/acc"] == done["test"]["acc"]
