"""The console scripts as a user runs them, with the defaults as shipped (progress bar, precision=auto, CSV +
TensorBoard logs, lr monitor, stage cache on): results table, eval agreeing with the pipeline, clear errors."""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from helpers.cli import run_cli
from helpers.config import SIZES, TINY


def run_timed(*args: str, output_root: Path) -> tuple[subprocess.CompletedProcess, float]:
    """`run_cli`, and the seconds from the script's last line of output to the end of its process."""
    script = Path(sys.executable).parent / args[0]
    env = {**os.environ, "TRANSFERLAB_OUTPUT_ROOT": str(output_root)}
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: a full stderr pipe would block the script
        proc = subprocess.Popen([str(script), *args[1:]], stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        watchdog = threading.Timer(900, proc.kill)  # run_cli's timeout
        watchdog.start()
        stdout, last_line = [], time.monotonic()
        for line in proc.stdout:
            stdout.append(line)
            last_line = time.monotonic()
        proc.wait()
        after = time.monotonic() - last_line
        watchdog.cancel()
        err.seek(0)
        stderr = err.read()
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{''.join(stdout)[-3000:]}\n{stderr[-5000:]}"
    return subprocess.CompletedProcess(args, proc.returncode, "".join(stdout), stderr), after


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """The pipeline with the defaults a user gets (only the data and epochs made small), its outputs and stage
    cache in a folder of its own."""
    folder = tmp_path_factory.mktemp("cli")
    run_dir = folder / "run"
    proc, ended_after = run_timed("transferlab", *SIZES, f"hydra.run.dir={run_dir}", output_root=folder / "outputs")
    return run_dir, proc, ended_after


def test_cli_prints_the_results_table_and_writes_the_run_folder(cli_run):
    run_dir, proc, _ = cli_run
    assert "| stage | task | init | test acc |" in proc.stdout and "Transfer gain" in proc.stdout
    for name in ("config.yaml", "overrides.yaml"):
        assert (run_dir / ".hydra" / name).is_file()
    for name in ("manifest.json", "results.json", "results.md"):
        assert (run_dir / name).is_file()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config"]["trainer"]["precision"] == "32-true"  # precision=auto on a CPU
    assert manifest["config"]["trainer"]["enable_progress_bar"] is True and manifest["config"]["cache"] is True
    for n, stage in enumerate(manifest["stages"], 1):  # each stage's bar, named after it, was drawn
        assert f"{stage} {n}/4 · epoch" in proc.stdout and f"{stage} {n}/4 · test" in proc.stdout, proc.stdout
        assert (run_dir / stage / "tensorboard" / "version_0").is_dir()
        header = (run_dir / stage / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
        assert "lr-SGD" in header and "val/acc" in header  # the lr monitor logged
    assert "0.00it/s" not in proc.stdout  # short stages' bars showed a speed of 0 (rich had no estimate)
    entries = (run_dir.parent / "outputs" / "cache" / "stages").glob("*/entry.json")
    cached = sorted(p.parent.name.split("-")[0] for p in entries)
    assert cached == ["finetune", "pretrain", "scratch", "source"], cached  # published to the stage cache


def test_the_process_ends_right_after_its_last_line(cli_run):
    """Python's module teardown took 1.25 s after the results table (torch and Lightning loaded): the console
    scripts now end once the atexit handlers have run (transferlab.commands.common)."""
    run_dir, proc, ended_after = cli_run
    assert "Transfer gain" in proc.stdout.rstrip().splitlines()[-1]
    assert ended_after < 0.6, f"the process ended {ended_after:.2f} s after its last line"
    assert "Loaded model weights" in (run_dir / "transferlab.log").read_text()  # the log file was flushed and closed


def test_console_scripts_exit_as_sys_exit_would(tmp_path):
    """transferlab.commands.common.script: the exit status of sys.exit (a message is printed, status 1), atexit
    handlers run, threads that are not daemons finish, buffered output is written."""
    program = f"""
import atexit, sys, threading, time
from pathlib import Path
from transferlab.commands.common import script
atexit.register(lambda: Path({str(tmp_path / "atexit")!r}).write_text("ran"))
threading.Thread(target=lambda: (time.sleep(0.3), Path({str(tmp_path / "thread")!r}).write_text("done"))).start()
print("buffered, no newline", end="")
script(lambda: sys.exit(sys.argv[1] if sys.argv[1] != "3" else 3))
"""
    for code, status in (("3", 3), ("the reason", 1)):
        proc = subprocess.run([sys.executable, "-c", program, code], capture_output=True, text=True, timeout=60)
        assert proc.returncode == status and proc.stdout == "buffered, no newline"
        assert (tmp_path / "atexit").read_text() == "ran" and (tmp_path / "thread").read_text() == "done"
        assert ("the reason" in proc.stderr) == (status == 1)
        (tmp_path / "atexit").unlink()
        (tmp_path / "thread").unlink()


def test_eval_agrees_with_the_pipelines_test_metrics(cli_run):
    run_dir, _, _ = cli_run
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    for stage, task in (("finetune", "target"), ("source", "source")):
        proc = run_cli(
            "transferlab-eval",
            f"ckpt={run_dir / manifest[stage]['best_ckpt']}",
            f"task={task}",
            *[o for o in SIZES if o.startswith("data.")],
            f"hydra.run.dir={run_dir / ('eval-' + stage)}",
        )
        metrics = json.loads((run_dir / f"eval-{stage}" / "eval.json").read_text())["test"]
        for key in ("acc", "acc_top5", "f1", "auroc", "loss"):
            assert metrics[key] == pytest.approx(manifest[stage]["test"][key], abs=1e-6), (stage, key)
        assert f"test/acc: {manifest[stage]['test']['acc']:.4f}" in proc.stdout


def test_eval_refuses_a_checkpoint_for_other_classes(cli_run):
    run_dir, _, _ = cli_run
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
    run_dir, _, _ = cli_run
    before = (run_dir / "manifest.json").read_text()
    proc = run_cli(
        "transferlab",
        *SIZES,
        f"hydra.run.dir={run_dir}",
        env={"TRANSFERLAB_OUTPUT_ROOT": str(run_dir.parent / "outputs")},
    )
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
