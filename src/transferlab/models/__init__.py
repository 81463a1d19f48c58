"""Backbones: each maps images to a feature vector; the classifier head is added by ClassifierModule."""

from torch import nn

from transferlab.core.errors import UserError
from transferlab.models.convnet import ConvNetBackbone
from transferlab.models.resnet import resnet_backbone

BACKBONES = {
    "convnet": lambda **kw: ConvNetBackbone(**kw),
    "resnet18": lambda **kw: resnet_backbone("resnet18", **kw),
    "resnet50": lambda **kw: resnet_backbone("resnet50", **kw),
}
INPUT_SIZES = {"convnet": ConvNetBackbone.input_size}  # backbones that take one image size only (ResNets: any)

# Each backbone's blocks, input to output, as the backbone's submodules that make them up: the units of freezing,
# gradual unfreezing and layer-wise lr decay (the head, "head", is the last block; see transferlab.train.finetuning).
RESNET_BLOCKS = {"stem": ("conv1", "bn1"), **{f"layer{i}": (f"layer{i}",) for i in range(1, 5)}}
BLOCKS: dict[str, dict[str, tuple[str, ...]]] = {
    "convnet": {"conv1": ("0",), "conv2": ("3",), "fc": ("7",)},
    "resnet18": RESNET_BLOCKS,
    "resnet50": RESNET_BLOCKS,
}


def build_backbone(name: str, **kwargs) -> tuple[nn.Module, int]:
    """Return (backbone, feature_dim) for a model config (`conf/model/*.yaml`)."""
    if name not in BACKBONES:
        raise UserError(f"Unknown model.name={name!r}; available: {', '.join(BACKBONES)}.")
    backbone = BACKBONES[name](**kwargs)
    return backbone, backbone.out_features
