"""Experiment trackers, `logger=mlflow` and `logger=wandb` (docs/trackers.md), on top of Lightning's own loggers.

Lightning's loggers see one Trainer. A transferlab run has one Trainer per stage, and its results (the table, the
gain) come after the last one. So a tracker here belongs to the run:

- MLflow: one MLflow run per transferlab run (the parent) and a nested run per stage (tag `mlflow.parentRunId`),
  which Lightning's MLFlowLogger fills with the stage's per-epoch metrics. The composed config becomes the parent's
  params. At the end, the results and the manifest become its artifacts, and the test metrics and the gain its
  metrics.
- W&B: one W&B run per stage (W&B does not nest runs), grouped by the transferlab run (`group`), with the stage as
  `job_type`. Offline by default: files only, `wandb sync` uploads them later.

The tracker runs' ids go into `<run>/trackers.json`, so a re-run into the folder (a resume) continues them rather
than starting new ones. Under DDP only rank 0 talks to a tracker. mlflow and wandb are pip extras, imported here
only when a tracker is configured: importing either one takes a second or more.
"""

import json
import logging
import math
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Literal

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from transferlab.core.console import global_rank
from transferlab.core.errors import UserError
from transferlab.core.fileio import lock, read_json, write_json_atomic
from transferlab.run.interrupt import INTERRUPTIONS
from transferlab.train.factories import build
from transferlab.train.metrics import METRICS, metric_key

log = logging.getLogger(__name__)
STATE_FILE = "trackers.json"  # <run>/trackers.json: {"mlflow": {...run ids}, "wandb": {...}}
RESULT_FILES = ("results.md", "results.json", "manifest.json")  # the parent MLflow run's artifacts
# MLflow's limits (mlflow.utils.validation): key length, param value length, params per log_batch call
MAX_KEY, MAX_PARAM_VALUE, PARAMS_PER_BATCH = 250, 6000, 100
WandbMode = Literal["offline", "online", "disabled"]  # logger.wandb.mode (config.validation checks it)


# -- what the pipeline calls ----------------------------------------------------------------------------
def stage_loggers(cfg: DictConfig, stage: str, stage_dir: Path) -> list:
    """The stage's Lightning loggers, one for each entry in `cfg.logger`. A plain logger (CSV, TensorBoard) writes into
    the stage folder. A tracker's logger reports into the tracker's run for this stage, and exists on rank 0 only."""
    loggers = []
    for node in cfg.logger.values():
        if str(node.get("_target_")) not in TRACKERS:
            loggers.append(build(node, save_dir=str(stage_dir)))
        elif global_rank() == 0:
            loggers.append(build(node).stage_logger(cfg, stage, stage_dir))
    return loggers


def start(cfg: DictConfig, run_dir: Path) -> None:
    """Before the first stage: open the run's tracker runs (MLflow's parent run), or continue them on a re-run."""
    for tracker in _trackers(cfg):
        tracker.start(cfg, run_dir)


def finish(cfg: DictConfig, run_dir: Path, summary: dict) -> None:
    """After the results are written: hand each tracker the results and close its runs."""
    for tracker in _trackers(cfg):
        tracker.finish(cfg, run_dir, summary)


def fail(cfg: DictConfig, run_dir: Path, err: BaseException) -> None:
    """A stage failed or was interrupted: mark the open tracker runs failed or killed. A tracker's own error here is
    only a warning, so that the run reports the stage's failure and not this one."""
    for tracker in _trackers(cfg):
        try:
            tracker.fail(run_dir, err)
        except Exception as caught:  # e.g. the tracking server is unreachable too
            log.warning("Could not mark the %s runs as failed: %s", type(tracker).__name__, caught)


def _trackers(cfg: DictConfig) -> list:
    if global_rank() != 0:
        return []
    return [build(node) for node in (cfg.get("logger") or {}).values() if str(node.get("_target_")) in TRACKERS]


# -- what a tracker is told about the run ---------------------------------------------------------------
def run_context(cfg: DictConfig, run_dir: Path) -> dict:
    """The run's name, its seed, and its overrides without the seed, so that trackers can group a sweep's seeds. In a
    multirun (-m) it also has the sweep folder and the job number."""
    overrides: list[str] = []
    sweep, job = None, None
    if HydraConfig.initialized():
        hydra = HydraConfig.get()
        overrides = list(hydra.overrides.task)
        if hydra.mode == RunMode.MULTIRUN:
            sweep, job = str(hydra.sweep.dir), hydra.job.num
    grouped = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "seed"]
    return {
        "name": f"{Path(sweep).name}/{run_dir.name}" if sweep else run_dir.name,
        "seed": cfg.seed,
        "overrides": " ".join(grouped),
        "run_dir": str(run_dir),
        "sweep": sweep,
        "job": job,
    }


