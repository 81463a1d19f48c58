"""Every check of config values, in one place: each entry point calls `validate` (transferlab) or
`validate_eval` (transferlab-eval) before it writes or trains anything, so a bad value is one message
(UserError: exit 2, no traceback) and never a failure halfway through a run.

Types are checked as a user means them: a bool is not a number (`lr=true` is not lr 1), `1.5` is not a count
of epochs. What needs the data itself (empty splits, labels out of range) is checked by the data modules when
`pipeline.Datasets` builds them, still before the first training step.
"""

import difflib
import importlib.util
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from transferlab import models
from transferlab.core.checks import MAX_SEED, choice, config_dict, number, show, whole_number
from transferlab.core.errors import UserError
from transferlab.core.fileio import not_a_file
from transferlab.data.corruptions import check_corruption
from transferlab.data.splits import check_class_list, check_settings
from transferlab.data.unlabeled import check_setting as check_unlabeled_setting
from transferlab.models import INPUT_SIZES
from transferlab.train import methods
from transferlab.train.metrics import METRICS, metric_key
from transferlab.train.optim import OPTIMIZERS, optimizer_options
from transferlab.train.unlabeled import ADAPTATION
from transferlab.train.weights import check_backbone_weights

# Old names -> new ones. Each old name stays in conf/ as a null placeholder (or, for a group option, a file that
# sets `refused_option`) so that using it is refused with a message naming the new name.
RENAMED = {
    "recipe=seed": "recipe=mission",
    "trainer.max_epochs": "trainer.max_epochs_per_stage",
    "ckpt": "result_ckpt",
    "train": "trainable",
}  # the last two: stages.<stage>.<key>
INIT_HEADS = ("new", "keep")


def validate(cfg: DictConfig) -> None:
    """The pipeline's config (`conf/config.yaml`)."""
    _refuse_renamed(cfg)
    for name, stage in cfg.stages.items():
        check_stage(cfg, name, stage)
    tasks = {stage.task for stage in cfg.stages.values()}
    check_data(cfg.data, tasks)
    check_model(cfg)
    check_image_size(cfg, tasks)
    check_gain(cfg)
    whole_number("seed", cfg.seed, minimum=0, maximum=MAX_SEED)
    whole_number("reference_batch_size", cfg.reference_batch_size)
    for key in ("cache", "scale_lr"):
        if not isinstance(cfg[key], bool):
            raise UserError(f"{key} must be true or false, got {show(cfg[key])}.")
    check_trainer(cfg.trainer)
    check_trackers(cfg)


def validate_eval(cfg: DictConfig) -> None:
    """`transferlab-eval`'s config (`conf/eval.yaml`)."""
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise UserError(
            "No checkpoint given: pass ckpt=<path to a .ckpt>, e.g. ckpt=outputs/runs/<run>/finetune/"
            "checkpoints/best.ckpt, and the data it was trained for (data=..., task=source|target)."
        )
    _refuse_renamed(cfg)
    if cfg.task not in _tasks(cfg.data):
        raise UserError(f"task={cfg.task!r}: the data config has tasks {' and '.join(_tasks(cfg.data))}.")
    check_data(cfg.data, {cfg.task})
    whole_number("seed", cfg.seed, minimum=0, maximum=MAX_SEED)
    check_trainer(cfg.trainer)


def _mapping(key: str, value) -> None:
    if not isinstance(value, DictConfig):
        raise UserError(f"{key} must be a mapping of settings ({key}.name=..., ...), got {value!r}.")


# -- renamed keys ----------------------------------------------------------------------------------------
def _refuse_renamed(cfg: DictConfig) -> None:
    old = cfg.get("refused_option")
    if old is None and cfg.trainer.get("max_epochs") is not None:
        old = "trainer.max_epochs"
    if old is not None:
        raise UserError(f"{old} was renamed {RENAMED[old]}: use {RENAMED[old]} instead.")


# -- stages ----------------------------------------------------------------------------------------------
def stage_keys() -> list[str]:
    """The keys a stage may have: those of the default stage (conf/stage/default.yaml), less renamed ones."""
    return [k for k in methods.DEFAULT_STAGE if k not in RENAMED]


