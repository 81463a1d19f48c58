"""The target's unlabeled images, served beside a stage's labelled batches (Lightning's CombinedLoader): for
semi-supervised fine-tuning on the target and for domain adaptation from the source to it.

Where they come from, `data.target.unlabeled`:
- `rest`: the target's training images that the stage does not train on with their labels, which are never read.
  For a stage on the target, what `samples_per_class` / `label_fraction` left out of the training split; for a
  stage on the source (domain adaptation), every training image of the target (its val and test images are never
  among them).
- a folder of images without classes (`<folder>/<image>`, any format PIL reads).

A batch holds `ratio` x the labelled batch size images, as uint8 at the labelled images' size; on the device they
become the views the stage's method asks for (`views.py`: weak = crop + flip, strong = weak + RandAugment +
cutout). An epoch lasts as long as the longer of the two loaders; the shorter is cycled (`max_size_cycle`). Their
order depends only on (seed, epoch), like the labelled batches', so a stage resumed at an epoch boundary sees the
same unlabeled batches.
"""

from collections.abc import Sized
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from transferlab.core.errors import UserError
from transferlab.data.files import ImageLoader, readable_dir
from transferlab.data.inputs import InMemoryBatches, Rows
from transferlab.data.views import make_views

KEY = "data.target.unlabeled"
ORDER_OFFSET = 7919  # the unlabeled batches' order is drawn apart from the labelled ones'


@dataclass
class UnlabeledImages:
    """The images (uint8 N x 3 x H x W, a tensor or lazy `Rows`) or an image dataset, and what they came from."""

    images: torch.Tensor | Rows | Dataset
    origin: str  # for the stage header and the manifest: "rest of data.target's training images" or the folder
    files: list[Path]  # the folder's files (their content enters the stage hash); [] for `rest`

    def __len__(self) -> int:
        return len(cast(Sized, self.images))


def check_setting(value) -> None:
    """`data.target.unlabeled`: rest or a folder (which is read when a stage asks for it)."""
    if value is None or (isinstance(value, str) and value.strip()):
        return
    raise UserError(f"{KEY}={value!r}: give rest (the target's unused training images) or a folder of images.")


def unlabeled_images(target, include_train: bool) -> UnlabeledImages:
    """The unlabeled images of `target` (a set-up target data module), as its `unlabeled` setting says."""
    setting = target.unlabeled
    if setting in (None, "rest"):
        return _rest(target, include_train)
    return _folder(Path(setting).expanduser(), target)


def _rest(target, include_train: bool) -> UnlabeledImages:
    target.setup()
    idx = torch.cat([target.unused_idx, target.train_idx]) if include_train else target.unused_idx
    if len(idx) == 0:
        raise UserError(
            f"{KEY}=rest: the target keeps every training image's label (data.target.samples_per_class and "
            "label_fraction are null), so no image is left unlabeled. Keep fewer labels (e.g. "
            "data.target.samples_per_class=100), or give a folder of unlabeled images: data.target.unlabeled=<dir>."
        )
    data = target.train_data
    what = f"the target's {'training' if include_train else 'unused training'} images, labels unread"
    if hasattr(data, "images"):  # array data: uint8 rows, no copy of a memory map
        rows = data.images[idx] if target.copy_subsets else Rows(data.images, idx)
        return UnlabeledImages(rows, what, [])
    return UnlabeledImages(_FileImages([data.samples[i][0] for i in idx.tolist()], target), what, [])


def _folder(folder: Path, target) -> UnlabeledImages:
    if not folder.exists():
        raise UserError(f"{KEY}={folder} does not exist: give a folder of images (<folder>/<image>), or rest.")
    readable_dir(folder, "unlabeled image folder")
    subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if subfolders:
        raise UserError(
            f"{KEY}={folder} holds class-like folders ({', '.join(subfolders[:5])}"
            f"{', ...' if len(subfolders) > 5 else ''}): unlabeled images are read from the folder itself, "
            "without classes. Give the folder of the images (e.g. one of those), or put them directly in it."
        )
    if not files:
        raise UserError(
            f"{KEY}={folder} holds no images ({', '.join(IMG_EXTENSIONS)}): put the unlabeled images directly in it."
        )
    return UnlabeledImages(_FileImages([str(p) for p in files], target), f"{len(files):,} images in {folder}", files)


class _FileImages(Dataset):
    """Image files as uint8 3 x S x S tensors at the labelled images' size (resized, centre-cropped)."""

    def __init__(self, paths: list[str], target):
        self.paths, self.size = paths, target.input_size
        self.load = ImageLoader(False, KEY)
        self.transform = v2.Compose([v2.PILToTensor(), v2.Resize(self.size, antialias=True), v2.CenterCrop(self.size)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(self.load(self.paths[i]))


@dataclass
class UnlabeledBatches:
    """What a stage attaches to its data module (`ClassificationDataModule.unlabeled_batches`): the images, the batch
    ratio, the views its method needs, and the stage's seed, which orders them and draws their views (the labelled
    batches follow the data's seed, which a study may hold fixed to share a source model: the seeds still vary the
    unlabeled side of every stage that trains on it)."""

    images: UnlabeledImages
    ratio: int
    views: tuple[str, ...]
    seed: int = 0

    def describe(self) -> dict:
        return {"images": len(self.images), "from": self.images.origin, "ratio": self.ratio}

    def combined(self, dm, labelled: DataLoader) -> CombinedLoader:
        return CombinedLoader({"labeled": labelled, "unlabeled": self.loader(dm)}, mode="max_size_cycle")

    def loader(self, dm) -> DataLoader:
        rank, world = (dm.trainer.global_rank, dm.trainer.world_size) if dm.trainer else (0, 1)
        size, images = dm.batch_size * self.ratio, self.images.images
        if isinstance(images, Dataset):  # files: decoded in worker processes
            gen = torch.Generator().manual_seed(self.seed + ORDER_OFFSET + dm.epoch())
            return DataLoader(
                images,
                batch_size=size,
                shuffle=True,
                generator=gen,
                num_workers=dm.num_workers,
                pin_memory=dm.pin(dm.device()),
                persistent_workers=False,
            )
        # the row index stands in for a label: InMemoryBatches yields (images, index)
        index = torch.arange(len(images))
        rows = cast(torch.Tensor, images)  # a tensor or Rows: both index a batch at a time
        batches = InMemoryBatches(rows, index, size, True, self.seed + ORDER_OFFSET, dm.epoch, rank, world)
        return DataLoader(batches, batch_size=None, pin_memory=dm.pin(dm.device()))

    def on_device(self, dm, batch) -> dict[str, torch.Tensor]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return make_views(dm, images, self.views, self.generator(dm, images.device))

    def generator(self, dm, device: torch.device) -> torch.Generator:
        """The views' random stream, reseeded at each epoch from (stage seed, rank, epoch), as the labelled batches'
        augmentation is: a stage resumed at an epoch boundary makes the same views."""
        epoch, rank = dm.epoch(), dm.trainer.global_rank if dm.trainer else 0
        if getattr(self, "_epoch", None) != (epoch, device):
            self._epoch = (epoch, device)
            self._gen = torch.Generator(device=device).manual_seed(
                ((self.seed + ORDER_OFFSET) * 1009 + rank) * 100_003 + epoch
            )
        return self._gen
