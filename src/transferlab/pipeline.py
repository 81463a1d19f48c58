"""Chains the stages of a recipe: source -> pretrain -> finetune, and the scratch baseline.

Each stage gets its own folder (`<run>/<stage>/`), Trainer and ModelCheckpoint; the manifest
(`<run>/manifest.json`, `manifest.Manifest`) records what each stage produced and under which config hash, so
a re-run into the same folder skips finished stages and resumes an unfinished one from its `last.ckpt`, and
refuses either when the config changed (`plan.check_rerun`).
"""

import contextlib
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from transferlab import attempts, console, methods, provenance, report, validation
from transferlab.callbacks import check_losses
from transferlab.checkpoint_io import check_resumable
from transferlab.errors import UserError, user_message
from transferlab.factories import build, make_trainer
from transferlab.fileio import not_a_file, writable_dir
from transferlab.interrupt import INTERRUPTIONS, outcome
from transferlab.manifest import Manifest, StageRecord
from transferlab.module import ClassifierModule
from transferlab.plan import StagePlan, check_rerun, new_head_seed, plan_stages, stage_seed
from transferlab.stage_cache import NoCache, StageCache
from transferlab.transfer import draw_new_head, init_from_checkpoint

log = logging.getLogger(__name__)


@dataclass
class RunFolder:
    """What the stages of one attempt at a run folder share."""

    dir: Path
    manifest: Manifest
    cache: StageCache | NoCache
    attempt: int  # this attempt's number (`.hydra/attempts/<n>/`)

    @property
    def provenance(self) -> dict:
        return self.manifest.header["provenance"]


def run(cfg: DictConfig) -> dict:
    """Run every stage of `cfg.stages` not yet done in `cfg.paths.run_dir`; return the results."""
    validation.validate(cfg)  # every config value, before anything is read or written
    run_dir = Path(cfg.paths.run_dir)
    writable_dir(run_dir, "The run folder (hydra.run.dir)")
    attempt = attempts.begin(run_dir)
    manifest = None
    try:
        manifest = Manifest.load(run_dir)
        results = run_stages(cfg, run_dir, manifest, attempt)
    except BaseException as err:
        trained = manifest.trained_by(attempt) if manifest else []
        _keep_going("the attempt's outcome.json", attempts.end, run_dir, attempt, trained, err)
        raise
    attempts.end(run_dir, attempt, manifest.trained_by(attempt), None)
    return results


def _keep_going(what: str, write, *args) -> None:
    """A record written on the way out of a failure (the disk may be full): if it cannot be written, say so and let
    the failure itself be reported."""
    try:
        write(*args)
    except OSError as err:
        log.warning("Could not write %s on the way out (%s)", what, err)


def run_stages(cfg: DictConfig, run_dir: Path, manifest: Manifest, attempt: int) -> dict:
    manifest.header = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "seed": cfg.seed,
        "provenance": provenance.collect(),
    }
    folder = RunFolder(run_dir, manifest, open_cache(cfg), attempt)
    data = Datasets(cfg)
    pending = []
    for plan in plan_stages(cfg, data.hashes()):  # every check before any training
        record = manifest.get(plan.name)
        check_rerun(plan, record, run_dir)
        if record is not None and record.status == "done":
            log.info("Stage %s: done in an earlier run, skipped", plan.name)
        else:
            pending.append(plan)
    # bad data fails here, before any training (stages given as a checkpoint or in the cache need none)
    data.load([p for p in pending if not p.stage.get("result_ckpt") and not folder.cache.has(p.name, p.hash)])
    for plan in pending:
        if plan.stage.init or plan.stage.get("init_ckpt"):
            init = manifest.checkpoint(plan.stage.init) if plan.stage.init else Path(plan.stage.init_ckpt)
            plan = replace(plan, init=init.expanduser())
        try:
            record = obtain_stage(cfg, plan, folder, data)
        except (Exception, *INTERRUPTIONS) as err:  # a signal marks the stage `interrupted`, an error `failed`
            # with a full disk the manifest keeps `running` and the hash and attempts it trains under: a re-run resumes
            _keep_going(
                "the stage's failure in manifest.json",
                manifest.record,
                plan.name,
                failed(plan, folder, err, status=outcome(err, plan.name)),
            )
            raise
        manifest.record(plan.name, record)
    stages = {name: record.to_json() for name, record in manifest.stages.items()}
    results = report.summarise(stages, **(cfg.gain or {}))
    if rank_zero_only.rank == 0:
        report.write(run_dir, results)
    return results


def open_cache(cfg: DictConfig) -> StageCache | NoCache:
    if not cfg.cache:
        return NoCache()
    writable_dir(Path(cfg.paths.cache_dir) / "stages", "The stage cache folder (paths.cache_dir)")
    return StageCache(Path(cfg.paths.cache_dir) / "stages")