def check_stage_overrides(overrides: list[str]) -> None:
    """`stages.<stage>.<key>=...` on the command line with a key no stage has: Hydra refuses it (not in the config)
    without naming the valid keys, so name them first. (`+stages.<stage>.<key>=` reaches `check_stage`.)"""
    valid = stage_keys()
    for override in overrides:
        parts = override.split("=", 1)[0].split(".")
        if len(parts) >= 3 and parts[0] == "stages" and parts[2] not in valid and parts[2] not in RENAMED:
            raise UserError(f"stages.{parts[1]}: unknown key {parts[2]}; valid: {', '.join(valid)}.")


def check_optuna_installed(overrides: list[str]) -> None:
    """`hparams_search=optuna` (or `hydra/sweeper=optuna`) needs the Optuna sweeper plugin, an extra since it brings
    scipy: without it Hydra would only say that it cannot find hydra/sweeper/optuna."""
    wanted = any(
        o.lstrip("+~").split("=", 1)[0] in ("hparams_search", "hydra/sweeper") and "optuna" in o.split("=", 1)[1]
        for o in overrides
        if "=" in o
    )
    if not wanted:
        return
    try:
        installed = importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None
    except ImportError:  # not even the hydra_plugins namespace
        installed = False
    if not installed:
        raise UserError(
            "an Optuna search needs the hydra-optuna-sweeper plugin, which is not installed: "
            "pip install 'transferlab[optuna]' (from a checkout: pip install -e '.[optuna]')."
        )


# The experiment trackers (conf/logger/<name>.yaml, run/trackers.py), each a pip extra named after its library
TRACKERS = ("mlflow", "wandb")
WANDB_MODES = ("offline", "online", "disabled")


def check_trackers_installed(overrides: list[str]) -> None:
    """`logger=mlflow`, `logger=[csv,wandb]` (or a sweep over loggers) on the command line: a tracker whose extra is
    missing is refused with the install command before Hydra creates the run folder (Hydra's own error would be a
    traceback from the first stage's Trainer)."""
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+~") == "logger":
            for name in value.replace("[", ",").replace("]", ",").split(","):
                if name.strip() in TRACKERS:
                    _require_tracker(name.strip(), f"logger={value}")


def check_trackers(cfg: DictConfig) -> None:
    """The trackers among the loggers, also where a config file selects them (an experiment, a --config-dir file):
    each needs its extra (a logger whose `_target_` names mlflow or wandb, transferlab's or Lightning's own), and
    transferlab's take these options."""
    for key, node in (cfg.get("logger") or {}).items():
        target = str(node.get("_target_", "")).lower() if isinstance(node, DictConfig) else ""
        for name in TRACKERS:
            if name in target:
                _require_tracker(name, f"logger.{key} ({node._target_})")
        if target == "transferlab.run.trackers.mlflowtracker":
            for option in ("tracking_uri", "experiment_name"):
                if node.get(option) is not None and not (isinstance(node[option], str) and node[option]):
                    raise UserError(f"logger.{key}.{option} must be a string or null, got {show(node[option])}.")
        elif target == "transferlab.run.trackers.wandbtracker":
            choice(f"logger.{key}.mode", node.get("mode", "offline"), WANDB_MODES)


def _require_tracker(name: str, what: str) -> None:
    try:
        installed = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        installed = False
    if not installed:
        raise UserError(
            f"{what} needs the {name} extra, which is not installed: pip install 'transferlab[{name}]' (from a "
            f"checkout: pip install -e '.[{name}]')."
        )


def check_stage(cfg: DictConfig, name: str, stage) -> None:
    at = f"stages.{name}"
    _check_stage_keys(at, stage)
    if stage.task not in _tasks(cfg.data):
        raise UserError(
            f"{at}.task={stage.task!r}: the data config {cfg.data.get('name', '')} has no such task; "
            f"use one of: {', '.join(_tasks(cfg.data))}."
        )
    _check_stage_start(at, stage, earlier=list(cfg.stages)[: list(cfg.stages).index(name)])
    whole_number(f"{at}.epochs", stage.epochs)
    whole_number(f"{at}.seed", stage.seed, minimum=0, optional=True, maximum=MAX_SEED)
    _mapping(f"{at}.optimizer", stage.optimizer)
    choice(f"{at}.optimizer.name", stage.optimizer.get("name", "sgd"), OPTIMIZERS)
    number(f"{at}.optimizer.lr", stage.optimizer.get("lr"), 0, float("inf"), low_open=True)
    if "momentum" in stage.optimizer:
        number(f"{at}.optimizer.momentum", stage.optimizer.momentum, 0, 1, high_open=True)
    if "weight_decay" in stage.optimizer:
        number(f"{at}.optimizer.weight_decay", stage.optimizer.weight_decay, 0, float("inf"))
    optimizer_options(config_dict(stage.optimizer), f"{at}.optimizer")  # fits torch's
    _mapping(f"{at}.scheduler", stage.scheduler)
    methods.check(name, stage, config_dict(cfg.model))  # the fine-tuning options and the scheduler
    _check_unlabeled(cfg, at, stage, earlier=list(cfg.stages)[: list(cfg.stages).index(name)])


