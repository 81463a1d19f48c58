"""Data files on disk, shared by the datasets: pickled batch files (CIFAR, Imagenet32) read without running
anything they name, a PIL loader that names an unreadable file (or skips it) and scales 16-bit and float images,
ImageFolder over a fixed class list that walks each real folder once, and folder checks that tell an unreadable
folder (permissions) from an empty one."""

import logging
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets import ImageFolder

from transferlab.core.errors import UserError

log = logging.getLogger(__name__)


# What the dataset pickles hold besides dicts, lists, text and numbers: numpy arrays and scalars, as numpy 1.x
# (numpy.core) and 2.x (numpy._core) write them; `_frombuffer` is protocol 5's form, `_codecs.encode` the bytes of
# a protocol-2 pickle written by Python 3. Each only builds data.
PICKLE_GLOBALS = {
    *((f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


def load_pickle(path: Path, what: str):
    """The object pickled in `path` (Python-2 strings read as latin1, as the official files need). Unpickling can
    call any function the file names (`os.system`, ...), so only the `PICKLE_GLOBALS` data types are admitted:
    a file that names anything else is refused before any of it runs (`what`: how messages call the file)."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) in PICKLE_GLOBALS:
                with warnings.catch_warnings():  # numpy 2 calls numpy 1's `numpy.core` names deprecated
                    warnings.simplefilter("ignore", DeprecationWarning)
                    return super().find_class(module, name)
            raise UserError(
                f"{what} file {path} asks to call or build `{module}.{name}`, which a dataset file never holds "
                "(only arrays, lists, numbers and text): it was refused, and nothing from the file was run. "
                "The file is not a good copy (it may be crafted to run code): replace it with one from the "
                "official release."
            )

    with open(path, "rb") as f:
        return Unpickler(f, encoding="latin1").load()


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


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB. Pillow's `convert` clips 16-bit, 32-bit and float greyscale to 0..255 (a 16-bit image
    comes out nearly white), so these are scaled to 8 bits by their nominal range first: `I;16*` (16-bit PNG, TIFF)
    by the 16-bit range; `I` (32-bit integers, e.g. a 16-bit PGM) by the 16-bit range when a value exceeds 255, else
    taken as 8-bit values; `F` (floats) by 255 when no value exceeds 1 (the 0..1 convention), else taken as 0..255.
    Values outside the range are clipped, NaN is 0."""
    if image.mode.startswith("I") or image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if image.mode.startswith("I;16") or (image.mode == "I" and values.max() > 255):
            values = values / 257  # 65535 -> 255
        elif image.mode == "F" and values.max() <= 1:
            values = values * 255
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    return image.convert("RGB")


class ImageLoader:
    """PIL loader (8-bit RGB, see `to_rgb`) that names an unreadable file, or skips it."""

    def __init__(self, skip_corrupt: bool, key: str):
        self.skip_corrupt, self.key, self.skipped = skip_corrupt, key, 0

    def __call__(self, path: str):
        try:
            with open(path, "rb") as f:
                return to_rgb(Image.open(f))
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


def class_files(folder: str, valid) -> list[str]:
    """The files under `folder` that `valid` accepts, in torchvision's order (by folder path, then name), following
    symlinks but entering each real folder once and taking each real file once: torchvision follows a symlink loop
    until the OS stops it, reading a class dozens of times and putting the same image in train and val. Hidden
    files and folders (`.ipynb_checkpoints`, macOS `._*` files) are left out, as hidden class folders are."""
    found: dict[str, list[tuple[str, str]]] = {}  # folder -> (name, real path) of its files
    seen, stack = {os.path.realpath(folder)}, [folder]
    while stack:
        top = stack.pop()
        real_top = os.path.realpath(top)
        with os.scandir(readable_dir(Path(top), "folder")) as entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    real = os.path.realpath(e.path)
                    if real in seen:
                        log.warning("%s leads to %s, read already (a symlink loop?): not read again", e.path, real)
                    else:
                        seen.add(real)
                        stack.append(e.path)
                elif valid(e.path):
                    real = os.path.realpath(e.path) if e.is_symlink() else os.path.join(real_top, e.name)
                    found.setdefault(top, []).append((e.name, real))
    files, taken = [], set()
    for top in sorted(found):
        for name, real in sorted(found[top]):
            if real not in taken:
                taken.add(real)
                files.append(os.path.join(top, name))
    return files


class FixedClassFolder(ImageFolder):
    """ImageFolder over a given list of class folders, so val/test number their classes as train does; each class
    folder is read by `class_files`."""

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

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """torchvision's `make_dataset`, with each class folder read by `class_files` instead of `os.walk`."""
        valid = is_valid_file or (lambda p: p.lower().endswith(extensions))
        samples, empty = [], []
        for name in sorted(class_to_idx):
            folder = os.path.join(os.path.expanduser(directory), name)
            files = class_files(folder, valid) if os.path.isdir(folder) else []
            samples += [(f, class_to_idx[name]) for f in files]
            empty += [] if files else [name]
        if empty and not allow_empty:  # torchvision's error, which the data modules complete with the fix
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}.")
        return samples


def shared_files(train: list[str], other: list[str]) -> list[tuple[str, str]]:
    """(path in `other`, path in `train`) of each file both lists hold under two names: the same file (device and
    inode) reached through a symlinked folder, a symlink or a hard link (e.g. `ln -s train val`)."""

    def ids(paths: list[str]) -> dict:
        found: dict[tuple[int, int], str] = {}
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:  # unreadable: the loader names it
                continue
            found.setdefault((st.st_dev, st.st_ino), path)
        return found

    in_train = ids(train)
    return [(path, in_train[key]) for key, path in ids(other).items() if key in in_train]


def check_split_classes(train: Path, other: Path, all_classes: bool) -> None:
    """A class folder in val/ or test/ that train/ lacks would be dropped without a word: name it instead
    (only when every class is used; a `classes` subset leaves the others out on purpose)."""
    extra = sorted(set(class_folders(other, "folder")) - set(class_folders(train, "folder")))
    if extra and all_classes:
        raise UserError(
            f"{other} has class folders that {train} lacks: {extra[:10]}. Their images would be tested "
            f"but never learnt: add their training images to {train}, or remove the folders."
        )
