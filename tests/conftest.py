"""Shared fixtures: the real config composed with tiny sizes, and small datasets in the real file layouts."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

import transferlab.commands.common  # noqa: F401  (registers the config's resolvers, as every console script does)
from transferlab import CONF_DIR

REPO = Path(__file__).resolve().parents[1]
# The team's real-data copy (CIFAR-10, an ImageNet sample): ../shared/data beside the checkout, or wherever
# TRANSFERLAB_SHARED_DATA points. Tests that read it skip, naming the setting, only where it is absent.
SHARED_DATA = Path(os.environ.get("TRANSFERLAB_SHARED_DATA", REPO.parent / "shared" / "data"))
needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "cifar10").is_dir(),
    reason=f"the real-data copy is not at {SHARED_DATA}: set TRANSFERLAB_SHARED_DATA to the folder holding "
    "cifar10/ and imagenet-sample/ (see ../shared/data/README.md)",
)

# The built-in tasks at a size that trains in seconds; every stage 2 epochs (scratch: 4). Sizes only: every
# feature as a user gets it (progress bar, precision=auto, CSV + TensorBoard, lr monitor, stage cache on).
SIZES = [
    "data.source.source_classes=6",
    "data.source.train_per_class=40",
    "data.source.test_per_class=10",
    "data.target.train_per_class=10",
    "data.target.test_per_class=10",
    "data.batch_size=16",
    "stages.source.epochs=2",
    "stages.pretrain.epochs=2",
    "stages.finetune.epochs=2",
]
# What most tests turn off for speed and independence; for each feature, a test in tests/test_defaults.py (or the
# feature's own file) runs it with SIZES alone, as shipped.
QUIET = [
    "trainer.enable_progress_bar=false",
    "logger=csv",
    "~callbacks.lr_monitor",
    "cache=false",  # every test trains what it runs; tests/test_cache.py turns the stage cache on
]
TINY = [*SIZES, "data.source.eval_batch_size=64", *QUIET]


def compose_config(run_dir: Path, overrides: list[str] = (), config_name: str = "config"):
    """The real Hydra config, as the CLI composes it, with `run_dir` as the run folder (and the stage cache
    next to it)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            config_name=config_name,
            overrides=[*overrides, f"paths.run_dir={run_dir}", f"paths.output_root={Path(run_dir).parent}"],
        )


@pytest.fixture(scope="session", autouse=True)
def _no_outputs_in_the_repo(tmp_path_factory):
    """Console scripts started by module-scoped fixtures write under a session folder, not the checkout."""
    os.environ["TRANSFERLAB_OUTPUT_ROOT"] = str(tmp_path_factory.mktemp("outputs"))


@pytest.fixture(autouse=True)
def _outputs_in_tmp(tmp_path, monkeypatch):
    """Console scripts started by a test write outputs (and the stage cache) under its tmp_path."""
    monkeypatch.setenv("TRANSFERLAB_OUTPUT_ROOT", str(tmp_path / "outputs"))


@pytest.fixture
def tiny_cfg(tmp_path):
    return lambda *overrides: compose_config(tmp_path / "run", [*TINY, *overrides])


def run_cli(
    *args: str, cwd: Path | None = None, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run a console script as a user would (same interpreter, real process); `env`: variables to set for it."""
    script = Path(sys.executable).parent / args[0]
    proc = subprocess.run(
        [str(script), *args[1:]],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=900,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
        )
    return proc


def write_cifar10(root: Path, n_train: int = 50, n_test: int = 20, seed: int = 0) -> Path:
    """A small cifar-10-batches-py folder in the official pickle layout (5 train batches + test batch)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_train // 5
        entry = {
            "batch_label": name,
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "labels": [int(i % 10) for i in range(n)],
            "filenames": [f"{i}.png" for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(
            {
                "label_names": [
                    "airplane",
                    "automobile",
                    "bird",
                    "cat",
                    "deer",
                    "dog",
                    "frog",
                    "horse",
                    "ship",
                    "truck",
                ],
                "num_cases_per_batch": n_train // 5,
                "num_vis": 3072,
            },
            f,
        )
    return root


def write_imagenet(root: Path, wnids=("n01440764", "n01443537", "n01484850"), per_class: int = 4) -> Path:
    """An ILSVRC-2012 style folder of JPEGs of varied sizes, with one greyscale image per split."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, wnid in enumerate(wnids):
            (root / split / wnid).mkdir(parents=True)
            for i in range(per_class):
                h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
                if c == 0 and i == 0:
                    img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L")
                else:
                    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")
                img.save(root / split / wnid / f"{split}_{c}_{i}.JPEG", quality=90)
    return root


@pytest.fixture(scope="session")
def real_cifar10(tmp_path_factory) -> Path:
    """The real CIFAR-10 copy of ../shared/data, built into the official layout (about 6 s)."""
    if not (SHARED_DATA / "cifar10").is_dir():
        pytest.skip(f"the real-data copy is not at {SHARED_DATA}: set TRANSFERLAB_SHARED_DATA")
    out = tmp_path_factory.mktemp("cifar10")
    subprocess.run(
        [sys.executable, str(SHARED_DATA / "cifar10" / "build_cifar10.py"), str(out)], check=True, capture_output=True
    )
    return out


def write_imagenet32(
    root: Path, n_train: int = 60, n_val: int = 20, size: int = 32, batches: int = 3, npz: bool = False, seed: int = 0
) -> Path:
    """Downsampled ImageNet in the release layout: `Imagenet{size}_train/train_data_batch_1..` and
    `Imagenet{size}_val/val_data` (pickled dicts, or `.npz`), `data` N x 3*size*size, `labels` 1..1000."""
    rng = np.random.default_rng(seed)
    files = [(f"Imagenet{size}_train", f"train_data_batch_{i}", n_train // batches) for i in range(1, batches + 1)]
    for folder, name, n in [*files, (f"Imagenet{size}_val", "val_data", n_val)]:
        (root / folder).mkdir(parents=True, exist_ok=True)
        entry = {
            "data": rng.integers(0, 256, (n, 3 * size * size), dtype=np.uint8),
            "labels": [int(i % 5) + 1 for i in range(n)],
        }
        if name.startswith("train"):
            entry["mean"] = entry["data"].mean(0)
        if npz:
            np.savez(root / folder / f"{name}.npz", **entry)
        else:
            with open(root / folder / name, "wb") as f:
                pickle.dump(entry, f)
    return root


def pytest_collection_modifyitems(items):
    """Under pytest-xdist (`-n`), the tests that share the one local SLURM cluster run on one worker, in turn."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
