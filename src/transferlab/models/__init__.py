"""Backbones: each maps images to a feature vector; the classifier head is added by ClassifierModule. A model config
is the reference ConvNet, a torchvision ResNet, or any timm model (`library: timm`, models/zoo.py)."""

from typing import cast

from torch import nn

from transferlab.core.errors import UserError
from transferlab.models import zoo
from transferlab.models.convnet import ConvNetBackbone
from transferlab.models.resnet import resnet_backbone

BACKBONES = {
    "convnet": lambda **kw: ConvNetBackbone(**kw),
    "resnet18": lambda **kw: resnet_backbone("resnet18", **kw),
    "resnet50": lambda **kw: resnet_backbone("resnet50", **kw),
}
LIBRARIES = ("timm",)  # model.library: a model zoo whose names go in model.name
INPUT_SIZES = {"convnet": ConvNetBackbone.input_size}  # backbones that take one image size only (ResNets: any)
WEIGHT_KEYS = ("weights", "pretrained")  # where a backbone's starting weights come from: loaded by the stage

# Each backbone's blocks, input to output, as the backbone's submodules that make them up: the units of freezing,
# gradual unfreezing and layer-wise lr decay (the head, "head", is the last block; see transferlab.train.finetuning).
RESNET_BLOCKS: dict[str, tuple[str, ...]] = {
    "stem": ("conv1", "bn1"),
    **{f"layer{i}": (f"layer{i}",) for i in range(1, 5)},
}
BLOCKS: dict[str, dict[str, tuple[str, ...]]] = {
    "convnet": {"conv1": ("0",), "conv2": ("3",), "fc": ("7",)},
    "resnet18": RESNET_BLOCKS,
    "resnet50": RESNET_BLOCKS,
}


def check_model(model: dict) -> None:
    """The model's name (and library) name a backbone transferlab can build."""
    library, name = model.get("library"), model.get("name")
    if library is None and name not in BACKBONES:
        raise UserError(
            f"model.name={name!r} is unknown; available: {', '.join(BACKBONES)}, or any timm model with model=timm."
        )
    if library is not None and library not in LIBRARIES:
        raise UserError(f"model.library={library!r} is unknown; available: {', '.join(LIBRARIES)} (or null).")
    if library == "timm":
        zoo.check_name(str(name))


def build_backbone(name: str, library: str | None = None, **kwargs) -> tuple[nn.Module, int]:
    """Return (backbone, feature_dim) for a model config (`conf/model/*.yaml`), with random weights: a stage loads
    `weights` / `pretrained` where it starts from them (transferlab.train.pretrained)."""
    check_model({"name": name, "library": library})
    options = {k: v for k, v in kwargs.items() if k not in (*WEIGHT_KEYS, "input")}
    backbone = zoo.timm_backbone(name, **options) if library == "timm" else BACKBONES[name](**options)
    return backbone, cast(int, backbone.out_features)


def block_table(model: dict) -> dict[str, tuple[str, ...]]:
    """The model's blocks, input to output, each as the names in the backbone that make it up (submodules, or for a
    timm model parameters); a timm model's `head` entry names backbone parameters that belong to the head."""
    if model.get("library") == "timm":
        return zoo.timm_blocks(model["name"])
    return BLOCKS[model["name"]]


def model_input(model: dict) -> dict | None:
    """The input the model asks for (size, mean, std, interpolation), or None: the data's own. A timm model with
    `input: model` (its default) takes the size and normalisation it was pretrained with."""
    if model.get("library") == "timm" and model.get("input", "model") == "model":
        return zoo.timm_input(model["name"])
    return None
