"""The shared base of every data module: class subsets, splits, low-data regimes, checks, the data's content
fingerprint, and one of two input paths (`inputs.py`: `memory` or `workers`), which the base does not branch on.

Subclasses say how to read their files: `load_split(split)` returns a `Dataset` whose `targets` are the labels
(`inputs.ArrayData` for data held as uint8 arrays), and `data_files()` lists the files it reads.
"""

from collections.abc import Callable, Sequence
from typing import Any, cast

import lightning as L
import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset
from torchvision.transforms import v2

from transferlab.core.digests import json_digest
from transferlab.core.errors import UserError
from transferlab.data.fingerprint import files_digest
from transferlab.data.inputs import INPUTS, Rows
from transferlab.data.splits import (
    check_classes_present,
    check_not_empty,
    check_samples_per_class,
    check_settings,
    resolve_classes,
    stratified_split,
)
from transferlab.data.unlabeled import UnlabeledBatches
from transferlab.data.unlabeled import check_setting as check_unlabeled_setting

TEST_SPLIT_SEED = 0  # a test split taken from train is the same for every `seed`, so runs stay comparable


def auto_eval_batch(device_type: str, batch_size: int) -> int:
    """`eval_batch_size=auto`: on a CPU 128 (the fastest measured on the reference CPU, scripts/bench_eval_batch.py;
    docs/performance.md), on a GPU 4x the training batch (an eval forward keeps no activations for a backward pass,
    and small batches leave a GPU idle)."""
    return 128 if device_type == "cpu" else 4 * batch_size


def require_cache_dir(key: str, cache_dir: str | None, what: str) -> None:
    """A data module that keeps `what` in its cache folder cannot run without one."""
    if not cache_dir:
        raise UserError(
            f"{key}.cache_dir={cache_dir!r}: this data set keeps {what} in that folder. Give a folder there "
            "(the default is ${paths.cache_dir}/data, under the outputs folder)."
        )


