"""Initialising a stage from another stage's checkpoint: weights only, never code, head swapped if asked.

Init is not resume: resuming restores a stage's own `last.ckpt` (optimizer, epoch, ...) through
Lightning; initialising copies model weights from a checkpoint that may come from someone else, so it
loads with `weights_only=True` and checks that the weights fit the model.
"""

from pathlib import Path

import torch
from torch import nn

from transferlab.checkpoint_io import verify_checkpoint
from transferlab.errors import UserError


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint's contents as tensors and plain containers, after `verify_checkpoint` (readable, a PyTorch
    checkpoint, zip CRCs right, nothing that would run code)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"Checkpoint {path} does not exist: give the path of a .ckpt file "
            "(e.g. <run>/finetune/checkpoints/best.ckpt)."
        )
    verify_checkpoint(path, "init")
    return torch.load(path, map_location="cpu", weights_only=True)


def draw_new_head(module: nn.Module, seed: int) -> None:
    """Draw the new head from its own random stream. Drawn from the global one, seeded as the source stage was
    (the same seed, the same modules built in the same order), it repeated the source head's initial weights row
    for row, so target class i started out tied to source class i: on the CIFAR-10 class split, seed 0 gave 8-18 %
    test accuracy, below chance, for every transfer recipe at 10 and 25 labels per class."""
    with torch.random.fork_rng(devices=[]):  # the global stream goes on as before: nothing else changes
        torch.manual_seed(seed)
        module.head.reset_parameters()


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
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    saved_model = checkpoint.get("hyper_parameters", {}).get("model")
    if mismatched and all(m.startswith("head.") for m in mismatched) and not (missing or unexpected):
        raise UserError(
            f"{path} has a head for another class count ({'; '.join(mismatched)}): set this stage's "
            "init_head=new to start a new head for the target classes."
        )
    if missing or unexpected or mismatched:
        details = "; ".join(
            f"{what}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
            for what, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch (checkpoint vs model)", mismatched),
            )
            if keys
        )
        built = getattr(module, "hparams", {}).get("model")
        raise UserError(
            f"{path} does not fit this model ({details}). The checkpoint was saved for model "
            f"{saved_model}, this stage builds {built}: use a checkpoint of the same architecture "
            "or change model=."
        )
    module.load_state_dict(state, strict=False)
