"""torchvision ResNets as backbones. Their pretrained weights (a local torchvision .pth, `model.weights`) are loaded
by the stage that starts from them (transferlab.train.pretrained): nothing downloads."""

import torchvision
from torch import nn


def resnet_backbone(arch: str, small_input: bool = False, image_size: int = 32):
    """ResNet without its fc layer. `small_input` uses the CIFAR-style 3x3 stem without max-pool; a pretrained 7x7
    stem then does not fit, so its weights are left out on purpose (`fresh_keys`)."""
    net = getattr(torchvision.models, arch)(weights=None)
    net.fresh_keys = ()
    if small_input:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        net.fresh_keys = ("conv1.weight",)
    net.classifier_names = ("fc",)  # in a torchvision weights file: left out, transferlab's head classifies
    net.out_features = net.fc.in_features
    net.fc = nn.Identity()
    return net
