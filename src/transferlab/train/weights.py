"""Initialising a stage from another stage's checkpoint: weights only, never code, head swapped if asked.

Init is not resume: resuming restores a stage's own `last.ckpt` (optimizer, epoch, ...) through
Lightning; initialising copies model weights from a checkpoint that may come from someone else, so it
loads with `weights_only=True` and checks that the weights fit the model.
"""

from pathlib import Path

import torch
from torch import nn

from transferlab.core.errors import UserError
from transferlab.core.fileio import not_a_file
from transferlab.train.checkpoint_files import verify_checkpoint
from transferlab.train.module import ClassifierModule


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint's contents as tensors and plain containers, after `verify_checkpoint` (readable, a PyTorch
    checkpoint, zip CRCs right, nothing that would run code)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"Checkpoint {path} {not_a_file(path)}: give the path of a .ckpt file "
            "(e.g. <run>/finetune/checkpoints/best.ckpt)."
        )
    verify_checkpoint(path, "init")
    return torch.load(path, map_location="cpu", weights_only=True)


def draw_new_head(module: ClassifierModule, seed: int) -> None:
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
    state = _state_dict(checkpoint, path)
    if new_head:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    problems = key_problems(state, module.state_dict(), skip_head=new_head)
    mismatched = problems["shape mismatch (checkpoint vs model)"]
    if (
        mismatched
        and all(m.startswith("head.") for m in mismatched)
        and sum(map(len, problems.values())) == len(mismatched)
    ):
        raise UserError(
            f"{path} has a head for another class count ({'; '.join(mismatched)}): set this stage's "
            "init_head=new to start a new head for the target classes."
        )
    if any(problems.values()):
        saved = checkpoint.get("hyper_parameters", {}).get("model") if isinstance(checkpoint, dict) else None
        built = getattr(module, "hparams", {}).get("model")
        raise UserError(
            f"{path} does not fit this model ({describe(problems)}). The checkpoint was saved for model "
            f"{saved}, this stage builds {built}: use a checkpoint of the same architecture or change model=."
        )
    module.load_state_dict(state, strict=False)


def load_module(path: str | Path) -> tuple[ClassifierModule, dict]:
    """The ClassifierModule a transferlab checkpoint describes (its hyperparameters), with the checkpoint's
    weights, and the checkpoint. A file without them, or whose weights do not fit the module they describe (keys
    missing, extra or of another shape: an edited or damaged file), is a UserError naming what is wrong."""
    checkpoint = load_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "model" not in hparams or "state_dict" not in checkpoint:
        raise UserError(
            f"{path} is not a transferlab ClassifierModule checkpoint (it has no model hyperparameters or no "
            "state_dict): give a checkpoint written by transferlab, e.g. <run>/finetune/checkpoints/best.ckpt."
        )
    try:
        module = ClassifierModule.from_hparams(hparams)
    except (TypeError, ValueError, KeyError) as err:
        raise UserError(
            f"{path}: its hyperparameters do not describe a model transferlab can build ({type(err).__name__}: "
            f"{err}); the file was edited or written by another tool."
        ) from None
    state = _state_dict(checkpoint, path)
    problems = key_problems(state, module.state_dict())
    if any(problems.values()):
        raise UserError(
            f"{path}: its weights do not fit the model its hyperparameters describe ({describe(problems)}; model "
            f"{hparams['model']}, {hparams.get('num_classes')} classes). The file was edited or damaged: use the "
            "checkpoint as transferlab wrote it."
        )
    module.load_state_dict(state)
    return module, checkpoint


def _state_dict(checkpoint, path) -> dict:
    """The checkpoint's `state_dict` (or the checkpoint itself, a plain state dict), checked to map names to
    tensors."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(
            f"{path} holds no state dict (a mapping of parameter names to tensors, or a checkpoint with a "
            "`state_dict`): give a .ckpt written by transferlab/Lightning or a torch.save'd state dict."
        )
    return state


def key_problems(state: dict, own: dict, skip_head: bool = False) -> dict[str, list[str]]:
    """The keys of `state` that do not fit a module's own state dict `own`: missing (the head's excepted with
    `skip_head`), unexpected, and of another shape."""
    return {
        "missing": [k for k in own if k not in state and not (skip_head and k.startswith("head."))],
        "unexpected": [k for k in state if k not in own],
        "shape mismatch (checkpoint vs model)": [
            f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and v.shape != own[k].shape
        ],
    }


def describe(problems: dict[str, list[str]]) -> str:
    """`missing: a, b; unexpected: c`: at most six keys of each kind."""
    return "; ".join(
        f"{what}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}" for what, keys in problems.items() if keys
    )