def failed(plan: StagePlan, folder: RunFolder, err: BaseException, status: str = "failed") -> StageRecord:
    """The record of a stage that failed (or was interrupted): the attempts that trained it under this hash
    stay named, so it can be resumed; it is never cached."""
    last = folder.dir / plan.name / "checkpoints" / "last.ckpt"
    before = folder.manifest.get(plan.name)
    trained = before.attempts if before and before.config_hash == plan.hash else []
    return StageRecord(
        status=status,
        task=plan.stage.task,
        config_hash=plan.hash,
        config=plan.config,
        attempts=trained,
        reason=f"{type(err).__name__}: {user_message(err)}",
        last_ckpt=os.path.relpath(last, folder.dir) if last.is_file() else None,
        provenance=folder.provenance,
    )


def obtain_stage(cfg: DictConfig, plan: StagePlan, folder: RunFolder, data: "Datasets") -> StageRecord:
    """A given checkpoint (`stages.<name>.result_ckpt`), else the cached stage, else train it (and cache it).

    Under DDP only rank zero takes the lock, and rank zero's decision is broadcast so that every rank
    trains, or skips, the same stages."""
    if plan.stage.get("result_ckpt"):
        return given_checkpoint(cfg, plan, folder)
    cache = folder.cache
    record = _rank_zero_decides(cache.fetch(plan.name, plan.hash, folder.dir))
    if record is None:
        with cache.lock(plan.name, plan.hash) if rank_zero_only.rank == 0 else contextlib.nullcontext():
            # trained by a parallel job while this one waited for the lock?
            record = _rank_zero_decides(cache.fetch(plan.name, plan.hash, folder.dir))
            if record is None:
                record = train_stage(cfg, plan, folder, data.take(plan.stage.task))
                if rank_zero_only.rank == 0:
                    publish(cache, plan, folder.dir, record)
                return record
    log.info(
        "Stage %s: reused from the stage cache (%s, trained in %s)", plan.name, record.cached_from, record.trained_in
    )
    return record


def publish(cache: StageCache | NoCache, plan: StagePlan, run_dir: Path, record: StageRecord) -> None:
    """Offer a trained stage to the stage cache; a cache folder that is full (or gone read-only) costs the reuse,
    never the stage, which is done in this run's folder."""
    try:
        cache.publish(plan.name, plan.hash, run_dir, record)
    except OSError as err:
        log.warning(
            "Stage %s is done but could not be added to the stage cache (%s: %s): later runs will train it again. "
            "Free space in %s (or set cache=false).",
            plan.name,
            err.strerror,
            err.filename,
            cache.dir,
        )


def _rank_zero_decides(value):
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        holder = [value]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]
    return value


def given_checkpoint(cfg: DictConfig, plan: StagePlan, folder: RunFolder) -> StageRecord:
    """`stages.<name>.result_ckpt=<path>`: use an existing checkpoint as this stage's result, without training. It is
    loaded (weights only) and checked to fit the model before the stage is marked done."""
    path = Path(plan.stage.result_ckpt).expanduser().resolve()
    if not path.is_file():
        raise UserError(
            f"stages.{plan.name}.result_ckpt={plan.stage.result_ckpt} {not_a_file(path)}: give the path "
            "of a .ckpt file (e.g. <run>/source/checkpoints/best.ckpt), or remove the option to train the "
            "stage."
        )
    module = ClassifierModule(
        model=OmegaConf.to_container(cfg.model, resolve=True), num_classes=2, optimizer={"name": "sgd", "lr": 1.0}
    )
    try:
        init_from_checkpoint(module, path, new_head=True)  # the head is checked by the stage that inits from it
    except UserError as err:
        raise UserError(f"stages.{plan.name}.result_ckpt: {err}") from None
    log.info("Stage %s: using the given checkpoint %s", plan.name, path)
    return StageRecord(
        status="done",
        task=plan.stage.task,
        config_hash=plan.hash,
        config=plan.config,
        best_ckpt=str(path),
        given_ckpt=True,
        provenance=folder.provenance,
    )


