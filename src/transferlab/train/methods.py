"""The fine-tuning options of a stage, with their defaults (every one off) and their one check.

ClassifierModule takes them as keyword arguments (plain containers, so checkpoints load weights-only); the
pipeline checks every stage's options before anything trains.
"""

from pathlib import Path
from typing import cast

from omegaconf import OmegaConf

from transferlab import CONF_DIR
from transferlab.core.checks import config_dict
from transferlab.core.errors import UserError
from transferlab.models import BLOCKS
from transferlab.train import unlabeled
from transferlab.train.finetuning import resolve_trainable
from transferlab.train.optim import check_scheduler

STAGE_SCHEMA = Path(CONF_DIR) / "stage" / "default.yaml"  # the default stage: its keys are a stage's keys
OPTIONS = (
    *("trainable", "unfreeze_every", "backbone_lr_mult", "layer_decay", "decay_norm_bias", "label_smoothing"),
    *("l2sp", "bss", "ema_decay", "unlabeled"),
)
# Their defaults (every one off) and what each means are written once, in the default stage; a ClassifierModule
# built without the pipeline takes the same values.
# The default stage (a mapping), read once; validation takes its keys.
DEFAULT_STAGE = cast(dict, OmegaConf.to_container(OmegaConf.load(STAGE_SCHEMA)))
DEFAULTS = {k: v for k, v in DEFAULT_STAGE.items() if k in OPTIONS}

_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
RULES = {  # option -> (test, what it must be)
    "unfreeze_every": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "a whole number of epochs >= 0 (0: off)",
    ),
    "backbone_lr_mult": (lambda v: _number(v) and v > 0, "a number > 0 (1: off)"),
    "layer_decay": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1] (1: off)"),
    "decay_norm_bias": (lambda v: isinstance(v, bool), "true or false"),
    "label_smoothing": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "l2sp.alpha": (lambda v: _number(v) and v >= 0, "a number >= 0 (0: off)"),
    "l2sp.beta": (lambda v: _number(v) and v >= 0, "a number >= 0 (0: off)"),
    "bss.weight": (lambda v: _number(v) and v >= 0, "a number >= 0 (0: off)"),
    "bss.k": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a whole number >= 1"),
    "ema_decay": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1) (0: off; e.g. 0.999)"),
    "unlabeled.method": (lambda v: v in unlabeled.METHODS, f"one of {', '.join(unlabeled.METHODS)}"),
    "unlabeled.weight": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "unlabeled.ratio": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "a whole number >= 1 (unlabeled images per labelled one in a batch)",
    ),
    "unlabeled.threshold": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "unlabeled.temperature": (lambda v: _number(v) and v > 0, "a number > 0"),
    "unlabeled.teacher": (lambda v: v is None or isinstance(v, str), "a stage name or null"),
}


def options(stage) -> dict:
    """The fine-tuning options a stage sets, as plain containers (missing ones take DEFAULTS in the module)."""
    plain = config_dict(stage) if OmegaConf.is_config(stage) else dict(stage)
    return {key: plain[key] for key in DEFAULTS if key in plain}


def check(name: str, stage, model: dict) -> None:
    """Every fine-tuning option of `stages.<name>`, and its scheduler, named with the fix when wrong."""
    where = f"stages.{name}"
    opts = {**DEFAULTS, **options(stage)}
    for group in ("l2sp", "bss", "unlabeled"):
        if not isinstance(opts[group], dict) or set(opts[group]) - set(DEFAULTS[group]):
            raise UserError(f"{where}.{group}={opts[group]!r}: give {{{', '.join(DEFAULTS[group])}}} only.")
        opts |= {f"{group}.{key}": value for key, value in {**DEFAULTS[group], **opts[group]}.items()}
    for key, (test, what) in RULES.items():
        if not test(opts[key]):
            raise UserError(f"{where}.{key}={opts[key]!r}: must be {what}.")
    if model.get("library") or model.get("name") in BLOCKS:  # an unknown model is named when it is built
        trainable = resolve_trainable(opts["trainable"], model, f"{where}.trainable")
        every, epochs = opts["unfreeze_every"], stage.get("epochs")
        if every and isinstance(epochs, int) and every >= epochs and len(trainable) > 1:
            raise UserError(
                f"{where}.unfreeze_every={every} with {where}.epochs={epochs}: no block would ever be unfrozen, so "
                f"the stage would only train its top block ({trainable[-1]}). Use unfreeze_every < epochs (e.g. "
                f"{max(1, epochs // len(trainable))}), or trainable=head for a linear probe."
            )
    scheduler = config_dict(stage.scheduler) if "scheduler" in stage else {}
    check_scheduler(scheduler, f"{where}.scheduler")
    if scheduler.get("warmup_epochs", 0) >= stage.get("epochs", 1) and scheduler.get("warmup_epochs", 0):
        raise UserError(
            f"{where}.scheduler.warmup_epochs={scheduler['warmup_epochs']} leaves no epoch after the "
            f"warm-up ({where}.epochs={stage.get('epochs')}): use fewer warm-up epochs."
        )
    optimizer = stage.get("optimizer") or {}
    if optimizer.get("nesterov") and not optimizer.get("momentum"):
        raise UserError(
            f"{where}.optimizer.nesterov=true needs momentum > 0: set {where}.optimizer.momentum (e.g. 0.9)."
        )
