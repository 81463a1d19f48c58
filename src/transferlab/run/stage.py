"""One stage of a run folder, obtained without training (a checkpoint given as its result) or trained: its Trainer
and module, where its weights start (its own `last.ckpt` to resume, else its init checkpoint), fit, test, and the
record of each state in the manifest."""

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from transferlab.core import console
from transferlab.core.checks import config_dict
from transferlab.core.errors import UserError, user_message
from transferlab.core.fileio import not_a_file
from transferlab.run import trackers
from transferlab.run.manifest import Manifest, StageRecord
from transferlab.run.plan import StagePlan, new_head_seed
from transferlab.run.stage_cache import NoCache, StageCache
from transferlab.train import methods
from transferlab.train.callbacks import check_losses
from transferlab.train.checkpoint_files import check_resumable
from transferlab.train.factories import build, make_trainer
from transferlab.train.metrics import metric_key, split_metrics
from transferlab.train.module import ClassifierModule
from transferlab.train.unlabeled import FrozenTeacher
from transferlab.train.weights import draw_new_head, init_from_checkpoint, load_backbone_weights, load_module

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

    def last_checkpoint(self, name: str) -> Path:
        return self.dir / name / "checkpoints" / "last.ckpt"


def train_stage(cfg: DictConfig, plan: StagePlan, folder: RunFolder, datamodule, tested_on=None) -> StageRecord:
    """Train one stage (initialised from its init checkpoint, or resumed from its own last.ckpt) and test it (on
    `tested_on`'s test split where given: `test_task`)."""
    L.seed_everything(plan.seed, workers=True, verbose=False)
    trainer, checkpoint = stage_trainer(cfg, plan, folder.dir / plan.name)
    optimizer = config_dict(plan.stage.optimizer)
    if cfg.scale_lr:  # linear scaling rule: lr x global batch / reference batch
        optimizer["lr"] *= datamodule.batch_size * trainer.world_size / cfg.reference_batch_size
    module = ClassifierModule(
        model=config_dict(cfg.model),
        num_classes=datamodule.num_classes,
        optimizer=optimizer,
        scheduler=config_dict(plan.stage.scheduler),
        **methods.options(plan.stage),
    )
    resumed = start_weights(plan, folder, module)
    if plan.stage.unlabeled.method == "pseudo_label":
        module.teacher = teacher(plan, folder, datamodule.num_classes)
    last = folder.last_checkpoint(plan.name)
    record = StageRecord.of(
        plan,
        "running",
        folder.provenance,
        attempts=[*resumed, folder.attempt],
        init=plan.starts_from,
        last_ckpt=os.path.relpath(last, folder.dir),
    )
    folder.manifest.record(plan.name, record)  # before the first step: the hash its checkpoints are trained under
    init = plan.init_checkpoint(folder.manifest) or plan.model_weights
    log.info("%s", console.stage_header(cfg, plan.name, datamodule, trainer, optimizer, bool(resumed), init))
    start = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if resumed else None)
    return tested(plan, folder, record, trainer, checkpoint, module, tested_on or datamodule, start)


def teacher(plan: StagePlan, folder: RunFolder, num_classes: int) -> FrozenTeacher:
    """pseudo_label's teacher: the best checkpoint of `unlabeled.teacher` (by default the init stage)."""
    name = plan.stage.unlabeled.teacher or plan.stage.init
    path = folder.manifest.checkpoint(name)
    model, _ = load_module(path)
    if model.head.out_features != num_classes:
        raise UserError(
            f"stages.{plan.name}.unlabeled.teacher={name}: its model predicts {model.head.out_features} classes, "
            f"this stage's task has {num_classes}; the teacher must label the same classes (a stage on this task)."
        )
    return FrozenTeacher(model)


def stage_trainer(cfg: DictConfig, plan: StagePlan, stage_dir: Path) -> tuple[L.Trainer, ModelCheckpoint]:
    """The stage's Trainer, its loggers writing into the stage folder, and its ModelCheckpoint."""
    callbacks = [build(c) for c in cfg.callbacks.values()] + console.progress_bars(cfg, plan.name)
    checkpoint = next(c for c in callbacks if isinstance(c, ModelCheckpoint))
    checkpoint.dirpath, checkpoint.save_last = str(stage_dir / "checkpoints"), True  # resume needs last.ckpt
    trainer = make_trainer(
        cfg,
        max_epochs=plan.stage.epochs,
        callbacks=callbacks,
        default_root_dir=str(stage_dir),
        logger=trackers.stage_loggers(cfg, plan.name, stage_dir),  # cfg.logger's, a tracker's on rank 0 only
    )
    return trainer, checkpoint