def _check_unlabeled(cfg: DictConfig, at: str, stage, earlier: list[str]) -> None:
    """What a stage trained on unlabeled images, or tested on the other task, needs from the rest of the run."""
    tasks = _tasks(cfg.data)
    if stage.test_task is not None and stage.test_task not in tasks:
        raise UserError(f"{at}.test_task={stage.test_task!r}: use null (its own task) or one of {', '.join(tasks)}.")
    method = stage.unlabeled.method
    if method == "none":
        return
    if "target" not in tasks:
        raise UserError(
            f"{at}.unlabeled.method={method}: the unlabeled images are data.target's, and this data "
            "config has no target task."
        )
    check_unlabeled_setting(cfg.data.target.get("unlabeled", "rest"))
    if method in ADAPTATION and stage.task != "source":
        raise UserError(
            f"{at}.unlabeled.method={method} adapts a model trained on labelled source images to the target's "
            f"unlabeled ones: set {at}.task=source (and {at}.test_task=target to test it on the target), or use "
            "fixmatch / mean_teacher / pseudo_label for a target with some labels."
        )
    if method == "mean_teacher" and not stage.ema_decay:
        raise UserError(
            f"{at}.unlabeled.method=mean_teacher: its teacher is the EMA of the weights; set {at}.ema_decay "
            "(e.g. 0.999)."
        )
    if method == "pseudo_label":
        teacher = stage.unlabeled.teacher or stage.init
        if teacher is None or teacher not in earlier:
            raise UserError(
                f"{at}.unlabeled.method=pseudo_label needs a teacher: set {at}.unlabeled.teacher to an earlier stage "
                f"({', '.join(earlier) or 'none'}), or {at}.init (the teacher by default)."
            )


def _check_stage_keys(at: str, stage) -> None:
    """A stage is a mapping with exactly the default stage's keys (a renamed one is named as such)."""
    valid = stage_keys()
    if not isinstance(stage, DictConfig):
        raise UserError(f"{at} must be a stage (a mapping); add one from the default with +stage@{at}=default.")
    for key in stage:
        if key in RENAMED and stage[key] is not None:
            raise UserError(
                f"{at}.{key} was renamed {at}.{RENAMED[key]}: use {at}.{RENAMED[key]}={stage[key]} instead."
            )
        if key not in valid and key not in RENAMED:
            raise UserError(f"{at}: unknown key {key!s}; valid: {', '.join(valid)}.")
    missing = [k for k in valid if k not in stage]
    if missing:
        raise UserError(
            f"{at} lacks {', '.join(missing)}: a stage added on the command line starts from the "
            f"default stage with +stage@{at}=default (then set what differs)."
        )


def _check_stage_start(at: str, stage, earlier: list[str]) -> None:
    """Where the stage's weights start: an earlier stage or a checkpoint file (not both), and its head."""
    if stage.init is not None and stage.init not in earlier:
        raise UserError(
            f"{at}.init={stage.init!r} must name an earlier stage (stages before it: {', '.join(earlier) or 'none'})."
        )
    if stage.init is not None and stage.init_ckpt:
        raise UserError(
            f"{at} has both init={stage.init!r} and init_ckpt={stage.init_ckpt!r}: "
            f"a stage starts from one of them; set {at}.init=null to use the file."
        )
    if stage.init_ckpt and not Path(str(stage.init_ckpt)).expanduser().is_file():
        raise UserError(
            f"{at}.init_ckpt={stage.init_ckpt} {not_a_file(str(stage.init_ckpt))}. Give the path of a .ckpt "
            "(e.g. <run>/source/checkpoints/best.ckpt) or a saved state dict."
        )
    if stage.init_head not in INIT_HEADS:
        raise UserError(f"{at}.init_head={stage.init_head!r}: use 'new' or 'keep'.")


