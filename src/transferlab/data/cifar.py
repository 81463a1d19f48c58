"""CIFAR-10 (`cifar-10-batches-py`) and CIFAR-100 (`cifar-100-python`), the python versions, read from their
pickles. Re-encoded or re-packed copies have other md5 sums than the official files, so the check is of the
layout (files, shapes, label range, each file named when it is wrong), not of torchvision's checksums;
torchvision is used only to download (`download: true`).
"""

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100

from transferlab.core.errors import UserError
from transferlab.data.base import ClassificationDataModule
from transferlab.data.files import load_pickle, readable_dir
from transferlab.data.inputs import ArrayData


class CIFARDataModule(ClassificationDataModule):
    """What differs between the two: the folder, the files of each split, the label key, the class names."""

    name: str
    folder: str
    split_files: dict[str, list[str]]
    meta_file: str
    layout_files: str
    downloader: type[Any]  # the torchvision dataset class
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    def __init__(self, root: str | None = None, download: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.root, self.download = root, download
        self._names: list[str] | None = None

    @property
    def label_key(self) -> str:
        return "labels"

    @property
    def names_key(self) -> str:
        return "label_names"

    @property
    def layout(self) -> str:
        return f"{self.folder}/{{{self.layout_files}}} (the python version of {self.name})"

    def prepare_data(self) -> None:
        if self.download:
            self.downloader(str(self._root()), train=True, download=True)

    def _root(self) -> Path:
        if self.root is None:
            raise UserError(
                f"{self.name} root is not set: pass {self.key}.root=<folder holding {self.layout}>, "
                f"or {self.key}.download=true to download it there."
            )
        root = Path(self.root).expanduser()
        return root.parent if root.name in (self.folder, self.downloader.filename) else root

    def data_files(self) -> list[Path]:
        return [
            self._root() / self.folder / f
            for f in [*self.split_files["train"], *self.split_files["test"], self.meta_file]
        ]

    def _check_layout(self) -> Path:
        root = self._root()
        for folder in (root, root / self.folder):
            if folder.is_dir():
                readable_dir(folder, f"{self.name} folder")
        missing = [f.name for f in self.data_files() if not f.is_file()]
        archive = root / self.downloader.filename  # the release's archive, downloaded but not unpacked
        if missing and archive.is_file():
            raise UserError(
                f"{self.name} at {root} is still packed in {archive.name}: unpack it there "
                f"(tar -xzf {archive} -C {root}), which makes {self.folder}/."
            )
        if missing:
            raise UserError(
                f"{self.name} not found at {root}: expected {self.layout}; missing {', '.join(missing)}. "
                f"Point {self.key}.root at the folder that holds {self.folder}, or set "
                f"{self.key}.download=true (needs internet)."
            )
        return root / self.folder

    def class_names(self) -> list[str]:
        if self._names is None:
            self._names = list(self._read(self._check_layout() / self.meta_file)[self.names_key])
        return self._names

    def load_split(self, split: str) -> ArrayData:
        folder = self._check_layout()
        images, labels = [], []
        for name in self.split_files[split]:
            data, y = self._read_batch(folder / name)
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(y)
        return ArrayData(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))

    def _read(self, path: Path) -> dict:
        try:
            return load_pickle(path, self.name)
        except UserError:
            raise
        except PermissionError:
            raise UserError(
                f"Cannot read {self.name} file {path}: permission denied. Let this user read it (chmod a+r)."
            ) from None
        except Exception as err:
            raise UserError(
                f"{self.name} file {path} is truncated or corrupt ({type(err).__name__}: {err}). "
                f"Replace it with a good copy (or re-download with {self.key}.download=true)."
            ) from None

    def _read_batch(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """(data N x 3072 uint8, labels) of one batch file, each checked; a bad file is named."""
        entry = self._read(path)
        if not isinstance(entry, dict) or "data" not in entry or self.label_key not in entry:
            keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise UserError(
                f"{self.name} file {path} has no `data` and `{self.label_key}` entries (found {keys}): "
                f"it is not a {self.name} batch. Replace it with a good copy."
            )
        data, labels = np.asarray(entry["data"]), np.asarray(entry[self.label_key])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise UserError(
                f"{self.name} file {path} holds data of shape {data.shape}; expected N x 3072 "
                f"uint8 (3 x 32 x 32: R, G, B planes), found {data.dtype}. Replace it with a good copy."
            )
        if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(
                f"{self.name} file {path} has {len(data)} images but labels of shape {labels.shape} "
                f"({labels.dtype}). Replace it with a good copy."
            )
        bad = labels[(labels < 0) | (labels >= self.num_classes_total)]
        if len(bad):
            raise UserError(
                f"{self.name} file {path}: labels out of range 0..{self.num_classes_total - 1}: "
                f"{np.unique(bad)[:10].tolist()}. Replace it with a good copy."
            )
        return data, labels.astype(np.int64)


class CIFAR10DataModule(CIFARDataModule):
    name, folder, num_classes_total = "CIFAR-10", "cifar-10-batches-py", 10
    split_files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    meta_file, downloader = "batches.meta", CIFAR10
    layout_files = "data_batch_1..5, test_batch, batches.meta"


class CIFAR100DataModule(CIFARDataModule):
    """`label_type`: `fine` (100 classes) or `coarse` (the 20 superclasses)."""

    name, folder = "CIFAR-100", "cifar-100-python"
    split_files = {"train": ["train"], "test": ["test"]}
    meta_file, downloader = "meta", CIFAR100
    layout_files = "train, test, meta"
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)

    def __init__(self, label_type: str = "fine", **kwargs):
        if label_type not in ("fine", "coarse"):
            raise UserError(f"CIFAR-100 label_type={label_type!r}: use fine (100 classes) or coarse (20 superclasses).")
        self.label_type = label_type
        super().__init__(**kwargs)

    @property
    def num_classes_total(self) -> int:
        return 100 if self.label_type == "fine" else 20

    @property
    def label_key(self) -> str:
        return f"{self.label_type}_labels"

    @property
    def names_key(self) -> str:
        return f"{self.label_type}_label_names"

    def identity_params(self) -> dict:
        return {"label_type": self.label_type}
