"""Parallel sweeps on one machine (`hydra/launcher=joblib`, real loky processes): jobs run at once, each in a slot
with its share of the cores, the shared source stage trained once through the stage cache's lock, a failed job
named at the sweep's end (exit 1) while the others finish, and what cannot run refused before any job starts."""

import json
import os
import re
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from helpers.cli import ENV, assert_user_error, cli, run_cli, start_as_shell_job
from helpers.config import SOURCE_ONLY, SOURCE_ONLY_DEFAULTS, TINY, compose_config

from transferlab.run.parallel import cores
from transferlab.run.plan import stage_config

CACHED = [o for o in TINY if o != "cache=false"]  # the stage cache on: what the shared source stage relies on
JOBLIB = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
SLOT_LINE = re.compile(
    r"^\[(?P<time>[\d-]+ [\d:,]+)\]\[[^]]+\]\[INFO\] - Parallel sweep job (?P<job>\d+): slot (?P<slot>\d+) of 2 "
    r"\(pid (?P<pid>\d+)\), (?P<threads>\d+) torch thread\(s\)",
    re.M,
)
RELEASED = re.compile(r"^\[(?P<time>[\d-]+ [\d:,]+)\].* - Parallel sweep job \d+: slot \d+ released", re.M)


def stages(job: Path) -> dict:
    return json.loads((job / "manifest.json").read_text())["stages"]


def when(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


@pytest.mark.slow
def test_a_joblib_sweep_runs_two_jobs_at_once_and_trains_the_shared_source_once(tmp_path):
    """4 jobs, 2 at once, cache on. OMP_NUM_THREADS and MKL_NUM_THREADS set to all the cores in the environment (loky
    passes them on as they are): without the slot's share, torch in each job would use every core."""
    sweep = tmp_path / "sweep"
    lrs = ["0.01", "0.02", "0.03", "0.04"]
    run_cli(
        "transferlab",
        *JOBLIB,
        f"stages.finetune.optimizer.lr={','.join(lrs)}",
        *CACHED,
        "~stages.scratch",
        f"paths.output_root={tmp_path}",
        f"hydra.sweep.dir={sweep}",
        env={"OMP_NUM_THREADS": str(cores()), "MKL_NUM_THREADS": str(cores())},  # loky keeps these, torch reads them
    )
    jobs = [sweep / str(n) for n in range(4)]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    for job in jobs:
        assert (job / "results.json").is_file()
    manifests = [stages(job) for job in jobs]
    for stage in ("source", "pretrain"):  # trained by one job; the others waited on its lock and reused it
        assert sorted(m[stage]["cached"] for m in manifests) == [False, True, True, True], stage
        assert len({json.dumps(m[stage]["test"]) for m in manifests}) == 1
    assert [m["finetune"]["cached"] for m in manifests] == [False] * 4
    assert sum((job / "source" / "csv").is_dir() for job in jobs) == 1  # one Trainer ran the source stage
    expected_threads = max(1, cores() // 2)
    intervals, slots, pids = [], [], set()
    for job in jobs:
        log = (job / "transferlab.log").read_text()
        [start] = SLOT_LINE.finditer(log)
        [end] = RELEASED.finditer(log)
        assert int(start["threads"]) == expected_threads
        header = json.loads((job / "manifest.json").read_text())
        assert header["provenance"]["machine"]["torch_threads"] == expected_threads
        intervals.append((when(start["time"]), when(end["time"])))
        slots.append(int(start["slot"]))
        pids.add(int(start["pid"]))
    assert len(pids) == 2 and set(slots) <= {0, 1}  # two worker processes, each job in one of the two slots
    overlapping = [(a, b) for a in range(4) for b in range(a + 1, 4) if _overlap(intervals[a], intervals[b])]
    assert overlapping, intervals  # jobs ran at the same time
    assert all(slots[a] != slots[b] for a, b in overlapping), (slots, intervals)  # never two jobs in one slot
    for a in range(4):  # never more than n_jobs at once
        assert sum(s <= intervals[a][0] < e for s, e in intervals) <= 2, intervals


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


@pytest.mark.slow
def test_a_failing_job_makes_the_sweep_exit_1_naming_it_while_the_others_finish(tmp_path):
    """Job 1's source stage diverges (NaN weights at epoch 0: a UserError, recorded in its manifest); in a worker
    process, so the launching process learns of it through the sweep folder."""
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "transferlab",
        *JOBLIB,
        *SOURCE_ONLY,
        "+callbacks.poison._target_=helpers.callbacks.PoisonAtEpoch",
        "+callbacks.poison.stage=nothing,source,nothing",
        "+callbacks.poison.epoch=0",
        f"hydra.sweep.dir={sweep}",
        env={"PYTHONPATH": ENV["PYTHONPATH"]},
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    summary = proc.stderr.split("transferlab: 1 sweep job(s) failed", 1)[1]
    assert f"job 1 ({sweep / '1'}): " in summary and "diverged" in summary, summary
    assert "transferlab: job 1 failed:" in proc.stderr  # said when it failed, too
    assert stages(sweep / "1")["source"]["status"] == "failed"
    for job in ("0", "2"):
        assert stages(sweep / job)["source"]["status"] == "done"
        assert (sweep / job / "results.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    "to_group, sig, code", [(True, signal.SIGINT, 130), (False, signal.SIGTERM, 143)], ids=["ctrl-c", "kill"]
)
def test_with_the_defaults_a_stopped_joblib_sweep_marks_its_jobs_interrupted_and_the_same_command_resumes_them(
    tmp_path, to_group, sig, code
):
    """As a user runs it (progress bar, stage cache, precision=auto): both jobs wait in their source stage's epoch 1
    (after epoch 0's last.ckpt). Ctrl-C reaches the whole process group (the launching process and the loky workers,
    as a terminal sends it); `kill PID` (a scheduler's) reaches the launching process alone, which passes it on.
    Either way the sweep exits 128 + signal with one line naming the sweep, after every running job marked its
    stage interrupted (joblib's abort killed the workers first: a job was left `running`, and a `kill` left the
    workers training on), no worker is left, and the same command resumes each job from its last.ckpt."""
    sweep, outputs = tmp_path / "sweep", tmp_path / "outputs"
    command = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1", *SOURCE_ONLY_DEFAULTS]
    command += [f"hydra.sweep.dir={sweep}"]
    env = {**ENV, "TRANSFERLAB_OUTPUT_ROOT": str(outputs)}
    wait = ["+callbacks.wait._target_=helpers.callbacks.MarkAndWaitAtStep", "+callbacks.wait.stage=source"]
    wait += ["+callbacks.wait.step=20", f"+callbacks.wait.marker={tmp_path}/marker-${{hydra:job.num}}"]
    proc = start_as_shell_job([str(Path(sys.executable).parent / "transferlab"), *command, *wait], env)
    deadline = time.time() + 400
    while not all((tmp_path / f"marker-{n}").exists() for n in (0, 1)):  # both jobs at once, mid-stage
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.1)
    (os.killpg if to_group else os.kill)(proc.pid, sig)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        f"transferlab: stopped by {sig.name}: the sweep in {sweep} is stopped; its running jobs marked their stages "
        f"interrupted (each job's manifest.json). Re-run the same command (hydra.sweep.dir={sweep}) to resume: "
        "finished stages are reused and interrupted ones resume from their last checkpoint."
    )
    workers = {
        int(m["pid"]) for job in ("0", "1") for m in SLOT_LINE.finditer((sweep / job / "transferlab.log").read_text())
    }
    time.sleep(1)
    for pid in workers:  # stopped with the sweep, not left training
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(), pid
    for job in ("0", "1"):
        source = stages(sweep / job)["source"]
        assert source["status"] == "interrupted" and source["reason"] == f"Interrupted: stopped by {sig.name}"
        assert (sweep / job / "source" / "checkpoints" / "last.ckpt").is_file()
    assert not list((outputs / "cache" / "stages").glob("source-*/entry.json"))  # nothing half-trained published
    done = cli("transferlab", *command, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    for job in ("0", "1"):
        assert "resuming from" in (sweep / job / "transferlab.log").read_text()
        source = stages(sweep / job)["source"]
        assert source["status"] == "done" and source["epochs"] == 2 and source["attempts"] == [1, 2], source
        assert (sweep / job / "results.json").is_file()


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["hydra.launcher.n_jobs=0"], "hydra.launcher.n_jobs=0: give the number of jobs to run at once"),
        (["trainer=ddp_cpu"], "DDP cannot run inside a joblib job"),
        (["trainer=ddp"], "DDP cannot run inside a joblib job"),
        (["trainer=gpu", "trainer.devices=2"], "trainer.devices=2: a joblib job runs on one device"),
        (
            ["trainer=gpu", f"hydra.launcher.n_jobs={torch.cuda.device_count() + 1}"],
            f"but this machine has {torch.cuda.device_count()} visible GPU(s)",
        ),
    ],
    ids=["n_jobs=0", "ddp_cpu", "ddp", "2 devices per job", "more jobs than GPUs"],
)
def test_what_cannot_run_in_parallel_is_refused_before_any_job(tmp_path, overrides, fragment):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "transferlab",
        "-m",
        "hydra/launcher=joblib",
        "seed=0,1",
        *TINY,
        *overrides,
        f"hydra.sweep.dir={sweep}",
        check=False,
    )
    assert_user_error(proc, fragment)
    assert "Launching" not in proc.stdout + proc.stderr
    assert not sweep.exists()  # nothing written


