"""Fine-tuning methods, each on its mechanism, with real Trainers: freezing, gradual unfreezing, param groups,
warm-up + cosine, L2-SP, BSS, label smoothing, weight decay without norms/biases (the pipeline and the ready
recipes: test_methods_pipeline.py)."""

import math

import lightning as L
import pytest
import torch
from helpers.training import fit, loader
from torch import nn

from transferlab.train import regularizers
from transferlab.train.finetuning import block_names
from transferlab.train.module import ClassifierModule

SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}
CONVNET, RESNET18 = {"name": "convnet"}, {"name": "resnet18", "small_input": True}


def block_state(module: ClassifierModule, name: str) -> dict:
    """Parameters and buffers (BatchNorm statistics too) of one block, copied."""
    modules = module.blocks[name].modules
    return {f"{i}.{k}": v.clone() for i, m in enumerate(modules) for k, v in m.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "model,names",
    [
        ("convnet", ["conv1", "conv2", "fc", "head"]),
        ("resnet18", ["stem", "layer1", "layer2", "layer3", "layer4", "head"]),
        ("resnet50", ["stem", "layer1", "layer2", "layer3", "layer4", "head"]),
    ],
)
def test_every_model_is_split_into_named_blocks(model, names):
    module = ClassifierModule(
        model={"name": model, "small_input": True} if model != "convnet" else CONVNET, num_classes=4, optimizer=SGD
    )
    assert (
        block_names({"name": model}) == list(module.blocks) == names
    )  # (model_blocks checks every parameter is in one)


@pytest.mark.parametrize("model,trainable", [(CONVNET, ["conv2", "head"]), (RESNET18, ["layer4", "head"])])
def test_surgical_fine_tuning_leaves_frozen_blocks_bit_identical(model, trainable):
    """Momentum, weight decay and BatchNorm statistics included: the blocks outside `trainable` do not change."""
    L.seed_everything(0)
    module = ClassifierModule(model=model, num_classes=4, optimizer=SGD, trainable=trainable)
    before = {name: block_state(module, name) for name in module.blocks}
    optimized = {id(p) for g in module.configure_optimizers().param_groups for p in g["params"]}
    assert optimized == {id(p) for n in trainable for p in module.blocks[n].params}
    fit(module, epochs=2 if model is CONVNET else 1, n=48 if model is CONVNET else 16)
    for name in module.blocks:
        assert same(before[name], block_state(module, name)) == (name not in trainable), name


class Snapshots(L.Callback):
    """Each block's state at the end of every training epoch."""

    def __init__(self):
        self.epochs = []

    def on_train_epoch_end(self, trainer, module):
        self.epochs.append({name: block_state(module, name) for name in module.blocks})


def test_gradual_unfreezing_unfreezes_one_block_more_every_n_epochs_from_the_head_down():
    L.seed_everything(0)
    module = ClassifierModule(model=CONVNET, num_classes=4, optimizer=SGD, unfreeze_every=2)
    start = {name: block_state(module, name) for name in module.blocks}
    snapshots = Snapshots()
    fit(module, epochs=6, callbacks=[snapshots])
    changed = [[name for name in module.blocks if not same(start[name], epoch[name])] for epoch in snapshots.epochs]
    assert changed == [
        ["head"],
        ["head"],
        ["fc", "head"],
        ["fc", "head"],
        ["conv2", "fc", "head"],
        ["conv2", "fc", "head"],
    ]


def test_layer_decay_and_backbone_multiplier_scale_each_block_group():
    lr, decay, mult = 0.1, 0.5, 0.1
    module = ClassifierModule(
        model=RESNET18, num_classes=4, optimizer={"name": "sgd", "lr": lr}, layer_decay=decay, backbone_lr_mult=mult
    )
    groups = module.configure_optimizers().param_groups
    names = block_names(RESNET18)
    assert [g["name"] for g in groups] == names
    for i, group in enumerate(groups):
        expected = lr * decay ** (len(names) - 1 - i) * (1 if group["name"] == "head" else mult)
        assert group["lr"] == pytest.approx(expected)
    assert groups[-1]["lr"] == lr and groups[0]["lr"] == pytest.approx(lr * mult * decay**5)


def test_default_options_keep_one_plain_parameter_group():
    module = ClassifierModule(model=CONVNET, num_classes=4, optimizer=SGD)
    [group] = module.configure_optimizers().param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in module.parameters()] and "name" not in group