def load_state(run_dir: Path) -> dict:
    return read_json(run_dir / STATE_FILE) or {}


def _save_state(run_dir: Path, tracker: str, value: dict) -> None:
    state = load_state(run_dir)
    state[tracker] = value
    write_json_atomic(run_dir / STATE_FILE, state)


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """The composed config as MLflow params: `a.b.c` keys, strings as they are, other values as JSON (`true`, `null`,
    `[1, 2]`); keys limited to the characters and length MLflow accepts, values to its length."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), sub)
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            flat[re.sub(r"[^\w./\- :]", "_", prefix)[:MAX_KEY]] = text[:MAX_PARAM_VALUE]

    walk("", OmegaConf.to_container(cfg, resolve=True))
    return flat


def _stage_metrics(record: dict) -> dict[str, float]:
    return {metric_key("test", m): record["test"][m] for m in METRICS if m in (record.get("test") or {})}


def _reused(summary: dict, tracked: dict) -> dict[str, dict]:
    """The done stages that no tracker run reported: reused from the stage cache or given as a checkpoint."""
    return {n: r for n, r in summary["stages"].items() if r.get("status") == "done" and n not in tracked}


def _quiet_libraries() -> None:
    """MLflow's store set-up logs every schema migration (alembic) at INFO, which would reach the console."""
    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)


