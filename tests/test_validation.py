"""Every config value is checked in one place (transferlab.config.validation) before anything is written or
trained: one message, exit 2, no traceback, the run folder untouched; a renamed key is refused naming the new name.
The whole table through the entry points in this process, a sample through the installed scripts; transferlab-eval
checks the same values."""

import hashlib
from pathlib import Path

import pytest
from helpers.cli import assert_user_error, in_process, run_cli, transferlab
from helpers.config import ONLY_SOURCE, STAGE_KEYS, TINY

from transferlab.commands import evaluate as eval_command
from transferlab.commands import main as cli

IMAGENET32_64 = [
    "data/source=imagenet32",
    "data.source.image_size=64",
    "data.target.source_classes=6",
    "data.target.noise=0.5",
    "data.target.max_shift=4",
    "data.target.world_seed=1234",
]
CIFAR = ["data/target=cifar10"]  # validation refuses its values before the data (root: null) is read

# override(s) -> fragments of the one message; each is refused before anything is written or trained
BAD_VALUES = [
    (["stages.finetune.optimizer.lr=true"], "stages.finetune.optimizer.lr must be a positive number, got true."),
    (["stages.finetune.optimizer.lr=-0.1"], "stages.finetune.optimizer.lr must be a positive number, got -0.1."),
    (
        ["stages.source.optimizer.momentum=abc"],
        'stages.source.optimizer.momentum must be a number in [0, 1), got "abc".',
    ),
    # issue 19 (third round of hostile testing): accepted before, and trained on
    (["stages.source.optimizer.momentum=1.5"], "stages.source.optimizer.momentum must be a number in [0, 1), got 1.5."),
    (
        ["stages.finetune.scheduler.name=step", "+stages.finetune.scheduler.gamma=-1"],
        "stages.finetune.scheduler.gamma must be a number in (0, 1], got -1.",
    ),
    (
        ["stages.finetune.scheduler.name=step", "+stages.finetune.scheduler.step_size=abc"],
        'stages.finetune.scheduler.step_size must be a whole number of at least 1, got "abc".',
    ),
    (["seed=4294967296"], "seed must be a whole number from 0 to 4294967295, got 4294967296."),
    (["data.source.seed=-1"], "data.source.seed must be a whole number from 0 to 4294967295, got -1."),
    (
        ["stages.finetune.unfreeze_every=2", "stages.finetune.epochs=2"],
        "stages.finetune.unfreeze_every=2 with stages.finetune.epochs=2: no block would ever be unfrozen",
    ),
    (
        ["recipe=sgd_momentum", "stages.finetune.optimizer.name=adamw"],
        "stages.finetune.optimizer.name=adamw (AdamW) takes no momentum (set to 0.9): set it to 0 or remove it",
    ),
    (["stages.source.optimizer.name=adam"], "stages.source.optimizer.name='adam' is unknown; available: sgd, adamw."),
    (
        ["stages.pretrain.scheduler.name=cosin"],
        "stages.pretrain.scheduler.name='cosin' is unknown; available: none, cosine, step.",
    ),
    (["data.batch_size=abc"], 'data.batch_size must be a whole number of at least 1, got "abc".'),
    (
        ["data/target=cifar10_shifted", "data.target.corruption=fgo"],
        'data.target.corruption="fgo" is not a CIFAR-10-C corruption (did you mean fog?); available: gaussian_noise,',
    ),
    (
        ["data/target=cifar10_shifted", "data.target.severity=0"],
        "data.target.severity must be a whole number from 1 to 5, got 0.",
    ),
    # a TypeError from Path(None) before: the ImageNet layouts keep what they build in their cache folder
    (
        ["data/source=imagenet", "data.source.root=/nowhere", "data.source.cache_dir=null"],
        "data.source.cache_dir=None: this data set keeps the devkit layout's sorted view of val/ in that folder.",
    ),
    (
        ["data/source=imagenet32", "data.source.root=/nowhere", "data.source.cache_dir=null"],
        "data.source.cache_dir=None: this data set keeps the decoded images",
    ),
    (["stages.source.seed=-1"], "stages.source.seed must be null or a whole number from 0 to 4294967295, got -1."),
    (["data.batch_size=0"], "data.batch_size must be a whole number of at least 1, got 0."),
    (["data.batch_size=true"], "data.batch_size must be a whole number of at least 1, got true."),
    (
        ["data.target.eval_batch_size=-5"],
        "data.target.eval_batch_size must be a whole number >= 1, auto (chosen for the device) or null (the "
        "training batch size), got -5.",
    ),
    (["stages.source.epochs=abc"], 'stages.source.epochs must be a whole number of at least 1, got "abc".'),
    (["stages.pretrain.epochs=1.5"], "stages.pretrain.epochs must be a whole number of at least 1, got 1.5."),
    (["stages.pretrain.epochs=abc"], 'stages.pretrain.epochs must be a whole number of at least 1, got "abc".'),
    (["stages.finetune.epochs=0"], "stages.finetune.epochs must be a whole number of at least 1, got 0."),
    (["stages.source.epochs=-2"], "stages.source.epochs must be a whole number of at least 1, got -2."),
    (
        [*CIFAR, "data.target.classes=[]"],
        "data.target.classes=[] selects no class: give null (all classes), a count, or a non-empty list.",
    ),
    ([*CIFAR, "data.target.classes=[3,3]"], "data.target.classes lists [3] more than once (by id or name)"),
    ([*CIFAR, "data.target.classes=[cat,cat]"], "data.target.classes lists ['cat'] more than once (by id or name)"),
    ([*CIFAR, "data.target.classes=0"], "data.target.classes=0: give a count of at least 1, null (all classes)"),
    ([*CIFAR, "data.target.classes=true"], "data.target.classes=True: give null (all classes), a count, or a list"),
    (
        [*CIFAR, "data.target.samples_per_class=-1"],
        "data.target.samples_per_class must be a whole number >= 1 or null, got -1.",
    ),
    (
        [*CIFAR, "data.target.samples_per_class=0"],
        "data.target.samples_per_class must be a whole number >= 1 or null, got 0.",
    ),
    (["data.target.val_fraction=1.5"], "data.target.val_fraction must be a number in [0, 1), got 1.5."),
    ([*CIFAR, "data.target.label_fraction=0"], "data.target.label_fraction must be a number in (0, 1] or null, got 0."),
    (["data.num_workers=-1"], "data.num_workers must be a whole number of at least 0, got -1."),
    (
        IMAGENET32_64,
        "model=convnet takes 32x32 images but data.source.image_size=64: set data.source.image_size=32, "
        "or use a model that takes any size (e.g. model=resnet18).",
    ),
    (
        ["model.name=vgg"],
        "model.name='vgg' is unknown; available: convnet, resnet18, resnet50, or any timm model with model=timm.",
    ),
    (
        ["objective=finetune/test/accuracy"],
        "objective='finetune/test/accuracy' is not a metric this run will "
        "produce. It produces <stage>/test/<metric> for the stages source, "
        "pretrain, finetune, scratch and gain/<metric>, <metric> one of acc, "
        "acc_top5, f1, auroc: set objective= to one of them",
    ),
    (
        ["objective=gain/acc", "~stages.scratch"],
        "objective='gain/acc' is not a metric this run will produce "
        "(gain/<metric> is gain.compare=finetune minus gain.baseline=scratch",
    ),
    (
        ["gain.compare=finetun"],
        "gain.compare='finetun' is not a stage of this run (did you mean finetune?); stages: source, pretrain, "
        "finetune, scratch.",
    ),
    (
        ["stages.source.result_ckpt=/x.ckpt", "objective=source/test/acc"],
        "objective='source/test/acc' is not a "
        "metric this run will produce. It produces "
        "<stage>/test/<metric> for the stages "
        "pretrain, finetune, scratch and",
    ),
    (["+stages.finetune.optimzer.lr=0.1"], f"stages.finetune: unknown key optimzer; valid: {STAGE_KEYS}."),
    (["stages.finetune.optimzer.lr=0.1"], f"stages.finetune: unknown key optimzer; valid: {STAGE_KEYS}."),
    (
        ["+stages.extra.task=target"],
        "stages.extra lacks init, init_ckpt, init_head, model_weights, trainable, unfreeze_every, backbone_lr_mult, "
        "layer_decay, decay_norm_bias, label_smoothing, l2sp, bss, ema_decay, unlabeled, test_task, result_ckpt, "
        "epochs, seed, optimizer, scheduler: a "
        "stage added on the command line starts from the default stage with +stage@stages.extra=default",
    ),
    (
        ["stages.pretrain.init=finetune"],
        "stages.pretrain.init='finetune' must name an earlier stage (stages before it: source).",
    ),
    (["stages.pretrain.init_head=maybe"], "stages.pretrain.init_head='maybe': use 'new' or 'keep'."),
    (["trainer.max_epochs_per_stage=0"], "trainer.max_epochs_per_stage must be null or a whole number of at least 1"),
    (["cache=maybe"], 'cache must be true or false, got "maybe".'),
    (["channels_last=maybe"], "channels_last='maybe' is not a choice: give channels_last=auto | true | false."),
    (["compile=1"], "compile=1 is not a choice: give compile=true | false."),
    (["data.target.eval_batch_size=fast"], "data.target.eval_batch_size must be a whole number >= 1, auto"),
    (["seed=-1"], "seed must be a whole number from 0 to 4294967295, got -1."),
    # renamed: the old name is refused with the new one
    (["recipe=seed"], "recipe=seed was renamed recipe=mission: use recipe=mission instead."),
    (
        ["trainer.max_epochs=1"],
        "trainer.max_epochs was renamed trainer.max_epochs_per_stage: use trainer.max_epochs_per_stage instead.",
    ),
    (
        ["stages.source.ckpt=/some/best.ckpt"],
        "stages.source.ckpt was renamed stages.source.result_ckpt: use "
        "stages.source.result_ckpt=/some/best.ckpt instead.",
    ),
]


