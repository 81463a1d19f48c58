"""CIFAR-10 in the `cifar-10-batches-py` layout, read through torchvision.

Re-encoded or re-packed copies have other md5 sums than the official files, so the check is of the
layout (files, shapes, label range), not of torchvision's checksums.
"""

import pickle
from pathlib import Path

import torch
from torchvision.datasets import CIFAR10

from transferlab.data.base import ClassificationDataModule
from transferlab.errors import UserError

FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
LAYOUT = "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} (the python version of CIFAR-10)"


def _missing_files(root: Path) -> list[str]:
    return [f for f in FILES if not (root / "cifar-10-batches-py" / f).is_file()]


class _CIFAR10Files(CIFAR10):
    def _check_integrity(self) -> bool:  # the layout instead of the official md5 sums
        return not _missing_files(Path(self.root))

    def _load_meta(self) -> None:  # torchvision's also checks batches.meta's md5 sum
        with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


class CIFAR10DataModule(ClassificationDataModule):
    num_classes_total = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    def __init__(self, root: str | None = None, download: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.root, self.download = root, download

    def prepare_data(self) -> None:
        if self.download:
            _CIFAR10Files(self._root(), train=True, download=True)

    def _root(self) -> Path:
        if self.root is None:
            raise UserError(f"CIFAR-10 root is not set: pass data.target.root=<folder holding {LAYOUT}>, "
                            "or data.target.download=true to download it there.")
        root = Path(self.root).expanduser()
        return root.parent if root.name == "cifar-10-batches-py" else root

    def data_files(self) -> list[Path]:
        return [self._root() / "cifar-10-batches-py" / f for f in FILES]

    def load_split(self, split: str):
        root = self._root()
        missing = _missing_files(root)
        if missing:
            raise UserError(f"CIFAR-10 not found at {root}: expected {LAYOUT}; missing {', '.join(missing)}. "
                            "Point data.target.root at the folder that holds cifar-10-batches-py, or set "
                            "data.target.download=true (needs internet).")
        try:
            data = _CIFAR10Files(str(root), train=split == "train")
        except Exception:
            raise UserError(_find_bad_file(root / "cifar-10-batches-py")) from None
        images = torch.from_numpy(data.data)
        labels = torch.as_tensor(data.targets)
        if len(images) != len(labels):  # rows of another length that happen to reshape to 3 x 32 x 32
            raise UserError(_find_bad_file(root / "cifar-10-batches-py"))
        if images.ndim != 4 or tuple(images.shape[1:]) != (32, 32, 3):
            raise UserError(f"CIFAR-10 {split} images under {root} have shape {tuple(images.shape)}, "
                            "expected N x 32 x 32 x 3 (the data rows are 3072 uint8 values, R, G, B planes).")
        bad = labels[(labels < 0) | (labels > 9)]
        if len(bad):
            raise UserError(f"CIFAR-10 {split} labels under {root} out of range 0..9: {bad.unique()[:10].tolist()}.")
        if self.loader == "workers":
            return data
        return images.permute(0, 3, 1, 2).contiguous(), labels


def _find_bad_file(folder: Path) -> str:
    """Name the batch file that torchvision could not read (only called after a failure)."""
    for name in FILES:
        try:
            with open(folder / name, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            if name != "batches.meta":
                assert len(entry["data"]) == len(entry.get("labels", entry.get("fine_labels", [])))
                data = entry["data"]
        except Exception as err:
            return (f"CIFAR-10 file {folder / name} is truncated or corrupt ({type(err).__name__}: {err}). "
                    "Replace it with a good copy (or re-download with data.target.download=true).")
        if name != "batches.meta" and (getattr(data, "ndim", 0) != 2 or data.shape[1] != 3072):
            return (f"CIFAR-10 file {folder / name} holds data of shape {getattr(data, 'shape', '?')}; expected "
                    "N x 3072 uint8 (3 x 32 x 32: R, G, B planes). Replace it with a good copy.")
    return f"CIFAR-10 under {folder} could not be read; its files look intact: check their permissions."
