"""A decoded dataset cached on disk as uint8 `.npy` files, memory-mapped so processes share one copy.

An entry is `<cache_dir>/<name>-<key>/{images,labels}.npy`, where `key` hashes the source files' names,
sizes and modification times (and any options that change the decoded result): a changed source gives a new
key and the entry is rebuilt; stale entries of the same name are removed. Entries are built under a file
lock into a temporary folder and renamed into place, so DDP ranks (or parallel jobs) build it once and
never read a half-written entry.
"""

import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)


def source_key(files: Sequence[Path], **options) -> str:
    """A short hash of the files' names, sizes and mtimes, and of `options`."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for f in files:
        st = Path(f).stat()
        h.update(f"{Path(f).resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
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
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait, then find the entry
        if entry.is_dir():
            return entry
        for stale in cache_dir.glob(f"{name}-*"):
            log.info("Removing stale cache entry %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = cache_dir / f".{name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            log.info("Building the cache entry %s (once)", entry)
            write(tmp)
            os.replace(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return entry
