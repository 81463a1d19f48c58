"""torchvision ResNets as backbones, optionally from a local torchvision weights file (nothing downloads)."""

from pathlib import Path

import torch
import torchvision
from torch import nn

from transferlab.core.errors import UserError


def resnet_backbone(arch: str, small_input: bool = False, weights: str | None = None, image_size: int = 32):
    """ResNet without its fc layer. `small_input` uses the CIFAR-style 3x3 stem without max-pool."""
    net = getattr(torchvision.models, arch)(weights=None)
    if weights:
        _load_torchvision_weights(net, Path(weights), arch)
    if small_input:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.out_features = net.fc.in_features
    net.fc = nn.Identity()
    return net


def _load_torchvision_weights(net: nn.Module, path: Path, arch: str) -> None:
    if not path.is_file():
        raise UserError(
            f"model.weights={path} does not exist: give the path of a torchvision {arch} state-dict "
            f"file (e.g. {arch}-<hash>.pth from torchvision's model zoo), or weights=null."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches: another architecture's file
        raise UserError(f"{path} does not fit torchvision {arch}: {err}") from None
    if result.missing_keys or result.unexpected_keys:
        raise UserError(
            f"{path} is not a torchvision {arch} state dict: missing keys {result.missing_keys[:5]}, "
            f"unexpected keys {result.unexpected_keys[:5]}."
        )