def check_gain(cfg: DictConfig) -> None:
    gain = cfg.get("gain")
    if gain is not None and (not isinstance(gain, DictConfig) or set(gain) != {"compare", "baseline"}):
        raise UserError(
            f"gain must be null or have the keys compare and baseline (two stage names: gain/<metric> "
            f"is compare's test metric minus baseline's), got {show(gain)}."
        )
    if gain is None:
        return
    for key in ("compare", "baseline"):
        close = difflib.get_close_matches(str(gain[key]), list(cfg.stages), n=1, cutoff=0.8)
        if gain[key] not in cfg.stages and close:  # a typo; a stage removed on purpose is named under the table
            raise UserError(
                f"gain.{key}={gain[key]!r} is not a stage of this run (did you mean {close[0]}?); stages: "
                f"{', '.join(cfg.stages)}."
            )


def check_objective(cfg: DictConfig) -> None:
    """The objective (what the CLI returns to a sweeper) must be a metric the configured stages will produce (a
    stage given as `result_ckpt` is not tested), so a typo fails now rather than after the whole pipeline trained.
    The CLI calls it; `pipeline.run` does not need an objective."""
    check_gain(cfg)
    tested = [n for n, s in cfg.stages.items() if isinstance(s, DictConfig) and not s.get("result_ckpt")]
    gain = cfg.get("gain")
    with_gain = gain is not None and gain.compare in tested and gain.baseline in tested
    produced = [metric_key(n, "test", m) for n in tested for m in METRICS]
    produced += [metric_key("gain", m) for m in METRICS if with_gain]
    if cfg.objective not in produced:
        why = (
            f" (gain/<metric> is gain.compare={gain.compare} minus gain.baseline={gain.baseline}: both must be "
            "stages of this run)"
            if gain is not None and str(cfg.objective).startswith("gain/")
            else ""
        )
        what = (
            f"<stage>/test/<metric> for the stages {', '.join(tested)}{' and gain/<metric>' if with_gain else ''}"
            f", <metric> one of {', '.join(METRICS)}"
            if tested
            else "no metric (no stage is tested)"
        )
        raise UserError(
            f"objective={cfg.objective!r} is not a metric this run will produce{why}. It produces {what}: "
            f"set objective= to one of them (e.g. objective={(produced or ['none'])[0]})."
        )


# -- data ------------------------------------------------------------------------------------------------
def _tasks(data: DictConfig) -> list:
    return [k for k, v in data.items() if isinstance(v, DictConfig) and "_target_" in v]


def check_data(data: DictConfig, tasks) -> None:
    """The values of the data config: the shared keys first (data.batch_size: the one a user sets), then
    each task's data module."""
    whole_number("data.batch_size", data.get("batch_size", 1))
    whole_number("data.num_workers", data.get("num_workers", 0), minimum=0)
    for task in tasks:
        check_data_module(f"data.{task}", data[task])


def check_data_module(at: str, node: DictConfig) -> None:
    """The split and loader settings and the form of `classes`, by the data layer's own checks (one definition);
    which class ids or names exist is checked by the data module, which knows them, when `pipeline` builds it."""
    check_settings(
        at,
        node.get("batch_size", 1),
        node.get("eval_batch_size"),
        node.get("num_workers", 0),
        node.get("val_fraction", 0.1),
        node.get("samples_per_class"),
        node.get("label_fraction"),
        node.get("test_fraction", 0.2),
    )
    whole_number(f"{at}.image_size", node.get("image_size", 32))
    whole_number(f"{at}.seed", node.get("seed", 0), minimum=0, maximum=MAX_SEED)  # its split and augmentation
    if "corruption" in node:  # a shifted data set (data/dataset/cifar10_shifted.yaml)
        check_corruption(at, node.corruption, node.get("severity"))
        whole_number(f"{at}.corruption_seed", node.get("corruption_seed", 0), minimum=0, maximum=MAX_SEED)
    classes = node.get("classes")
    check_class_list(at, OmegaConf.to_container(classes) if OmegaConf.is_config(classes) else classes)


