"""The shared base of every data module: splits, class subsets, low-data regimes, and two input paths.

- `memory`: the whole split as a uint8 tensor N x 3 x H x W, indexed a batch at a time (no per-sample
  collate); crop, flip and normalisation run batched on the training device (`on_after_batch_transfer`).
  This is the path for 32x32 data, where per-sample PIL transforms would be the bottleneck. Large sets
  (Imagenet32) come as a memory-mapped cache (`cache.py`) that the splits index lazily (`Rows`), not copy.
- `workers`: a torchvision dataset with per-sample PIL transforms in DataLoader worker processes, for
  large images read from files.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate
from torchvision.transforms import v2

from transferlab.errors import UserError


class ClassificationDataModule(L.LightningDataModule):
    """Subclasses say how to read their files; this class decides which samples go where and how.

    Subclasses implement `load_split(split)` for split in {"train", "test"}: for the memory path it returns
    `(images uint8 N x 3 x H x W, labels int64 N)`, for the workers path a dataset of (PIL image, label)
    with a `targets` list. They set `num_classes_total`, `mean`, `std` and `image_size`.
    """

    loaders: tuple[str, ...] = ("memory", "workers")
    class_names = False  # True: `classes` may name classes (wnids), not only number them (transferlab.validation)
    copy_subsets = True  # False: splits index lazily into the (memory-mapped, shared) images instead of copying
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)

    def __init__(self, batch_size: int = 64, eval_batch_size: int | None = None, num_workers: int = 0,
                 val_fraction: float = 0.1, classes: int | Sequence[int] | None = None,
                 samples_per_class: int | None = None, label_fraction: float | None = None,
                 augment: bool = True, loader: str = "memory", pin_memory: bool = False, seed: int = 0,
                 image_size: int = 32):
        super().__init__()  # the values' types and ranges are checked by transferlab.validation before this runs
        if loader not in self.loaders:
            raise UserError(f"{type(self).__name__} supports loader={' | '.join(self.loaders)}, not {loader!r}.")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.pin_memory, self.loader = num_workers, pin_memory, loader
        self.val_fraction, self.classes, self.seed = val_fraction, classes, seed
        self.samples_per_class, self.label_fraction = samples_per_class, label_fraction
        self.augment, self.image_size = augment, image_size
        self.splits: dict[str, object] = {}

    # -- what subclasses provide -------------------------------------------------------------------
    num_classes_total: int

    def load_split(self, split: str):
        raise NotImplementedError

    def train_transform(self) -> Callable:
        """Per-sample transform of the workers path (PIL in, float tensor out)."""
        ops = [v2.RandomCrop(self.image_size, padding=4), v2.RandomHorizontalFlip()] if self.augment else []
        return v2.Compose([*self._to_tensor(), *ops, v2.Normalize(self.mean, self.std)])

    def eval_transform(self) -> Callable:
        return v2.Compose([*self._to_tensor(), v2.Normalize(self.mean, self.std)])

    def _to_tensor(self) -> list:
        return [v2.PILToTensor(), v2.Resize(self.image_size, antialias=True), v2.CenterCrop(self.image_size),
                v2.ToDtype(torch.float32, scale=True)]

    # -- class subsets and splits ----------------------------------------------------------------
    @property
    def class_ids(self) -> list[int]:
        """Original class ids kept, in order; they are renumbered 0..k-1."""
        if self.classes is None:
            return list(range(self.num_classes_total))
        if isinstance(self.classes, int):
            if not 0 < self.classes <= self.num_classes_total:
                raise UserError(f"classes={self.classes}: the dataset has {self.num_classes_total} classes.")
            return list(range(self.classes))
        ids = [int(c) for c in self.classes]
        bad = [c for c in ids if not 0 <= c < self.num_classes_total]
        if bad:
            raise UserError(f"classes {bad} are out of range: the dataset has {self.num_classes_total} classes.")
        return ids

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train_data, test_data = self.load_split("train"), self.load_split("test")
        remap = torch.full((self.num_classes_total,), -1, dtype=torch.long)
        remap[self.class_ids] = torch.arange(self.num_classes)
        train_labels = remap[_labels(train_data)]
        test_labels = remap[_labels(test_data)]
        train_idx, val_idx = stratified_split(train_labels, self.val_fraction, self.samples_per_class,
                                              self.label_fraction, self.seed)
        test_idx = torch.nonzero(test_labels >= 0).flatten()
        self.splits = {
            "train": self._subset(train_data, train_labels, train_idx, train=True),
            "val": self._subset(train_data, train_labels, val_idx, train=False),
            "test": self._subset(test_data, test_labels, test_idx, train=False),
        }

    def split_sizes(self) -> dict[str, int]:
        self.setup()
        return {name: len(split[1]) if self.loader == "memory" else len(split)
                for name, split in self.splits.items()}

    def fingerprint(self) -> dict:
        """What this data is, cheaply: split sizes and a hash of the file names and sizes it reads (no file
        contents), or of the generator's parameters for generated data; with the split settings."""
        digest = hashlib.sha256()
        files = sorted(self.data_files())
        sizes = [path.stat().st_size for path in files]
        top = Path(os.path.commonpath(files)).parent if files else None  # names relative to the data folder
        for path, size in zip(files, sizes):
            digest.update(f"{path.relative_to(top).as_posix()}\t{size}\n".encode())
        settings = {"class_ids": self.class_ids, "val_fraction": self.val_fraction, "seed": self.seed,
                    "samples_per_class": self.samples_per_class, "label_fraction": self.label_fraction,
                    "generator": self.generator_params()}
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
        return {"dataset": type(self).__name__, "splits": self.split_sizes(), "files": len(files),
                "bytes": sum(sizes), "hash": digest.hexdigest()[:16]}

    def data_files(self) -> list[Path]:
        """The files the data is read from (subclasses that read files say which)."""
        return []

    def generator_params(self) -> dict | None:
        """The parameters of generated data (subclasses that generate it say which)."""
        return None

    def _subset(self, data, labels: torch.Tensor, idx: torch.Tensor, train: bool):
        if self.loader == "memory":
            images, _ = data
            return (images[idx] if self.copy_subsets else Rows(images, idx)), labels[idx]
        return RelabelledSubset(data, idx.tolist(), labels, self.train_transform() if train else self.eval_transform())

    # -- loaders ---------------------------------------------------------------------------------
    def train_dataloader(self):
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self):
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self):
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def _loader(self, split: str, batch_size: int, shuffle: bool):
        self.setup()
        data = self.splits[split]
        if self.loader == "memory":
            rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
            return DataLoader(InMemoryBatches(*data, batch_size, shuffle, self.seed, self._epoch, rank, world),
                              batch_size=None, pin_memory=self.pin_memory)
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
                          drop_last=False, collate_fn=collate_readable)

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer else 0

    def _augment_generator(self, device: torch.device) -> torch.Generator:
        """Reseeded at each epoch from (seed, epoch): a run resumed at an epoch boundary augments the same way."""
        epoch = self._epoch()
        if getattr(self, "_augment_epoch", None) != (epoch, device):
            self._augment_epoch = (epoch, device)
            rank = self.trainer.global_rank if self.trainer else 0
            self._augment_gen = torch.Generator(device=device).manual_seed((self.seed * 1009 + rank) * 100_003 + epoch)
        return self._augment_gen

    def on_after_batch_transfer(self, batch, dataloader_idx):
        """Memory path: uint8 batch on the device -> augmented (training only), normalised float batch."""
        if self.loader != "memory":
            return batch
        x, y = batch
        training = self.trainer is not None and self.trainer.training
        if training and self.augment:
            x = random_crop_flip(x, padding=4, generator=self._augment_generator(x.device))
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return x.float().mul_(1 / (255 * std)).sub_(mean / std), y  # (x / 255 - mean) / std, in place


