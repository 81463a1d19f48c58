"""hydra/launcher=slurm against a real single-node SLURM cluster (scripts/slurm_cluster.sh, started by the
`slurm` fixture): a multirun through the submitit launcher, a 2-task DDP job, a requeued job that resumes.

These tests never skip: without a working cluster (the script installs the Debian packages when it is root)
they fail and say why. Every wait is bounded; jobs a test submitted are cancelled when it ends."""

import csv
import json
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.config import ONE_EPOCH, ONE_EPOCH_DEFAULTS, REPO, TINY
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from transferlab import CONF_DIR
from transferlab.core.errors import UserError
from transferlab.run.slurm import check_slurm_tasks

SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
SLURM = ["-m", "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=20"]
LAUNCH_TIMEOUT_S = 420  # the launcher waits for its jobs; a hung wait fails the test instead of blocking CI


@pytest.fixture(scope="session")
def slurm_env():
    """Start the test cluster (or use the one already running) and put its SLURM_CONF and sacct on PATH."""
    was_up = subprocess.run([str(SCRIPT), "status"], capture_output=True).returncode == 0
    start = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=600)
    if start.returncode != 0:
        pytest.fail(f"could not start the SLURM test cluster:\n{start.stdout}\n{start.stderr}")
    exports = dict(re.findall(r"^export (\w+)=(.*)$", start.stdout, re.M))
    saved = {k: os.environ.get(k) for k in exports}
    for key, value in exports.items():
        os.environ[key] = value.replace("$PATH", os.environ.get("PATH", ""))
    yield exports
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if not was_up:
        subprocess.run([str(SCRIPT), "stop"], capture_output=True, timeout=120)


@pytest.fixture
def sweep_dir(slurm_env, tmp_path):
    """The sweep folder of one test; the jobs it submitted are cancelled at the end (scancel on no job is fine)."""
    sweep = tmp_path / "sweep"
    yield sweep
    ids = {p.name.split("_")[0] for p in (sweep / ".submitit").glob("*") if p.is_dir() and p.name[0].isdigit()}
    if ids:
        subprocess.run(["scancel", *sorted(ids)], capture_output=True, timeout=60)


