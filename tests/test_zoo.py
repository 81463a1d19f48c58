"""timm backbones (`model=timm model.name=<timm name>`): built offline, their blocks and layer-wise lr decay from
timm's own grouping, pretrained weights from local files in the formats people have (and from a local Hugging Face
cache), the input following the model, and bad input named. timm's `test_*` models are real architectures at a
size that trains in seconds."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from helpers.cli import run_cli
from helpers.config import TINY
from safetensors.torch import save_file
from timm.optim import param_groups_layer_decay

from transferlab.core.errors import UserError
from transferlab.data import BuiltinDataModule
from transferlab.models import model_input
from transferlab.train.module import ClassifierModule
from transferlab.train.weights import load_backbone_weights

SGD = {"name": "sgd", "lr": 0.1}
# Target-only runs at the tiny sizes: the source stage is a given checkpoint, the others train 1 epoch.
ONE_EPOCH = [*TINY, "stages.pretrain.epochs=1", "stages.finetune.epochs=1"]


def timm_module(name: str, **options) -> ClassifierModule:
    return ClassifierModule(model={"library": "timm", "name": name}, num_classes=7, optimizer=SGD, **options)


@pytest.mark.parametrize("name", ["test_vit", "test_convnext", "test_resnet", "test_efficientnet"])
def test_a_timm_model_is_a_backbone_split_into_timm_s_groups(name):
    module = timm_module(name)
    assert module(torch.zeros(2, 3, 64, 64)).shape == (2, 7)  # transferlab's head on the pooled features
    twin = timm.create_model(name, num_classes=7)
    groups = timm.models.group_parameters(twin, twin.group_matcher(coarse=False))
    assert list(module.blocks)[0] == "stem" and list(module.blocks)[-1] == "head"
    assert len(module.blocks) == len(groups)  # one block per timm group, the classifier's group being the head
    assert not any(n.startswith(("head.", "fc.", "classifier.")) for n, _ in module.backbone.named_parameters()) or (
        name == "test_convnext"  # ConvNeXt's head keeps its norm before the classifier: it is in the head block
    )


@pytest.mark.parametrize("name", ["test_vit", "test_convnext"])
def test_layer_decay_groups_match_timm_s_own(name):
    """Per parameter, the lr scale and weight decay of transferlab's groups (layer_decay, decay_norm_bias=false) are
    those of timm's param_groups_layer_decay on the same architecture (its classifier = transferlab's head)."""
    decay, wd = 0.75, 0.05
    ours = timm_module(name, layer_decay=decay, decay_norm_bias=False)
    optimizer = {"name": "adamw", "lr": 1.0, "weight_decay": wd}
    ours.hparams.optimizer = optimizer
    groups = ours.configure_optimizers().param_groups
    by_id = {id(p): (g["lr"], g.get("weight_decay", wd)) for g in groups for p in g["params"]}
    mine = {n.removeprefix("backbone."): by_id[id(p)] for n, p in ours.named_parameters()}
    twin = timm.create_model(name, num_classes=7)
    skip = getattr(twin, "no_weight_decay", set)()  # as timm.optim.create_optimizer_v2 asks the model
    theirs_groups = param_groups_layer_decay(twin, wd, skip, layer_decay=decay)
    by_id = {id(p): (g["lr_scale"], g["weight_decay"]) for g in theirs_groups for p in g["params"]}
    theirs = {n: by_id[id(p)] for n, p in twin.named_parameters()}
    classifier = {n for n, p in twin.named_parameters() if any(p is q for q in twin.get_classifier().parameters())}
    theirs = {("head." + n.rsplit(".", 1)[1] if n in classifier else n): v for n, v in theirs.items()}
    assert mine.keys() == theirs.keys()
    assert {n: (pytest.approx(s), w) for n, (s, w) in theirs.items()} == mine
    assert len({s for s, _ in mine.values()}) == len(ours.blocks) > 5  # the decay really spans the blocks


def test_the_input_follows_the_model():
    """CIFAR-size images go to a 160-px timm model at 160 px, normalised with its mean and std, on the device."""
    wanted = model_input({"library": "timm", "name": "test_efficientnet"})
    assert wanted["size"] == 160 and wanted["mean"] == pytest.approx([0.485, 0.456, 0.406])
    dm = BuiltinDataModule(task="target", train_per_class=10, test_per_class=2, model_input=wanted, augment=False)
    dm.setup()
    x, _ = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    assert x.shape[-2:] == (160, 160) and x.dtype == torch.float32
    plain = BuiltinDataModule(task="target", train_per_class=10, test_per_class=2, augment=False)
    plain.setup()
    y, _ = plain.on_after_batch_transfer(next(iter(plain.test_dataloader())), 0)
    assert y.shape[-2:] == (32, 32)  # without a model input, the data's own
    pixels = (y * 0.5 + 0.5) * 255  # the built-in data's own normalisation undone
    resized = torch.nn.functional.interpolate(pixels, size=160, mode="bicubic", antialias=True).clamp(0, 255)
    mean, std = torch.tensor(wanted["mean"]).view(1, 3, 1, 1), torch.tensor(wanted["std"]).view(1, 3, 1, 1)
    assert torch.allclose(x, (resized / 255 - mean) / std, atol=1e-4)


def weights_files(tmp_path: Path) -> dict[str, tuple[list[str], dict, Path]]:
    """The files people have, each with the model it is for (overrides, model config): a timm safetensors
    (classifier included), a pytorch_model.bin inside a Lightning-style checkpoint (the `state_dict` of a module
    holding the net as `model`), a torchvision ResNet-18 .pth."""
    import torchvision

    resnet = timm.create_model("test_resnet", num_classes=1000)
    save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, tmp_path / "model.safetensors")
    vit = timm.create_model("test_vit", num_classes=1000)
    wrapped = {"state_dict": {f"model.{k}": v for k, v in vit.state_dict().items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "pytorch_model.bin")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18-f37072fd.pth")
    timm_model = lambda name: (["model=timm", f"model.name={name}"], {"library": "timm", "name": name})
    return {
        "safetensors": (*timm_model("test_resnet"), tmp_path / "model.safetensors"),
        "lightning bin": (*timm_model("test_vit"), tmp_path / "pytorch_model.bin"),
        "torchvision pth": (
            ["model=resnet18", "model.small_input=false"],
            {"name": "resnet18", "small_input": False},
            tmp_path / "resnet18-f37072fd.pth",
        ),
    }


def file_backbone(path: Path, model: dict) -> dict[str, torch.Tensor]:
    module = ClassifierModule(model=model, num_classes=3, optimizer=SGD)
    load_backbone_weights(module, path)
    return {k: v for k, v in module.state_dict().items() if k.startswith("backbone.")}


def stage_backbone(run_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / stage / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("backbone.")}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "lightning bin", "torchvision pth"])
def test_weights_files_start_the_backbone_three_ways(tmp_path, fmt):
    """One run per file format: the file is the source stage's result (pretrain starts from it), another stage's
    init_ckpt, and model.weights (a stage added from nothing starts from it); with the backbone frozen (trainable=head)
    each stage's best checkpoint holds exactly the file's backbone. The scratch baseline stays random."""
    overrides, model, path = weights_files(tmp_path)[fmt]
    run_dir = tmp_path / "run"
    frozen = lambda s: [f"stages.{s}.trainable=head"]
    proc = run_cli(
        "transferlab",
        *ONE_EPOCH,
        *overrides,
        f"model.weights={path}",
        f"stages.source.result_ckpt={path}",
        *frozen("pretrain"),
        *("stages.finetune.init=null", f"stages.finetune.init_ckpt={path}", "stages.finetune.init_head=new"),
        *frozen("finetune"),
        *("+stage@stages.direct=default", "stages.direct.epochs=1", *frozen("direct")),
        "stages.scratch.epochs=1",
        f"hydra.run.dir={run_dir}",
    )
    expected = file_backbone(path, model)
    for stage in ("pretrain", "finetune", "direct"):
        got = stage_backbone(run_dir, stage)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), stage
    scratch = stage_backbone(run_dir, "scratch")
    assert not all(torch.equal(scratch[k], expected[k]) for k in scratch if scratch[k].is_floating_point())
    assert "backbone weights" in proc.stdout + proc.stderr  # the stage header says where the direct stage starts
    assert "left out on purpose" in proc.stdout + proc.stderr  # the file's own classifier, named


def write_hf_cache(cache: Path, name: str) -> Path:
    """A local Hugging Face cache holding timm's weights of `name` as the hub lays it out (refs/main -> snapshot)."""
    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    (folder / "snapshots" / "0123abcd").mkdir(parents=True)
    net = timm.create_model(name, num_classes=1000)
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()},
        folder / "snapshots" / "0123abcd" / "model.safetensors",
    )
    return folder / "snapshots" / "0123abcd" / "model.safetensors"


