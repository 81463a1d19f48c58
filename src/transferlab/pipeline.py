"""Chains the stages of a recipe: source -> pretrain -> finetune, and the scratch baseline.

Each stage gets its own folder (`<run>/<stage>/`), Trainer and ModelCheckpoint; the manifest
(`<run>/manifest.json`, written atomically by rank zero) records what each stage produced, so a re-run
into the same folder skips finished stages and resumes an unfinished one from its `last.ckpt`.
"""

import contextlib
import hashlib
import json
import logging
import os
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from transferlab import __version__, console, provenance, report
from transferlab.cache import NoCache, StageCache
from transferlab.checkpoint_io import AtomicCheckpointIO, check_resumable
from transferlab.errors import UserError, user_message
from transferlab.module import OPTIMIZERS, ClassifierModule
from transferlab.transfer import init_from_checkpoint

log = logging.getLogger(__name__)
logging.getLogger("lightning").handlers.clear()  # Lightning's own stderr handler doubles every line under Hydra
for message in (".*IterableDataset.*has `__len__` defined", ".*is smaller than the logging interval",
                ".*LeafSpec.*is deprecated"):  # expected with our batch loader / epoch-level logging
    warnings.filterwarnings("ignore", message=message)
UI_KEYS = {"enable_progress_bar", "enable_model_summary", "log_every_n_steps"}  # don't change results


def run(cfg: DictConfig) -> dict:
    """Run every stage of `cfg.stages` not yet done in `cfg.paths.run_dir`; return the results."""
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = run_dir / "manifest.json"
    manifest = read_json(manifest_path) or {"stages": {}}
    manifest["config"] = OmegaConf.to_container(cfg, resolve=True)
    manifest["seed"] = cfg.seed
    manifest["provenance"] = provenance.collect()
    validate(cfg)
    cache = StageCache(Path(cfg.paths.cache_dir) / "stages") if cfg.cache else NoCache()
    hashes: dict[str, str] = {}
    pending = []
    for name, stage in cfg.stages.items():
        hashes[name] = stage_hash(cfg, name, hashes.get(stage.init))
        done = manifest["stages"].get(name, {})
        if done.get("status") == "done":
            if done.get("config_hash") != hashes[name]:
                raise UserError(f"Stage {name!r} in {run_dir} was run with another configuration. Re-running into "
                                f"the same folder only resumes the same experiment: use a new run folder, or delete "
                                f"{run_dir / name} and its entry in manifest.json to run that stage again.")
            log.info("Stage %s: done in an earlier run, skipped", name)
        else:
            pending.append(name)
    # bad data fails here, before any training (stages given as a checkpoint or in the cache need none)
    data = check_data(cfg, [n for n in pending if not cfg.stages[n].get("ckpt") and not cache.has(n, hashes[n])])
    for name in pending:
        stage = cfg.stages[name]
        datamodule = lambda task=stage.task: data.pop(task, None) or build(cfg.data[task])
        try:
            entry = obtain_stage(cfg, name, stage, manifest["stages"], run_dir, datamodule, cache, hashes[name])
        except Exception as err:
            last = run_dir / name / "checkpoints" / "last.ckpt"
            manifest["stages"][name] = {"status": "failed", "reason": f"{type(err).__name__}: {user_message(err)}",
                                        "last_ckpt": os.path.relpath(last, run_dir) if last.is_file() else None,
                                        "config_hash": hashes[name], "provenance": manifest["provenance"]}
            write_json_atomic(manifest_path, manifest)
            raise
        manifest["stages"][name] = entry | {"config_hash": hashes[name], "provenance": manifest["provenance"]}
        write_json_atomic(manifest_path, manifest)
    results = report.summarise(manifest["stages"])
    if rank_zero_only.rank == 0:
        report.write(run_dir, results)
    return results


def obtain_stage(cfg: DictConfig, name: str, stage: DictConfig, done: dict, run_dir: Path, datamodule, cache,
                 key: str) -> dict:
    """A given checkpoint (`stages.<name>.ckpt`), else the cached stage, else train it (and cache it).

    Under DDP only rank zero takes the lock, and rank zero's decision is broadcast so that every rank
    trains, or skips, the same stages."""
    if stage.get("ckpt"):
        return given_checkpoint(name, stage)

    def from_cache() -> dict | None:
        entry = _rank_zero_decides(cache.fetch(name, key, run_dir))
        if entry is not None:
            log.info("Stage %s: reused from the stage cache (%s)", name, entry["cached_from"])
        return entry

    entry = from_cache()
    if entry is None:
        with cache.lock(name, key) if rank_zero_only.rank == 0 else contextlib.nullcontext():
            entry = from_cache()  # trained by a parallel job while this one waited for the lock?
            if entry is None:
                entry = run_stage(cfg, name, stage, done, run_dir, datamodule())
                if rank_zero_only.rank == 0:
                    cache.publish(name, key, run_dir, entry)
                return entry | {"cached": False}
    return entry | {"cached": True}


