"""Initialising a stage from another stage's checkpoint: weights only, never code, head swapped if asked.

Init is not resume: resuming restores a stage's own `last.ckpt` (optimizer, epoch, ...) through
Lightning; initialising copies model weights from a checkpoint that may come from someone else, so it
loads with `weights_only=True` and checks that the weights fit the model.
"""

import pickle
from pathlib import Path

import torch
from torch import nn

from transferlab.errors import UserError


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint's contents as tensors and plain containers; refuses anything that would run code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Checkpoint {path} does not exist: give the path of a .ckpt file "
                        "(e.g. <run>/finetune/checkpoints/best.ckpt).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[-1] if lines else "")
        raise UserError(f"Refused to load {path}: it holds objects other than tensors and plain containers, "
                        f"and loading it would run code from the file ({reason}). Nothing from it was run. Only "
                        "checkpoints saved by transferlab/Lightning with plain hyperparameters, or plain state "
                        "dicts, load; if you trust the file, re-save its state_dict as a plain dict.") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise UserError(f"Checkpoint {path} is truncated or not a PyTorch checkpoint ({err}).") from None


def init_from_checkpoint(module: nn.Module, path: str | Path, new_head: bool) -> None:
    """Copy `path`'s weights into `module`. With `new_head`, the head keeps its fresh initialisation (the
    class count may differ); every other key must be present with the same shape."""
    checkpoint = load_checkpoint(path)
    state = checkpoint.get("state_dict", checkpoint)
    if new_head:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    own = module.state_dict()
    missing = [k for k in own if k not in state and not (new_head and k.startswith("head."))]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                  for k in state if k in own and state[k].shape != own[k].shape]
    saved_model = checkpoint.get("hyper_parameters", {}).get("model")
    if mismatched and all(m.startswith("head.") for m in mismatched) and not (missing or unexpected):
        raise UserError(f"{path} has a head for another class count ({'; '.join(mismatched)}): set this stage's "
                        "init_head=new to start a new head for the target classes.")
    if missing or unexpected or mismatched:
        details = "; ".join(f"{what}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                            for what, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("shape mismatch (checkpoint vs model)", mismatched)) if keys)
        built = getattr(module, "hparams", {}).get("model")
        raise UserError(f"{path} does not fit this model ({details}). The checkpoint was saved for model "
                        f"{saved_model}, this stage builds {built}: use a checkpoint of the same architecture "
                        "or change model=.")
    module.load_state_dict(state, strict=False)
