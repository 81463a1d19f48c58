"""ImageNet (ILSVRC-2012) in the ImageFolder layout: `train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`."""

from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torchvision.datasets import ImageFolder

from transferlab.data.base import ClassificationDataModule
from transferlab.errors import UserError

LAYOUT = "<root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG (one folder per class)"


class _FixedClassFolder(ImageFolder):
    """ImageFolder over a given list of class folders, so val numbers its classes as train does."""

    def __init__(self, root: Path, classes: list[str], allow_empty: bool):
        self._classes = classes
        super().__init__(str(root), loader=load_image, allow_empty=allow_empty)

    def find_classes(self, directory):
        return self._classes, {c: i for i, c in enumerate(self._classes)}


def load_image(path: str) -> Image.Image:
    """PIL's loader, with a message that names a corrupt or truncated image file."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserError(f"Image {path} is corrupt or truncated ({type(err).__name__}: {err}). Replace or delete "
                        "the file, then re-run into the same folder (hydra.run.dir=...) to resume.") from None


class ImageNetDataModule(ClassificationDataModule):
    """Class subsets are taken when scanning the folders (`classes`: first N, or a list of wnids)."""

    loaders = ("workers",)
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(self, root: str | None = None, classes: int | list[str] | None = None, **kwargs):
        super().__init__(loader="workers", **kwargs)
        self.root, self.wnids_wanted = root, classes
        self._wnids: list[str] | None = None

    @property
    def wnids(self) -> list[str]:
        if self._wnids is None:
            train = self._folder("train")
            found = sorted(d.name for d in train.iterdir() if d.is_dir())
            if not found:
                raise UserError(f"No class folders in {train}: expected {LAYOUT}.")
            wanted = self.wnids_wanted
            if wanted is None:
                self._wnids = found
            elif isinstance(wanted, int):
                self._wnids = found[:wanted]
            else:
                unknown = sorted(set(wanted) - set(found))
                if unknown:
                    raise UserError(f"classes {unknown[:10]} have no folder in {train}.")
                self._wnids = list(wanted)
        return self._wnids

    @property
    def num_classes_total(self) -> int:
        return len(self.wnids)

    def _folder(self, split: str) -> Path:
        if self.root is None:
            raise UserError(f"ImageNet root is not set: pass data.source.root=<folder with {LAYOUT}>.")
        folder = Path(self.root).expanduser() / split
        if not folder.is_dir():
            raise UserError(f"ImageNet folder {folder} does not exist: expected {LAYOUT}. "
                            "Point data.source.root at the folder that holds train/ and val/.")
        return folder

    def data_files(self) -> list[Path]:
        """The image files of the classes used (names and sizes are hashed, not contents)."""
        self.setup()
        return [Path(p) for split in ("train", "test") for p, _ in self.splits[split].data.samples]

    def load_split(self, split: str):
        folder = self._folder("train" if split == "train" else "val")
        try:
            return _FixedClassFolder(folder, self.wnids, allow_empty=split != "train")
        except FileNotFoundError as err:
            raise UserError(f"{err} Each class folder under {folder} needs at least one image "
                            "(.jpeg/.jpg/.png); remove the empty folder or use `classes` to leave it out.") from None
