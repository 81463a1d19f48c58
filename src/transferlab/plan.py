"""What each stage of a run is to be: its config, the hash of everything that determines its result, and where
its init comes from; and the check that a stage already in the run folder was produced by that same config."""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from transferlab import __version__
from transferlab.errors import UserError
from transferlab.fileio import file_digest
from transferlab.manifest import StageRecord

NEW_HEAD_DRAW = "own stream (seed, stage name)"  # since the new head stopped replaying the source head's init
UI_KEYS = {"enable_progress_bar", "enable_model_summary", "log_every_n_steps"}  # don't change results


@dataclass(frozen=True)
class StagePlan:
    name: str
    stage: DictConfig  # cfg.stages[name]
    hash: str  # of `config`: the stage's cache key, and what its checkpoints must have been trained under
    config: dict  # the values that determine the stage's result, with their config keys
    init: Path | None = None  # the checkpoint its weights start from (set once its init stage is done)


def plan_stages(cfg: DictConfig, data_hashes: dict[str, str]) -> list[StagePlan]:
    """`data_hashes`: each task's data content hash (`ClassificationDataModule.data_hash`)."""
    plans: dict[str, StagePlan] = {}
    for name, stage in cfg.stages.items():
        upstream = plans[stage.init].hash if stage.init in plans else None
        config = stage_config(cfg, name, upstream)
        if not stage.get("result_ckpt"):
            config[f"data.{stage.task} (content hash of its files)"] = data_hashes[stage.task]
        config = json.loads(json.dumps(config, sort_keys=True, default=str))
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
        plans[name] = StagePlan(name, stage, digest, config)
    return list(plans.values())


def stage_config(cfg: DictConfig, name: str, upstream: str | None) -> dict:
    """What determines a stage's result: its recipe, data, model, seed, trainer, and its upstream stage; for a
    given checkpoint (`stages.<name>.result_ckpt`), the file."""
    plain = lambda node: OmegaConf.to_container(node, resolve=True)
    stage = cfg.stages[name]
    if stage.get("result_ckpt"):
        path = Path(stage.result_ckpt).expanduser()
        return {
            f"stages.{name}.result_ckpt": str(path.resolve()),
            f"stages.{name}.result_ckpt (content sha256)": _digest(path, f"stages.{name}.result_ckpt")
            if path.is_file()
            else None,
        }
    config = {
        "transferlab version": __version__,
        f"stages.{name}": plain(stage),
        f"data.{stage.task}": {k: v for k, v in plain(cfg.data[stage.task]).items() if k != "cache_dir"},
        "model": plain(cfg.model),
        "seed": stage_seed(cfg, stage),
        "trainer": {k: v for k, v in plain(cfg.trainer).items() if k not in UI_KEYS},
        f"stages.{stage.init} (the init stage's config hash)": upstream,
        "scale_lr, reference_batch_size": [cfg.scale_lr, cfg.reference_batch_size] if cfg.scale_lr else None,
    }
    if stage.get("init_ckpt"):  # the file's content, not only its path: a replaced file is another stage
        config[f"stages.{name}.init_ckpt (content sha256)"] = _digest(
            Path(stage.init_ckpt).expanduser(), f"stages.{name}.init_ckpt"
        )
    if (stage.init or stage.get("init_ckpt")) and stage.init_head == "new":
        config["new head"] = NEW_HEAD_DRAW  # a key only where it applies: the other stages' hashes stay as they were
    return config


def _digest(path: Path, key: str) -> str:
    try:
        return file_digest(path)
    except OSError as err:
        raise UserError(
            f"{key}={path} cannot be read ({err.strerror}): let this user read it, or give another file."
        ) from None


def stage_seed(cfg: DictConfig, stage) -> int:
    """The stage's own seed where it has one (a source shared by a seed sweep), else the run's."""
    return cfg.seed if stage.get("seed") is None else stage.seed


def new_head_seed(seed: int, stage_name: str) -> int:
    """The seed of a stage's new head: its own stream, derived from the stage's seed and name (see
    transfer.draw_new_head)."""
    return int(hashlib.sha256(f"{seed}/{stage_name}/new head".encode()).hexdigest()[:8], 16)


def check_rerun(plan: StagePlan, record: StageRecord | None, run_dir: Path) -> None:
    """A stage the folder already holds (done, or checkpoints of a partial run: running, failed, interrupted)
    is skipped or resumed only under the config hash it was trained under; else refuse, naming what changed."""
    if record is None or record.config_hash == plan.hash:
        return
    checkpoints = run_dir / plan.name / "checkpoints"
    partial = checkpoints.is_dir() and any(checkpoints.glob("*.ckpt"))
    if record.status != "done" and not partial:
        return  # it produced nothing (e.g. failed before training): nothing to contradict
    changes = diff(record.config, plan.config) if record.config else []
    changed = "; ".join(changes) or f"config hash {record.config_hash} -> {plan.hash} (its values were not recorded)"
    how = "was run" if record.status == "done" else f"was partly trained (status {record.status})"
    raise UserError(
        f"Stage {plan.name!r} in {run_dir} {how} with another configuration; changed: {changed}. "
        "Re-running into the same folder only continues the same experiment (resuming would train on "
        "under the old values): use a new run folder (hydra.run.dir=...), or delete "
        f"{run_dir / plan.name} and its entry in manifest.json to run that stage again."
    )


def diff(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every leaf that differs between two nested dicts (dotted keys)."""
    before, after = _flatten(old), _flatten(new)
    return [
        f"{key}: {_show(before.get(key))} -> {_show(after.get(key))}"
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key)
    ]


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)
