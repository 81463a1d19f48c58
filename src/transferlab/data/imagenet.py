"""ImageNet (ILSVRC-2012) from JPEG folders, in the two layouts users have (`layout: auto` tells them apart):

- `folder`: `train/<wnid>/*.JPEG` and `val/<wnid>/*.JPEG` (val already sorted into class folders): ImageFolder.
- `devkit`: the official layout, `train/<wnid>/*.JPEG` plus the flat `val/ILSVRC2012_val_*.JPEG` folder, with the
  devkit's ground truth in `meta.bin` (written by torchvision) or `ILSVRC2012_devkit_t12.tar.gz`. Read through
  `torchvision.datasets.ImageNet`, over a view in `cache_dir` that sorts val/ into class folders with symlinks
  (what torchvision does when it extracts the val archive), so the user's folder is never written to.

Downsampled ImageNet (Imagenet32/64 batch files) is `DownsampledImageNetDataModule` (data/source=imagenet32).
"""

import hashlib
import os
from pathlib import Path

from torchvision.datasets import ImageNet
from torchvision.datasets.imagenet import ARCHIVE_META, META_FILE, load_meta_file, parse_devkit_archive

from transferlab.core.errors import UserError
from transferlab.data.base import ClassificationDataModule, require_cache_dir
from transferlab.data.decoded_cache import cached_dir, source_key
from transferlab.data.files import FixedClassFolder, ImageLoader, check_split_classes, class_folders, readable_dir
from transferlab.data.imagenet_downsampled import find_files
from transferlab.data.splits import resolve_classes

LAYOUT = "<root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG (one folder per class)"
DEVKIT = ARCHIVE_META["devkit"][0]
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


class _FixedClassImageNet(ImageNet):
    """torchvision's ImageNet (reads meta.bin: wnid -> class names) over a given list of wnids."""

    def __init__(self, root: Path, split: str, classes: list[str], allow_empty: bool, loader):
        self._classes = classes
        super().__init__(str(root), split=split, allow_empty=allow_empty, loader=loader)

    def find_classes(self, directory):
        return self._classes, {c: i for i, c in enumerate(self._classes)}

    make_dataset = staticmethod(FixedClassFolder.make_dataset)  # each real folder once: no symlink loops


