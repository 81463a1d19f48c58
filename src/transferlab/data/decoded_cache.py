"""The decoded-data cache: a dataset decoded once into uint8 `.npy` files, memory-mapped so processes share one
copy (not the stage cache, `transferlab/cache.py`).

An entry is `<cache_dir>/<name>-<key>/{images,labels}.npy`, where `key` hashes the source files' contents (through
the fingerprint index, `fingerprint.py`) and any options that change the decoded result: a changed source gives a
new key and the entry is rebuilt; stale entries of the same name are removed. Entries are built under a file lock
into a temporary folder that is renamed into place (`fileio.lock`, `fileio.atomic_dir`), so DDP ranks (or
parallel jobs) build it once and never read a half-written entry.
"""

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from transferlab.core.fileio import atomic_dir, lock
from transferlab.data.fingerprint import content_hashes

log = logging.getLogger(__name__)


def source_key(paths: Sequence[Path], index_dir: str | Path | None = None, **options) -> str:
    """A short hash of `options` and of the files' paths and contents (folders: their path and mtime)."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    files = [Path(p) for p in paths if Path(p).is_file()]
    hashes = dict(zip(files, content_hashes(files, index_dir)[0]))
    for path in map(Path, paths):
        what = hashes.get(path) or path.stat().st_mtime_ns
        h.update(f"{path.resolve()}\0{what}\n".encode())
    return h.hexdigest()[:16]


Builder = Callable[[], tuple[tuple[int, ...], Callable[[np.ndarray], Iterable[np.ndarray]]]]


def cached_arrays(cache_dir: str | Path, name: str, key: str, build: Builder) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (memory-mapped uint8 tensor N x C x H x W) and labels (int64) of entry `name-key`.

    If the entry is missing, `build()` checks the source and returns `(shape, fill)`; `fill(images)` writes
    the decoded images into the memory-mapped array `images` and yields their labels in chunks, in order.
    """

    def write(folder: Path) -> None:
        shape, fill = build()
        images = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8, shape=shape)
        labels = np.concatenate([np.empty(0, np.int64), *fill(images)]).astype(np.int64)
        if len(labels) != shape[0]:
            raise RuntimeError(f"cache fill for {name} wrote {len(labels)} labels for {shape[0]} images")
        images.flush()
        del images
        np.save(folder / "labels.npy", labels)

    entry = cached_dir(cache_dir, name, key, write)
    # copy-on-write mapping: writable for torch.from_numpy, shared page cache, never written back
    images = torch.from_numpy(np.load(entry / "images.npy", mmap_mode="c"))
    labels = torch.from_numpy(np.load(entry / "labels.npy")).long()
    return images, labels


def cached_dir(cache_dir: str | Path, name: str, key: str, write: Callable[[Path], None]) -> Path:
    """The folder `<cache_dir>/<name>-<key>`, made by `write(folder)` if missing (once, under a lock)."""
    cache_dir = Path(cache_dir).expanduser()
    entry = cache_dir / f"{name}-{key}"
    if entry.is_dir():
        return entry
    with lock(cache_dir / f"{name}.lock"):  # one builder; the others wait, then find the entry
        if entry.is_dir():
            return entry
        for stale in cache_dir.glob(f"{name}-*"):
            log.info("Removing stale cache entry %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        log.info("Building the cache entry %s (once)", entry)
        with atomic_dir(entry) as tmp:
            write(tmp)
    return entry