@pytest.mark.slow
def test_pretrained_weights_come_from_the_local_hugging_face_cache(tmp_path):
    cache = tmp_path / "hf"
    path = write_hf_cache(cache, "test_vit")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    run_dir = tmp_path / "run"
    only_source = ["~stages.pretrain", "~stages.finetune", "~stages.scratch", "objective=source/test/acc"]
    run_cli(
        "transferlab",
        *TINY,
        *only_source,
        "model=timm",
        "model.name=test_vit",
        "model.pretrained=true",
        "stages.source.trainable=head",
        "stages.source.epochs=1",
        f"hydra.run.dir={run_dir}",
        env=env,
    )
    expected = file_backbone(path, {"library": "timm", "name": "test_vit"})
    got = stage_backbone(run_dir, "source")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    record = json.loads((run_dir / "manifest.json").read_text())["stages"]["source"]
    assert any("model weights (content sha256)" in k for k in record["config"])  # the file's content is in the hash


BAD = {
    "unknown name": (["model.name=test_vitt"], "is not a timm model; close matches: test_vit"),
    "other architecture": (["model.name=test_vit", "model.weights={convnext}"], "does not fit the backbone"),
    "not a weights file": (["model.name=test_vit", "model.weights={junk}"], "is not a readable safetensors file"),
    "not a checkpoint": (["model.name=test_vit", "model.weights={junk_bin}"], "is not a PyTorch checkpoint"),
    "missing file": (["model.name=test_vit", "model.weights={missing}"], "does not exist"),
    "not in the cache": (["model.name=test_convnext", "model.pretrained=true"], "not in the local Hugging Face cache"),
    "pretrained for torchvision": (["model=resnet18", "+model.pretrained=true"], "it needs model=timm"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_model_input_is_one_message_and_writes_nothing(tmp_path, case):
    overrides, message = BAD[case]
    torch.save(timm.create_model("test_convnext").state_dict(), tmp_path / "convnext.bin")
    (tmp_path / "junk.safetensors").write_text("not weights")
    (tmp_path / "junk.bin").write_text("not weights")
    files = {
        k: tmp_path / f
        for k, f in [
            ("convnext", "convnext.bin"),
            ("junk", "junk.safetensors"),
            ("junk_bin", "junk.bin"),
            ("missing", "missing.bin"),
        ]
    }
    overrides = [o.format(**files) for o in overrides]
    model = [] if any(o.startswith("model=") for o in overrides) else ["model=timm"]
    run_dir = tmp_path / "run"
    env = {"HF_HUB_CACHE": str(tmp_path / "empty_hf_cache"), "HF_HUB_OFFLINE": "1"}
    proc = run_cli("transferlab", *TINY, *model, *overrides, f"hydra.run.dir={run_dir}", check=False, env=env)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (run_dir / "manifest.json").exists()
    if case == "not in the cache":
        assert str(tmp_path / "empty_hf_cache" / "models--timm--test_convnext.r160_in1k") in proc.stderr


def test_model_weights_of_another_architecture_are_named_in_process(tmp_path):
    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "resnet.bin")
    with pytest.raises(UserError, match="missing: backbone.cls_token"):
        load_backbone_weights(timm_module("test_vit"), tmp_path / "resnet.bin")
    assert os.path.exists(tmp_path / "resnet.bin")


def test_a_run_of_another_model_never_imports_timm():
    """timm costs ~0.4 s to import: only a run of a timm model pays it (the premise of timm being a dependency, not
    an extra)."""
    program = (
        "import sys; from transferlab.commands import main; from transferlab.run import pipeline; "
        "from transferlab.models import model_input; from transferlab.train.module import ClassifierModule; "
        "ClassifierModule(model={'name': 'resnet18'}, num_classes=3, optimizer={'name': 'sgd', 'lr': 0.1}); "
        "model_input({'name': 'resnet18'}); print('timm' in sys.modules, 'huggingface_hub' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["False", "False"]
