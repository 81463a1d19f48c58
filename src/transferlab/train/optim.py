"""The optimizer of a stage: parameter groups (discriminative learning rates, weight decay without norms and
biases) and the learning-rate schedule (warm-up, then none | cosine | step; per epoch or per step)."""

import inspect
import math
from typing import TYPE_CHECKING

import torch

from transferlab.core.checks import is_number, number, whole_number
from transferlab.core.errors import UserError

if TYPE_CHECKING:
    from transferlab.train.finetuning import Block

OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
SCHEDULES = ("none", "cosine", "step")
SCHEDULER_KEYS = {"name", "warmup_epochs", "interval", "step_size", "gamma"}


def param_groups(
    blocks: dict[str, "Block"],
    lr: float,
    backbone_lr_mult: float = 1.0,
    layer_decay: float = 1.0,
    decay_norm_bias: bool = True,
) -> list[dict]:
    """One group per block (and per decay / no decay), named after it, with lr x `scale`:
    scale = backbone_lr_mult (1 for the head) x layer_decay^(L-1-i) for block i of the model's L blocks (timm's
    layer-wise decay: the head, last, gets 1). With `decay_norm_bias=false`, weight decay skips every 1-d parameter
    (norm weights, biases) and those the model says to (timm's `no_weight_decay()`: position embeddings, class
    tokens), as timm's `param_groups_layer_decay` does. Only parameters that require gradients are included. With
    every option off, one unnamed group: torch's default, as before these options existed."""
    trains = lambda params: [p for p in params if p.requires_grad]
    if backbone_lr_mult == 1 and layer_decay == 1 and decay_norm_bias:
        return [{"params": trains(p for block in blocks.values() for p in block.params)}]
    groups, last = [], len(blocks) - 1
    for i, (name, block) in enumerate(blocks.items()):
        scale = layer_decay ** (last - i) * (1.0 if name == "head" else backbone_lr_mult)
        params = trains(block.params)
        skip = [not decay_norm_bias and (p.ndim <= 1 or id(p) in block.no_decay) for p in params]
        decay = [p for p, s in zip(params, skip) if not s]
        no_decay = [p for p, s in zip(params, skip) if s]
        if decay:
            groups.append({"name": name, "params": decay, "lr": lr * scale, "scale": scale})
        if no_decay:
            groups.append(
                {"name": f"{name}/no_decay", "params": no_decay, "lr": lr * scale, "scale": scale, "weight_decay": 0.0}
            )
    return groups


def optimizer_options(cfg: dict, key: str = "optimizer") -> tuple[type, dict]:
    """(torch optimizer class, its keyword arguments) for `cfg`: name (sgd | adamw) and the optimizer's own
    arguments (lr, momentum, nesterov, weight_decay, betas, ...). The default stage lists SGD's `momentum: 0.0`, so
    that a recipe can set it: an option another optimizer does not take is dropped where it is off (0, false)
    and refused, with the ones it takes, where it is set. Validation calls this for every stage before training."""
    cfg = dict(cfg)
    name = cfg.pop("name", "sgd")
    if name not in OPTIMIZERS:
        raise UserError(f"Unknown {key}.name={name!r}; available: {', '.join(OPTIMIZERS)}.")
    if not is_number(cfg.get("lr")) or cfg["lr"] <= 0:
        raise UserError(f"{key}.lr must be a positive number, got {cfg.get('lr')!r}.")
    cls = OPTIMIZERS[name]
    takes = [p for p in inspect.signature(cls).parameters if p != "params"]
    cfg = {k: v for k, v in cfg.items() if k in takes or v not in (0, 0.0, False, None)}
    unknown = sorted(set(cfg) - set(takes))
    if unknown:
        raise UserError(
            f"{key}.name={name} ({cls.__name__}) takes no {', '.join(unknown)} (set to {cfg[unknown[0]]!r}): set it "
            f"to 0 or remove it, or use an optimizer that has it. {cls.__name__} takes: {', '.join(takes)}."
        )
    return cls, cfg


def build_optimizer(groups: list[dict], cfg: dict) -> torch.optim.Optimizer:
    """The optimizer of `cfg` (see `optimizer_options`) over the parameter groups."""
    cls, options = optimizer_options(cfg)
    try:
        return cls(groups, **options)
    except (TypeError, ValueError) as err:
        raise UserError(f"optimizer {dict(cfg)} does not fit torch's {cls.__name__}: {err}") from None


def lr_factor(cfg: dict, total: int, per_epoch: float):
    """t (the epoch, or the step with interval=step) -> the factor on each group's lr: a linear warm-up to 1 over
    `warmup_epochs`, then the schedule `name` over the remaining epochs (cosine: to 0 at the end; step: x gamma
    every `step_size` epochs; none: 1)."""
    warmup = round(cfg.get("warmup_epochs", 0) * per_epoch)
    name, step_size, gamma = cfg.get("name", "none"), cfg.get("step_size", 1), cfg.get("gamma", 0.1)

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        if name == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(1, total - warmup)))
        if name == "step":
            return gamma ** ((t - warmup) // max(1, round(step_size * per_epoch)))
        return 1.0

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: dict, trainer) -> dict | None:
    """The Lightning lr_scheduler config for `cfg` (see `lr_factor`), or None for a constant lr."""
    check_scheduler(cfg)
    if cfg.get("name", "none") == "none" and not cfg.get("warmup_epochs", 0):
        return None
    epochs = max(1, trainer.max_epochs if trainer else 1)
    interval = cfg.get("interval", "epoch")
    total = int(trainer.estimated_stepping_batches) if trainer and interval == "step" else epochs
    factor = lr_factor(cfg, total, total / epochs)
    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": interval}


def check_scheduler(cfg: dict, key: str = "scheduler") -> None:
    """Names, intervals and warm-up lengths a typo gets wrong, named before anything trains."""
    unknown = set(cfg) - SCHEDULER_KEYS
    if unknown:
        raise UserError(
            f"{key} has unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(SCHEDULER_KEYS))}."
        )
    if cfg.get("name", "none") not in SCHEDULES:
        raise UserError(f"{key}.name={cfg.get('name')!r} is unknown; available: {', '.join(SCHEDULES)}.")
    if cfg.get("interval", "epoch") not in ("epoch", "step"):
        raise UserError(f"{key}.interval={cfg.get('interval')!r}: use epoch or step (when the lr changes).")
    number(f"{key}.warmup_epochs", cfg.get("warmup_epochs", 0), 0, math.inf)
    whole_number(f"{key}.step_size", cfg.get("step_size", 1))  # epochs between two steps of `step`
    number(f"{key}.gamma", cfg.get("gamma", 0.1), 0, 1, low_open=True)  # the factor on the lr at each step
