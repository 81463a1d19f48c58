"""Initialising a stage from another stage's checkpoint, or its backbone from a model zoo's weights file: weights
only, never code, head swapped if asked.

Init is not resume: resuming restores a stage's own `last.ckpt` (optimizer, epoch, ...) through
Lightning; initialising copies model weights from a checkpoint that may come from someone else, so it
loads with `weights_only=True` (or from safetensors, which holds tensors only) and checks that the weights fit the
model. The files people have: a transferlab or Lightning `.ckpt`, a timm / Hugging Face `.safetensors` or
`pytorch_model.bin`, a torchvision `.pth`; a file that holds a backbone alone (a zoo's, with its own classifier) is
mapped onto the module's backbone, its classifier left out on purpose and said so.
"""

import logging
from pathlib import Path
from typing import cast

import torch
from torch import nn

from transferlab.core.errors import UserError
from transferlab.core.fileio import not_a_file
from transferlab.train.checkpoint_files import verify_checkpoint
from transferlab.train.module import ClassifierModule

log = logging.getLogger(__name__)
WRAPPERS = ("state_dict", "model", "module")  # where checkpoints of Lightning, timm's train.py, MAE keep the weights
AUXILIARY = ("domain_head.",)  # modules a stage trains with that are not part of the model


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """A checkpoint's contents as tensors and plain containers, after `verify_checkpoint` (readable, a PyTorch
    checkpoint, zip CRCs right, nothing that would run code)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"Checkpoint {path} {not_a_file(path)}: give the path of a .ckpt file "
            "(e.g. <run>/finetune/checkpoints/best.ckpt)."
        )
    if path.suffix == ".safetensors":
        return _read_safetensors(path, shapes_only=mmap)
    verify_checkpoint(path, "init")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and _is_zip(path))


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"  # torch.save's archive, which torch.load can map


def _read_safetensors(path: Path, shapes_only: bool = False) -> dict:
    """The file's tensors (or, `shapes_only`, empty meta tensors of their shapes: nothing read but the header)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        if shapes_only:
            with safe_open(str(path), framework="pt") as f:
                return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(
            f"{path} is not a readable safetensors file ({err}): it was cut short or is another kind of file. "
            "Give the path of a good copy."
        ) from None


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
    state = module_state(_state_dict(checkpoint, path), module, path)
    if new_head:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    # a training aid (DANN's domain discriminator) is neither carried on nor expected
    state = {k: v for k, v in state.items() if not k.startswith(AUXILIARY)}
    own = {k: v for k, v in module.state_dict().items() if not k.startswith(AUXILIARY)}
    problems = key_problems(state, own, skip_head=new_head)
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


def load_backbone_weights(module: ClassifierModule, path: str | Path) -> None:
    """`model.weights` / `model.pretrained`: the backbone starts from a weights file (see `backbone_state`)."""
    path = Path(path)
    backbone, fresh = backbone_state(module, path)
    module.load_state_dict(backbone, strict=False)
    log.info(
        "Backbone weights from %s (%d tensors)%s",
        path,
        len(backbone),
        f"; left at random init on purpose: {', '.join(fresh)}" if fresh else "",
    )


def backbone_state(module: ClassifierModule, path: Path, mmap: bool = False) -> tuple[dict, list[str]]:
    """The backbone's tensors in the weights file `path` (in the module's names), and the backbone keys left at
    random init on purpose (`fresh_keys`: a CIFAR stem where the file has ImageNet's). Every other backbone tensor
    must be there with its shape: a file for another architecture is one message naming the keys that differ.
    With `mmap` the tensors are not read (a check of the file's names and shapes before anything runs)."""
    state = module_state(_state_dict(load_checkpoint(path, mmap=mmap), path), module, path, quiet=mmap)
    fresh = [f"backbone.{k}" for k in getattr(module.backbone, "fresh_keys", ())]
    backbone = {k: v for k, v in state.items() if k.startswith("backbone.") and k not in fresh}
    own = {k: v for k, v in module.state_dict().items() if k.startswith("backbone.") and k not in fresh}
    problems = key_problems(backbone, own)
    if any(problems.values()):
        raise UserError(
            f"model.weights={path} does not fit the backbone {module.hparams['model']} ({describe(problems)}): "
            "give the weights of the same architecture, or set model.name to the model they are for."
        )
    return backbone, fresh


def check_backbone_weights(model: dict, path: Path) -> None:
    """`model.weights` checked against the model before anything is written or trained: the module is built on the
    meta device (no memory, no weights) and the file's names and shapes read without its tensors."""
    with torch.device("meta"):
        module = ClassifierModule(model=model, num_classes=1, optimizer={"name": "sgd", "lr": 1.0})
    backbone_state(module, path, mmap=True)


def module_state(state: dict, module: nn.Module, path, quiet: bool = False) -> dict:
    """A state dict in the module's names (`backbone.*`, `head.*`). A transferlab checkpoint is one already; a
    Lightning module's `model.*` or DDP's `module.*` prefix is dropped; a file that holds a backbone alone (a model
    zoo's) is put under `backbone.`, without its own classifier (transferlab's head classifies: said so)."""
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state) or not hasattr(module, "backbone"):  # transferlab's own
        return state
    own = cast(nn.Module, module.backbone).state_dict()
    classifier = tuple(f"{c}." for c in getattr(module.backbone, "classifier_names", ()))
    dropped = [k for k in state if k not in own and k.startswith(classifier)]
    if dropped and not quiet:
        log.info(
            "%s: its classifier (%s) is left out on purpose: transferlab's head classifies", path, ", ".join(dropped)
        )
    return {f"backbone.{k}": v for k, v in state.items() if k not in dropped}


def _state_dict(checkpoint, path) -> dict:
    """The checkpoint's `state_dict` (or `model`, `module`, or the checkpoint itself, a plain state dict), checked
    to map names to tensors."""
    state = checkpoint
    while isinstance(state, dict) and (wrapper := next((w for w in WRAPPERS if isinstance(state.get(w), dict)), None)):
        state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
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