# -- MLflow ---------------------------------------------------------------------------------------------
class MLflowTracker:
    """`logger=mlflow` (conf/logger/mlflow.yaml). With no `tracking_uri`, the local store `store` is used: SQLite
    (`mlflow.db`) and an `artifacts/` folder. MLflow 3 refuses its old file store unless told otherwise, and the
    SQLite store is the one its UI and server open as they are."""

    def __init__(self, tracking_uri: str | None = None, store: str = "outputs/mlflow", experiment_name=None):
        self.store = Path(store).expanduser().resolve()
        self.local = not tracking_uri
        self.uri = tracking_uri or f"sqlite:///{self.store / 'mlflow.db'}"
        self.experiment_name = experiment_name

    def client(self):
        _quiet_libraries()
        from mlflow.tracking import MlflowClient  # here: only a run that uses MLflow imports it

        if self.local and not (self.store / "mlflow.db").is_file():
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            self.store.mkdir(parents=True, exist_ok=True)
            with lock(self.store / ".create.lock"):  # parallel jobs: one creates the database's tables
                # with the store's artifacts/ as the artifact root (MLflow's default: ./mlruns, wherever it runs)
                SqlAlchemyStore(self.uri, (self.store / "artifacts").as_uri())
        return MlflowClient(self.uri)

    def start(self, cfg: DictConfig, run_dir: Path) -> None:
        """Create the parent run, or continue the one in trackers.json; log the config as its params."""
        from mlflow.exceptions import MlflowException

        context = run_context(cfg, run_dir)
        if not self.local:
            _check_server(self.uri)
        try:
            client = self.client()
            state = load_state(run_dir).get("mlflow") or {}
            run = _mlflow_run(client, state.get("run_id")) if state.get("tracking_uri") == self.uri else None
            if run is None:
                experiment_id = self._experiment(client, context)
                tags = {**_mlflow_tags(context), "mlflow.runName": context["name"]}
                run = client.create_run(experiment_id, tags=_resolve_tags(tags))
                state = {"tracking_uri": self.uri, "experiment_id": experiment_id, "run_id": run.info.run_id}
                state["stages"] = {}
                _save_state(run_dir, "mlflow", state)
                log.info("MLflow: run %s in experiment %s (%s)", run.info.run_id, experiment_id, self.uri)
            else:
                client.update_run(run.info.run_id, status="RUNNING")
                log.info("MLflow: continuing run %s (%s)", run.info.run_id, self.uri)
            self._log_params(client, run, cfg)
        except (MlflowException, OSError) as err:
            raise UserError(
                f"MLflow could not start this run's tracking at {self.uri} ({type(err).__name__}: {err}). Check "
                "logger.mlflow.tracking_uri (a server must be running there), or leave it null for the local store "
                "under logger.mlflow.store."
            ) from None

    def _experiment(self, client, context: dict) -> str:
        """The experiment `experiment_name`; by default `transferlab`, or the sweep folder's name in a multirun."""
        name = self.experiment_name or (Path(context["sweep"]).name if context["sweep"] else "transferlab")
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                client.restore_experiment(experiment.experiment_id)
            return experiment.experiment_id
        location = (self.store / "artifacts").as_uri() if self.local else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except Exception:  # created meanwhile by a parallel job
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _log_params(self, client, run, cfg: DictConfig) -> None:
        """The composed config, in batches of MLflow's size. MLflow params cannot change: on a re-run the keys the
        first attempt logged keep its values (each attempt's config is in .hydra/attempts/)."""
        from mlflow.entities import Param

        logged = run.data.params
        params = flat_params(cfg)
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
        if changed:
            log.info("MLflow: params keep the first attempt's values for %s", ", ".join(changed))
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), PARAMS_PER_BATCH):
            client.log_batch(run.info.run_id, params=new[i : i + PARAMS_PER_BATCH])

    def stage_logger(self, cfg: DictConfig, stage: str, stage_dir: Path):
        """Lightning's MLFlowLogger, logging into the stage's nested run (created, or continued on a resume)."""
        from lightning.pytorch.loggers import MLFlowLogger

        run_dir = stage_dir.parent
        state = load_state(run_dir).get("mlflow") or {}
        if state.get("tracking_uri") != self.uri:  # the pipeline starts the parent first; a caller might not
            self.start(cfg, run_dir)
            state = load_state(run_dir)["mlflow"]
        client = self.client()
        child = _mlflow_run(client, state["stages"].get(stage))
        if child is None:
            tags = {**_mlflow_tags(run_context(cfg, run_dir)), "stage": stage}
            tags |= {"mlflow.parentRunId": state["run_id"], "mlflow.runName": stage}
            child = client.create_run(state["experiment_id"], tags=_resolve_tags(tags))
            state["stages"][stage] = child.info.run_id
            _save_state(run_dir, "mlflow", state)
        else:
            client.update_run(child.info.run_id, status="RUNNING")
        return MLFlowLogger(tracking_uri=self.uri, run_id=child.info.run_id)

    def finish(self, cfg: DictConfig, run_dir: Path, summary: dict) -> None:
        """The parent's metrics (each stage's test metrics, the gain), its artifacts, and a nested run for each stage
        that was reused rather than trained here."""
        from mlflow.entities import Metric

        state = load_state(run_dir)["mlflow"]
        client, parent = self.client(), state["run_id"]
        now = int(time.time() * 1000)
        for name, record in _reused(summary, state["stages"]).items():
            tags = {**_mlflow_tags(run_context(cfg, run_dir)), "stage": name, "mlflow.parentRunId": parent}
            tags |= {"mlflow.runName": name, "reused": record.get("cached_from") or record.get("best_ckpt") or ""}
            child = client.create_run(state["experiment_id"], tags=_resolve_tags(tags))
            metrics = [Metric(k, v, now, 0) for k, v in _stage_metrics(record).items()]
            client.log_batch(child.info.run_id, metrics=metrics)
            client.set_terminated(child.info.run_id, "FINISHED")
            state["stages"][name] = child.info.run_id
        _save_state(run_dir, "mlflow", state)
        metrics = [Metric(k, float(v), now, 0) for k, v in summary["metrics"].items() if not math.isnan(v)]
        client.log_batch(parent, metrics=metrics)
        for name in RESULT_FILES:
            if (run_dir / name).is_file():
                client.log_artifact(parent, str(run_dir / name))
        if (run_dir / ".hydra" / "config.yaml").is_file():
            client.log_artifact(parent, str(run_dir / ".hydra" / "config.yaml"), "hydra")
        client.set_terminated(parent, "FINISHED")
        ui = f"mlflow server --backend-store-uri {self.uri}" if self.local else self.uri
        log.info("MLflow: run %s finished; to see it: %s", parent, ui)

    def fail(self, run_dir: Path, err: BaseException) -> None:
        state = load_state(run_dir).get("mlflow")
        if not state or state.get("tracking_uri") != self.uri:
            return
        client = self.client()
        status = "KILLED" if isinstance(err, INTERRUPTIONS) else "FAILED"
        for run_id in [state["run_id"], *state["stages"].values()]:
            run = _mlflow_run(client, run_id)
            if run is not None and (run_id == state["run_id"] or run.info.status in ("RUNNING", "FAILED")):
                client.set_terminated(run_id, status)


