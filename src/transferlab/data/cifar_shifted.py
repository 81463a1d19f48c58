"""CIFAR-10 under a distribution shift: one CIFAR-10-C corruption (`corruptions.py`) at one severity applied to
every train and test image, the same classes and labels. The target of a domain-adaptation pair whose source is
the clean CIFAR-10 (`data=cifar10_shifted`).

The corrupted splits are made once and kept in the decoded-data cache (`decoded_cache.py`, `cache_dir`), keyed by
the CIFAR-10 files' contents, the corruption, severity, corruption_seed and RECIPE_VERSION; DDP ranks and parallel
jobs share one entry. Without a cache_dir they are made once per data module, in memory. The same values enter
the data hash (`identity_params`), so a stage trained at another severity is never reused.
"""

import hashlib

import numpy as np
import torch

from transferlab.core.checks import MAX_SEED, whole_number
from transferlab.data.cifar import CIFAR10DataModule
from transferlab.data.corruptions import CHUNK, RECIPE_VERSION, check_corruption, corrupt_chunk
from transferlab.data.decoded_cache import cached_arrays, source_key
from transferlab.data.inputs import ArrayData


class ShiftedCIFAR10DataModule(CIFAR10DataModule):
    """`corruption` (a name in corruptions.CORRUPTIONS), `severity` 1..5, `corruption_seed`: the noise's seed, apart
    from the run's `seed` so that runs of any seed see the same corrupted images (CIFAR-10-C is one fixed set)."""

    def __init__(self, corruption: str = "fog", severity: int = 5, corruption_seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        check_corruption(self.key, corruption, severity)
        whole_number(f"{self.key}.corruption_seed", corruption_seed, minimum=0, maximum=MAX_SEED)
        self.corruption, self.severity, self.corruption_seed = corruption, severity, corruption_seed

    def identity_params(self) -> dict:
        return {
            "corruption": self.corruption,
            "severity": self.severity,
            "corruption_seed": self.corruption_seed,
            "recipe": RECIPE_VERSION,
        }

    def describe(self) -> str:
        return f"{type(self).__name__} ({self.corruption}, severity {self.severity})"

    def load_split(self, split: str) -> ArrayData:
        clean = super().load_split(split)
        chw = clean.images.numpy()

        def chunks():
            for start in range(0, len(chw), CHUNK):
                hwc = chw[start : start + CHUNK].transpose(0, 2, 3, 1)
                out = corrupt_chunk(hwc, self.corruption, self.severity, self.corruption_seed, split, start // CHUNK)
                yield start, out.transpose(0, 3, 1, 2)

        if not self.cache_dir:
            made = np.empty_like(chw)
            for start, out in chunks():
                made[start : start + len(out)] = out
            return ArrayData(torch.from_numpy(made), clean.targets)

        def build():
            def fill(target: np.ndarray):
                for start, out in chunks():
                    target[start : start + len(out)] = out
                    yield clean.targets[start : start + len(out)].numpy()

            return chw.shape, fill

        files = self.data_files()  # all of them: one fingerprint index with the data hash's
        folder = hashlib.sha256(str(files[0].parent.resolve()).encode()).hexdigest()[:8]
        name = f"cifar10c-{self.corruption}-{self.severity}-{self.corruption_seed}-{split}-{folder}"
        key = source_key(files, self.cache_dir, **self.identity_params(), chunk=CHUNK)
        images, labels = cached_arrays(self.cache_dir, name, key, build)
        return ArrayData(images, labels)