def _rank_zero_decides(value):
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        holder = [value]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]
    return value


def given_checkpoint(name: str, stage: DictConfig) -> dict:
    """`stages.<name>.ckpt=<path>`: use an existing checkpoint as this stage's result, without training."""
    path = Path(stage.ckpt).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"stages.{name}.ckpt={stage.ckpt} does not exist: give the path of a .ckpt file "
                        "(e.g. <run>/source/checkpoints/best.ckpt), or remove the option to train the stage.")
    log.info("Stage %s: using the given checkpoint %s", name, path)
    return {"status": "done", "task": stage.task, "init": None, "best_ckpt": str(path), "last_ckpt": None,
            "given_ckpt": True, "test": {}, "wall_time_s": 0.0}


def run_stage(cfg: DictConfig, name: str, stage: DictConfig, done: dict, run_dir: Path, datamodule) -> dict:
    """Train one stage (initialised from its `init` stage or `init_ckpt`, or resumed from its own last.ckpt)
    and test it."""
    stage_dir = run_dir / name
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    callbacks = [build(c) for c in cfg.callbacks.values()] + console.progress_bars(cfg, name)
    checkpoint = next(c for c in callbacks if isinstance(c, ModelCheckpoint))
    checkpoint.dirpath, checkpoint.save_last = str(stage_dir / "checkpoints"), True  # resume needs last.ckpt
    trainer = make_trainer(cfg, max_epochs=stage.epochs, callbacks=callbacks, default_root_dir=str(stage_dir),
                           logger=[build(lg, save_dir=str(stage_dir)) for lg in cfg.logger.values()])
    optimizer = OmegaConf.to_container(stage.optimizer, resolve=True)
    if cfg.scale_lr:  # linear scaling rule: lr x global batch / reference batch
        optimizer["lr"] *= datamodule.batch_size * trainer.world_size / cfg.reference_batch_size
    module = ClassifierModule(model=OmegaConf.to_container(cfg.model, resolve=True),
                              num_classes=datamodule.num_classes, optimizer=optimizer,
                              scheduler=OmegaConf.to_container(stage.scheduler, resolve=True), train=stage.train)
    last = stage_dir / "checkpoints" / "last.ckpt"
    for partial in (stage_dir / "checkpoints").glob("*.tmp"):  # a write cut short by a kill: never loaded
        log.info("Stage %s: removing %s, a checkpoint write that did not finish", name, partial)
        partial.unlink(missing_ok=True)
    resume = last.is_file()
    if resume:
        check_resumable(last)
        log.info("Stage %s: resuming from %s", name, last)
    elif stage.init or stage.get("init_ckpt"):
        # the init stage's best checkpoint (relative to the run, or absolute when given), or a user's file
        source = run_dir / done[stage.init]["best_ckpt"] if stage.init else Path(stage.init_ckpt).expanduser()
        log.debug("Stage %s: initialised from %s (%s head)", name, source, stage.init_head)
        init_from_checkpoint(module, source, new_head=stage.init_head == "new")
    log.info("%s", console.stage_header(cfg, name, datamodule, trainer, optimizer, resume, done))
    start = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if resume else None)
    best = checkpoint.best_model_path
    if not best:
        raise UserError(f"Stage {name!r} saved no best checkpoint: was {checkpoint.monitor!r} logged? "
                        "Check callbacks.model_checkpoint.monitor and trainer.limit_val_batches.")
    [test] = trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)
    return {
        "status": "done",
        "task": stage.task,
        "init": stage.init or stage.get("init_ckpt"),
        "best_ckpt": os.path.relpath(best, run_dir),
        "last_ckpt": os.path.relpath(last, run_dir),
        "best_val": float(checkpoint.best_model_score),
        "epochs": trainer.current_epoch,
        "splits": datamodule.split_sizes(),
        "data": datamodule.fingerprint(),
        "test": {k.removeprefix("test/"): float(v) for k, v in test.items()},
        "wall_time_s": round(time.time() - start, 1),
    }


def check_data(cfg: DictConfig, stages: list[str]) -> dict:
    """Load the data of the stages to run, so a missing root or a bad file stops the run before any training;
    the loaded data modules are handed to the first stage of each task."""
    data = {}
    for name in stages:
        task = cfg.stages[name].task
        if task not in data:
            data[task] = build(cfg.data[task])
        if data[task].split_sizes()["val"] == 0:
            raise UserError(f"Stage {name!r}: the validation split is empty; the best checkpoint is chosen on it, so "
                            f"set data.{task}.val_fraction above 0 (or give more training samples).")
    return data