class ClassificationDataModule(L.LightningDataModule):
    """Which samples go where and how they reach the model; `role` (source/target) names the config keys in
    messages (`data.<role>.classes`)."""

    loaders: tuple[str, ...] = ("memory", "workers")
    copy_subsets = True  # False: splits index lazily into the (memory-mapped, shared) images instead of copying
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | str | None = None,  # the presets: "auto" (auto_eval_batch)
        num_workers: int = 0,
        val_fraction: float = 0.1,
        classes: int | Sequence[int | str] | None = None,
        samples_per_class: int | None = None,
        label_fraction: float | None = None,
        augment: bool = True,
        loader: str = "memory",
        pin_memory: bool | None = None,
        device_resident: bool = False,
        seed: int = 0,
        image_size: int = 32,
        test_fraction: float = 0.2,
        cache_dir: str | None = None,
        role: str = "target",
        model_input: dict | None = None,  # the model's input (size, mean, std, interpolation): models.model_input
        unlabeled: str | None = "rest",  # a target's unlabeled images (unlabeled.py), read when a stage asks
    ):
        super().__init__()
        self.key = f"data.{role}"
        check_settings(
            self.key,
            batch_size,
            eval_batch_size,
            num_workers,
            val_fraction,
            samples_per_class,
            label_fraction,
            test_fraction,
        )
        if loader not in self.loaders:
            raise UserError(
                f"{type(self).__name__} supports {self.key}.loader={' | '.join(self.loaders)}, not {loader!r}."
            )
        self.loader, self.input = loader, INPUTS[loader]
        if device_resident and not self.input.can_be_resident:
            raise UserError(
                f"{self.key}.device_resident=true keeps an in-memory split on the device: it needs "
                f"loader=memory, not {loader!r}."
            )
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size  # "auto": eval_batch()
        self.num_workers, self.pin_memory, self.device_resident = num_workers, pin_memory, device_resident
        self.val_fraction, self.test_fraction, self.classes, self.seed = val_fraction, test_fraction, classes, seed
        self.samples_per_class, self.label_fraction = samples_per_class, label_fraction
        self.augment, self.image_size, self.cache_dir = augment, image_size, cache_dir
        self.model_input = cast(
            dict | None, OmegaConf.to_container(model_input) if OmegaConf.is_config(model_input) else model_input
        )
        if model_input:  # images go to the model at its size, normalised as it was pretrained
            self.mean, self.std = tuple(model_input["mean"]), tuple(model_input["std"])
        self.splits: dict[str, Any] = {}  # the input path's own: (images, labels) for memory, a Dataset for workers
        self.sizes: dict[str, int] = {}
        self._resident: dict = {}
        self._data_hash: str | None = None
        check_unlabeled_setting(unlabeled)
        self.unlabeled = unlabeled
        self.unlabeled_batches: UnlabeledBatches | None = None  # attached by a stage that trains on them too

    # -- what subclasses provide -------------------------------------------------------------------
    @property
    def num_classes_total(self) -> int:
        """How many classes the dataset has (a class attribute or a property of the subclass)."""
        raise NotImplementedError

    def load_split(self, split: str) -> Dataset:
        """The (PIL image, label) dataset of `split` ("train", "test", and "val" where `has_split` says so)."""
        raise NotImplementedError

    def has_split(self, split: str) -> bool:
        """Whether the data has its own `split`; a missing val or test split is taken from train (stratified)."""
        return split in ("train", "test")

    def class_names(self) -> list[str] | None:
        """Names of the classes by original id, where the dataset has them (lets `classes` name classes)."""
        return None

    def data_files(self) -> list:
        """The files the data is read from (subclasses that read files say which)."""
        return []

    def describe(self) -> str:
        """The data's name in the stage header (a variant adds what sets it apart, e.g. a corruption)."""
        return type(self).__name__

    def identity_params(self) -> dict | None:
        """What else determines the data besides its files and the split settings (e.g. a generator's
        parameters, a label type)."""
        return None

    def train_transform(self) -> Callable:
        """Per-sample transform of the workers path (PIL in, float tensor out)."""
        ops = [v2.RandomCrop(self.input_size, padding=4), v2.RandomHorizontalFlip()] if self.augment else []
        return v2.Compose([*self._to_tensor(), *ops, v2.Normalize(self.mean, self.std)])

    def eval_transform(self) -> Callable:
        return v2.Compose([*self._to_tensor(), v2.Normalize(self.mean, self.std)])

    def _to_tensor(self) -> list:
        return [
            v2.PILToTensor(),
            v2.Resize(self.input_size, interpolation=self.interpolation, antialias=True),
            v2.CenterCrop(self.input_size),
            v2.ToDtype(torch.float32, scale=True),
        ]

    @property
    def input_size(self) -> int:
        """The side of the images the model gets: the model's input size where it asks for one, else image_size."""
        return int(self.model_input["size"]) if self.model_input else self.image_size

    @property
    def interpolation(self) -> v2.InterpolationMode:
        return v2.InterpolationMode((self.model_input or {}).get("interpolation", "bilinear"))

    # -- class subsets and splits ----------------------------------------------------------------
    @property
    def class_ids(self) -> list[int]:
        """Original class ids kept, in order; they are renumbered 0..k-1."""
        return resolve_classes(self.key, self.classes, self.num_classes_total, self.class_names())

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        ids, names = self.class_ids, self.class_names()
        data: dict[str, Any] = {  # datasets with `targets` (load_split)
            split: self.load_split(split) for split in ("train", "val", "test") if self.has_split(split)
        }
        remap = torch.full((self.num_classes_total,), -1, dtype=torch.long)
        remap[ids] = torch.arange(len(ids))
        labels = {split: remap[torch.as_tensor(d.targets, dtype=torch.long)] for split, d in data.items()}
        source = lambda split: split if split in data else "train"  # val/test not given: taken from train
        pool = labels["train"].clone()  # what is left of train for train and val
        if "test" not in data:
            _, test_idx = stratified_split(pool, self.test_fraction, None, None, TEST_SPLIT_SEED)
            pool[test_idx] = -1
        else:
            test_idx = torch.nonzero(labels["test"] >= 0).flatten()
        val_fraction = 0.0 if "val" in data else self.val_fraction
        if self.samples_per_class is not None:
            check_samples_per_class(self.key, pool, val_fraction, self.samples_per_class, ids, names)
        train_idx, val_idx = stratified_split(
            pool, val_fraction, self.samples_per_class, self.label_fraction, self.seed
        )
        if "val" in data:
            val_idx = torch.nonzero(labels["val"] >= 0).flatten()
        others = {"val": labels[source("val")][val_idx], "test": labels[source("test")][test_idx]}
        check_classes_present(self.key, ids, names, labels["train"][train_idx], others, self.classes is not None)
        check_not_empty(
            self.key,
            {"train": len(train_idx), "val": len(val_idx), "test": len(test_idx)},
            self.val_fraction,
            "val" in data,
        )
        parts = {"train": (train_idx, True), "val": (val_idx, False), "test": (test_idx, False)}
        # the training images without their labels in the stage (unlabeled.py): train's rows and what is left
        pool[train_idx] = -1
        if "val" not in data:
            pool[val_idx] = -1
        self.train_data, self.train_idx, self.unused_idx = data["train"], train_idx, torch.nonzero(pool >= 0).flatten()
        self.sizes = {split: len(idx) for split, (idx, _) in parts.items()}
        self.splits = {
            split: self.input.subset(self, data[source(split)], labels[source(split)], idx, train)
            for split, (idx, train) in parts.items()
        }

    def split_sizes(self) -> dict[str, int]:
        self.setup()
        return dict(self.sizes)

    # -- what this data is -----------------------------------------------------------------------
    def data_hash(self) -> str:
        """A hash of the data's content and of what selects the samples: the sha256 of every file read (through
        the fingerprint index in `cache_dir`, so only changed files are read again), or of the generator's
        parameters for generated data, with the class and split settings. Computed once per data module."""
        if self._data_hash is None:
            files = self.data_files()
            try:
                files_hash, self._bytes = files_digest(files, self.cache_dir)
            except OSError as err:  # a missing or unreadable file: the dataset's own message names it and the fix
                self.load_split("train")
                self.load_split("test")
                raise UserError(f"{self.key}: cannot read {err.filename} ({err.strerror}).") from None
            self._files = len(files)
            settings = {
                "class_ids": self.class_ids,
                "val_fraction": self.val_fraction,
                "seed": self.seed,
                "samples_per_class": self.samples_per_class,
                "label_fraction": self.label_fraction,
                "test_fraction": self.test_fraction,
                "identity": self.identity_params(),
                "files": files_hash,
            }
            self._data_hash = json_digest(settings)
        return self._data_hash

    def fingerprint(self) -> dict:
        """What this data is, for the manifest: dataset, split sizes, number and bytes of files, `hash`."""
        data_hash = self.data_hash()
        unlabeled = self.unlabeled_batches
        return {
            "dataset": type(self).__name__,
            "splits": self.split_sizes(),
            "files": self._files,
            "bytes": self._bytes,
            "hash": data_hash,
            **({"unlabeled": unlabeled.describe()} if unlabeled else {}),
        }

    # -- loaders ---------------------------------------------------------------------------------
    def train_dataloader(self):
        labelled = self._loader("train", self.batch_size, shuffle=True)
        return self.unlabeled_batches.combined(self, labelled) if self.unlabeled_batches else labelled

    def val_dataloader(self):
        return self._loader("val", self.eval_batch(), shuffle=False)

    def test_dataloader(self):
        return self._loader("test", self.eval_batch(), shuffle=False)

    def eval_batch(self) -> int:
        """`eval_batch_size`, or for `auto` the training device's (`auto_eval_batch`)."""
        if self.eval_batch_size != "auto":
            return cast(int, self.eval_batch_size)  # a whole number (check_settings)
        return auto_eval_batch(self.device().type, self.batch_size)

    def _loader(self, split: str, batch_size: int, shuffle: bool):
        self.setup()
        return self.input.loader(self, split, batch_size, shuffle)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if isinstance(batch, dict):  # labelled + unlabeled (UnlabeledBatches.combined)
            assert self.unlabeled_batches is not None
            return {
                "labeled": self.input.on_device(self, batch["labeled"]),
                "unlabeled": self.unlabeled_batches.on_device(self, batch["unlabeled"]),
            }
        return self.input.on_device(self, batch)

    def device(self) -> torch.device:
        """The training device (the CPU outside a Trainer)."""
        strategy = getattr(self.trainer, "strategy", None)
        return strategy.root_device if strategy is not None else torch.device("cpu")

    def pin(self, device: torch.device) -> bool:
        """pin_memory: as set, or (null) true when the batches go to a GPU."""
        return self.pin_memory if self.pin_memory is not None else device.type == "cuda"

    def resident(self, split: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory split's (images, labels) on `device`, copied there once."""
        if (split, device) not in self._resident:
            images, labels = self.splits[split]
            images = images.to(device) if isinstance(images, (torch.Tensor, Rows)) else images
            self._resident[(split, device)] = (images, labels.to(device))
        return self._resident[(split, device)]

    def epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer else 0

    def augment_generator(self, device: torch.device) -> torch.Generator:
        """Reseeded at each epoch from (seed, epoch): a run resumed at an epoch boundary augments the same way."""
        epoch = self.epoch()
        if getattr(self, "_augment_epoch", None) != (epoch, device):
            self._augment_epoch = (epoch, device)
            rank = self.trainer.global_rank if self.trainer else 0
            self._augment_gen = torch.Generator(device=device).manual_seed((self.seed * 1009 + rank) * 100_003 + epoch)
        return self._augment_gen