def _check_server(uri: str) -> None:
    """An http(s) tracking URI must answer now: MLflow's client would retry an unreachable server for minutes."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10).close()
    except urllib.error.HTTPError:  # it answered
        return
    except (urllib.error.URLError, OSError) as err:
        raise UserError(
            f"logger.mlflow.tracking_uri={uri}: no MLflow server answers there ({getattr(err, 'reason', err)}). "
            "Start it (mlflow server --host ... --port ...), fix the address, or set logger.mlflow.tracking_uri=null "
            "for the local store under logger.mlflow.store."
        ) from None


def _mlflow_run(client, run_id: str | None):
    """The run `run_id` if the store still has it (not deleted), else None."""
    if not run_id:
        return None
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    return run if run.info.lifecycle_stage != "deleted" else None


def _mlflow_tags(context: dict) -> dict[str, str]:
    tags = {"seed": str(context["seed"]), "overrides": context["overrides"], "run_dir": context["run_dir"]}
    if context["sweep"]:
        tags |= {"sweep": context["sweep"], "job": str(context["job"])}
    return tags


def _resolve_tags(tags: dict) -> dict:
    """MLflow's own context tags (user, source, git commit) under ours, as its fluent API adds them."""
    from mlflow.tracking.context.registry import resolve_tags

    return resolve_tags(tags)


# -- Weights & Biases -----------------------------------------------------------------------------------
class WandbTracker:
    """`logger=wandb` (conf/logger/wandb.yaml): one W&B run per stage, under `<run>/<stage>/wandb/`. The runs are in
    the group `group` (by default the run folder's name; `<sweep>/<job>` in a multirun), with the stage as job_type.
    `mode=offline` (the default) writes files only, and needs no account."""

    def __init__(self, mode: WandbMode = "offline", project: str = "transferlab", entity=None, group=None, tags=()):
        self.mode, self.project, self.entity, self.group, self.tags = mode, project, entity, group, list(tags or [])

    def start(self, cfg: DictConfig, run_dir: Path) -> None:
        """Nothing to open before the first stage: each stage's W&B run starts with its Trainer."""

    def _init(self, cfg: DictConfig, run_dir: Path, stage: str, stage_dir: Path) -> Any:
        """Start the stage's W&B run (or continue it: its id is in trackers.json); the previous stage's is finished."""
        import wandb

        context = run_context(cfg, run_dir)
        state = load_state(run_dir).get("wandb") or {"stages": {}}
        run_id = state["stages"].get(stage)
        stage_dir.mkdir(parents=True, exist_ok=True)
        group = self.group or context["name"]
        config: dict = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        config["transferlab"] = {**context, "stage": stage}
        run = wandb.init(
            mode=self.mode,
            project=self.project,
            entity=self.entity,
            group=group,
            job_type=stage,
            name=f"{group}/{stage}",
            id=run_id,
            resume="allow" if run_id else None,
            dir=str(stage_dir),
            config=config,
            tags=[*self.tags, f"seed={context['seed']}"],
            reinit="finish_previous",
            settings=wandb.Settings(silent=True, console="off"),  # the console stays the run's: W&B says nothing
        )
        state["stages"][stage] = run.id
        _save_state(run_dir, "wandb", state)
        return run

    def stage_logger(self, cfg: DictConfig, stage: str, stage_dir: Path):
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(experiment=self._init(cfg, stage_dir.parent, stage, stage_dir), save_dir=str(stage_dir))

    def finish(self, cfg: DictConfig, run_dir: Path, summary: dict) -> None:
        """Close the last stage's run; give each reused stage a run holding its test metrics."""
        import wandb

        tracked = (load_state(run_dir).get("wandb") or {}).get("stages", {})
        for name, record in _reused(summary, tracked).items():
            run = self._init(cfg, run_dir, name, run_dir / name)
            run.log(_stage_metrics(record))
            run.summary["reused"] = record.get("cached_from") or record.get("best_ckpt") or ""
        if wandb.run is not None:
            wandb.run.finish()
        if self.mode == "offline":
            runs = f"{run_dir}/*/wandb/offline-run-*"
            log.info("W&B: offline runs in %s; to upload them: wandb sync %s", runs, runs)

    def fail(self, run_dir: Path, err: BaseException) -> None:
        import wandb

        if wandb.run is not None:
            wandb.run.finish(exit_code=getattr(err, "exit_code", 1))


# The trackers by their `_target_` in conf/logger/<name>.yaml; every other logger entry is a plain Lightning logger.
TRACKERS = {f"{__name__}.{cls.__name__}": cls for cls in (MLflowTracker, WandbTracker)}
