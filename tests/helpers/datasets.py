"""Small data sets written here in the real file layouts (CIFAR-10 and CIFAR-100 pickles, ILSVRC-2012 JPEG folders,
downsampled ImageNet, image folders), and where the team's real-data copy is."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.config import REPO

# The team's real-data copy (CIFAR-10, an ImageNet sample): ../shared/data beside the checkout, or wherever
# TRANSFERLAB_SHARED_DATA points. Tests that read it skip, naming the setting, only where it is absent.
SHARED_DATA = Path(os.environ.get("TRANSFERLAB_SHARED_DATA", REPO.parent / "shared" / "data"))
needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "cifar10").is_dir(),
    reason=f"the real-data copy is not at {SHARED_DATA}: set TRANSFERLAB_SHARED_DATA to the folder holding "
    "cifar10/ and imagenet-sample/ (see ../shared/data/README.md)",
)


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


def write_cifar100(root: Path, n_train=200, n_test=100) -> Path:
    """cifar-100-python/{train, test, meta} as released: fine and coarse labels, their names in meta."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = [i % 100 for i in range(n)]
        entry = {
            "filenames": [f"{i}.png" for i in range(n)],
            "batch_label": name,
            "fine_labels": fine,
            "coarse_labels": [f // 5 for f in fine],
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
        (folder / name).write_bytes(pickle.dumps(entry))
    meta = {
        "fine_label_names": [f"fine{i}" for i in range(100)],
        "coarse_label_names": [f"coarse{i}" for i in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta))
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


def write_folder(root: Path, classes=("ant", "bee", "cat"), per_class=6, splits=("train",)) -> Path:
    """An image folder, <split>/<class>/<i>.png: `per_class` 20x24 RGB images a class."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root