def _labels(data) -> torch.Tensor:
    if isinstance(data, tuple):
        return data[1].long()
    return torch.as_tensor(data.targets, dtype=torch.long)


def stratified_split(labels: torch.Tensor, val_fraction: float, samples_per_class: int | None,
                     label_fraction: float | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class: shuffle (by seed), hold out `val_fraction` for validation, then keep
    `samples_per_class` or `label_fraction` of the rest for training (the low-data regime).
    Samples whose label is -1 (classes not selected) are dropped."""
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in range(int(labels.max()) + 1 if len(labels) else 0):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) == 0:
            continue
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = int(round(val_fraction * len(idx)))
        rest = idx[n_val:]
        if samples_per_class is not None:
            rest = rest[:samples_per_class]
        if label_fraction is not None:
            rest = rest[:max(1, int(round(label_fraction * len(rest))))]
        val.append(idx[:n_val])
        train.append(rest)
    cat = lambda parts: torch.sort(torch.cat(parts)).values if parts else torch.empty(0, dtype=torch.long)
    return cat(train), cat(val)


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched RandomCrop(size, padding) + RandomHorizontalFlip on a B x C x H x W tensor, on its device:
    one gather from the zero-padded batch, with the flip folded into the column index."""
    b, c, h, w = x.shape
    hp, wp = h + 2 * padding, w + 2 * padding
    padded = torch.nn.functional.pad(x, (padding,) * 4).reshape(b, c * hp * wp)
    dy = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device, generator=generator)
    flip = torch.rand(b, 1, device=x.device, generator=generator) < 0.5
    cols = torch.arange(w, device=x.device)
    cols = torch.where(flip, cols.flip(0), cols) + dx  # B x W
    rows = torch.arange(h, device=x.device) + dy  # B x H
    index = (torch.arange(c, device=x.device).view(1, c, 1, 1) * (hp * wp)
             + rows[:, None, :, None] * wp + cols[:, None, None, :])
    return padded.gather(1, index.reshape(b, -1)).view(b, c, h, w)