def make_trainer(cfg: DictConfig, max_epochs: int | None = None, **kwargs) -> L.Trainer:
    """The Trainer of `cfg.trainer`; a set `trainer.max_epochs` caps every stage's epochs (debug presets)."""
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    cap = trainer_cfg.pop("max_epochs", None)
    epochs = min(e for e in (max_epochs, cap) if e is not None) if (max_epochs or cap) else None
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


def validate(cfg: DictConfig) -> None:
    """Check the values a typo or a wrong machine gets wrong, before anything trains."""
    validate_stages(cfg)
    if cfg.data.get("batch_size") is not None and cfg.data.batch_size < 1:
        raise UserError(f"data.batch_size must be at least 1, got {cfg.data.batch_size}.")
    validate_devices(cfg.trainer)


def validate_stages(cfg: DictConfig) -> None:
    seen: list[str] = []
    for name, stage in cfg.stages.items():
        if stage.task not in cfg.data or not isinstance(cfg.data[stage.task], DictConfig):
            raise UserError(f"stages.{name}.task={stage.task!r}: the data config {cfg.data.get('name', '')} "
                            f"has no such task; use one of: source, target.")
        if stage.init is not None and stage.init not in seen:
            raise UserError(f"stages.{name}.init={stage.init!r} must name an earlier stage "
                            f"(stages before it: {', '.join(seen) or 'none'}).")
        if stage.init is not None and stage.get("init_ckpt"):
            raise UserError(f"stages.{name} has both init={stage.init!r} and init_ckpt={stage.init_ckpt!r}: "
                            f"a stage starts from one of them; set stages.{name}.init=null to use the file.")
        if stage.get("init_ckpt") and not Path(stage.init_ckpt).expanduser().is_file():
            raise UserError(f"stages.{name}.init_ckpt={stage.init_ckpt}: no such file. Give the path of a .ckpt "
                            "(e.g. <run>/source/checkpoints/best.ckpt) or a saved state dict.")
        if stage.init_head not in ("new", "keep"):
            raise UserError(f"stages.{name}.init_head={stage.init_head!r}: use 'new' or 'keep'.")
        if stage.epochs < 1:
            raise UserError(f"stages.{name}.epochs must be at least 1, got {stage.epochs}.")
        optimizer = stage.optimizer
        if optimizer.get("name", "sgd") not in OPTIMIZERS:
            raise UserError(f"stages.{name}.optimizer.name={optimizer.name!r} is unknown; available: "
                            f"{', '.join(OPTIMIZERS)}.")
        if not isinstance(optimizer.get("lr"), (int, float)) or optimizer.lr <= 0:
            raise UserError(f"stages.{name}.optimizer.lr must be a positive number, got {optimizer.get('lr')}.")
        if stage.scheduler.get("name", "none") not in ("none", "cosine", "step"):
            raise UserError(f"stages.{name}.scheduler.name={stage.scheduler.name!r} is unknown; available: "
                            "none, cosine, step.")
        seen.append(name)


def validate_devices(trainer: DictConfig) -> None:
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
        raise UserError(f"trainer.accelerator={accelerator} but this machine has no visible GPU "
                        f"(torch.cuda.device_count() is 0): {fix}, or run where a GPU is visible.")
    if isinstance(wanted, int) and not isinstance(wanted, bool) and (wanted > available or wanted == 0):
        raise UserError(f"trainer.devices={devices} but this machine has {available} {what} "
                        f"(accelerator={accelerator}): set trainer.devices between 1 and {available}, or -1 for all; "
                        f"{fix}.")


def stage_hash(cfg: DictConfig, name: str, upstream: str | None) -> str:
    """What determines a stage's result: its recipe, data, model, seed, trainer, and its upstream stage."""
    plain = lambda node: OmegaConf.to_container(node, resolve=True)
    stage = cfg.stages[name]
    what = {"version": __version__, "stage": plain(stage), "data": {k: v for k, v in plain(cfg.data[stage.task]).items() if k != "cache_dir"}, "model": plain(cfg.model), "seed": cfg.seed,
            "trainer": {k: v for k, v in plain(cfg.trainer).items() if k not in UI_KEYS}, "upstream": upstream,
            "lr_scale": [cfg.scale_lr, cfg.reference_batch_size] if cfg.scale_lr else None}
    if stage.get("ckpt"):  # a given checkpoint: what determines it is the file
        path = Path(stage.ckpt).expanduser()
        what = {"ckpt": str(path.resolve()), "size": path.stat().st_size if path.is_file() else None}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


@rank_zero_only
def write_json_atomic(path: Path, data: dict) -> None:
    """Write to a temporary file, then rename: a kill mid-write leaves the old file whole."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
