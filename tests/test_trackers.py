"""The experiment trackers (logger=mlflow, logger=wandb; docs/trackers.md): real runs reported to MLflow's local store
and to W&B's offline files, read back with MLflow's own client, the MLflow server's REST API and W&B's transaction
log; a sweep, a resume and DDP; the logger group's combinations; a missing extra refused before anything is
written."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.cli import assert_user_error, run_cli
from helpers.config import ONLY_SOURCE, REPO, TESTS, TINY, compose_config
from helpers.installs import declared_only_python
from helpers.run_folder import stages
from helpers.trackers import mlflow_client, mlflow_runs, mlflow_server, parents_and_children, rest, wandb_run
from omegaconf import OmegaConf

from transferlab.config.validation import validate
from transferlab.core.errors import UserError
from transferlab.run.pipeline import run

BASE = [o for o in TINY if not o.startswith("logger=")]
MLFLOW = [*BASE, "logger=[csv,mlflow]"]
TWO_STAGES = ["~stages.finetune", "~stages.scratch", "objective=pretrain/test/acc"]  # source and pretrain
EPOCHS = {"source": 2, "pretrain": 2, "finetune": 2, "scratch": 4}  # TINY's


def csv_column(run_dir: Path, stage: str, key: str, version: int = 0) -> list[float]:
    """The per-epoch values of `key` that the CSV logger wrote for the stage (the reference the trackers match)."""
    with open(run_dir / stage / "csv" / f"version_{version}" / "metrics.csv") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def history(client, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory):
    """One four-stage run with logger=[csv,mlflow], in this process: (run folder, config, results, local store)."""
    run_dir = tmp_path_factory.mktemp("mlflow") / "run"
    cfg = compose_config(run_dir, MLFLOW)
    return run_dir, cfg, run(cfg), run_dir.parent / "mlflow"


# -- the logger group ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "choice, loggers",
    [
        (None, ["csv", "tensorboard"]),  # the default, unchanged
        ("logger=tensorboard", ["tensorboard"]),
        ("logger=mlflow", ["mlflow"]),
        ("logger=[csv,mlflow]", ["csv", "mlflow"]),
        ("logger=[default,wandb]", ["csv", "tensorboard", "wandb"]),
        ("logger=[tensorboard,mlflow,wandb]", ["tensorboard", "mlflow", "wandb"]),
    ],
)
def test_logger_choices_compose_as_a_list(tmp_path, choice, loggers):
    cfg = compose_config(tmp_path / "run", [choice] if choice else [])
    assert list(cfg.logger) == loggers
    if "mlflow" in loggers:  # the local store under the outputs folder, no server
        assert cfg.logger.mlflow.tracking_uri is None and cfg.logger.mlflow.store == f"{tmp_path}/mlflow"
    if "wandb" in loggers:
        assert cfg.logger.wandb.mode == os.environ.get("WANDB_MODE", "offline")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("logger.wandb.mode=cloud", "logger.wandb.mode='cloud' is unknown; available: offline, online, disabled"),
        ("logger.mlflow.tracking_uri=5", "logger.mlflow.tracking_uri must be a string or null, got 5"),
    ],
)
def test_tracker_options_are_checked(tmp_path, override, fragment):
    cfg = compose_config(tmp_path / "run", [*BASE, "logger=[mlflow,wandb]", override])
    with pytest.raises(UserError, match=fragment.replace("[", r"\[")):
        validate(cfg)


# -- MLflow -------------------------------------------------------------------------------------------------
def test_mlflow_one_parent_run_with_a_nested_run_per_stage(mlflow_run):
    run_dir, cfg, _, store = mlflow_run
    runs = mlflow_runs(store, "transferlab")
    [parent], children = parents_and_children(runs)
    assert list(children) == [parent.info.run_id] and len(runs) == 5
    assert sorted(children[parent.info.run_id]) == sorted(EPOCHS)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert parent.info.run_name == run_dir.name and parent.data.tags["seed"] == "0"
    state = json.loads((run_dir / "trackers.json").read_text())["mlflow"]  # what a re-run continues
    assert state["run_id"] == parent.info.run_id
    assert state["stages"] == {name: r.info.run_id for name, r in children[parent.info.run_id].items()}
    assert not (REPO / "mlruns").exists() and not (Path.cwd() / "mlruns").exists()  # nothing in the working folder
    default = mlflow_client(store).get_experiment("0")  # even MLflow's default experiment keeps to the store
    assert default.artifact_location == (store / "artifacts").as_uri() + "/0"


def test_mlflow_params_are_the_composed_config(mlflow_run):
    _, cfg, _, store = mlflow_run
    [parent], _ = parents_and_children(mlflow_runs(store, "transferlab"))

    def flat(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value if isinstance(value, str) else json.dumps(value)

    composed = dict(flat(OmegaConf.to_container(cfg, resolve=True)))
    assert len(composed) > 100  # more than one batch of MLflow's 100 params
    assert parent.data.params == composed
    assert parent.data.params["stages.finetune.optimizer.lr"] == "0.001"
    assert parent.data.params["logger.mlflow._target_"] == "transferlab.run.trackers.MLflowTracker"


def test_mlflow_nested_runs_hold_each_epochs_metrics_and_the_stage_test(mlflow_run):
    """Per stage, val/acc of every epoch as the CSV logger has it, train/loss per epoch, and the test metrics of the
    manifest."""
    run_dir, _, _, store = mlflow_run
    client = mlflow_client(store)
    [parent], children = parents_and_children(mlflow_runs(store, "transferlab"))
    records = stages(run_dir)
    for name, child in children[parent.info.run_id].items():
        assert child.data.tags["stage"] == name
        assert history(client, child.info.run_id, "val/acc") == pytest.approx(csv_column(run_dir, name, "val/acc"))
        assert len(history(client, child.info.run_id, "val/acc")) == EPOCHS[name]
        assert len(history(client, child.info.run_id, "train/loss")) == EPOCHS[name]
        for metric, value in records[name]["test"].items():
            assert child.data.metrics[f"test/{metric}"] == pytest.approx(value), (name, metric)


def test_mlflow_parent_holds_the_results_and_the_manifest(mlflow_run, tmp_path):
    run_dir, _, summary, store = mlflow_run
    client = mlflow_client(store)
    [parent], _ = parents_and_children(mlflow_runs(store, "transferlab"))
    results = json.loads((run_dir / "results.json").read_text())
    assert "gain/acc" in results and parent.data.metrics == pytest.approx(results)
    assert parent.data.metrics["gain/acc"] == pytest.approx(summary["metrics"]["gain/acc"])
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.md", "results.json", "manifest.json"} <= names  # and .hydra/config.yaml under a CLI run (below)
    for name in ("results.md", "results.json", "manifest.json"):
        copy = client.download_artifacts(parent.info.run_id, name, str(tmp_path))
        assert Path(copy).read_bytes() == (run_dir / name).read_bytes(), name
    assert Path(parent.info.artifact_uri.removeprefix("file://")).is_relative_to(store / "artifacts")


@pytest.mark.slow
def test_the_mlflow_server_lists_the_runs_of_the_local_store(mlflow_run):
    """`mlflow server` on the store a run wrote, as docs/trackers.md opens it: its REST API lists the same runs."""
    _, _, _, store = mlflow_run
    [parent], children = parents_and_children(mlflow_runs(store, "transferlab"))
    with mlflow_server(store) as address:
        experiment = rest(address, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=transferlab")
        found = rest(
            address,
            "/api/2.0/mlflow/runs/search",
            {"experiment_ids": [experiment["experiment"]["experiment_id"]], "max_results": 100},
        )["runs"]
        listed = rest(address, f"/api/2.0/mlflow/artifacts/list?run_id={parent.info.run_id}")
    by_id = {r["info"]["run_id"]: r for r in found}
    assert set(by_id) == {parent.info.run_id, *(c.info.run_id for c in children[parent.info.run_id].values())}
    tags = {t["key"]: t["value"] for t in by_id[parent.info.run_id]["data"]["tags"]}
    assert tags["seed"] == "0" and "mlflow.parentRunId" not in tags
    assert {"results.md", "results.json", "manifest.json"} <= {f["path"] for f in listed["files"]}


@pytest.mark.slow
def test_a_multirun_is_one_experiment_whose_runs_are_tagged_by_seed(tmp_path):
    """`-m seed=0,1`: one MLflow experiment named after the sweep folder, one parent run per job, tagged with its seed
    and with the same overrides-without-the-seed, so that the seeds group."""
    sweep = tmp_path / "lr_study"
    run_cli("transferlab", "-m", *MLFLOW, *ONLY_SOURCE, "seed=0,1", f"hydra.sweep.dir={sweep}")
    store = tmp_path / "outputs" / "mlflow"  # TRANSFERLAB_OUTPUT_ROOT
    runs = mlflow_runs(store, "lr_study")
    parents, children = parents_and_children(runs)
    assert sorted(p.data.tags["seed"] for p in parents) == ["0", "1"] and len(runs) == 4
    assert len({p.data.tags["overrides"] for p in parents}) == 1
    overrides = parents[0].data.tags["overrides"].split()
    assert "logger=[csv,mlflow]" in overrides and not [o for o in overrides if o.startswith("seed=")]
    for p in parents:
        assert p.data.tags["sweep"] == str(sweep) and p.info.run_name == f"lr_study/{p.data.tags['job']}"
        assert list(children[p.info.run_id]) == ["source"]
        assert p.data.params["seed"] == p.data.tags["seed"]
        job = sweep / p.data.tags["job"]
        assert p.data.metrics == pytest.approx(json.loads((job / "results.json").read_text()))
        copy = mlflow_client(store).download_artifacts(p.info.run_id, "hydra/config.yaml", str(tmp_path))
        assert Path(copy).read_bytes() == (job / ".hydra" / "config.yaml").read_bytes()
    assert mlflow_client(store).get_experiment_by_name("transferlab") is None  # no stray runs elsewhere


@pytest.mark.slow
def test_a_resumed_run_continues_its_mlflow_runs(tmp_path):
    """A run that crashed in pretrain, re-run into its folder: the same parent run (failed, then finished), the
    same nested run for pretrain, holding the epoch of each attempt; no second parent."""
    run_dir = tmp_path / "run"
    crash = [
        "+callbacks.crash._target_=helpers.callbacks.CrashAtEpoch",
        "+callbacks.crash.stage=pretrain",
        "+callbacks.crash.epoch=1",
    ]
    with pytest.raises(RuntimeError, match="simulated kill of pretrain"):
        run(compose_config(run_dir, [*MLFLOW, *TWO_STAGES, *crash]))
    store = tmp_path / "mlflow"
    [parent], children = parents_and_children(mlflow_runs(store, "transferlab"))
    first = {name: r.info.run_id for name, r in children[parent.info.run_id].items()}
    assert parent.info.status == "FAILED" and children[parent.info.run_id]["pretrain"].info.status == "FAILED"
    assert children[parent.info.run_id]["source"].info.status == "FINISHED"

    run(compose_config(run_dir, [*MLFLOW, *TWO_STAGES]))
    runs = mlflow_runs(store, "transferlab")
    [again], children = parents_and_children(runs)
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED" and len(runs) == 3
    assert {name: r.info.run_id for name, r in children[parent.info.run_id].items()} == first
    pretrain = children[parent.info.run_id]["pretrain"]
    assert pretrain.info.status == "FINISHED"
    both = csv_column(run_dir, "pretrain", "val/acc", 0) + csv_column(run_dir, "pretrain", "val/acc", 1)
    assert len(both) == 2 and history(mlflow_client(store), pretrain.info.run_id, "val/acc") == pytest.approx(both)
    assert again.data.metrics == pytest.approx(json.loads((run_dir / "results.json").read_text()))


@pytest.mark.slow
def test_under_ddp_only_rank_zero_reports_to_mlflow(tmp_path):
    """trainer=ddp_cpu (2 processes): one parent and one nested run, each epoch's metrics once; rank 1 never even
    imports mlflow."""
    run_dir = tmp_path / "run"
    record = ["+callbacks.imported._target_=helpers.callbacks.RecordImported", "+callbacks.imported.modules=mlflow"]
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    run_cli("transferlab", *MLFLOW, *ONLY_SOURCE, "trainer=ddp_cpu", *record, f"hydra.run.dir={run_dir}", env=env)
    imported = [json.loads((run_dir / "source" / f"imported_rank{r}.json").read_text()) for r in (0, 1)]
    assert imported == [["mlflow"], []]
    store = tmp_path / "outputs" / "mlflow"
    runs = mlflow_runs(store, "transferlab")
    [parent], children = parents_and_children(runs)
    assert len(runs) == 2 and list(children[parent.info.run_id]) == ["source"]
    source = children[parent.info.run_id]["source"]
    assert history(mlflow_client(store), source.info.run_id, "val/acc") == pytest.approx(
        csv_column(run_dir, "source", "val/acc")
    )
    assert len(history(mlflow_client(store), source.info.run_id, "val/acc")) == EPOCHS["source"]


# -- W&B ----------------------------------------------------------------------------------------------------
@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    """W&B's own folders (settings, cache, data) under the test's folder; its mode as the config sets it."""
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)


def test_wandb_offline_runs_hold_each_stages_metrics(tmp_path, wandb_home):
    """logger=[csv,wandb], no account: one offline W&B run per stage under <run>/<stage>/wandb/, grouped by the run
    folder, job_type the stage, with each epoch's val/acc (as the CSV logger has it) and the stage's test metrics."""
    run_dir = tmp_path / "run"
    run(compose_config(run_dir, [*BASE, "logger=[csv,wandb]", *TWO_STAGES]))
    records, ids = stages(run_dir), json.loads((run_dir / "trackers.json").read_text())["wandb"]["stages"]
    for name in ("source", "pretrain"):
        found = wandb_run(run_dir / name)
        assert (found["group"], found["job_type"], found["project"]) == (run_dir.name, name, "transferlab")
        assert found["id"] == ids[name] and found["name"] == f"{run_dir.name}/{name}"
        val = [row["val/acc"] for row in found["history"] if "val/acc" in row]
        assert val == pytest.approx(csv_column(run_dir, name, "val/acc")) and len(val) == EPOCHS[name]
        [test] = [row for row in found["history"] if "test/acc" in row]
        assert test["test/acc"] == pytest.approx(records[name]["test"]["acc"])
    assert not (REPO / "wandb").exists() and not (tmp_path / "wandb_config_dir" / "settings").exists()


# -- start-up and the extras ----------------------------------------------------------------------------------
def test_a_run_without_trackers_imports_neither_mlflow_nor_wandb(tmp_path):
    """mlflow and wandb are imported only by a run that uses them (each costs a second or more), though installed."""
    program = (
        "import sys; from pathlib import Path\n"
        "from helpers.config import ONLY_SOURCE, TINY, compose_config\n"
        "from transferlab.run.pipeline import run\n"
        f"run(compose_config(Path({str(tmp_path / 'run')!r}), [*TINY, *ONLY_SOURCE]))\n"
        "print(sorted(m for m in ('mlflow', 'wandb') if m in sys.modules))\n"
    )
    assert all(subprocess.run([sys.executable, "-c", f"import {m}"]).returncode == 0 for m in ("mlflow", "wandb"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(TESTS)])}
    proc = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[-2] == "[]"


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """An install of transferlab without extras (no mlflow, no wandb), running this checkout's code."""
    return declared_only_python(tmp_path_factory.mktemp("bare") / "venv")


