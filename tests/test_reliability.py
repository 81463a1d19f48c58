"""Issue 5: nothing lost, nothing let in. Kill and resume, divergence, bad input, safe checkpoints,
provenance; each test runs the real CLI (real Hydra, real Trainer) on the tiny built-in data."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, run_cli, write_cifar10, write_imagenet

from transferlab.train.module import ClassifierModule

TESTS = Path(__file__).resolve().parent
DETERMINISTIC = [*TINY, "trainer.deterministic=true"]
ONLY_SOURCE = ["~stages.pretrain", "~stages.finetune", "~stages.scratch", "objective=source/test/acc"]
ONLY_SCRATCH = ["~stages.pretrain", "~stages.finetune", "stages.scratch.epochs=2", "objective=scratch/test/acc"]


@pytest.fixture(autouse=True)
def helpers_on_path(monkeypatch):
    """Subprocesses import the test callbacks (`helpers.X`) and this worktree's package."""
    paths = [str(REPO / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)


def transferlab(run_dir: Path, *overrides: str, check: bool = False) -> subprocess.CompletedProcess:
    """The CLI with the tiny sizes, less those of a data group that `overrides` replace (data/source=...)."""
    replaced = [o.split("=")[0].replace("/", ".") + "." for o in overrides if o.startswith("data/")]
    tiny = [o for o in TINY if not any(o.startswith(prefix) for prefix in replaced)]
    return run_cli("transferlab", *tiny, *overrides, f"hydra.run.dir={run_dir}", check=check)


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> str:
    """Exit code, one `transferlab: error:` paragraph naming the problem, and no traceback."""
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    message = proc.stderr.split("transferlab: error: ", 1)[1].strip() if code == 2 else proc.stderr
    for fragment in fragments:
        assert fragment in message, message
    if os.environ.get("TRANSFERLAB_MESSAGES"):  # collects the real messages for docs/reliability.md
        with open(os.environ["TRANSFERLAB_MESSAGES"], "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}\t{proc.returncode}\t{message}\n")
    return message


# -- 1. kill and resume ------------------------------------------------------------------------------
STEPS = {"source": 14, "pretrain": 5, "finetune": 5, "scratch": 5}  # optimizer steps per epoch of each tiny stage
EPOCHS = {"source": 2, "pretrain": 2, "finetune": 2, "scratch": 4}


def kill_when_marked(run_dir: Path, overrides: list[str], callback: str, **params) -> Path:
    """Start the CLI with test callback `helpers.<callback>`, which writes a marker file and waits at a chosen
    point; SIGKILL the process as soon as the marker appears. Returns the marker (it says where it stopped)."""
    marker = run_dir.parent / f"marker-{run_dir.name}"
    injected = [
        f"+callbacks.kill._target_=helpers.{callback}",
        f"+callbacks.kill.marker={marker}",
        *(f"+callbacks.kill.{k}={v}" for k, v in params.items()),
    ]
    args = [
        str(Path(sys.executable).parent / "transferlab"),
        *DETERMINISTIC,
        *overrides,
        *injected,
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, f"the run ended before {params}: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return marker


def resume(run_dir: Path, stage: str, overrides: list[str]) -> dict:
    """Re-run into the killed run's folder: finished stages are skipped untouched, `stage` resumes."""
    recorded = manifest(run_dir)["stages"] if (run_dir / "manifest.json").exists() else {}
    before = {name: s for name, s in recorded.items() if s["status"] == "done"}  # the killed one is "running"
    mtimes = {name: (run_dir / s["best_ckpt"]).stat().st_mtime_ns for name, s in before.items()}
    resumed = run_cli("transferlab", *DETERMINISTIC, *overrides, f"hydra.run.dir={run_dir}")
    log = resumed.stdout + resumed.stderr + (run_dir / "transferlab.log").read_text()
    assert f"Stage {stage}: resuming from {run_dir / stage / 'checkpoints' / 'last.ckpt'}" in log
    for name in before:
        assert f"Stage {name}: done in an earlier run, skipped" in log
        assert (run_dir / before[name]["best_ckpt"]).stat().st_mtime_ns == mtimes[name]
    assert not list(run_dir.rglob("*.tmp"))
    return manifest(run_dir)["stages"]


def assert_same_results(expected: dict, got: dict, where: str) -> None:
    assert list(got) == list(expected)
    for name in expected:
        assert got[name]["status"] == "done"
        assert got[name]["test"] == expected[name]["test"], f"{name} differs after a kill at {where}"
        assert got[name]["best_val"] == expected[name]["best_val"], f"{name} differs after a kill at {where}"


@pytest.fixture(scope="module")
def source_reference(tmp_path_factory) -> dict:
    """An uninterrupted deterministic one-stage run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_cli("transferlab", *DETERMINISTIC, *ONLY_SOURCE, f"hydra.run.dir={run_dir}")
    return manifest(run_dir)["stages"]


def test_killed_stage_resumes_from_last_ckpt_with_identical_metrics(tmp_path, source_reference):
    """SIGKILL at a random step after the first checkpoint; the re-run resumes and ends with the same numbers."""
    step = random.randrange(STEPS["source"] + 1, STEPS["source"] * EPOCHS["source"] + 1)
    kill_when_marked(tmp_path / "run", ONLY_SOURCE, "MarkAndWaitAtStep", stage="source", step=step)
    assert_same_results(source_reference, resume(tmp_path / "run", "source", ONLY_SOURCE), f"step {step}")


def test_kill_while_writing_a_checkpoint_leaves_the_previous_one_whole(tmp_path, source_reference):
    """SIGKILL half-way through writing the epoch-1 checkpoint: last.ckpt is still epoch 0's, whole; the
    partial file is a `.tmp` that nothing loads; the re-run resumes from epoch 0 to the same numbers."""
    run_dir = tmp_path / "run"
    marker = kill_when_marked(run_dir, ONLY_SOURCE, "MarkAndWaitInCheckpointWrite", stage="source", epoch=1)
    partial = Path(marker.read_text())
    assert partial.suffix == ".tmp" and partial.stat().st_size > 0
    last = torch.load(run_dir / "source" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0
    assert_same_results(source_reference, resume(run_dir, "source", ONLY_SOURCE), "a checkpoint write")


def test_manifest_write_cut_short_leaves_the_old_manifest(tmp_path, monkeypatch):
    """The manifest is written to a temporary file and renamed: a crash before the rename (here the rename
    itself fails) leaves the previous manifest whole."""
    from transferlab.core import fileio

    path = tmp_path / "manifest.json"
    fileio.write_json_atomic(path, {"stages": {"source": {"status": "done"}}})

    def crash(*args):
        raise OSError("killed")

    monkeypatch.setattr(fileio.os, "replace", crash)
    with pytest.raises(OSError):
        fileio.write_json_atomic(path, {"stages": {"source": {"status": "done"}, "pretrain": {"status": "done"}}})
    assert json.loads(path.read_text()) == {"stages": {"source": {"status": "done"}}}


@pytest.fixture(scope="module")
def pipeline_reference(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_cli("transferlab", *DETERMINISTIC, "recipe=sgd_momentum", f"hydra.run.dir={run_dir}")
    return manifest(run_dir)["stages"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "finetune", "scratch"])
def test_killed_pipeline_resumes_and_skips_finished_stages(tmp_path, pipeline_reference, stage):
    """The whole pipeline, with momentum and a cosine schedule (optimizer and scheduler state must resume too)."""
    step = random.randrange(STEPS[stage] + 1, STEPS[stage] * EPOCHS[stage] + 1)
    overrides = ["recipe=sgd_momentum"]
    kill_when_marked(tmp_path / "run", overrides, "MarkAndWaitAtStep", stage=stage, step=step)
    assert_same_results(pipeline_reference, resume(tmp_path / "run", stage, overrides), f"{stage} step {step}")


# -- a finished source stage that the bad-input tests re-run into -------------------------------------
@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("source") / "run"
    run_cli("transferlab", *TINY, *ONLY_SOURCE, f"hydra.run.dir={run_dir}")
    return run_dir


@pytest.fixture
def after_source(source_run, tmp_path):
    """A copy of a run whose source stage is done; returns (run folder, check that source is intact)."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(source_run, run_dir)
    files = {p: p.read_bytes() for p in (run_dir / "source" / "checkpoints").iterdir()}

    def source_intact():
        stages = manifest(run_dir)["stages"]
        assert stages["source"]["status"] == "done"
        assert {p: p.read_bytes() for p in (run_dir / "source" / "checkpoints").iterdir()} == files
        assert not list(run_dir.rglob("*.tmp"))
        return stages

    return run_dir, source_intact


# -- 2. non-finite loss -----------------------------------------------------------------------------
def test_nan_loss_stops_the_stage_marks_it_failed_and_keeps_the_last_good_checkpoint(after_source):
    run_dir, source_intact = after_source
    proc = transferlab(
        run_dir,
        "+callbacks.poison._target_=helpers.PoisonAtEpoch",
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


# -- 3. bad input -----------------------------------------------------------------------------------
CIFAR_TARGET = ["data/target=cifar10", "data.target.val_fraction=0.2", "data.target.augment=false"]


def test_missing_data_root(after_source, tmp_path):
    run_dir, source_intact = after_source
    proc = transferlab(run_dir, *CIFAR_TARGET, f"data.target.root={tmp_path / 'nowhere'}")
    assert_user_error(
        proc,
        f"CIFAR-10 not found at {tmp_path / 'nowhere'}",
        "missing data_batch_1",
        "Point data.target.root at the folder that holds cifar-10-batches-py",
    )
    assert "pretrain" not in source_intact() and not (run_dir / "pretrain").exists()  # stopped before training


def test_truncated_cifar_batch(after_source, tmp_path):
    run_dir, source_intact = after_source
    root = write_cifar10(tmp_path / "cifar")
    bad = root / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:1000])
    proc = transferlab(run_dir, *CIFAR_TARGET, f"data.target.root={root}")
    assert_user_error(proc, f"CIFAR-10 file {bad} is truncated or corrupt", "Replace it with a good copy")
    assert "pretrain" not in source_intact() and not (run_dir / "pretrain").exists()


IMAGENET_SOURCE = [
    "data/source=imagenet",
    "data.source.val_fraction=0.25",
    "data.source.augment=false",
    *ONLY_SOURCE,
    # the built-in target takes these from the built-in source
    "data.target.source_classes=6",
    "data.target.noise=0.5",
    "data.target.max_shift=4",
    "data.target.world_seed=1234",
]


def test_empty_class_folder(tmp_path):
    root = write_imagenet(tmp_path / "imagenet")
    (root / "train" / "n09999999").mkdir()
    proc = transferlab(tmp_path / "run", *IMAGENET_SOURCE, f"data.source.root={root}")
    assert_user_error(proc, "n09999999", "needs at least one image", "remove the empty folder")
    assert not (tmp_path / "run" / "source").exists() and not (tmp_path / "run" / "manifest.json").exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_jpeg(tmp_path, workers):
    root = write_imagenet(tmp_path / "imagenet")
    bad = sorted((root / "train" / "n01443537").iterdir())[1]
    bad.write_bytes(bad.read_bytes()[:300])
    proc = transferlab(tmp_path / "run", *IMAGENET_SOURCE, f"data.source.root={root}", f"data.num_workers={workers}")
    message = assert_user_error(proc, f"Cannot read image {bad}", "skip_corrupt=true")
    assert "Original Traceback" not in message and len(message.splitlines()) == 1
    stages = manifest(tmp_path / "run")["stages"]
    assert stages["source"]["status"] == "failed" and str(bad) in stages["source"]["reason"]


def save_module_checkpoint(path: Path, model: dict, num_classes: int) -> Path:
    module = ClassifierModule(model=model, num_classes=num_classes, optimizer={"name": "sgd", "lr": 0.1})
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def test_checkpoint_for_another_class_count(after_source, tmp_path):
    run_dir, source_intact = after_source
    ckpt = save_module_checkpoint(tmp_path / "three_classes.ckpt", {"name": "convnet"}, 3)
    proc = transferlab(run_dir, "stages.scratch.init_ckpt=" + str(ckpt), "stages.scratch.init_head=keep", *ONLY_SCRATCH)
    assert_user_error(
        proc,
        f"{ckpt} has a head for another class count (head.weight (3, 128) vs (10, 128)",
        "set this stage's init_head=new",
    )
    stages = source_intact()
    assert stages["scratch"]["status"] == "failed" and not (run_dir / "scratch" / "checkpoints").exists()


def test_checkpoint_of_another_architecture(after_source, tmp_path):
    run_dir, source_intact = after_source
    ckpt = save_module_checkpoint(tmp_path / "resnet18.ckpt", {"name": "resnet18"}, 10)
    proc = transferlab(run_dir, "stages.scratch.init_ckpt=" + str(ckpt), *ONLY_SCRATCH)
    assert_user_error(
        proc,
        f"{ckpt} does not fit this model",
        "saved for model {'name': 'resnet18'",
        "use a checkpoint of the same architecture or change model=",
    )
    assert source_intact()["scratch"]["status"] == "failed"


def test_checkpoint_path_that_does_not_exist(after_source, tmp_path):
    run_dir, source_intact = after_source
    missing = tmp_path / "nowhere" / "best.ckpt"
    proc = transferlab(run_dir, f"stages.scratch.init_ckpt={missing}", *ONLY_SCRATCH)
    assert_user_error(proc, f"stages.scratch.init_ckpt={missing} does not exist. Give the path of a .ckpt")
    assert "scratch" not in source_intact()
    proc = run_cli("transferlab-eval", f"ckpt={missing}", f"hydra.run.dir={tmp_path / 'eval'}", check=False)
    assert_user_error(proc, f"Checkpoint {missing} does not exist")
    folder = run_dir / "source" / "checkpoints"  # a folder where a file belongs: said so, not "does not exist"
    proc = transferlab(tmp_path / "given", f"stages.source.result_ckpt={folder}", "objective=pretrain/test/acc")
    assert_user_error(proc, f"stages.source.result_ckpt={folder} is a folder, not a file: give the path")


@pytest.mark.parametrize(
    "override,fragments",
    [
        ("stages.finetune.optimizer.lr=-0.1", ["stages.finetune.optimizer.lr must be a positive number, got -0.1"]),
        ("data.batch_size=0", ["data.batch_size must be a whole number of at least 1, got 0"]),
        ("trainer.devices=64", ["trainer.devices=64 but this machine has", "CPU core(s)"]),
        ("stages.pretrain.scheduler.name=cosin", ["stages.pretrain.scheduler.name='cosin' is unknown"]),
    ],
)
def test_invalid_values_stop_before_training(after_source, override, fragments):
    run_dir, source_intact = after_source
    assert_user_error(transferlab(run_dir, override), *fragments)
    assert set(source_intact()) == {"source"} and not (run_dir / "pretrain").exists()


def test_gpu_preset_without_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no visible GPU, also on a machine that has one
    proc = transferlab(tmp_path / "run", "trainer=gpu")
    assert_user_error(proc, "trainer.accelerator=gpu but this machine has no visible GPU", "use trainer=cpu")
    assert not (tmp_path / "run" / "source").exists()


def test_unknown_recipe_name(tmp_path):
    proc = transferlab(tmp_path / "run", "recipe=lp-ft")
    assert_user_error(proc, "Could not find 'recipe/lp-ft'", "Available options in 'recipe'", "lp_ft", code=1)
    assert not (tmp_path / "run").exists()


def test_full_disk_while_writing_a_checkpoint(after_source):
    run_dir, source_intact = after_source
    proc = transferlab(run_dir, "+callbacks.full._target_=helpers.DiskFullInStage", "+callbacks.full.stage=pretrain")
    folder = run_dir / "pretrain" / "checkpoints"
    assert_user_error(
        proc,
        f"The disk holding {folder}/",
        "is full (No space left on device). Free space on it",
        f"re-run the same command into the same folder (hydra.run.dir={run_dir})",
    )
    stages = source_intact()  # also: no partial *.tmp left
    assert stages["pretrain"]["status"] == "failed" and "No space left" in stages["pretrain"]["reason"]
    assert not list(folder.glob("*.ckpt"))


def test_truncated_last_checkpoint_is_not_resumed(after_source):
    run_dir, source_intact = after_source
    last = run_dir / "pretrain" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    whole = (run_dir / "source" / "checkpoints" / "last.ckpt").read_bytes()
    last.write_bytes(whole[: len(whole) // 2])
    proc = transferlab(run_dir)
    assert_user_error(proc, f"Cannot resume from {last}: the file is truncated or corrupt", "Delete it")
    assert source_intact()["pretrain"]["status"] == "failed" and last.stat().st_size == len(whole) // 2


# -- 4. safe checkpoints ----------------------------------------------------------------------------
class RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __reduce__(self):
        return os.system, ('touch "$TRANSFERLAB_TEST_MARKER"',)


def test_checkpoint_that_would_run_code_is_refused(after_source, tmp_path, monkeypatch):
    run_dir, source_intact = after_source
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": RunsCode()}, evil)
    proof = tmp_path / "proof"  # the file does run code when loaded without weights_only
    subprocess.run(
        [sys.executable, "-c", f"import torch; torch.load({str(evil)!r}, weights_only=False)"],
        env={**os.environ, "TRANSFERLAB_TEST_MARKER": str(proof)},
        check=True,
        cwd=TESTS,
    )
    assert proof.exists()

    marker = tmp_path / "marker"
    monkeypatch.setenv("TRANSFERLAB_TEST_MARKER", str(marker))
    proc = transferlab(run_dir, f"stages.scratch.init_ckpt={evil}", *ONLY_SCRATCH)
    assert_user_error(proc, f"Refused to load {evil}", "loading it would run code from the file", "posix.system")
    assert source_intact()["scratch"]["status"] == "failed"
    proc = run_cli("transferlab-eval", f"ckpt={evil}", f"hydra.run.dir={tmp_path / 'eval'}", check=False)
    assert_user_error(proc, f"Refused to load {evil}")
    assert not marker.exists()


# -- 5. provenance ----------------------------------------------------------------------------------
def test_manifest_records_provenance(source_run):
    m = manifest(source_run)
    assert m["seed"] == 0 and m["config"]["stages"]["source"]["optimizer"]["lr"] == 0.01
    prov = m["provenance"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert prov["git"]["commit"] == head and isinstance(prov["git"]["dirty"], bool)
    assert set(prov["versions"]) == {"python", "torch", "lightning", "hydra"}
    assert prov["versions"]["torch"] == torch.__version__
    assert prov["machine"]["cpu"] and prov["machine"]["gpu_count"] == torch.cuda.device_count()
    source = m["stages"]["source"]
    assert source["provenance"] == prov
    assert source["data"]["splits"] == source["splits"] == {"train": 216, "val": 24, "test": 60}
    assert source["data"]["dataset"] == "BuiltinDataModule" and len(source["data"]["hash"]) == 16


def test_dataset_fingerprint_follows_files_and_settings(tmp_path):
    from transferlab.data import BuiltinDataModule, CIFAR10DataModule

    root = write_cifar10(tmp_path)
    first = CIFAR10DataModule(root=str(root), val_fraction=0.2).fingerprint()
    assert first["files"] == 7 and first["splits"] == {"train": 40, "val": 10, "test": 20}
    assert CIFAR10DataModule(root=str(root), val_fraction=0.2).fingerprint() == first
    assert CIFAR10DataModule(root=str(root), val_fraction=0.4).fingerprint()["hash"] != first["hash"]
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(batch.read_bytes() + b"\0")  # another size: another file list hash
    assert CIFAR10DataModule(root=str(root), val_fraction=0.2).fingerprint()["hash"] != first["hash"]
    builtin = lambda **kw: BuiltinDataModule(task="target", train_per_class=10, test_per_class=5, **kw).fingerprint()
    assert builtin() == builtin() and builtin(noise=0.4)["hash"] != builtin()["hash"]
