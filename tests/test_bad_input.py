"""Bad input to a real run, each one message (exit 2, no traceback) before anything trains, what was done
kept: invalid values and presets, a missing or damaged data set, a run or stage-cache folder that cannot be
used or holds a manifest that is not one."""

from pathlib import Path

import pytest
from helpers.cli import assert_user_error, run_cli, transferlab
from helpers.config import DETERMINISTIC, ONLY_SOURCE
from helpers.datasets import write_cifar10, write_imagenet
from helpers.run_folder import manifest, snapshot

pytestmark = pytest.mark.usefixtures("helpers_on_path")  # runs in other processes: this src, helpers.callbacks


# -- invalid values and presets ------------------------------------------------------------------------------
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


# -- a missing or damaged data set ---------------------------------------------------------------------------
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


# -- a run or stage-cache folder that cannot be used ---------------------------------------------------------
def bad_manifest(text: str):
    def setup(run_dir: Path, tmp_path: Path) -> list[str]:
        run_dir.mkdir(parents=True)
        (run_dir / "manifest.json").write_text(text)
        return []

    return setup


def a_file(run_dir: Path, tmp_path: Path) -> Path:
    (tmp_path / "file").write_text("a file, not a folder\n")
    return tmp_path / "file"


BAD_FOLDERS = {  # what is wrong: (set it up, returning overrides), the message
    "manifest.json not JSON": (bad_manifest("{stages: "), "is not a transferlab manifest (Expecting property name"),
    "empty manifest.json": (bad_manifest(""), "is not a transferlab manifest (Expecting value"),
    "manifest.json holding []": (bad_manifest("[]"), "(expected an object with a 'stages' object)"),
    "a stage record that is not one": (
        bad_manifest('{"stages": {"source": {"status": "finished"}}}'),
        "stage 'source' is not a stage record",
    ),
    "run folder is a file": (
        lambda r, t: [f"hydra.run.dir={a_file(r, t)}"],
        "The run folder (hydra.run.dir) {tmp}/file cannot be written to (File exists",
    ),
    "run folder under a file": (
        lambda r, t: [f"hydra.run.dir={a_file(r, t)}/run"],
        "The run folder (hydra.run.dir) {tmp}/file/run cannot be written to (Not a directory",
    ),
    "run folder where no file can be created": (
        lambda r, t: ["hydra.run.dir=/sys/transferlab-run"],
        "cannot be written to (Operation not permitted: /sys/transferlab-run)",
    ),
    "cache folder is a file": (
        lambda r, t: ["cache=true", f"paths.cache_dir={a_file(r, t)}"],
        "The stage cache folder (paths.cache_dir) {tmp}/file/stages cannot be written to",
    ),
    "cache folder where no file can be created": (
        lambda r, t: ["cache=true", "paths.cache_dir=/sys/transferlab"],
        "cannot be written to (Operation not permitted",
    ),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_bad_run_or_cache_folder_is_one_message_and_changes_nothing(tmp_path, case):
    setup, message = BAD_FOLDERS[case]
    run_dir = tmp_path / "run"
    overrides = setup(run_dir, tmp_path)
    before = snapshot(tmp_path, ".hydra")
    proc = run_cli("transferlab", *DETERMINISTIC, *ONLY_SOURCE, f"hydra.run.dir={run_dir}", *overrides, check=False)
    assert_user_error(proc, message.format(tmp=tmp_path))
    assert snapshot(tmp_path, ".hydra") == before and not (run_dir / "source").exists()