def start_weights(plan: StagePlan, folder: RunFolder, module: ClassifierModule) -> list[int]:
    """Resume the stage from its own last.ckpt (Lightning restores it in `fit`: the attempts that trained it are
    returned), else copy its init checkpoint's weights into `module` (a new head drawn where asked): []."""
    name, last = plan.name, folder.last_checkpoint(plan.name)
    for partial in last.parent.glob("*.tmp"):  # a write cut short by a kill: never loaded
        log.info("Stage %s: removing %s, a checkpoint write that did not finish", name, partial)
        partial.unlink(missing_ok=True)
    if last.is_file():
        check_resumable(last)
        before = folder.manifest.get(name)
        if before is None or before.config_hash != plan.hash or not before.attempts:  # no attempt trained it
            raise UserError(
                f"{last} has no record in manifest.json of the config that trained it, so resuming it "
                f"could train on under other values: delete {last.parent.parent} to train the stage from its "
                "start, or use a new run folder (hydra.run.dir=...)."
            )
        log.info("Stage %s: resuming from %s", name, last)
        return before.attempts
    init = plan.init_checkpoint(folder.manifest)
    if init is not None:
        log.debug("Stage %s: initialised from %s (%s head)", name, init, plan.stage.init_head)
        init_from_checkpoint(module, init, new_head=plan.new_head)
        if plan.new_head:
            draw_new_head(module, new_head_seed(plan.seed, name))
    elif plan.model_weights is not None:  # the model's pretrained backbone; the head stays at its random init
        load_backbone_weights(module, plan.model_weights)
    return []


def tested(plan, folder, record, trainer, checkpoint, module, datamodule, start: float) -> StageRecord:
    """Test the stage's best checkpoint; its losses must be finite and sane: the stage's `done` record."""
    best = checkpoint.best_model_path
    if not best:
        raise UserError(
            f"Stage {plan.name!r} saved no best checkpoint: was {checkpoint.monitor!r} logged? "
            "Check callbacks.model_checkpoint.monitor and trainer.limit_val_batches."
        )
    fit_losses = {k: trainer.callback_metrics.get(metric_key(k, "loss")) for k in ("train", "val")}
    [test] = trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)
    stage_dir = folder.dir / plan.name
    check_losses(plan.name, stage_dir, datamodule.num_classes, **fit_losses, test=test.get(metric_key("test", "loss")))
    return record.done(
        best_ckpt=os.path.relpath(best, folder.dir),
        best_val=float(checkpoint.best_model_score),
        epochs=trainer.current_epoch,
        splits=datamodule.split_sizes(),
        data=datamodule.fingerprint(),
        test=split_metrics(test, "test"),
        wall_time_s=round(time.time() - start, 1),
    )


def given_result(cfg: DictConfig, plan: StagePlan, folder: RunFolder) -> StageRecord:
    """`stages.<name>.result_ckpt=<path>`: an existing checkpoint is the stage's result, without training. It is
    loaded (weights only) and checked to fit the model before the stage is marked done."""
    path = plan.result_file
    assert path is not None  # obtain_stage calls this for a stage with result_ckpt only
    if not path.is_file():
        raise UserError(
            f"stages.{plan.name}.result_ckpt={plan.stage.result_ckpt} {not_a_file(path)}: give the path "
            "of a .ckpt file (e.g. <run>/source/checkpoints/best.ckpt), or remove the option to train the "
            "stage."
        )
    module = ClassifierModule(model=config_dict(cfg.model), num_classes=2, optimizer={"name": "sgd", "lr": 1.0})
    try:
        init_from_checkpoint(module, path, new_head=True)  # the head is checked by the stage that inits from it
    except UserError as err:
        raise UserError(f"stages.{plan.name}.result_ckpt: {err}") from None
    log.info("Stage %s: using the given checkpoint %s", plan.name, path)
    return StageRecord.of(plan, "done", folder.provenance, best_ckpt=str(path), given_ckpt=True)


def failed(plan: StagePlan, folder: RunFolder, err: BaseException, status: str) -> StageRecord:
    """The record of a stage that failed (or was interrupted): the attempts that trained it under this hash
    stay named, so it can be resumed; it is never cached."""
    last, before = folder.last_checkpoint(plan.name), folder.manifest.get(plan.name)
    return StageRecord.of(
        plan,
        status,
        folder.provenance,
        attempts=before.attempts if before and before.config_hash == plan.hash else [],
        reason=f"{type(err).__name__}: {user_message(err)}",
        last_ckpt=os.path.relpath(last, folder.dir) if last.is_file() else None,
    )
