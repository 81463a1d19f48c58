"""The console scripts as a user runs them: results table, eval agreeing with the pipeline, clear errors."""

import json

import pytest
from conftest import TINY, run_cli


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    proc = run_cli("transferlab", *TINY, f"hydra.run.dir={run_dir}")
    return run_dir, proc


def test_cli_prints_the_results_table_and_writes_the_run_folder(cli_run):
    run_dir, proc = cli_run
    assert "| stage | task | init | test acc |" in proc.stdout and "Transfer gain" in proc.stdout
    for name in ("config.yaml", "overrides.yaml"):
        assert (run_dir / ".hydra" / name).is_file()
    for name in ("manifest.json", "results.json", "results.md"):
        assert (run_dir / name).is_file()
    assert (run_dir / "source" / "tensorboard").is_dir() is False  # TINY uses logger=csv
    assert (run_dir / "finetune" / "csv" / "version_0" / "metrics.csv").is_file()


def test_eval_agrees_with_the_pipelines_test_metrics(cli_run):
    run_dir, _ = cli_run
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    for stage, task in (("finetune", "target"), ("source", "source")):
        proc = run_cli(
            "transferlab-eval",
            f"ckpt={run_dir / manifest[stage]['best_ckpt']}",
            f"task={task}",
            *[o for o in TINY if o.startswith("data.")],
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={run_dir / ('eval-' + stage)}",
        )
        metrics = json.loads((run_dir / f"eval-{stage}" / "eval.json").read_text())["test"]
        for key in ("acc", "acc_top5", "f1", "auroc", "loss"):
            assert metrics[key] == pytest.approx(manifest[stage]["test"][key], abs=1e-6), (stage, key)
        assert f"test/acc: {manifest[stage]['test']['acc']:.4f}" in proc.stdout


def test_eval_refuses_a_checkpoint_for_other_classes(cli_run):
    run_dir, _ = cli_run
    proc = run_cli(
        "transferlab-eval",
        f"ckpt={run_dir}/source/checkpoints/best.ckpt",
        "task=target",
        f"hydra.run.dir={run_dir / 'eval-bad'}",
        check=False,
    )
    assert proc.returncode == 2
    assert "classifies 6 classes but data.target has 10" in proc.stderr and "Traceback" not in proc.stderr


def test_rerun_of_a_finished_run_skips_every_stage(cli_run):
    run_dir, _ = cli_run
    before = (run_dir / "manifest.json").read_text()
    proc = run_cli("transferlab", *TINY, f"hydra.run.dir={run_dir}")
    assert proc.stdout.count("done in an earlier run, skipped") == 4
    assert "Transfer gain" in proc.stdout
    after = json.loads((run_dir / "manifest.json").read_text())
    assert after["stages"] == json.loads(before)["stages"]


def test_missing_cifar_root_is_one_clear_message(tmp_path):
    missing = tmp_path / "no-cifar"
    proc = run_cli(
        "transferlab",
        "data=builtin_cifar10",
        f"data.target.root={missing}",
        *[o for o in TINY if not o.startswith("data.")],
        f"hydra.run.dir={tmp_path / 'run'}",
        "~stages.source",
        "~stages.pretrain",
        "~stages.finetune",
        "stages.scratch.epochs=1",
        "objective=scratch/test/acc",
        check=False,
    )
    assert proc.returncode == 2
    assert f"CIFAR-10 not found at {missing}" in proc.stderr
    assert "cifar-10-batches-py/{data_batch_1..5" in proc.stderr and "download=true" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_objective_lists_the_metrics(tmp_path):
    proc = run_cli(
        "transferlab",
        *TINY,
        "~stages.source",
        "~stages.pretrain",
        "~stages.finetune",
        "stages.scratch.epochs=1",
        "objective=finetune/test/acc",
        f"hydra.run.dir={tmp_path}",
        check=False,
    )
    assert proc.returncode == 2
    assert (
        "objective='finetune/test/acc' is not a metric this run will produce. It produces <stage>/test/<metric> "
        "for the stages scratch, <metric> one of acc, acc_top5, f1, auroc"
    ) in proc.stderr
    assert not (tmp_path / "scratch").exists()  # refused before training (it was refused after, until issue 8)
