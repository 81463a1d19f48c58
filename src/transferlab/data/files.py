"""Image files on disk, shared by the folder datasets (ImageNet, image_folder): a PIL loader that names an
unreadable file (or skips it), ImageFolder over a fixed class list, and folder checks that tell an unreadable
folder (permissions) from an empty one."""

import logging
import os
from pathlib import Path

from PIL import Image
from torchvision.datasets import ImageFolder

from transferlab.errors import UserError

log = logging.getLogger(__name__)


def readable_dir(folder: Path, what: str) -> Path:
    """`folder`, after checking that it is a folder this process may list (`what`: how messages call it)."""
    if not folder.exists():
        raise FileNotFoundError(folder)
    if not folder.is_dir():
        raise UserError(f"{what} {folder} is a file, not a folder.")
    try:
        with os.scandir(folder):
            pass
    except PermissionError:
        raise UserError(
            f"Cannot read {what} {folder}: permission denied (it is not empty, it is unreadable). "
            f"Let this user read it (e.g. chmod -R a+rX {folder}) or copy the data somewhere "
            "readable."
        ) from None
    return folder


def class_folders(folder: Path, what: str) -> list[str]:
    """The sorted names of the (readable) class folders in `folder`."""
    readable_dir(folder, what)
    names = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    for name in names:
        readable_dir(folder / name, "class folder")
    return names


class ImageLoader:
    """PIL loader (RGB; greyscale images are converted) that names an unreadable file, or skips it."""

    def __init__(self, skip_corrupt: bool, key: str):
        self.skip_corrupt, self.key, self.skipped = skip_corrupt, key, 0

    def __call__(self, path: str):
        try:
            with open(path, "rb") as f:
                return Image.open(f).convert("RGB")
        except Exception as err:
            if not self.skip_corrupt:
                fix = (
                    "Let this user read it (chmod a+r)"
                    if isinstance(err, PermissionError)
                    else "Replace or remove the file"
                )
                raise UserError(
                    f"Cannot read image {path} ({type(err).__name__}: {err}). {fix}, or set "
                    f"{self.key}.skip_corrupt=true to skip unreadable images."
                ) from None
            self.skipped += 1
            log.warning("Skipped unreadable image %s (%s); %d skipped so far in this process", path, err, self.skipped)
            return None


class FixedClassFolder(ImageFolder):
    """ImageFolder over a given list of class folders, so val/test number their classes as train does."""

    def __init__(self, root: Path, classes: list[str], allow_empty: bool, loader, extensions=None):
        self._classes = classes
        super().__init__(
            str(root),
            allow_empty=allow_empty,
            loader=loader,
            is_valid_file=None if extensions is None else lambda p: p.lower().endswith(extensions),
        )

    def find_classes(self, directory):
        return self._classes, {c: i for i, c in enumerate(self._classes)}


def check_split_classes(train: Path, other: Path, all_classes: bool) -> None:
    """A class folder in val/ or test/ that train/ lacks would be dropped without a word: name it instead
    (only when every class is used; a `classes` subset leaves the others out on purpose)."""
    extra = sorted(set(class_folders(other, "folder")) - set(class_folders(train, "folder")))
    if extra and all_classes:
        raise UserError(
            f"{other} has class folders that {train} lacks: {extra[:10]}. Their images would be tested "
            f"but never learnt: add their training images to {train}, or remove the folders."
        )
