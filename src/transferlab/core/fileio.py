"""File safety in one place: whole-or-absent writes (temporary file in the same folder, fsync, rename) and
inter-process locks (`filelock`). Checkpoints, the manifest and both caches use these, nothing else."""

import errno
import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from transferlab.core.errors import UserError

__all__ = [
    "atomic_write",
    "write_json_atomic",
    "read_json",
    "atomic_dir",
    "lock",
    "copy_file",
    "writable_dir",
    "disk_full",
    "not_a_file",
    "Timeout",
]

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def atomic_write(path: str | Path, data: bytes | str | memoryview, write=None) -> None:
    """Write `data` to `path` whole or not at all: a kill mid-write leaves the old file (or none) and at most a
    `.<name>.<pid>.tmp` beside it. `write(data, tmp)` writes the temporary file (default: write and fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        (write or write_synced)(data.encode() if isinstance(data, str) else data, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_synced(data, path: Path) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: str | Path, data) -> None:
    atomic_write(path, json.dumps(data, indent=2, default=str))


def read_json(path: str | Path):
    """The parsed file, or None when it does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


@contextmanager
def atomic_dir(final: str | Path):
    """Yield a temporary folder next to `final`; on success rename it to `final` (all of it or nothing).
    If `final` appeared meanwhile (another process published it), the temporary folder is discarded."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def lock(path: str | Path, timeout: float = -1) -> FileLock:
    """An inter-process lock on `path` (created if missing); `timeout=0` fails at once with `Timeout`.
    The lock is released by the kernel when its holder dies, so a killed process never leaves it held."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path), timeout=timeout)


FICLONE = 0x40049409  # Linux ioctl: share the blocks copy-on-write (btrfs, XFS with reflink, bcachefs)


def copy_file(src: str | Path, dst: str | Path, read_only: bool = False) -> None:
    """Copy `src` to `dst` whole or not at all, as a file of its own (never a hard link: editing one copy must
    not change the other); a reflink where the file system does them, else a byte copy."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        with open(src, "rb") as source, open(tmp, "wb") as target:
            try:
                fcntl.ioctl(target.fileno(), FICLONE, source.fileno())
            except OSError:
                shutil.copyfileobj(source, target, 1 << 24)
            target.flush()
            os.fsync(target.fileno())
        if read_only:
            os.chmod(tmp, 0o444)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def writable_dir(path: str | Path, what: str) -> None:
    """Create `path` if missing and prove that a file can be written in it (a real write: root passes every
    permission check, yet not a read-only mount); else a UserError naming `what`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UserError(
            f"{what} {path} cannot be written to ({err.strerror}: {err.filename}): point it at a "
            "folder you can write (a path whose parents are folders, not files)."
        ) from None


def disk_full(err: BaseException | None) -> OSError | None:
    """The out-of-space OSError (ENOSPC, EDQUOT, EFBIG) behind `err`, following its causes and contexts: libraries
    wrap it (TensorBoard's logger raises a ValueError "you tried to log ... not supported" from it)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def not_a_file(path: str | Path) -> str:
    """Why `path` is not a file one can read, as a message says it: 'is a folder, not a file' or 'does not exist'."""
    return "is a folder, not a file" if Path(path).expanduser().is_dir() else "does not exist"