def bare_env(tmp_path: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "TRANSFERLAB_OUTPUT_ROOT": str(tmp_path / "outputs")}


@pytest.mark.parametrize(
    "args, extra",
    [
        (["logger=mlflow"], "mlflow"),
        (["logger=[csv,wandb]"], "wandb"),
        (["logger=[default, mlflow]"], "mlflow"),
        (["-m", "logger=csv,mlflow"], "mlflow"),  # a sweep over loggers
    ],
)
def test_a_tracker_without_its_extra_says_what_to_install_and_writes_nothing(bare_python, tmp_path, args, extra):
    target = [f"hydra.sweep.dir={tmp_path / 'sweep'}"] if "-m" in args else [f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(
        [str(bare_python), "-m", "transferlab.commands.main", *args, *target],
        env=bare_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    message = assert_user_error(proc, f"pip install 'transferlab[{extra}]'", f"needs the {extra} extra")
    assert message.startswith("logger=")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_config_file_that_selects_a_tracker_without_its_extra_is_refused(bare_python, tmp_path):
    """The logger chosen by a config file (here an experiment in --config-dir), not on the command line: config
    validation refuses it before the run writes or trains anything."""
    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "tracked.yaml").write_text("# @package _global_\ndefaults:\n  - override /logger: mlflow\n")
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [str(bare_python), "-m", "transferlab.commands.main", "--config-dir", str(tmp_path / "conf")]
        + ["experiment=tracked", f"hydra.run.dir={run_dir}"],
        env=bare_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert_user_error(proc, "logger.mlflow (transferlab.run.trackers.MLflowTracker) needs the mlflow extra")
    # Hydra's files and the run lock, as for any refused value: no attempt recorded, no stage, no store
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", ".transferlab.lock", "transferlab.log"]
    assert not (run_dir / ".hydra" / "attempts").exists()
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_an_install_with_the_tracker_extras_alone_runs_both_without_scipy(tmp_path, wandb_home):
    """`pip install 'transferlab[mlflow,wandb]'` is enough for logger=[mlflow,wandb] (the SQLite store included),
    and brings no scipy: torchmetrics would import it at every run's start-up."""
    python = declared_only_python(tmp_path / "venv", extras=("mlflow", "wandb"))
    program = "import importlib.util as u; print(u.find_spec('scipy') is None, u.find_spec('mlflow') is not None)"
    assert subprocess.run([str(python), "-c", program], capture_output=True, text=True).stdout.split() == [
        "True",
        "True",
    ]
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [str(python), "-m", "transferlab.commands.main", *BASE, *ONLY_SOURCE, "logger=[mlflow,wandb]"]
        + [f"hydra.run.dir={run_dir}"],
        env=bare_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [parent], children = parents_and_children(mlflow_runs(tmp_path / "outputs" / "mlflow", "transferlab"))
    assert list(children[parent.info.run_id]) == ["source"]
    assert wandb_run(run_dir / "source")["job_type"] == "source"