def check_model(cfg: DictConfig) -> None:
    """The backbone (a name transferlab builds, or a timm model), and where its pretrained weights come from: a
    local file that exists, or timm's weights in the local Hugging Face cache, found before anything trains."""
    model = cfg.model
    models.check_model(config_dict(model))
    if model.get("weights") is not None and not isinstance(model.weights, str):
        raise UserError(f"model.weights must be the path of a weights file or null, got {show(model.weights)}.")
    if not isinstance(model.get("pretrained", False), bool):
        raise UserError(f"model.pretrained must be true or false, got {show(model.pretrained)}.")
    if model.get("pretrained") and model.get("library") != "timm":
        raise UserError(
            f"model.pretrained=true finds timm's weights in the local Hugging Face cache: it needs model=timm; for "
            f"{model.name}, give a weights file (model.weights=<file>)."
        )
    if model.get("pretrained") and model.get("weights"):
        raise UserError("model.weights and model.pretrained=true both name the backbone's weights: keep one.")
    choice("model.input", model.get("input", "model"), ("model", "data"))
    weights = model_weights_file(model) if any(s.get("model_weights", True) for s in cfg.stages.values()) else None
    if weights is not None:  # it exists (or is in the cache) and fits the model: checked before anything is written
        check_backbone_weights(config_dict(model), weights)
    for name, stage in cfg.stages.items():
        if not isinstance(stage.get("model_weights", True), bool):
            raise UserError(f"stages.{name}.model_weights must be true or false, got {show(stage.model_weights)}.")


def model_weights_file(model: DictConfig) -> Path | None:
    """The file the backbone's weights start from: `model.weights`, or timm's pretrained weights in the local
    Hugging Face cache (`model.pretrained=true`); None for random init."""
    if model.get("weights"):
        path = Path(str(model.weights)).expanduser()
        if not path.is_file():
            raise UserError(
                f"model.weights={model.weights} {not_a_file(path)}: give a local weights file (.safetensors, "
                "pytorch_model.bin, a torchvision .pth or a .ckpt), or model.weights=null."
            )
        return path
    if model.get("pretrained"):
        return models.zoo.pretrained_file(str(model.name))
    return None


def check_image_size(cfg: DictConfig, tasks) -> None:
    """A backbone that takes one image size (the ConvNet: 32) against each task's image_size (data without
    that key, CIFAR-10 and the built-in data, is 32x32)."""
    need = INPUT_SIZES.get(cfg.model.name)
    for task in sorted(tasks):
        size = cfg.data[task].get("image_size", 32)
        if need is not None and size != need:
            raise UserError(
                f"model={cfg.model.name} takes {need}x{need} images but data.{task}.image_size={size}: "
                f"set data.{task}.image_size={need}, or use a model that takes any size "
                f"(e.g. model=resnet18)."
            )


# -- trainer ---------------------------------------------------------------------------------------------
def check_trainer(trainer: DictConfig) -> None:
    whole_number("trainer.max_epochs_per_stage", trainer.get("max_epochs_per_stage"), optional=True)
    for key, values in (("channels_last", "auto | true | false"), ("compile", "true | false")):
        if not isinstance(trainer.get(key, False), bool):
            raise UserError(f"{key}={trainer[key]!r} is not a choice: give {key}={values}.")
    check_devices(trainer)


def check_devices(trainer: DictConfig) -> None:
    """More devices than the machine has, or a GPU preset without a GPU: say so instead of Lightning's traceback."""
    accelerator, devices = trainer.get("accelerator"), trainer.get("devices")
    if accelerator in ("gpu", "cuda"):
        available, what, fix = torch.cuda.device_count(), "GPU(s)", "use trainer=cpu (or trainer=ddp_cpu)"
    elif accelerator == "cpu":
        available, what, fix = os.cpu_count() or 1, "CPU core(s)", "on CPU each device is a process"
    else:
        return
    wanted = len(devices) if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices) else devices
    if available == 0:
        raise UserError(
            f"trainer.accelerator={accelerator} but this machine has no visible GPU "
            f"(torch.cuda.device_count() is 0): {fix}, or run where a GPU is visible."
        )
    if isinstance(wanted, int) and not isinstance(wanted, bool) and (wanted > available or wanted == 0):
        raise UserError(
            f"trainer.devices={devices} but this machine has {available} {what} "
            f"(accelerator={accelerator}): set trainer.devices between 1 and {available}, or -1 for all; "
            f"{fix}."
        )
