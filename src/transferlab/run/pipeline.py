"""Chains the stages of a recipe: source -> pretrain -> finetune, and the scratch baseline.

The story of a run: check the config, plan every stage (its hash, where it starts) and check it against what the
folder already holds, load the data of the stages to train, then obtain each stage in turn (a given checkpoint,
the stage cache, or `stage.train_stage`), recording it in the manifest, and write the results table. A re-run into
the same folder skips finished stages and resumes an unfinished one from its `last.ckpt`, and refuses either when
the config changed (`plan.check_rerun`).
"""

import contextlib
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from transferlab.config import validation
from transferlab.core import provenance
from transferlab.core.console import global_rank
from transferlab.core.fileio import writable_dir
from transferlab.run import attempts, results, trackers
from transferlab.run.datasets import Datasets
from transferlab.run.interrupt import INTERRUPTIONS, outcome
from transferlab.run.manifest import Manifest, StageRecord
from transferlab.run.plan import StagePlan, check_rerun, plan_stages
from transferlab.run.stage import RunFolder, failed, given_result, train_stage
from transferlab.run.stage_cache import NoCache, StageCache

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Run every stage of `cfg.stages` not yet done in `cfg.paths.run_dir`; return the results."""
    validation.validate(cfg)  # every config value, before anything is read or written
    run_dir = Path(cfg.paths.run_dir)
    writable_dir(run_dir, "The run folder (hydra.run.dir)")
    attempt = attempts.begin(run_dir)
    manifest = None
    try:
        manifest = Manifest.load(run_dir)
        summary = run_stages(cfg, RunFolder(run_dir, manifest, open_cache(cfg), attempt))
    except BaseException as err:
        trained = manifest.trained_by(attempt) if manifest else []
        _keep_going("the attempt's outcome.json", attempts.end, run_dir, attempt, trained, err)
        raise
    attempts.end(run_dir, attempt, manifest.trained_by(attempt), None)
    return summary


def run_stages(cfg: DictConfig, folder: RunFolder) -> dict:
    folder.manifest.header = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "seed": cfg.seed,
        "provenance": provenance.collect(),
    }
    data = Datasets(cfg)
    pending = []
    for plan in plan_stages(cfg, data.hashes()):  # every check before any training
        record = folder.manifest.get(plan.name)
        check_rerun(plan, record, folder.dir)
        if record is not None and record.status == "done":
            log.info("Stage %s: done in an earlier run, skipped", plan.name)
        else:
            pending.append(plan)
    # bad data fails here, before any training (stages given as a checkpoint or in the cache need none)
    data.check([p for p in pending if p.result_file is None and not folder.cache.has(p.name, p.hash)])
    trackers.start(cfg, folder.dir)  # logger=mlflow: the run's MLflow run, new or continued (nothing otherwise)
    for plan in pending:
        try:
            record = obtain_stage(cfg, plan, folder, data)
        except (Exception, *INTERRUPTIONS) as err:  # a signal marks the stage `interrupted`, an error `failed`
            # with a full disk the manifest keeps `running` and the hash and attempts it trains under: a re-run resumes
            status = outcome(err, plan.name)
            _keep_going(
                "the stage's failure in manifest.json",
                folder.manifest.record,
                plan.name,
                failed(plan, folder, err, status),
            )
            trackers.fail(cfg, folder.dir, err)
            raise
        folder.manifest.record(plan.name, record)
    summary = results.summarise(folder.manifest.stages, **(cfg.gain or {}))
    if global_rank() == 0:
        results.write(folder.dir, summary)
    trackers.finish(cfg, folder.dir, summary)  # the results to the trackers' runs, which end
    return summary


def open_cache(cfg: DictConfig) -> StageCache | NoCache:
    if not cfg.cache:
        return NoCache()
    writable_dir(Path(cfg.paths.cache_dir) / "stages", "The stage cache folder (paths.cache_dir)")
    return StageCache(Path(cfg.paths.cache_dir) / "stages")


def obtain_stage(cfg: DictConfig, plan: StagePlan, folder: RunFolder, data: Datasets) -> StageRecord:
    """A given checkpoint (`stages.<name>.result_ckpt`), else the cached stage, else train it (and cache it).

    Under DDP only rank zero takes the lock, and rank zero's decision is broadcast so that every rank
    trains, or skips, the same stages."""
    if plan.result_file is not None:
        return given_result(cfg, plan, folder)
    cache = folder.cache
    record = _rank_zero_decides(cache.fetch(plan.name, plan.hash, folder.dir))
    if record is None:
        with cache.lock(plan.name, plan.hash) if global_rank() == 0 else contextlib.nullcontext():
            # trained by a parallel job while this one waited for the lock?
            record = _rank_zero_decides(cache.fetch(plan.name, plan.hash, folder.dir))
            if record is None:
                record = train_stage(cfg, plan, folder, *data.for_stage(plan))
                if global_rank() == 0:
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
        assert isinstance(cache, StageCache)  # NoCache.publish writes nothing
        log.warning(
            "Stage %s is done but could not be added to the stage cache (%s: %s): later runs will train it again. "
            "Free space in %s (or set cache=false).",
            *(plan.name, err.strerror, err.filename, cache.dir),
        )


def _rank_zero_decides(value):
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        holder = [value]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]
    return value


def _keep_going(what: str, write, *args) -> None:
    """A record written on the way out of a failure (the disk may be full): if it cannot be written, say so and let
    the failure itself be reported."""
    try:
        write(*args)
    except OSError as err:
        log.warning("Could not write %s on the way out (%s)", what, err)
