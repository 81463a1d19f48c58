"""timm models as backbones (`model=timm model.name=<timm name>`). The model is built without its classifier
(transferlab's head classifies); its blocks are timm's own parameter grouping (`group_matcher`, the one timm's
layer-wise lr decay uses); its input (size, normalisation) comes from its pretrained config; and timm's pretrained
weights are found in the local Hugging Face cache, never downloaded. timm is imported only for such a model."""

import difflib
import os
from pathlib import Path

import torch
from torch import nn

from transferlab.core.errors import UserError


def _timm():
    import timm  # ~0.4 s after torch and Lightning: paid only by runs that build a timm model

    return timm


def check_name(name: str) -> None:
    """An unknown timm name is one message naming the close matches."""
    timm = _timm()
    if not isinstance(name, str) or not timm.is_model(name):
        close = difflib.get_close_matches(str(name), timm.list_models(), n=6, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise UserError(
            f"model.name={name!r} is not a timm model{hint}. List them with "
            f"python -c \"import timm; print(timm.list_models('*{str(name)[:4]}*'))\"."
        )


def timm_backbone(name: str, image_size: int | None = None, **_) -> nn.Module:
    """The timm model `name` with random weights and no classifier: it maps images to pooled features
    (`out_features` of them). The pretrained weights, if any, are loaded by the stage that starts from them."""
    check_name(name)
    net = _timm().create_model(name, pretrained=False, num_classes=0)
    net.out_features = getattr(net, "head_hidden_size", None) or net.num_features
    classifier = net.pretrained_cfg.get("classifier") or ()
    net.classifier_names = (classifier,) if isinstance(classifier, str) else tuple(classifier)  # in a zoo's file
    return net


def timm_blocks(name: str) -> dict[str, tuple[str, ...]]:
    """Block name -> the backbone's parameter names in it, input to output, from timm's fine grouping. The group
    that holds the classifier is the head: its other parameters (a ConvNeXt head's norm) are in the `head` block.
    Worked out on a twin with a one-class classifier on the meta device: no memory, no weights."""
    from timm.models import group_parameters

    check_name(name)
    with torch.device("meta"):
        twin = _timm().create_model(name, pretrained=False, num_classes=1)
    classifier = {id(p) for p in twin.get_classifier().parameters()}
    in_classifier = {n for n, p in twin.named_parameters() if id(p) in classifier}
    blocks: dict[str, tuple[str, ...]] = {}
    head: tuple[str, ...] = ()
    for layer, names in sorted(group_parameters(twin, twin.group_matcher(coarse=False)).items()):
        if in_classifier & set(names):
            head = tuple(n for n in names if n not in in_classifier)
            continue
        blocks[_block_name(layer, names, blocks)] = tuple(names)
    return {**blocks, "head": head}


def _block_name(layer: int, names: list[str], taken: dict) -> str:
    """`stem` for timm's first group; else the module its parameters share (`blocks.3`), or, for a group that joins
    several (timm merges a final norm into the last block), each one's (`blocks.11+norm`)."""
    if layer == 0:
        return "stem"
    by_root: dict[str, list[list[str]]] = {}
    for module in (n.rsplit(".", 1)[0] if "." in n else n for n in names):
        by_root.setdefault(module.split(".")[0], []).append(module.split("."))
    name = "+".join(".".join(os.path.commonprefix(paths)) for paths in by_root.values())
    return name if name not in taken else f"{name}#{layer}"


def timm_input(name: str) -> dict:
    """The input the model was pretrained on: image size, mean, std, interpolation (timm's data config)."""
    with torch.device("meta"):
        twin = _timm().create_model(name, pretrained=False, num_classes=0)
    data = _timm().data.resolve_model_data_config(twin)
    return {
        "size": int(data["input_size"][-1]),
        "mean": [float(m) for m in data["mean"]],
        "std": [float(s) for s in data["std"]],
        "interpolation": str(data.get("interpolation", "bilinear")),
    }


def pretrained_file(name: str) -> Path:
    """timm's pretrained weights of `name` in the local Hugging Face cache (offline: nothing is downloaded);
    a missing file is one message naming where it looked."""
    from huggingface_hub import constants, try_to_load_from_cache

    cfg = _timm().models.get_pretrained_cfg(name)
    repo = cfg.hf_hub_id if cfg is not None else None
    if not repo:
        raise UserError(
            f"model.pretrained=true: timm has no Hugging Face weights for {name!r}. Give a weights file "
            "instead (model.weights=<file>)."
        )
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return Path(found)
    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    raise UserError(
        f"model.pretrained=true: timm's weights for {name} ({repo}) are not in the local Hugging Face cache "
        f"(looked in {folder}, HF_HUB_CACHE={constants.HF_HUB_CACHE}); nothing is downloaded here. Copy that "
        f"folder from a machine that has it (huggingface-cli download {repo}), or give the file: model.weights=<file>."
    )
