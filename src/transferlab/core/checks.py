"""Checks of single values, shared by every layer that takes settings (config validation, the data modules, the
optimizer and the fine-tuning options): a bool is not a number (`lr=true` is not lr 1), 1.5 is not a count. Each
raises a UserError that names the key, what it must be and what it got. `config_dict`: a config mapping as the
plain dict that the checks and the modules take."""

import json
from typing import cast

from omegaconf import DictConfig, OmegaConf

from transferlab.core.errors import UserError

MAX_SEED = 2**32 - 1  # numpy's and Lightning's seed_everything's largest


def show(value) -> str:
    """A value as written in YAML or on the command line: true, null, "abc", ["cat", "dog"]."""
    return json.dumps(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value, default=str)


def config_dict(node: DictConfig) -> dict:
    """A config mapping as a plain dict, its interpolations resolved (`OmegaConf.to_container`, which is typed for
    any config node)."""
    return cast(dict, OmegaConf.to_container(node, resolve=True))


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def whole_number(key: str, value, minimum: int = 1, optional: bool = False, maximum: int | None = None) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum and value > maximum):
        span = f"of at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise UserError(f"{key} must be {'null or ' if optional else ''}a whole number {span}, got {show(value)}.")


def number(
    key: str, value, low: float, high: float, low_open: bool = False, high_open: bool = False, optional: bool = False
) -> None:
    """A real number in a range (bools and strings refused); the range as written in the message."""
    if optional and value is None:
        return
    ok = (
        is_number(value)
        and (value > low if low_open else value >= low)
        and (value < high if high_open else value <= high)
    )
    if not ok:
        if high == float("inf"):
            span = "a positive number" if low == 0 and low_open else f"a number of at least {low:g}"
        else:
            span = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise UserError(f"{key} must be {'null or ' if optional else ''}{span}, got {show(value)}.")


def choice(key: str, value, options) -> None:
    if value not in options:
        raise UserError(f"{key}={value!r} is unknown; available: {', '.join(options)}.")