class InMemoryBatches(IterableDataset):
    """Batches of an in-memory tensor dataset, indexed a batch at a time.

    The order depends only on (seed, epoch), so a resumed run sees the same batches; under DDP each rank
    takes a disjoint, equally long shard of it (padded by wrapping around, as DistributedSampler does).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool, seed: int,
                 epoch: Callable[[], int], rank: int = 0, world_size: int = 1):
        self.images, self.labels, self.batch_size, self.shuffle = images, labels, batch_size, shuffle
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size

    def _shard(self) -> torch.Tensor:
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch()))
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            per_rank = -(-n // self.world_size)
            order = order.repeat(-(-per_rank * self.world_size // max(n, 1)))[:per_rank * self.world_size]
            order = order[self.rank::self.world_size]
        return order

    def __len__(self) -> int:
        per_rank = -(-len(self.labels) // self.world_size)
        return -(-per_rank // self.batch_size)

    def __iter__(self):
        order = self._shard()
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            yield self.images[idx], self.labels[idx]


class Rows:
    """Rows `idx` of a tensor, indexed lazily: a split of a memory-mapped dataset without copying it."""

    def __init__(self, base: torch.Tensor, idx: torch.Tensor):
        self.base, self.idx = base, idx
        self.shape, self.dtype = (len(idx), *base.shape[1:]), base.dtype

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i) -> torch.Tensor:
        return self.base[self.idx[i]]


class RelabelledSubset(Dataset):
    """A subset of a (PIL image, label) dataset with renumbered labels and its own transform."""

    def __init__(self, data, indices: list[int], labels: torch.Tensor, transform: Callable):
        self.data, self.indices, self.labels, self.transform = data, indices, labels, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, _ = self.data[self.indices[i]]
        if image is None:  # an unreadable file, skipped (skip_corrupt): dropped by `collate_readable`
            return None
        return self.transform(image), int(self.labels[self.indices[i]])


def collate_readable(samples: list):
    """default_collate of the samples that could be read (a skipped unreadable file is None)."""
    kept = [s for s in samples if s is not None]
    if not kept:
        raise UserError(f"All {len(samples)} images of a batch were unreadable: check the dataset's files.")
    return default_collate(kept)
