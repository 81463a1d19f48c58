"""Objects built from config: `build` (Hydra's instantiate, with a UserError surfacing as itself) and
`make_trainer` (the Trainer of `cfg.trainer`, with its speed settings). Used by the pipeline and by
`transferlab-eval`."""

import logging
import warnings

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from transferlab.core.checks import config_dict
from transferlab.core.errors import UserError
from transferlab.train.callbacks import SpeedSettings
from transferlab.train.checkpoint_files import AtomicCheckpointIO

logging.getLogger("lightning").handlers.clear()  # Lightning's own stderr handler doubles every line under Hydra
for message in (
    ".*IterableDataset.*has `__len__` defined",
    ".*is smaller than the logging interval",
    ".*LeafSpec.*is deprecated",
    ".*The `srun` command is available on your system but is not used",
):  # expected with our batch loader / epoch-level logging / transferlab's own SLURM path (hydra/launcher=slurm)
    warnings.filterwarnings("ignore", message=message)


def make_trainer(cfg: DictConfig, max_epochs: int | None = None, **kwargs) -> L.Trainer:
    """The Trainer of `cfg.trainer`; a set `trainer.max_epochs_per_stage` caps every stage's epochs (debug presets)."""
    trainer_cfg = config_dict(cfg.trainer)
    trainer_cfg.pop("max_epochs", None)  # the old name of max_epochs_per_stage: refused by validation when set
    cap = trainer_cfg.pop("max_epochs_per_stage", None)
    epochs = min(e for e in (max_epochs, cap) if e is not None) if (max_epochs or cap) else None
    speed = SpeedSettings(trainer_cfg.pop("channels_last", False), trainer_cfg.pop("compile", False))
    kwargs["callbacks"] = [*kwargs.get("callbacks", []), speed]
    kwargs.setdefault("plugins", [AtomicCheckpointIO()])  # whole checkpoints or none, whatever the temp folder
    return build(trainer_cfg, max_epochs=epochs, **kwargs)


def build(node, **kwargs):
    """hydra.utils.instantiate, but a UserError raised by the target surfaces as itself."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        target = node.get("_target_") if hasattr(node, "get") else None
        raise UserError(f"Could not build {target}: {cause or err}. Check the options given to it.") from None
