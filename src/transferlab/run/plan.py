"""What each stage of a run is to be, resolved once before anything trains: its config, the hash of everything that
determines its result, where its weights start (an earlier stage, a checkpoint file, or nothing) or the checkpoint
given as its result; and the check that a stage already in the run folder was produced by that same config."""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from transferlab import __version__
from transferlab.config.validation import model_weights_file
from transferlab.core.checks import config_dict
from transferlab.core.digests import file_digest, json_digest
from transferlab.core.errors import UserError
from transferlab.models import WEIGHT_KEYS
from transferlab.run.manifest import Manifest, StageRecord

NEW_HEAD_DRAW = "own stream (seed, stage name)"  # since the new head stopped replaying the source head's init
TESTED_ON = "(the test task)"  # the key of a stage tested on another task: results.table shows "source → target"
UI_KEYS = {"enable_progress_bar", "enable_model_summary", "log_every_n_steps"}  # don't change results


@dataclass(frozen=True)
class StagePlan:
    """One stage of the run. It starts from `init_stage`'s best checkpoint, from the file `init_file`, or at random
    (neither); with `result_file` it does not train: that checkpoint is its result."""

    name: str
    stage: DictConfig  # cfg.stages[name]
    hash: str  # of `config`: the stage's cache key, and what its checkpoints must have been trained under
    config: dict  # the values that determine the stage's result, with their config keys
    seed: int  # the stage's own seed where it has one, else the run's
    init_stage: str | None = None
    init_file: Path | None = None
    result_file: Path | None = None
    new_head: bool = (
        False  # a fresh head for this task's classes (init_head=new, where the weights come from elsewhere)
    )
    model_weights: Path | None = None  # the backbone's starting weights (model.weights / model.pretrained), if used

    @property
    def starts_from(self) -> str | None:
        """Where its weights start, as the config says it (the record's `init`)."""
        return self.init_stage or (str(self.stage.init_ckpt) if self.init_file else None)

    def init_checkpoint(self, manifest: Manifest) -> Path | None:
        """The checkpoint its weights start from: the init stage's best (done by now), or the given file."""
        return manifest.checkpoint(self.init_stage) if self.init_stage else self.init_file


def plan_stages(cfg: DictConfig, data_hashes: dict[str, str]) -> list[StagePlan]:
    """`data_hashes`: each task's data content hash (`ClassificationDataModule.data_hash`)."""
    plans: dict[str, StagePlan] = {}
    weights = model_weights_file(cfg.model)
    for name, stage in cfg.stages.items():
        result = Path(stage.result_ckpt).expanduser().resolve() if stage.get("result_ckpt") else None
        init_file = Path(stage.init_ckpt).expanduser() if stage.get("init_ckpt") else None
        starts_empty = result is None and not stage.init and init_file is None
        backbone = weights if starts_empty and stage.get("model_weights", True) else None
        upstream = plans[stage.init].hash if stage.init in plans else None
        config = stage_config(cfg, name, upstream, result, init_file, backbone)
        if result is None:
            config[f"data.{stage.task} (content hash of its files)"] = data_hashes[stage.task]
            config |= unlabeled_config(cfg, stage, data_hashes, plans)
        config = json.loads(json.dumps(config, sort_keys=True, default=str))
        new_head = bool(stage.init or init_file) and stage.init_head == "new"
        seed = cfg.seed if stage.get("seed") is None else stage.seed
        plans[name] = StagePlan(
            name, stage, json_digest(config), config, seed, stage.init, init_file, result, new_head, backbone
        )
    return list(plans.values())