def test_weight_decay_groups_hold_no_norm_or_bias_parameter():
    module = ClassifierModule(model=RESNET18, num_classes=4, optimizer=SGD, decay_norm_bias=False)
    norm_or_bias = {
        id(p)
        for m in module.modules()
        for n, p in m.named_parameters(recurse=False)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or n == "bias"
    }
    groups = module.configure_optimizers().param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    undecayed = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed and not decayed & norm_or_bias
    assert undecayed == norm_or_bias and decayed | undecayed == {id(p) for p in module.parameters()}


class RecordLRs(L.Callback):
    """Every group's lr at each training step, as the optimizer uses it."""

    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_group_lrs_follow_warmup_then_cosine(interval):
    lr, decay, epochs, per_epoch = 0.1, 0.5, 4, 3  # 48 samples / batch 16
    module = ClassifierModule(
        model=CONVNET,
        num_classes=4,
        optimizer={"name": "sgd", "lr": lr},
        layer_decay=decay,
        scheduler={"name": "cosine", "warmup_epochs": 1, "interval": interval},
    )
    record = RecordLRs()
    fit(module, epochs=epochs, callbacks=[record])
    total, warmup = (epochs * per_epoch, per_epoch) if interval == "step" else (epochs, 1)
    for step, lrs in enumerate(record.lrs):
        t = step if interval == "step" else step // per_epoch
        factor = (t + 1) / warmup if t < warmup else 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))
        assert lrs == pytest.approx([lr * decay ** (3 - i) * factor for i in range(4)]), step
    assert len(record.lrs) == epochs * per_epoch and max(r[-1] for r in record.lrs) == pytest.approx(lr)


def test_l2sp_is_zero_at_the_start_and_keeps_the_model_closer_to_its_starting_point():
    module = ClassifierModule(model=CONVNET, num_classes=4, optimizer=SGD)
    w0 = regularizers.starting_point(module.backbone)
    assert regularizers.l2sp(module.backbone, module.head, w0, alpha=0.01, beta=0.0).item() == 0
    head_sq = sum((p**2).sum() for p in module.head.parameters())
    assert regularizers.l2sp(module.backbone, module.head, w0, 0.01, 0.5).item() == pytest.approx(0.25 * head_sq.item())

    def distance(l2sp):
        L.seed_everything(0)
        module = ClassifierModule(model=CONVNET, num_classes=4, optimizer=SGD, l2sp=l2sp)
        start = regularizers.starting_point(module.backbone)
        trainer = fit(module, epochs=3)
        moved = sum(((p - start[n]) ** 2).sum() for n, p in module.backbone.named_parameters()).item()
        return moved, trainer.callback_metrics

    free, _ = distance(None)
    held, metrics = distance({"alpha": 1.0, "beta": 0.01})
    assert held < 0.8 * free and metrics["train/l2sp"] > 0


def test_bss_is_the_sum_of_the_k_smallest_squared_singular_values():
    q, _ = torch.linalg.qr(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)))
    r, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1)))
    features = q @ torch.diag(torch.tensor([5.0, 3.0, 2.0, 0.5])) @ r  # singular values 5, 3, 2, 0.5
    assert regularizers.bss(features, k=1).item() == pytest.approx(0.25)
    assert regularizers.bss(features, k=2).item() == pytest.approx(4.25)
    module = ClassifierModule(model=CONVNET, num_classes=4, optimizer=SGD, bss={"weight": 0.001, "k": 1})
    x, y = next(iter(loader()))
    plain = nn.functional.cross_entropy(module(x), y)
    expected = plain + 0.001 * regularizers.bss(module.backbone(x), 1)
    assert module.training_step((x, y), 0).item() == pytest.approx(expected.item(), rel=1e-6)
    assert fit(module, epochs=1).callback_metrics["train/bss"] > 0


def test_label_smoothing_loss_is_torchs():
    module = ClassifierModule(model=CONVNET, num_classes=4, optimizer=SGD, label_smoothing=0.1)
    x, y = next(iter(loader()))
    logits = module(x)
    by_hand = 0.9 * nn.functional.cross_entropy(logits, y) - 0.1 * logits.log_softmax(-1).mean(-1).mean()
    torchs = nn.CrossEntropyLoss(label_smoothing=0.1)(logits, y)
    assert module.training_step((x, y), 0).item() == pytest.approx(torchs.item()) == pytest.approx(by_hand.item())


def test_checkpoints_from_before_the_rename_still_build_their_module():
    """transferlab-eval builds the module from a checkpoint's hyperparameters; old ones say `train`."""
    module = ClassifierModule.from_hparams({"model": CONVNET, "num_classes": 4, "optimizer": SGD, "train": "head"})
    assert module.trainable == ["head"] and not any(p.requires_grad for p in module.backbone.parameters())
