"""Backbones: each maps images to a feature vector; the classifier head is added by ClassifierModule."""

from torch import nn

from transferlab.errors import UserError
from transferlab.models.convnet import ConvNetBackbone
from transferlab.models.resnet import resnet_backbone

BACKBONES = {
    "convnet": lambda **kw: ConvNetBackbone(**kw),
    "resnet18": lambda **kw: resnet_backbone("resnet18", **kw),
    "resnet50": lambda **kw: resnet_backbone("resnet50", **kw),
}
INPUT_SIZES = {"convnet": ConvNetBackbone.input_size}  # backbones that take one image size only (ResNets: any)


def build_backbone(name: str, **kwargs) -> tuple[nn.Module, int]:
    """Return (backbone, feature_dim) for a model config (`conf/model/*.yaml`)."""
    if name not in BACKBONES:
        raise UserError(f"Unknown model.name={name!r}; available: {', '.join(BACKBONES)}.")
    backbone = BACKBONES[name](**kwargs)
    return backbone, backbone.out_features
