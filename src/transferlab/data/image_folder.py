"""Your own images: `<root>/train/<class>/*` (one folder per class, any image format PIL reads), with optional
`<root>/val/<class>/*` and `<root>/test/<class>/*`. A split that is not there is taken from train, stratified
per class: test (`test_fraction`, the same for every seed) first, then val (`val_fraction`)."""

from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from transferlab.core.errors import UserError
from transferlab.data.base import ClassificationDataModule
from transferlab.data.files import (
    FixedClassFolder,
    ImageLoader,
    check_split_classes,
    class_folders,
    readable_dir,
    shared_files,
)

LAYOUT = "<root>/train/<class>/<image> (one folder per class), optionally <root>/val/<class>/ and <root>/test/<class>/"


class ImageFolderDataModule(ClassificationDataModule):
    """`classes`: null (all class folders of train/), N (the first N, sorted by name), or a list of folder names
    (or ids, their positions in sorted order)."""

    loaders = ("workers",)
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(self, root: str | None = None, skip_corrupt: bool = False, **kwargs):
        super().__init__(loader="workers", **kwargs)
        self.root, self.skip_corrupt = root, skip_corrupt
        self._classes: list[str] | None = None
        self._data: dict = {}

    def _root(self) -> Path:
        if self.root is None:
            raise UserError(f"Image folder root is not set: pass {self.key}.root=<folder with {LAYOUT}>.")
        root = Path(self.root).expanduser()
        if not root.exists():
            raise UserError(f"Image folder {root} does not exist: expected {LAYOUT}. Point {self.key}.root at it.")
        return readable_dir(root, "image folder root")

    def _split_dir(self, split: str) -> Path:
        return self._root() / split

    def has_split(self, split: str) -> bool:
        return split == "train" or self._split_dir(split).is_dir()

    def class_names(self) -> list[str]:
        """train/'s class folders, sorted: the class ids are their positions."""
        if self._classes is None:
            train = self._split_dir("train")
            if not train.is_dir():
                found = sorted(p.name for p in self._root().iterdir() if p.is_dir())
                hint = (
                    f" {self._root()} holds the folders {found[:10]}: if these are the classes, move them into "
                    f"{train}/."
                    if found
                    else ""
                )
                raise UserError(f"Image folder {self._root()} has no train/ folder: expected {LAYOUT}.{hint}")
            self._classes = class_folders(train, "train folder")
            if not self._classes:
                loose = [p.name for p in train.iterdir() if p.is_file()][:3]
                hint = (
                    f" It holds files ({', '.join(loose)}, ...) directly: put each image in the folder of its class."
                    if loose
                    else ""
                )
                raise UserError(f"No class folders in {train}: expected {LAYOUT}.{hint}")
        return self._classes

    @property
    def num_classes_total(self) -> int:
        return len(self.class_names())

    def load_split(self, split: str) -> FixedClassFolder:
        if split not in self._data:
            folder, classes = self._split_dir(split), self.class_names()
            if split != "train":
                check_split_classes(self._split_dir("train"), folder, all_classes=True)
            selected = [classes[i] for i in self.class_ids]
            try:  # only the selected classes' folders are read
                data = FixedClassFolder(
                    folder,
                    selected,
                    split != "train",
                    ImageLoader(self.skip_corrupt, self.key),
                    extensions=IMG_EXTENSIONS,
                )
            except FileNotFoundError as err:
                raise UserError(
                    f"{err} Each class folder under {folder} needs at least one image "
                    f"({', '.join(IMG_EXTENSIONS)}); remove the empty folder or leave it out with "
                    f"{self.key}.classes."
                ) from None
            if split != "train":
                self._check_disjoint(split, data)
            ids = {name: self.class_ids[i] for i, name in enumerate(selected)}
            data.targets = [ids[selected[t]] for t in data.targets]  # back to ids among all of train's classes
            self._data[split] = data
        return self._data[split]

    def _check_disjoint(self, split: str, data: FixedClassFolder) -> None:
        """An image of `split` that is also a training image (val/ a symlink to train/, links instead of moves)
        would be tested on what was learnt: the accuracy would be too high, without a word."""
        train = [p for p, _ in self.load_split("train").samples]
        shared = shared_files(train, [p for p, _ in data.samples])
        if shared:
            raise UserError(
                f"{len(shared)} images of {self._split_dir(split)} are training images too (e.g. {shared[0][0]} is "
                f"{shared[0][1]}, through a symlink or hard link): they would be tested on what was learnt. Keep "
                f"each image in one split, or remove {split}/ to hold out part of train/ instead."
            )

    def data_files(self) -> list[Path]:
        return [
            Path(p)
            for split in ("train", "val", "test")
            if self.has_split(split)
            for p, _ in self.load_split(split).samples
        ]