def launch(*args: str, extra_pythonpath: str = "") -> subprocess.Popen:
    """`transferlab <args>` as a user runs it (same interpreter), in the background."""
    env = dict(os.environ)
    if extra_pythonpath:
        env["PYTHONPATH"] = f"{extra_pythonpath}:{env.get('PYTHONPATH', '')}"
    script = Path(sys.executable).parent / "transferlab"
    return subprocess.Popen(
        [str(script), *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen, sweep: Path, timeout: float = LAUNCH_TIMEOUT_S) -> tuple[int, str, str]:
    """Wait for the launcher; on a timeout kill it and fail with the jobs' states and log tails."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the launcher did not return in {timeout} s\n{job_states()}\n{log_tails(sweep)}\n{err[-3000:]}")
    return proc.returncode, out, err


def job_states() -> str:
    return subprocess.run(["squeue", "-a", "-o", "%i %j %T %r"], capture_output=True, text=True).stdout


def job_info(job_id: str) -> str:
    return subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout


def log_tails(sweep: Path) -> str:
    tails = []
    for log in sorted((sweep / ".submitit").glob("*/*_log.*")):
        tails.append(f"--- {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
    return "\n".join(tails)


def submitit_results(sweep: Path) -> dict[str, tuple]:
    """{"<job id>_<task>": (outcome, value)} from the result pickles submitit wrote for each task."""
    return {
        p.name.removesuffix("_result.pkl"): pickle.loads(p.read_bytes())
        for p in (sweep / ".submitit").glob("*/*_result.pkl")
    }


@pytest.mark.slurm
@pytest.mark.slow
def test_multirun_of_two_jobs_runs_both_on_slurm_and_returns_their_objectives(sweep_dir):
    """With the defaults as shipped (progress bar, precision=auto, TensorBoard, stage cache), as a user submits."""
    proc = launch(*SLURM, "seed=0,1", *ONE_EPOCH_DEFAULTS, "~stages.scratch", f"hydra.sweep.dir={sweep_dir}")
    rc, out, err = finish(proc, sweep_dir)
    assert rc == 0, f"{err[-3000:]}\n{log_tails(sweep_dir)}"
    assert "Submitit 'slurm' sweep output dir" in err + out
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0", "1"]
    results = submitit_results(sweep_dir)
    assert len(results) == 2 and all(outcome == "success" for outcome, _ in results.values()), results
    array_ids = {key.rsplit("_", 2)[0] for key in results}
    assert len(array_ids) == 1, results  # one SLURM array of two tasks
    returned = {ret.hydra_cfg.hydra.job.num: ret.return_value for _, ret in results.values()}
    for num, value in returned.items():
        job = sweep_dir / str(num)
        assert value == json.loads((job / "results.json").read_text())["finetune/test/acc"]
        manifest = json.loads((job / "manifest.json").read_text())
        assert [s["status"] for s in manifest["stages"].values()] == ["done"] * 3
        assert manifest["config"]["seed"] == num


@pytest.mark.slurm
@pytest.mark.slow
def test_two_task_job_runs_ddp_with_the_processes_slurm_started(sweep_dir):
    proc = launch(
        *SLURM,
        "trainer=ddp_cpu",
        *ONE_EPOCH,
        "~stages.scratch",
        f"hydra.sweep.dir={sweep_dir}",
        "+callbacks.record._target_=helpers.callbacks.RecordTestMetrics",
        extra_pythonpath=str(REPO / "tests"),
    )
    rc, out, err = finish(proc, sweep_dir)
    assert rc == 0, f"{err[-3000:]}\n{log_tails(sweep_dir)}"
    [folder] = [p for p in (sweep_dir / ".submitit").iterdir() if p.is_dir() and p.name[0].isdigit()]
    assert "#SBATCH --ntasks-per-node=2" in (folder / f"{folder.name}_submission.sh").read_text()
    for rank in (0, 1):  # srun started both tasks; Lightning used them as its two ranks
        task_log = (folder / f"{folder.name}_{rank}_log.err").read_text() + (
            folder / f"{folder.name}_{rank}_log.out"
        ).read_text()
        assert f"global_rank={rank}(2)" in task_log
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in task_log
    results = submitit_results(sweep_dir)
    assert sorted(results) == [f"{folder.name}_0", f"{folder.name}_1"]
    assert all(outcome == "success" for outcome, _ in results.values())
    job = sweep_dir / "0"
    assert not (job / "train_ddp_process_1.log").exists()  # nothing spawned by Lightning
    manifest = json.loads((job / "manifest.json").read_text())["stages"]
    assert list(manifest) == ["source", "pretrain", "finetune"]
    for name, stage in manifest.items():
        seen = [json.loads((job / name / f"test_metrics_rank{r}.json").read_text()) for r in (0, 1)]
        assert seen[0] == seen[1], name
        assert stage["test"]["acc"] == pytest.approx(seen[0]["acc"], abs=1e-6), name


@pytest.mark.slurm
@pytest.mark.slow
def test_two_node_job_runs_ddp_across_the_simulated_nodes(sweep_dir, monkeypatch):
    # the simulated nodes' names (sim1, sim2) don't resolve; Lightning takes MASTER_ADDR from the environment first
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    proc = launch(
        *SLURM,
        "hydra.launcher.partition=sim",
        "trainer=ddp_cpu",
        "trainer.devices=1",
        "trainer.num_nodes=2",
        *ONE_EPOCH,
        "~stages.scratch",
        "~stages.pretrain",
        "~stages.finetune",
        "objective=source/test/acc",
        f"hydra.sweep.dir={sweep_dir}",
    )
    rc, out, err = finish(proc, sweep_dir)
    assert rc == 0, f"{err[-3000:]}\n{log_tails(sweep_dir)}"
    [folder] = [p for p in (sweep_dir / ".submitit").iterdir() if p.is_dir() and p.name[0].isdigit()]
    script = (folder / f"{folder.name}_submission.sh").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script
    for rank in (0, 1):
        task_log = (folder / f"{folder.name}_{rank}_log.err").read_text() + (
            folder / f"{folder.name}_{rank}_log.out"
        ).read_text()
        assert f"node={rank}(2), global_rank={rank}(2)" in task_log
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in task_log
    assert job_info(folder.name).count("NodeList=sim[1-2]") == 1
    manifest = json.loads((sweep_dir / "0" / "manifest.json").read_text())["stages"]
    assert manifest["source"]["status"] == "done"


@pytest.mark.slurm
def test_tasks_that_do_not_match_the_devices_fail_before_training(sweep_dir):
    proc = launch(*SLURM, "hydra.launcher.tasks_per_node=2", *ONE_EPOCH, f"hydra.sweep.dir={sweep_dir}")
    rc, out, err = finish(proc, sweep_dir, timeout=240)
    assert rc != 0
    assert "2 task(s) per node but trainer.devices=1" in err, err[-3000:]
    assert not (sweep_dir / "0" / "source").exists()


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("interrupt", ["scontrol requeue", "time-limit signal"])
def test_job_requeued_mid_stage_resumes_from_its_last_checkpoint_and_completes(sweep_dir, interrupt):
    """`scontrol requeue` (as an admin or a preemption does: SIGTERM, then back in the queue), or the signal SLURM
    sends `signal_delay_s` before the time limit (SIGUSR2: submitit's handler requeues the job itself)."""
    overrides = [o for o in TINY if ".epochs=" not in o]
    proc = launch(
        *SLURM,
        "seed=0",
        *overrides,
        "stages.source.epochs=10",
        "stages.pretrain.epochs=1",
        "stages.finetune.epochs=1",
        "~stages.scratch",
        f"hydra.sweep.dir={sweep_dir}",
        "+callbacks.slow._target_=helpers.callbacks.SlowEpochs",
        "+callbacks.slow.seconds=1",
        extra_pythonpath=str(REPO / "tests"),
    )  # source: at least 10 s, so the requeue lands mid-stage
    job = sweep_dir / "0"
    last = job / "source" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert last.is_file(), f"no {last} yet\n{job_states()}\n{log_tails(sweep_dir)}"
    assert (  # mid-stage: the source stage is recorded as running (its config hash), not done
        json.loads((job / "manifest.json").read_text())["stages"]["source"]["status"] == "running"
    )
    [folder] = [p for p in (sweep_dir / ".submitit").iterdir() if p.is_dir() and p.name[0].isdigit()]
    command = (
        ["scontrol", "requeue", folder.name]
        if interrupt == "scontrol requeue"
        else ["scancel", "--signal=USR2", folder.name]
    )
    requeue = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert requeue.returncode == 0, requeue.stderr

    rc, out, err = finish(proc, sweep_dir)
    assert rc == 0, f"{err[-3000:]}\n{log_tails(sweep_dir)}"
    deadline = time.time() + 60  # the result is written before the job's process exits
    while "JobState=COMPLETED" not in (info := job_info(folder.name)) and time.time() < deadline:
        time.sleep(1)
    assert "Restarts=1" in info and "JobState=COMPLETED" in info, info
    manifest = json.loads((job / "manifest.json").read_text())["stages"]
    assert [s["status"] for s in manifest.values()] == ["done"] * 3
    assert manifest["source"]["epochs"] == 10
    log = (job / "transferlab.log").read_text()
    assert f"Stage source: resuming from {last}" in log
    versions = sorted(p.name for p in (job / "source" / "csv").iterdir())
    assert versions == ["version_0", "version_1"]  # the interrupted attempt and the resumed one
    epochs = [
        [
            int(row["epoch"])
            for row in csv.DictReader((job / "source" / "csv" / v / "metrics.csv").open())
            if row.get("train/loss")
        ]
        for v in versions
    ]  # the epochs each attempt trained
    assert min(epochs[1]) >= 1 and min(epochs[1]) <= max(epochs[0]) + 1  # picked up where it stopped
    assert max(epochs[1]) == 9
    if interrupt == "time-limit signal":
        assert f"Requeued job {folder.name}" in (folder / f"{folder.name}_0_log.out").read_text()  # submitit did
    [(outcome, ret)] = submitit_results(sweep_dir).values()
    assert outcome == "success" and ret.return_value == manifest["finetune"]["test"]["acc"]


@pytest.mark.slurm
@pytest.mark.slow
def test_a_job_killed_before_its_result_fails_the_sweep_instead_of_hanging(sweep_dir):
    """scancel mid-stage: no result file, so only the job's state (bin/sacct, from scontrol) ends the wait."""
    proc = launch(
        *SLURM,
        "seed=0",
        *ONE_EPOCH,
        "stages.source.epochs=10",
        "trainer.max_epochs_per_stage=null",
        f"hydra.sweep.dir={sweep_dir}",
        "+callbacks.slow._target_=helpers.callbacks.SlowEpochs",
        "+callbacks.slow.seconds=1",
        extra_pythonpath=str(REPO / "tests"),
    )
    last = sweep_dir / "0" / "source" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert last.is_file(), f"no {last} yet\n{job_states()}\n{log_tails(sweep_dir)}"
    [folder] = [p for p in (sweep_dir / ".submitit").iterdir() if p.is_dir() and p.name[0].isdigit()]
    subprocess.run(["scancel", folder.name], check=True, timeout=60)
    rc, out, err = finish(proc, sweep_dir, timeout=180)
    assert rc != 0
    assert "has not produced any output (state: CANCELLED" in err, err[-3000:]
    assert not list((sweep_dir / ".submitit").glob("*/*_result.pkl"))


@pytest.mark.parametrize(
    "overrides,tasks,nodes,cpus",
    [
        ([], 1, 1, 1),
        (["trainer=ddp_cpu"], 2, 1, 1),
        (["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2", "data=imagenet_cifar10"], 4, 2, 5),
    ],
)
def test_launcher_config_ties_tasks_and_nodes_to_the_trainer(tmp_path, overrides, tasks, nodes, cpus):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.nodes, launcher.cpus_per_task) == (tasks, nodes, cpus)
    assert launcher.gpus_per_node is None and launcher.partition is None and launcher.max_num_timeout == 3


def test_check_slurm_tasks_names_the_mismatch():
    trainer = OmegaConf.create({"devices": 2, "num_nodes": 1})
    check_slurm_tasks(trainer, environ={})  # not under SLURM: nothing to check
    check_slurm_tasks(trainer, environ={"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1"})
    check_slurm_tasks(trainer, environ={"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "interactive"})
    with pytest.raises(UserError, match=r"1 task\(s\) per node but trainer.devices=2"):
        check_slurm_tasks(trainer, environ={"SLURM_NTASKS": "1", "SLURM_TASKS_PER_NODE": "1", "SLURM_NNODES": "1"})
    with pytest.raises(UserError, match=r"2 node\(s\) but trainer.num_nodes=1"):
        check_slurm_tasks(trainer, environ={"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "2"})
    check_slurm_tasks(
        OmegaConf.create({"devices": [0, 1], "num_nodes": 1}),
        environ={"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1"},
    )
