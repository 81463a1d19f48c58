"""Data identity is content: a sha256 of every data file, kept in a small on-disk index so a re-run hashes
only the files that changed.

The index (`<cache_dir>/fingerprint-<hash of the data folder>.json`) maps each file, by its path relative to
the data folder, to `[size, mtime_ns, ctime_ns, inode, sha256]`. A file whose size, mtime, ctime or inode differs
from its entry is read and hashed again. The ctime is what catches an in-place edit of equal size whose mtime
was put back (`os.utime`): the kernel sets ctime to the current time on every write and on every utime call,
and user programs cannot set it. A file changed within `RACY_S` seconds of being indexed may still share its
timestamps with the indexed version (coarse file-system clocks), so it is not kept in the index and is hashed
again next time (git's "racy clean" rule).

Not caught: a change made below the file system (a raw block device, an image edited offline) or with the
system clock set back to the file's old ctime; a file system that keeps no ctime. Such files can be re-hashed
by deleting the index file.
"""

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

from transferlab.core.digests import file_digest
from transferlab.core.fileio import atomic_write, lock, read_json

RACY_S = 2.0
VERSION = 1
log = logging.getLogger(__name__)


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_index(index_file: Path) -> dict:
    """The index's entries. A damaged index (cut short by a full disk or a killed job, edited by hand) is only a
    cache: it is ignored, so every file is hashed again and the index rewritten."""
    try:
        index = read_json(index_file) or {}
        entries = index.get("files", {}) if index.get("version") == VERSION else {}
        if isinstance(entries, dict) and all(isinstance(e, list) and len(e) == 5 for e in entries.values()):
            return entries
    except (ValueError, AttributeError):  # not JSON (or not UTF-8), or not an object
        pass
    log.warning(
        "Fingerprint index %s is damaged: ignored; the data files are hashed again and it is rewritten", index_file
    )
    return {}


def _index_lock(index_file: Path):
    """The index's lock, or None where its folder cannot be written (read-only, full): then no index is kept, and
    every data file is hashed."""
    try:
        held = lock(index_file.with_suffix(".lock"))
        held.acquire()
        held.release()
        return held
    except OSError as err:
        log.warning(
            "Fingerprint index folder %s cannot be written (%s): every data file is hashed", index_file.parent, err
        )
        return None


def content_hashes(files: Sequence[str | Path], index_dir: str | Path | None) -> tuple[list[str], list[int]]:
    """(sha256, size) of each file, in order; files unchanged since they were indexed are not read.
    `index_dir=None` keeps no index (every file is read)."""
    paths = [os.path.abspath(f) for f in files]
    return _hashes(paths, data_folder(sorted(paths)) if paths else "", index_dir)


def _hashes(files: list[str], top: str, index_dir: str | Path | None) -> tuple[list[str], list[int]]:
    """content_hashes of absolute paths under the data folder `top`."""
    if not files:
        return [], []
    index_file = None
    if index_dir is not None:
        name = hashlib.sha256(str(Path(top).resolve()).encode()).hexdigest()[:16]
        index_file = Path(index_dir).expanduser() / f"fingerprint-{name}.json"
    guard = _index_lock(index_file) if index_file else None
    if guard is None:
        index_file = None
    with guard or nullcontext():
        entries = _read_index(index_file) if index_file else {}
        now_ns, changed, hashes, sizes = time.time_ns(), False, [], []
        for path in files:
            st = os.stat(path)
            rel = path[len(top) + 1 :]
            key, entry = _stat_key(st), entries.get(rel)
            if entry is not None and entry[:4] == key:
                digest = entry[4]
            else:
                digest, changed = file_digest(path), True
                if now_ns - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_S * 1e9:
                    entries[rel] = [*key, digest]
                else:
                    entries.pop(rel, None)
            hashes.append(digest)
            sizes.append(st.st_size)
        if index_file and changed:
            try:
                atomic_write(index_file, json.dumps({"version": VERSION, "folder": str(top), "files": entries}))
            except OSError as err:  # a full or read-only cache folder: the index is only a cache
                log.warning(
                    "Fingerprint index %s not written (%s): the files are hashed again next time", index_file, err
                )
    return hashes, sizes


def data_folder(files: Sequence[str]) -> str:
    """The folder the (sorted, absolute) files' names are taken relative to: the parent of their common folder,
    so the name of the dataset's own folder (e.g. cifar-10-batches-py) is part of each name. The common folder of
    a sorted list is that of its first and last entries."""
    return os.path.dirname(os.path.commonpath([files[0], files[-1]]))


def files_digest(files: Sequence[str | Path], index_dir: str | Path | None) -> tuple[str, int]:
    """(hex sha256 over each file's name relative to the data folder and its content hash, total bytes)."""
    paths = sorted(os.path.abspath(f) for f in files)
    top = data_folder(paths) if paths else ""
    hashes, sizes = _hashes(paths, top, index_dir)
    digest = hashlib.sha256()
    for path, content in zip(paths, hashes):
        digest.update(f"{path[len(top) + 1 :].replace(os.sep, '/')}\t{content}\n".encode())
    return digest.hexdigest(), sum(sizes)