def train_stage(cfg: DictConfig, plan: StagePlan, folder: RunFolder, datamodule) -> StageRecord:
    """Train one stage (initialised from `plan.init`, or resumed from its own last.ckpt) and test it."""
    name, stage, stage_dir = plan.name, plan.stage, folder.dir / plan.name
    L.seed_everything(stage_seed(cfg, stage), workers=True, verbose=False)
    callbacks = [build(c) for c in cfg.callbacks.values()] + console.progress_bars(cfg, name)
    checkpoint = next(c for c in callbacks if isinstance(c, ModelCheckpoint))
    checkpoint.dirpath, checkpoint.save_last = str(stage_dir / "checkpoints"), True  # resume needs last.ckpt
    trainer = make_trainer(
        cfg,
        max_epochs=stage.epochs,
        callbacks=callbacks,
        default_root_dir=str(stage_dir),
        logger=[build(lg, save_dir=str(stage_dir)) for lg in cfg.logger.values()],
    )
    optimizer = OmegaConf.to_container(stage.optimizer, resolve=True)
    if cfg.scale_lr:  # linear scaling rule: lr x global batch / reference batch
        optimizer["lr"] *= datamodule.batch_size * trainer.world_size / cfg.reference_batch_size
    module = ClassifierModule(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        num_classes=datamodule.num_classes,
        optimizer=optimizer,
        scheduler=OmegaConf.to_container(stage.scheduler, resolve=True),
        **methods.options(stage),
    )
    last = stage_dir / "checkpoints" / "last.ckpt"
    for partial in (stage_dir / "checkpoints").glob("*.tmp"):  # a write cut short by a kill: never loaded
        log.info("Stage %s: removing %s, a checkpoint write that did not finish", name, partial)
        partial.unlink(missing_ok=True)
    before = folder.manifest.get(name)
    resume = last.is_file()
    if resume:
        check_resumable(last)
        if before is None or before.config_hash != plan.hash or not before.attempts:  # no attempt trained it
            raise UserError(
                f"{last} has no record in manifest.json of the config that trained it, so resuming it "
                f"could train on under other values: delete {stage_dir} to train the stage from its "
                "start, or use a new run folder (hydra.run.dir=...)."
            )
        log.info("Stage %s: resuming from %s", name, last)
    elif plan.init is not None:
        log.debug("Stage %s: initialised from %s (%s head)", name, plan.init, stage.init_head)
        init_from_checkpoint(module, plan.init, new_head=stage.init_head == "new")
        if stage.init_head == "new":
            draw_new_head(module, new_head_seed(stage_seed(cfg, stage), name))
    record = StageRecord(
        status="running",
        task=stage.task,
        config_hash=plan.hash,
        config=plan.config,
        attempts=[*(before.attempts if resume else []), folder.attempt],
        init=stage.init or stage.get("init_ckpt"),
        provenance=folder.provenance,
        last_ckpt=os.path.relpath(last, folder.dir),
    )
    folder.manifest.record(name, record)  # before the first step: the hash its checkpoints are trained under
    log.info("%s", console.stage_header(cfg, name, datamodule, trainer, optimizer, resume, plan.init))
    start = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if resume else None)
    best = checkpoint.best_model_path
    if not best:
        raise UserError(
            f"Stage {name!r} saved no best checkpoint: was {checkpoint.monitor!r} logged? "
            "Check callbacks.model_checkpoint.monitor and trainer.limit_val_batches."
        )
    fit_losses = {k: trainer.callback_metrics.get(f"{k}/loss") for k in ("train", "val")}
    [test] = trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)
    check_losses(name, stage_dir, datamodule.num_classes, **fit_losses, test=test.get("test/loss"))
    return replace(
        record,
        status="done",
        best_ckpt=os.path.relpath(best, folder.dir),
        best_val=float(checkpoint.best_model_score),
        epochs=trainer.current_epoch,
        splits=datamodule.split_sizes(),
        data=datamodule.fingerprint(),
        test={k.removeprefix("test/"): float(v) for k, v in test.items()},
        wall_time_s=round(time.time() - start, 1),
    )


class Datasets:
    """The data modules of the run's tasks. Their content hashes go into the stage hashes (the cache and resume
    follow the data's bytes, not only its config); the data of the stages to train is loaded up front, so that
    a missing root or a bad file stops the run before any training. A task's first stage gets the loaded
    module, later ones a fresh one."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        tasks = {stage.task for stage in cfg.stages.values() if not stage.get("result_ckpt")}
        self.loaded = {task: build(cfg.data[task]) for task in sorted(tasks)}

    def hashes(self) -> dict[str, str]:
        return {task: module.data_hash() for task, module in self.loaded.items()}

    def load(self, plans: list[StagePlan]) -> None:
        for plan in plans:
            task = plan.stage.task
            if self.loaded[task].split_sizes()["val"] == 0:
                raise UserError(
                    f"Stage {plan.name!r}: the validation split is empty; the best checkpoint is chosen on "
                    f"it, so set data.{task}.val_fraction above 0 (or give more training samples)."
                )

    def take(self, task: str):
        return self.loaded.pop(task, None) or build(self.cfg.data[task])
