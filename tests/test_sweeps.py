"""Multirun sweeps and Optuna searches through the real CLI: a folder per job and the report's table and plots,
trials sharing their stages through the cache, a failing trial recorded while the search goes on, a repeated
seed counted once, a restart into a finished search refused before any trial."""

import csv
import json

import pytest
import yaml
from helpers.cli import run_cli
from helpers.config import ONE_EPOCH, ONE_EPOCH_DEFAULTS


def test_multirun_gives_each_job_a_folder_and_the_report_a_table_and_plots(tmp_path):
    """A sweep with the defaults as shipped (bar, stage cache): the source and pretrain stages, which the lr sweep
    does not change, train once per seed and are reused from the stage cache by the other job."""
    sweep = tmp_path / "sweep"
    run_cli(
        "transferlab",
        "-m",
        "stages.finetune.optimizer.lr=0.01,0.001",
        "seed=0,1",
        *ONE_EPOCH_DEFAULTS,
        "~stages.scratch",
        f"hydra.sweep.dir={sweep}",
    )
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2", "3"]
    cached = []
    for job in jobs:
        assert json.loads((sweep / job / "results.json").read_text())["finetune/test/acc"] >= 0
        manifest = json.loads((sweep / job / "manifest.json").read_text())["stages"]
        cached.append([manifest[s]["cached"] for s in ("source", "pretrain", "finetune")])
    assert sorted(cached) == [[False] * 3] * 2 + [[True, True, False]] * 2, cached
    proc = run_cli("transferlab-report", str(sweep))
    rows = (sweep / "report.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:5] == ["job", "status", "seed", "stages.finetune.optimizer.lr", "objective"]
    assert len(rows) == 5 and all(r.split(",")[1] == "done" for r in rows[1:])
    assert {tuple(r.split(",")[2:4]) for r in rows[1:]} == {
        ("0", "0.01"),
        ("0", "0.001"),
        ("1", "0.01"),
        ("1", "0.001"),
    }
    for name in (
        "finetune_test_acc_vs_stages.finetune.optimizer.lr.png",  # mean ± std over the two seeds
        "source_test_acc_vs_stages.finetune.optimizer.lr.png",
    ):
        assert (sweep / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| job | status | seed |" in proc.stdout


def test_a_sweep_that_repeats_a_seed_counts_it_once(tmp_path):
    """`seed=0,0,1` trains seed 0 twice: the same experiment, one sample (n=2 of 3 jobs), its repeat named."""
    sweep = tmp_path / "sweep"
    run_cli("transferlab", "-m", "seed=0,0,1", *ONE_EPOCH, "~stages.scratch", f"hydra.sweep.dir={sweep}")
    acc = [json.loads((sweep / j / "results.json").read_text())["finetune/test/acc"] for j in "012"]
    run_cli("transferlab-report", str(sweep))
    with open(sweep / "report_cells.csv") as f:
        [row] = csv.DictReader(f)
    assert row["finetune/test/acc n"] == "2"
    assert float(row["finetune/test/acc mean"]) == pytest.approx(((acc[0] + acc[1]) / 2 + acc[2]) / 2, abs=1e-4)
    assert (row["jobs"], row["seeds"], row["duplicates"]) == ("3", "0 1", "seed 0: jobs 0 1")


@pytest.mark.slow
def test_optuna_search_runs_its_trials_and_reports_the_best(tmp_path):
    """With the defaults as shipped (bar, stage cache: the trials share their source and pretrain stages)."""
    sweep = tmp_path / "sweep"  # outputs/ (the stage cache) beside it
    run_cli(
        "transferlab",
        "-m",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=3",
        *ONE_EPOCH_DEFAULTS,
        "~stages.scratch",
        f"hydra.sweep.dir={sweep}",
    )
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2"]
    best = (sweep / "optimization_results.yaml").read_text()
    assert "stages.finetune.optimizer.lr" in best and "best_value" in best
    values = [json.loads((sweep / j / "results.json").read_text())["finetune/test/acc"] for j in "012"]
    assert f"best_value: {max(values)}" in best


@pytest.mark.slow
def test_a_failing_optuna_trial_is_recorded_and_the_search_goes_on(tmp_path):
    proc = run_cli(
        "transferlab",
        "-m",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=4",
        "stages.finetune.optimizer.lr=choice(-1.0,0.01)",
        *ONE_EPOCH,
        "~stages.scratch",
        f"hydra.sweep.dir={tmp_path}",
        check=False,
    )
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(jobs) == 4  # the search ran every trial
    lrs = [yaml_value(j, "stages.finetune.optimizer.lr") for j in jobs]
    assert [not (j / "results.json").exists() for j in jobs] == [lr == "-1.0" for lr in lrs] and "-1.0" in lrs
    report = run_cli("transferlab-report", str(tmp_path)).stdout
    assert report.count("| failed |") == lrs.count("-1.0")
    assert proc.returncode == 1 and "sweep job(s) failed" in proc.stderr
    assert "best_value" in (tmp_path / "optimization_results.yaml").read_text()


def yaml_value(job, key: str) -> str:
    overrides = (job / ".hydra" / "overrides.yaml").read_text().splitlines()
    return next(line.split("=", 1)[1] for line in overrides if line.startswith(f"- {key}="))


@pytest.mark.slow
def test_a_search_restarted_into_a_finished_search_is_refused_before_any_trial(tmp_path):
    """Another sampler seed would have every trial refused by the trial folders and the sweeper overwrite
    optimization_results.yaml with untrained parameters and -inf; the same settings would retrain nothing."""
    sweep = tmp_path / "search"
    search = ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", *ONE_EPOCH, "~stages.scratch"]
    run_cli("transferlab", *search, f"hydra.sweep.dir={sweep}")
    results = sweep / "optimization_results.yaml"
    before, files = results.read_bytes(), snapshot(sweep)
    best = yaml.safe_load(before)["best_value"]
    for restart in (["hydra.sweeper.sampler.seed=7"], []):  # other settings, then the same ones
        proc = run_cli("transferlab", *search, *restart, f"hydra.sweep.dir={sweep}", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"holds a finished Optuna search ({results}: best value {best})" in proc.stderr
        assert "another folder (hydra.sweep.dir=...)" in proc.stderr and "Launching" not in proc.stdout + proc.stderr
        assert results.read_bytes() == before and snapshot(sweep) == files


def snapshot(folder) -> list[tuple[str, int]]:
    """Every file under `folder` with its modification time."""
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*"))
