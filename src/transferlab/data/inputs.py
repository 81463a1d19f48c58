"""The two input paths, as two small objects behind one interface (`subset`, `loader`, `on_device`):

- `MemoryInput` (`loader: memory`): the split as a uint8 tensor N x 3 x H x W, indexed a batch at a time (no
  per-sample collate); crop, flip and normalisation run batched on the training device. The path for 32x32 data,
  where per-sample PIL transforms would be the bottleneck. `device_resident: true` keeps the split on the
  training device itself (no per-batch host transfer); otherwise batches are pinned on a GPU machine and copied
  without blocking (Lightning copies with `non_blocking=True` to a GPU).
- `WorkersInput` (`loader: workers`): a dataset of (PIL image, label) with per-sample transforms in DataLoader
  worker processes, for large images read from files.

Every data module's `load_split` returns a `Dataset` whose `targets` are its labels; array data (CIFAR,
Imagenet32, built-in) is an `ArrayData`, which both paths take.
"""

from collections.abc import Callable

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from transferlab.core.errors import UserError


class ArrayData(Dataset):
    """uint8 images N x 3 x H x W (a tensor or a memory map) and int64 labels; items are (PIL image, label)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.targets = images, labels.long()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return Image.fromarray(self.images[i].permute(1, 2, 0).numpy()), int(self.targets[i])


class MemoryInput:
    name, can_be_resident = "memory", True

    def subset(self, dm, data: Dataset, labels: torch.Tensor, idx: torch.Tensor, train: bool):
        """(images, labels) of rows `idx`: a copy, or a lazy view into a shared memory map."""
        if not isinstance(data, ArrayData):
            raise UserError(f"{type(dm).__name__} reads image files: use loader=workers, not loader=memory.")
        return (data.images[idx] if dm.copy_subsets else Rows(data.images, idx)), labels[idx]

    def loader(self, dm, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        rank, world = (dm.trainer.global_rank, dm.trainer.world_size) if dm.trainer else (0, 1)
        device = dm.device()
        images, labels = dm.splits[split]
        if dm.device_resident:
            images, labels = dm.resident(split, device)
        pin = dm.pin(device) and images.device.type == "cpu"
        return DataLoader(
            InMemoryBatches(images, labels, batch_size, shuffle, dm.seed, dm.epoch, rank, world),
            batch_size=None,
            pin_memory=pin,
        )

    def on_device(self, dm, batch):
        """uint8 batch on the device -> augmented (training only), normalised float batch."""
        x, y = batch
        training = dm.trainer is not None and dm.trainer.training
        if training and dm.augment:
            x = random_crop_flip(x, padding=4, generator=dm.augment_generator(x.device))
        return to_model_input(dm, x), y


def to_model_input(dm, x: torch.Tensor) -> torch.Tensor:
    """A batch of 0..255 images (uint8 or float) at the model's input size, normalised as the model expects."""
    if dm.model_input and dm.input_size != x.shape[-1]:  # the model's size: a 224-px ViT on 32-px CIFAR
        mode = dm.interpolation.value
        x = torch.nn.functional.interpolate(x.float(), size=dm.input_size, mode=mode, antialias=True)
        x = x.clamp_(0, 255) if mode == "bicubic" else x
    mean = torch.tensor(dm.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(dm.std, device=x.device).view(1, -1, 1, 1)
    return x.float().mul_(1 / (255 * std)).sub_(mean / std)  # (x / 255 - mean) / std, in place


class WorkersInput:
    name, can_be_resident = "workers", False

    def subset(self, dm, data: Dataset, labels: torch.Tensor, idx: torch.Tensor, train: bool):
        return RelabelledSubset(data, idx.tolist(), labels, dm.train_transform() if train else dm.eval_transform())

    def loader(self, dm, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dm.splits[split],
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=dm.num_workers,
            pin_memory=dm.pin(dm.device()),
            persistent_workers=dm.num_workers > 0,
            drop_last=False,
            collate_fn=collate_readable,
        )

    def on_device(self, dm, batch):
        return batch


INPUTS: dict[str, MemoryInput | WorkersInput] = {"memory": MemoryInput(), "workers": WorkersInput()}


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
    index = (
        torch.arange(c, device=x.device).view(1, c, 1, 1) * (hp * wp)
        + rows[:, None, :, None] * wp
        + cols[:, None, None, :]
    )
    return padded.gather(1, index.reshape(b, -1)).view(b, c, h, w)


class InMemoryBatches(IterableDataset):
    """Batches of an in-memory tensor dataset, indexed a batch at a time (on the tensors' device).

    The order depends only on (seed, epoch), so a resumed run sees the same batches; under DDP each rank
    takes a disjoint, equally long shard of it (padded by wrapping around, as DistributedSampler does).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int,
        epoch: Callable[[], int],
        rank: int = 0,
        world_size: int = 1,
    ):
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
            order = order.repeat(-(-per_rank * self.world_size // max(n, 1)))[: per_rank * self.world_size]
            order = order[self.rank :: self.world_size]
        return order

    def __len__(self) -> int:
        per_rank = -(-len(self.labels) // self.world_size)
        return -(-per_rank // self.batch_size)

    def __iter__(self):
        order = self._shard().to(self.labels.device)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.images[idx], self.labels[idx]


class Rows:
    """Rows `idx` of a tensor, indexed lazily: a split of a memory-mapped dataset without copying it."""

    def __init__(self, base: torch.Tensor, idx: torch.Tensor):
        self.base, self.idx = base, idx
        self.shape, self.dtype, self.device = (len(idx), *base.shape[1:]), base.dtype, base.device

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i) -> torch.Tensor:
        return self.base[self.idx[i]]

    def to(self, device: torch.device, chunk: int = 65536) -> torch.Tensor:
        """The rows as one tensor on `device`, copied a chunk at a time (no full host copy first)."""
        out = torch.empty(self.shape, dtype=self.dtype, device=device)
        for start in range(0, len(self.idx), chunk):
            out[start : start + chunk] = self.base[self.idx[start : start + chunk]].to(device, non_blocking=True)
        return out


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
