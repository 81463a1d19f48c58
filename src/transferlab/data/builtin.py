"""A procedurally generated pair of related tasks, made in-process in about a second (no files).

Each source class is a smooth random colour pattern (a "prototype"); an image of it is the prototype
shifted by a few pixels, with random brightness and strong pixel noise. Each of the 10 target classes
is the blend of two source prototypes, so the features that tell source classes apart are the ones the
target needs, while a model trained from scratch on the target's few labels must find them in the noise.
The source/target pair plays the part of ImageNet -> CIFAR-10 at a size that trains in a minute on a CPU.
"""

import itertools

import torch

from transferlab.core.errors import UserError
from transferlab.data.base import ClassificationDataModule
from transferlab.data.inputs import ArrayData

IMAGE_SIZE, TARGET_CLASSES = 32, 10


class BuiltinDataModule(ClassificationDataModule):
    loaders = ("memory",)

    def __init__(
        self,
        task: str = "source",
        source_classes: int = 40,
        train_per_class: int = 200,
        test_per_class: int = 50,
        noise: float = 0.5,
        max_shift: int = 4,
        world_seed: int = 1234,
        **kwargs,
    ):
        if task not in ("source", "target"):
            raise UserError(f"builtin data task={task!r}: use 'source' or 'target'.")
        if source_classes < 5:
            raise UserError(f"builtin source_classes must be at least 5, got {source_classes}.")
        super().__init__(**kwargs)
        self.task, self.noise, self.max_shift, self.world_seed = task, noise, max_shift, world_seed
        self.train_per_class, self.test_per_class = train_per_class, test_per_class
        self.prototypes = make_prototypes(task, source_classes, world_seed)

    @property
    def num_classes_total(self) -> int:
        return len(self.prototypes)

    def identity_params(self) -> dict:
        return {
            "task": self.task,
            "source_classes": len(self.prototypes) if self.task == "source" else None,
            "prototypes_sum": float(self.prototypes.double().sum()),
            "train_per_class": self.train_per_class,
            "test_per_class": self.test_per_class,
            "noise": self.noise,
            "max_shift": self.max_shift,
            "world_seed": self.world_seed,
        }

    def load_split(self, split: str):
        per_class = self.train_per_class if split == "train" else self.test_per_class
        stream = 2 * ["source", "target"].index(self.task) + (split == "test")
        gen = torch.Generator().manual_seed(self.world_seed * 10 + stream)
        labels = torch.arange(self.num_classes_total).repeat_interleave(per_class)
        return ArrayData(render(self.prototypes[labels], self.noise, self.max_shift, gen), labels)


def make_prototypes(task: str, source_classes: int, world_seed: int) -> torch.Tensor:
    """Source: smooth random patterns (random 4x4 colour grids, upsampled). Target: blends of two of them."""
    gen = torch.Generator().manual_seed(world_seed)
    grid = torch.rand(source_classes, 3, 4, 4, generator=gen)
    source = torch.nn.functional.interpolate(grid, size=IMAGE_SIZE, mode="bicubic", align_corners=False).clamp(0, 1)
    if task == "source":
        return source
    pairs = torch.tensor(list(itertools.combinations(range(source_classes), 2)))
    pairs = pairs[torch.randperm(len(pairs), generator=gen)[:TARGET_CLASSES]]
    return (source[pairs[:, 0]] + source[pairs[:, 1]]) / 2


def render(prototypes: torch.Tensor, noise: float, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """uint8 images N x 3 x 32 x 32: each prototype shifted (circularly) by up to `max_shift` pixels,
    scaled in brightness by 0.7..1.3, plus Gaussian noise of std `noise`."""
    n = len(prototypes)
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2, n, 1), generator=gen)
    rows = ((torch.arange(IMAGE_SIZE) - dy) % IMAGE_SIZE)[:, None, :, None]
    cols = ((torch.arange(IMAGE_SIZE) - dx) % IMAGE_SIZE)[:, None, None, :]
    images = prototypes[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
    images = images * (0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=gen))
    images = images + noise * torch.randn(images.shape, generator=gen)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)