def snapshot(run_dir: Path) -> dict:
    """Every file of a run folder with its bytes' hash and mtime, less Hydra's own (.hydra/, the job log), which
    Hydra writes before transferlab's code runs."""
    return {
        str(p.relative_to(run_dir)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"
    }


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run folder whose source stage is done (trained once for the module)."""
    run_dir = tmp_path_factory.mktemp("validation") / "run"
    run_cli("transferlab", *TINY, *ONLY_SOURCE, f"hydra.run.dir={run_dir}")
    return run_dir


def tiny(overrides) -> list[str]:
    """TINY, less the sizes of a data group that `overrides` replace (as helpers.cli.transferlab does)."""
    replaced = [o.split("=")[0].replace("/", ".") + "." for o in overrides if o.startswith("data/")]
    return [o for o in TINY if not any(o.startswith(prefix) for prefix in replaced)]


@pytest.mark.parametrize("overrides,message", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_value_is_one_message_before_anything_is_written(run_folder, capsys, monkeypatch, overrides, message):
    before = snapshot(run_folder)
    args = [*tiny(overrides), *overrides, f"hydra.run.dir={run_folder}"]
    assert_user_error(in_process(cli.main, capsys, monkeypatch, args), message)
    assert snapshot(run_folder) == before
    assert sorted(p.name for p in run_folder.iterdir() if p.is_dir() and p.name != ".hydra") == ["source"]


@pytest.mark.parametrize(
    "overrides",
    [
        ["stages.finetune.optimizer.lr=true"],
        [*CIFAR, "data.target.classes=[3,3]"],
        IMAGENET32_64,
        ["stages.source.ckpt=/some/best.ckpt"],
    ],
)
def test_the_installed_script_refuses_the_same(run_folder, overrides):
    """A sample of the table through the console script in its own process: exit 2, the message, no traceback."""
    [message] = [m for o, m in BAD_VALUES if o == overrides]
    before = snapshot(run_folder)
    assert_user_error(transferlab(run_folder, *overrides), message)
    assert snapshot(run_folder) == before


EVAL_BAD_VALUES = [
    (["data.batch_size=abc"], 'data.batch_size must be a whole number of at least 1, got "abc".'),
    (["task=extra"], "task='extra': the data config has tasks source and target."),
    ([*CIFAR, "data.target.classes=[3,3]"], "data.target.classes lists [3] more than once (by id or name)"),
    (["trainer.max_epochs=1"], "trainer.max_epochs was renamed trainer.max_epochs_per_stage"),
]


@pytest.mark.parametrize("overrides,message", EVAL_BAD_VALUES, ids=[" ".join(o) for o, _ in EVAL_BAD_VALUES])
def test_eval_checks_the_same_values(tmp_path, capsys, monkeypatch, overrides, message):
    run_dir = tmp_path / "eval"
    args = [f"ckpt={tmp_path / 'nowhere.ckpt'}", *overrides, f"hydra.run.dir={run_dir}"]
    assert_user_error(in_process(eval_command.main, capsys, monkeypatch, args), message)
    assert snapshot(run_dir) == {}  # no eval.json


def test_the_installed_eval_script_refuses_the_same(tmp_path):
    proc = run_cli(
        "transferlab-eval",
        f"ckpt={tmp_path / 'nowhere.ckpt'}",
        "data.batch_size=abc",
        f"hydra.run.dir={tmp_path / 'eval'}",
        check=False,
    )
    assert_user_error(proc, EVAL_BAD_VALUES[0][1])
    assert snapshot(tmp_path / "eval") == {}