class ImageNetDataModule(ClassificationDataModule):
    """Class subsets are taken when scanning the folders (`classes`: first N, or a list of wnids)."""

    loaders = ("workers",)
    layouts = ("auto", "folder", "devkit")
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)
    cache_dir: str  # a folder, never None here (the devkit layout's view of val/ is kept in it)

    def __init__(
        self,
        root: str | None = None,
        classes: int | list[str] | None = None,
        layout: str = "auto",
        skip_corrupt: bool = False,
        cache_dir: str = "outputs/cache/data",
        **kwargs,
    ):
        super().__init__(loader="workers", cache_dir=cache_dir, **kwargs)
        require_cache_dir(self.key, cache_dir, "the devkit layout's sorted view of val/")
        if layout not in self.layouts:
            raise UserError(
                f"ImageNet layout={layout!r}: use one of {' | '.join(self.layouts)} "
                "(downsampled Imagenet32/64 files: data/source=imagenet32)."
            )
        self.root, self.wnids_wanted, self.layout = root, classes, layout
        self.skip_corrupt = skip_corrupt
        self._wnids: list[str] | None = None

    @property
    def wnids(self) -> list[str]:
        """The wnids used, in label order: train/'s class folders, or the subset `classes` selects."""
        if self._wnids is None:
            train = self._folder("train")
            found = class_folders(train, "ImageNet train folder")
            if not found:
                raise UserError(f"No class folders in {train}: expected {LAYOUT}.")
            self._wnids = [found[i] for i in resolve_classes(self.key, self.wnids_wanted, len(found), found)]
        return self._wnids

    @property
    def num_classes_total(self) -> int:
        return len(self.wnids)

    def _root(self) -> Path:
        if self.root is None:
            raise UserError(f"ImageNet root is not set: pass {self.key}.root=<folder with {LAYOUT}>.")
        return Path(self.root).expanduser()

    def _folder(self, split: str) -> Path:
        folder = self._root() / split
        if self._root().is_dir():
            readable_dir(self._root(), "ImageNet root")
        if not folder.is_dir():
            if find_files(self._root())["train"]:
                raise UserError(
                    f"{self._root()} holds downsampled ImageNet batch files (train_data_batch_*): use "
                    "data/source=imagenet32 (or data=imagenet32_cifar10) for them."
                )
            raise UserError(
                f"ImageNet folder {folder} does not exist: expected {LAYOUT}, or the official layout "
                f"(flat val/ with {META_FILE} or {DEVKIT}). Point {self.key}.root at the folder that "
                "holds train/ and val/."
            )
        return readable_dir(folder, f"ImageNet {split} folder")

    def resolved_layout(self) -> str:
        """`devkit` when val/ holds the images themselves (flat), `folder` when it holds class folders."""
        val = self._folder("val")
        if self.layout != "auto":
            return self.layout
        with os.scandir(val) as entries:
            flat = any(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in entries)
        return "devkit" if flat else "folder"

    def data_files(self) -> list[Path]:
        """The image files of the classes used."""
        self.setup()
        return [Path(p) for split in ("train", "test") for p, _ in self.splits[split].data.samples]

    def load_split(self, split: str):
        split = "train" if split == "train" else "val"
        if split == "val" and self._folder("val").resolve() == self._folder("train").resolve():
            raise UserError(
                f"{self._folder('val')} is {self._folder('train')} (a symlink): the test split would be the training "
                "images. Point val/ at the validation images (the ILSVRC-2012 val set)."
            )
        loader = ImageLoader(self.skip_corrupt, self.key)
        try:
            if self.resolved_layout() == "folder":
                if split == "val":
                    check_split_classes(self._folder("train"), self._folder("val"), self.wnids_wanted is None)
                return FixedClassFolder(self._folder(split), self.wnids, split != "train", loader)
            return _FixedClassImageNet(self._devkit_view(), split, self.wnids, split != "train", loader)
        except FileNotFoundError as err:
            raise UserError(
                f"{err} Each class folder under {self._folder(split)} needs at least one image "
                "(.jpeg/.jpg/.png); remove the empty folder or use `classes` to leave it out."
            ) from None

    # -- the official layout: flat val/ + devkit ground truth ---------------------------------------
    def _devkit_view(self) -> Path:
        """A folder torchvision's ImageNet reads: meta.bin, train -> root/train, val/<wnid>/ symlinks."""
        root, val = self._root(), self._folder("val")
        meta = root / META_FILE if (root / META_FILE).is_file() else root / DEVKIT
        if not meta.is_file():
            raise UserError(
                f"{val} holds the validation images unsorted (the official layout); their classes come "
                f"from the devkit: put {DEVKIT} (from image-net.org) or torchvision's {META_FILE} in "
                f"{root}, or sort val/ into <wnid>/ folders (layout: folder)."
            )
        images = sorted(p for p in val.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS))
        name = f"imagenet_devkit_{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]}"

        def write(folder: Path) -> None:
            if meta.name == META_FILE:
                (folder / META_FILE).symlink_to(meta.resolve())
            else:
                (folder / DEVKIT).symlink_to(meta.resolve())
                try:
                    parse_devkit_archive(str(folder))  # checks the official md5 sum, writes meta.bin
                except Exception as err:
                    raise UserError(
                        f"Could not read the devkit {meta} ({type(err).__name__}: {err}). Replace it with "
                        f"the official {DEVKIT}, or put torchvision's {META_FILE} next to it."
                    ) from None
            (folder / "train").symlink_to(self._folder("train").resolve())
            val_wnids = load_meta_file(str(folder))[1]
            if len(val_wnids) != len(images):
                raise UserError(
                    f"{val} holds {len(images)} images, but the devkit ground truth ({meta.name}) lists "
                    f"{len(val_wnids)}: the folder is incomplete, or the ground truth is for another set."
                )
            for wnid in set(val_wnids):
                (folder / "val" / wnid).mkdir(parents=True)
            for path, wnid in zip(images, val_wnids):  # sorted file names, as torchvision's parse_val_archive
                (folder / "val" / wnid / path.name).symlink_to(path.resolve())

        return cached_dir(self.cache_dir, name, source_key([meta, val, self._folder("train")], self.cache_dir), write)