def test_without_the_plugin_a_joblib_sweep_says_what_to_install(tmp_path):
    """A `hydra_plugins` package of its own first on the path hides every installed plugin: an install without
    hydra-joblib-launcher, as far as Python can tell."""
    (tmp_path / "bare" / "hydra_plugins").mkdir(parents=True)
    (tmp_path / "bare" / "hydra_plugins" / "__init__.py").write_text("")
    proc = run_cli(
        "transferlab",
        "-m",
        "hydra/launcher=joblib",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        env={"PYTHONPATH": os.pathsep.join([str(tmp_path / "bare"), os.environ.get("PYTHONPATH", "")])},
        check=False,
    )
    assert_user_error(proc, "needs the hydra-joblib-launcher plugin", "pip install")
    assert not (tmp_path / "sweep").exists()


def test_one_device_enters_the_stage_hash_as_one_device_whatever_its_index(tmp_path):
    """A joblib job on GPU k runs with trainer.devices=[k]: its stages must be the ones a job on another GPU (or
    trainer.devices=1) trains, or the shared source stage would be trained once per GPU."""

    def trainer_key(*overrides: str) -> dict:
        return stage_config(compose_config(tmp_path / "r", [*TINY, *overrides]), "source", None, None, None)["trainer"]

    assert trainer_key("trainer.devices=[1]") == trainer_key("trainer.devices=[0]") == trainer_key()
    assert trainer_key("trainer.devices=[0,1]") != trainer_key()