def stage_config(
    cfg: DictConfig,
    name: str,
    upstream: str | None,
    result: Path | None,
    init_file: Path | None,
    backbone: Path | None = None,
) -> dict:
    """What determines a stage's result: its recipe, data, model, seed, trainer, its upstream stage and the content
    of a checkpoint or weights file it starts from; for a given result (`stages.<name>.result_ckpt`), that file's
    content. `model_weights` and the model's weight keys enter only as the content of the file the stage starts from
    (where it uses one), so the hashes of stages they do not change stay as they were."""
    stage = cfg.stages[name]
    if result is not None:
        return {
            f"stages.{name}.result_ckpt": str(result),
            f"stages.{name}.result_ckpt (content sha256)": _digest(result, f"stages.{name}.result_ckpt")
            if result.is_file()
            else None,
        }
    config = {
        "transferlab version": __version__,
        f"stages.{name}": {k: v for k, v in config_dict(stage).items() if k != "model_weights" and not _off(k, v)},
        f"data.{stage.task}": _data_config(cfg, stage.task),
        "model": {k: v for k, v in config_dict(cfg.model).items() if not (k in WEIGHT_KEYS and v)},
        "seed": cfg.seed if stage.get("seed") is None else stage.seed,
        "trainer": {  # one device is one device, whatever its index (a joblib job runs on GPU k: run.parallel)
            k: 1 if k == "devices" and isinstance(v, list) and len(v) == 1 else v
            for k, v in config_dict(cfg.trainer).items()
            if k not in UI_KEYS
        },
        f"stages.{stage.init} (the init stage's config hash)": upstream,
        "scale_lr, reference_batch_size": [cfg.scale_lr, cfg.reference_batch_size] if cfg.scale_lr else None,
    }
    if init_file is not None:  # the file's content, not only its path: a replaced file is another stage
        config[f"stages.{name}.init_ckpt (content sha256)"] = _digest(init_file, f"stages.{name}.init_ckpt")
    if backbone is not None:
        config["model weights (content sha256)"] = _digest(backbone, "model.weights")
    if (stage.init or init_file) and stage.init_head == "new":
        config["new head"] = NEW_HEAD_DRAW  # a key only where it applies: the other stages' hashes stay as they were
    return config


def _off(key: str, value) -> bool:
    """An option added after stages were first cached, at its default (off): left out of the hash, so that the
    stages it does not change keep their hashes (and their cached results, and resume)."""
    if key == "unlabeled":
        return value.get("method") == "none"
    return key in OFF and value == OFF[key]


OFF = {"ema_decay": 0.0, "test_task": None}


def _data_config(cfg: DictConfig, task: str) -> dict:
    """A task's data settings that select its samples (`unlabeled` counts only for a stage that trains on them)."""
    return {k: v for k, v in config_dict(cfg.data[task]).items() if k not in ("cache_dir", "unlabeled")}


def unlabeled_config(cfg: DictConfig, stage, data_hashes: dict[str, str], plans: dict) -> dict:
    """What else a stage's result depends on when it trains on unlabeled images or is tested on the other task:
    those images (the target's settings and content), the test task's data, and the pseudo-labelling teacher."""
    config: dict = {}
    method = stage.unlabeled.method
    if method != "none":
        config["data.target.unlabeled (the unlabeled images)"] = {
            "setting": cfg.data.target.get("unlabeled", "rest"),
            "target data": _data_config(cfg, "target"),
            "content": data_hashes["target unlabeled"],
        }
    if method == "pseudo_label":
        teacher = stage.unlabeled.teacher or stage.init
        config[f"stages.{teacher} (the teacher stage's config hash)"] = plans[teacher].hash
    test = stage.get("test_task")
    if test is not None and test != stage.task:
        config[f"data.{test} {TESTED_ON}"] = {"settings": _data_config(cfg, test), "content": data_hashes[test]}
    return config


def _digest(path: Path, key: str) -> str:
    try:
        return file_digest(path)
    except OSError as err:
        raise UserError(
            f"{key}={path} cannot be read ({err.strerror}): let this user read it, or give another file."
        ) from None


def new_head_seed(seed: int, stage_name: str) -> int:
    """The seed of a stage's new head: its own stream, derived from the stage's seed and name (see
    train.weights.draw_new_head)."""
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
    before, after = flatten(old), flatten(new)
    return [
        f"{key}: {_show(before.get(key))} -> {_show(after.get(key))}"
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key)
    ]


def flatten(tree, prefix: str = "") -> dict:
    """A nested dict as `{dotted.key: leaf}` (an empty dict is a leaf)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)
