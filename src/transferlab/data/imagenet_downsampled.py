"""Downsampled ImageNet (Imagenet32 / Imagenet64, Chrabaszcz et al. 2017): the natural source for the 32x32 ConvNet.

Layout as released: `train_data_batch_1..10` and `val_data` (pickled dicts), or the same names with `.npz`,
in `root` or one folder below it (e.g. `Imagenet32_train/`, `Imagenet32_val/`). Each holds `data`
N x (3*S*S) uint8 (R, G, B planes) and `labels` numbered 1..1000. `val_data` is the test split.

The files are decoded once into a memory-mapped uint8 cache (`cache_dir`, see `decoded_cache.py`): DDP ranks and
parallel jobs share one copy in the page cache, and the subsets of each split index into it lazily.
"""

import hashlib
from pathlib import Path

import numpy as np

from transferlab.core.errors import UserError
from transferlab.data.base import ClassificationDataModule, require_cache_dir
from transferlab.data.decoded_cache import cached_arrays, source_key
from transferlab.data.files import load_pickle
from transferlab.data.inputs import ArrayData

NUM_CLASSES = 1000
LAYOUT = (
    "train_data_batch_1..10 and val_data (pickled, or .npz), in root or one folder below it, "
    "as in the Imagenet32/Imagenet64 release"
)


def find_files(root: Path) -> dict[str, list[Path]]:
    """{"train": [train_data_batch_1, ...] in batch order, "test": [val_data]}: pickles or .npz."""

    def batch_number(p: Path) -> int:
        return int(p.name.removesuffix(".npz").rsplit("_", 1)[-1])

    found = {}
    for split, pattern in (("train", "train_data_batch_*"), ("test", "val_data*")):
        files = [
            p for p in [*root.glob(pattern), *root.glob(f"*/{pattern}")] if p.is_file() and (p.suffix in ("", ".npz"))
        ]
        if split == "train":
            files = sorted(
                (p for p in files if p.name.removesuffix(".npz").rsplit("_", 1)[-1].isdigit()), key=batch_number
            )
        found[split] = files
    return found


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(`data`, `labels`) of one batch file; a truncated or corrupt file is a UserError naming it."""
    try:
        if path.suffix == ".npz":
            with np.load(path) as entry:
                return np.asarray(entry["data"]), np.asarray(entry["labels"])
        entry = load_pickle(path, "Downsampled ImageNet")
        return np.asarray(entry["data"]), np.asarray(entry["labels"])
    except UserError:
        raise
    except Exception as err:
        raise UserError(
            f"Downsampled ImageNet file {path} is truncated or corrupt ({type(err).__name__}: {err}). "
            "Replace it with a good copy from the Imagenet32/64 release."
        ) from None


def check_batch(path: Path, data: np.ndarray, labels: np.ndarray, size: int) -> None:
    expected = 3 * size * size
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != expected:
        hint = ""
        if data.ndim == 2:
            for s in (8, 16, 32, 64):
                if data.shape[1] == 3 * s * s and s != size:
                    hint = f" These are {s}x{s} images: set image_size={s}."
                elif data.shape[1] == s * s:
                    hint = f" These look like one-channel {s}x{s} images; the release has 3 channels."
        raise UserError(
            f"Downsampled ImageNet file {path} holds data of shape {data.shape} ({data.dtype}); expected "
            f"N x {expected} uint8 (3 x {size} x {size}: R, G, B planes).{hint}"
        )
    if len(labels) != len(data):
        raise UserError(f"Downsampled ImageNet file {path} has {len(data)} images but {len(labels)} labels.")
    bad = labels[(labels < 1) | (labels > NUM_CLASSES)]
    if len(bad):
        raise UserError(
            f"Downsampled ImageNet file {path} has labels out of range 1..{NUM_CLASSES}: "
            f"{np.unique(bad)[:10].tolist()}."
        )


class DownsampledImageNetDataModule(ClassificationDataModule):
    """`classes`: null (all 1000), N (labels 1..N), a list of class ids (0-based), or a list of wnids
    (needs the release's `map_clsloc.txt`, `<wnid> <label> <name>`, in root)."""

    num_classes_total = NUM_CLASSES
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)
    copy_subsets = False  # index into the shared memory map instead of copying each split
    cache_dir: str  # a folder, never None here (the decoded arrays are kept in it)

    def __init__(
        self,
        root: str | None = None,
        classes=None,
        cache_dir: str = "outputs/cache/data",
        image_size: int = 32,
        **kwargs,
    ):
        super().__init__(image_size=image_size, cache_dir=cache_dir, **kwargs)
        require_cache_dir(self.key, cache_dir, "the decoded images (a memory map shared by DDP ranks and jobs)")
        self.root, self.classes = root, classes
        if classes is not None and not isinstance(classes, int) and any(isinstance(c, str) for c in classes):
            _ = self.class_ids  # wnids: checked against map_clsloc.txt now

    def _root(self) -> Path:
        if self.root is None:
            raise UserError(f"Downsampled ImageNet root is not set: pass {self.key}.root=<folder with {LAYOUT}>.")
        return Path(self.root).expanduser()

    def class_names(self) -> list[str] | None:
        """wnids by class id, from the release's `map_clsloc.txt` (`<wnid> <label 1..1000> <name>`) where present."""
        mapping = self._root() / "map_clsloc.txt"
        if not mapping.is_file():
            if (
                self.classes is not None
                and not isinstance(self.classes, int)
                and any(isinstance(c, str) for c in self.classes)
            ):
                raise UserError(
                    f"classes given as wnids need {mapping} (`<wnid> <label 1..1000> <name>` per line, "
                    "from the Imagenet32/64 release); or give class ids 0..999 or a count instead."
                )
            return None
        names = [""] * NUM_CLASSES
        for line in mapping.read_text().splitlines():
            if line.strip():
                names[int(line.split()[1]) - 1] = line.split()[0]
        return names

    def load_split(self, split: str):
        root = self._root()
        files = find_files(root)[split]
        if not files:
            raise UserError(
                f"No {'train_data_batch_*' if split == 'train' else 'val_data'} files under {root}: "
                f"expected {LAYOUT}. Point {self.key}.root at that folder."
            )
        size = self.image_size
        name = f"imagenet{size}_{split}_{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]}"

        def build():
            counts = []
            for path in files:  # check every file before writing anything
                data, labels = read_batch(path)
                check_batch(path, data, labels, size)
                counts.append(len(labels))

            def fill(images: np.ndarray):
                start = 0
                for path, n in zip(files, counts):
                    data, labels = read_batch(path)
                    images[start : start + n] = data.reshape(n, 3, size, size)
                    start += n
                    yield labels.astype(np.int64) - 1

            return (sum(counts), 3, size, size), fill

        images, labels = cached_arrays(self.cache_dir, name, source_key(files, self.cache_dir, image_size=size), build)
        return ArrayData(images, labels)

    def data_files(self) -> list[Path]:
        return [p for split in ("train", "test") for p in find_files(self._root())[split]]
