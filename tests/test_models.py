"""The reference ConvNet exactly as the mission describes it, and the torchvision backbones."""

import pytest
import torch
import torchvision
from torch import nn

from transferlab.core.errors import UserError
from transferlab.models import build_backbone
from transferlab.train.module import ClassifierModule
from transferlab.train.weights import load_backbone_weights

SGD = {"name": "sgd", "lr": 0.01}


def test_convnet_layers_and_split():
    module = ClassifierModule(model={"name": "convnet"}, num_classes=10, optimizer=SGD)
    convs = [m for m in module.backbone if isinstance(m, nn.Conv2d)]
    linears = [m for m in module.backbone if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (3, 32, (3, 3), (1, 1)),
        (32, 64, (3, 3), (1, 1)),
    ]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(64 * 8 * 8, 128)]
    assert sum(isinstance(m, nn.MaxPool2d) for m in module.backbone) == 2
    assert (module.head.in_features, module.head.out_features) == (128, 10)
    assert module.backbone(torch.zeros(2, 3, 32, 32)).shape == (2, 128)
    assert module(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    # 3*32*9+32 + 32*64*9+64 + 4096*128+128 + 128*10+10
    assert sum(p.numel() for p in module.parameters()) == 896 + 18496 + 524416 + 1290


@pytest.mark.parametrize("arch,features", [("resnet18", 512), ("resnet50", 2048)])
def test_resnet_backbones_on_32px(arch, features):
    backbone, dim = build_backbone(arch, small_input=True)
    assert dim == features
    assert backbone.conv1.kernel_size == (3, 3) and backbone.conv1.stride == (1, 1)
    assert isinstance(backbone.maxpool, nn.Identity)
    assert backbone(torch.zeros(2, 3, 32, 32)).shape == (2, features)


def resnet18_module(small_input: bool) -> ClassifierModule:
    return ClassifierModule(model={"name": "resnet18", "small_input": small_input}, num_classes=3, optimizer=SGD)


def test_resnet_from_local_torchvision_weights(tmp_path, caplog):
    """model.weights (loaded by the stage that starts from them): the file's backbone, its fc left out; with
    small_input the 3x3 stem cannot take the file's 7x7 one, which stays at random init and is named."""
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    module = resnet18_module(small_input=False)
    load_backbone_weights(module, tmp_path / "resnet18.pth")
    assert torch.equal(module.backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert torch.equal(module.backbone.conv1.weight, reference.conv1.weight)  # ImageNet stem kept without small_input
    small = resnet18_module(small_input=True)
    with caplog.at_level("INFO", logger="transferlab"):
        load_backbone_weights(small, tmp_path / "resnet18.pth")
    assert torch.equal(small.backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert "left at random init on purpose: backbone.conv1.weight" in caplog.text
    assert "its classifier (fc.weight, fc.bias) is left out on purpose" in caplog.text


def test_resnet_weights_of_another_architecture_are_named(tmp_path):
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "resnet50.pth")
    with pytest.raises(UserError, match="does not fit the backbone"):
        load_backbone_weights(resnet18_module(small_input=False), tmp_path / "resnet50.pth")
    with pytest.raises(UserError, match="does not exist"):
        load_backbone_weights(resnet18_module(small_input=False), tmp_path / "missing.pth")


def test_unknown_model_lists_the_available_ones():
    with pytest.raises(UserError, match="convnet, resnet18, resnet50"):
        build_backbone("vgg")


def test_head_training_freezes_the_backbone_and_optimizes_only_the_head():
    module = ClassifierModule(model={"name": "convnet"}, num_classes=10, optimizer=SGD, trainable="head")
    assert not any(p.requires_grad for p in module.backbone.parameters())
    optimizer = module.configure_optimizers()
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.head.parameters()}
