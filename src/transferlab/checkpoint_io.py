"""Checkpoint files that are whole or absent: written to `<name>.tmp` in the same folder, then renamed.

Lightning 2.6's `_atomic_save` writes through an fsspec transaction whose temporary file lives in the
system temp folder; `shutil.move` to the output folder is a rename only when both are on the same file
system, otherwise a copy that a kill can cut short. Writing the temporary file next to the target makes
the final `os.replace` a rename on every local file system.
"""

import errno
import io
import os
import zipfile
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from transferlab.errors import UserError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        tmp = path.with_name(path.name + ".tmp")
        try:
            self._write(buffer.getbuffer(), tmp)
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            if err.errno in DISK_FULL:
                raise UserError(f"No space left to write checkpoint {path} ({err.strerror}): free space in "
                                f"{path.parent} or point paths.output_root at a larger disk, then re-run into the same "
                                f"folder (hydra.run.dir=...) to resume; the checkpoints written before are intact.") from None
            raise

    @staticmethod
    def _write(data, path: Path) -> None:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def check_resumable(path: Path) -> None:
    """A checkpoint to resume from must be a whole zip archive (torch.save's format): a truncated file
    (copied half-way, or written by another tool that was killed) is named instead of loaded."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        raise UserError(f"Cannot resume from {path}: the file is truncated or corrupt ({err}). Delete it (the stage "
                        "then starts over) or restore a good copy, and re-run into the same folder.") from None
