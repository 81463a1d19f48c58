"""Checkpoint files that are whole or absent: written to a temporary file in the same folder, then renamed
(`fileio.atomic_write`), and verified before any use (`verify_checkpoint`).

Lightning 2.6's `_atomic_save` writes through an fsspec transaction whose temporary file lives in the
system temp folder; `shutil.move` to the output folder is a rename only when both are on the same file
system, otherwise a copy that a kill can cut short. Writing the temporary file next to the target makes
the final `os.replace` a rename on every local file system.
"""

import io
import pickle
import zipfile
import zlib
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from transferlab.core.errors import UserError
from transferlab.core.fileio import DISK_FULL, atomic_write, write_synced


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            atomic_write(path, buffer.getbuffer(), write=self._write)
        except OSError as err:
            if err.errno in DISK_FULL:  # the checkpoint's name, not its temporary file's: the CLI says what to free
                raise OSError(err.errno, err.strerror, str(path)) from None
            raise

    def load_checkpoint(self, path, *args, **kwargs) -> dict:
        """Every load through a Trainer (resume, test on the best checkpoint) unpickles tensors and plain containers
        only, also where TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 would make torch.load's default run code."""
        return super().load_checkpoint(path, *args[:1], **{**kwargs, "weights_only": True})

    _write = staticmethod(write_synced)  # writes the temporary file; the fault-injection tests replace it


def check_resumable(path: Path) -> None:
    """The stage's own `last.ckpt`, checked before Lightning resumes from it (see `verify_checkpoint`)."""
    verify_checkpoint(path, "resume")


FIXES = {
    "resume": "Delete it (the stage then starts over) or restore a good copy, and re-run into the same folder.",
    "init": "Give the path of a good copy (a .ckpt written by transferlab/Lightning, or a torch.save'd state dict).",
    "cache": "Delete the cache entry {folder} (the stage is then trained again) and re-run.",
}


def verify_checkpoint(path: str | Path, use: str = "init") -> None:
    """Check a checkpoint file before it is used (`use`: resume, init or cache, which picks the fix named): it can
    be read, it is a PyTorch checkpoint (torch.save's zip archive, or its legacy pickle format), every zip member
    matches the CRC-32 written with it (a few bytes changed with the length kept are caught, which torch.load does
    not check), and it unpickles with `weights_only=True`, so loading it runs no code from the file. Raises a
    UserError naming the file and the fix."""
    path = Path(path)
    fix = FIXES[use].format(folder=path.parent)
    lead, subject = (f"Cannot resume from {path}: ", "the file") if use == "resume" else ("", str(path))
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            problem = _zip_problem(f) if head == b"PK\x03\x04" else None
    except FileNotFoundError:
        raise UserError(f"{lead}{subject} does not exist. {fix}") from None
    except OSError as err:
        raise UserError(
            f"{lead}{subject} cannot be read ({err.strerror}): check the file's permissions and that "
            f"it is a file, as the user running transferlab. {fix}"
        ) from None
    if not head:
        problem = "is empty (0 bytes)"
    elif head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":  # a zip archive, or a legacy torch.save pickle
        problem = f"is not a PyTorch checkpoint (it starts with {head!r}; torch.save writes a zip archive)"
    if problem:
        raise UserError(f"{lead}{subject} {problem}. {fix}")
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=head == b"PK\x03\x04")  # mmap: no tensor read
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[-1] if lines else "")
        raise UserError(
            f"Refused to load {path}: it holds objects other than tensors and plain containers, "
            f"and loading it would run code from the file ({reason}). Nothing from it was run. Only "
            "checkpoints saved by transferlab/Lightning with plain hyperparameters, or plain state "
            "dicts, load; if you trust the file, re-save its state_dict as a plain dict. "
            f"{fix}"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise UserError(f"{lead}{subject} is truncated or not a PyTorch checkpoint ({err}). {fix}") from None


def _zip_problem(f) -> str | None:
    """What is wrong with an open zip archive as a torch.save checkpoint, or None."""
    try:
        with zipfile.ZipFile(f) as archive:
            if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist()):
                return "is a zip archive but not a PyTorch checkpoint (it has no data.pkl)"
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, zlib.error) as err:
        return f"is truncated or corrupt ({err})"
    if bad:
        return (
            f"is corrupt: its part {bad} does not match the CRC-32 checksum written with it, so bytes were "
            "changed after it was saved"
        )
    return None
