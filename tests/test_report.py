"""transferlab-report on sweep folders written by hand: known results in, known mean/std/n out."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import yaml
from helpers.cli import run_cli
from helpers.config import compose_config
from omegaconf import OmegaConf

PNG = b"\x89PNG\r\n\x1a\n"
# recipe x samples_per_class x seed -> finetune and scratch test accuracy
ACC = {
    ("mission", 10): ([0.50, 0.60, 0.70], [0.40, 0.40, 0.40]),
    ("mission", 100): ([0.60, 0.62, 0.64], [0.50, 0.52, 0.60]),
    ("strong", 10): ([0.55, 0.65, 0.60], [0.45, 0.45, 0.42]),
    ("strong", 100): ([0.80, 0.70, 0.75], [0.55, 0.50, 0.60]),
}


def make_job(
    sweep, num: int, overrides: list[str], metrics: dict | None, failed_stage: str | None = None, config: str = ""
):
    """A job folder as a sweep leaves it; `config` is its config.yaml (default: a minimal one)."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(config or yaml.safe_dump({"objective": "finetune/test/acc", "seed": 0}))
    if metrics is not None:
        (job / "results.json").write_text(json.dumps(metrics))
    if failed_stage:
        (job / "manifest.json").write_text(
            json.dumps({"stages": {failed_stage: {"status": "failed", "reason": "UserError: loss is nan at epoch 3"}}})
        )
    return job


def make_sweep(sweep, fail: tuple | None = None):
    """12 jobs as `transferlab -m recipe=... data.target.samples_per_class=... seed=0,1,2` writes them;
    `fail` = (recipe, size, seed) of a job that failed in finetune."""
    num = 0
    for (recipe, size), (finetune, scratch) in ACC.items():
        for seed in range(3):
            metrics = {
                "finetune/test/acc": finetune[seed],
                "scratch/test/acc": scratch[seed],
                "gain/acc": finetune[seed] - scratch[seed],
                "finetune/test/f1": 0.5,
            }
            failed = fail == (recipe, size, seed)
            make_job(
                sweep,
                num,
                [
                    "experiment=lowdata_study",
                    f"recipe={recipe}",
                    f"data.target.samples_per_class={size}",
                    f"seed={seed}",
                ],
                None if failed else metrics,
                "finetune" if failed else None,
            )
            num += 1
    return sweep


def cells(sweep) -> dict:
    with open(sweep / "report_cells.csv") as f:
        return {(r["recipe"], int(r["data.target.samples_per_class"])): r for r in csv.DictReader(f)}


def test_cells_hold_mean_sample_std_and_n_over_seeds(tmp_path):
    sweep = make_sweep(tmp_path / "sweep")
    proc = run_cli("transferlab-report", str(sweep))
    table = cells(sweep)
    assert set(table) == set(ACC)
    for key, (finetune, scratch) in ACC.items():
        row = table[key]
        assert (row["jobs"], row["failed"], row["seeds"]) == ("3", "0", "0 1 2")
        mean, std = sum(finetune) / 3, (sum((v - sum(finetune) / 3) ** 2 for v in finetune) / 2) ** 0.5  # ddof=1
        assert float(row["finetune/test/acc mean"]) == pytest.approx(mean, abs=1e-4)
        assert float(row["finetune/test/acc std"]) == pytest.approx(std, abs=1e-4)
        assert row["finetune/test/acc n"] == "3"
        gains = [f - s for f, s in zip(finetune, scratch)]
        assert float(row["gain/acc mean"]) == pytest.approx(sum(gains) / 3, abs=1e-4)
    assert float(table[("mission", 10)]["finetune/test/acc std"]) == pytest.approx(0.1, abs=1e-4)
    assert "| 10 | mission | 3 | 0 | 0.2000 ± 0.1000 (n=3) |" in proc.stdout  # gain/acc first
    assert "## Jobs" in proc.stdout and proc.stdout.count("| done |") == 12  # the per-job table is kept
    with open(sweep / "report.csv") as f:
        assert len(list(csv.DictReader(f))) == 12


def test_a_cell_with_a_failed_job_says_so_and_averages_only_what_ran(tmp_path):
    sweep = make_sweep(tmp_path / "sweep", fail=("strong", 100, 1))
    proc = run_cli("transferlab-report", str(sweep))
    row = cells(sweep)[("strong", 100)]
    assert (row["jobs"], row["failed"], row["finetune/test/acc n"]) == ("3", "1", "2")
    assert float(row["finetune/test/acc mean"]) == pytest.approx(0.775, abs=1e-4)  # seeds 0 and 2
    assert float(row["finetune/test/acc std"]) == pytest.approx(0.0354, abs=1e-4)
    report = (sweep / "report.md").read_text()
    assert "| 100 | strong | 3 | 1 | 0.2000 ± 0.0707 (n=2 of 3, failed=1) |" in report
    assert "job 10: finetune: UserError: loss is nan at epoch 3" in report
    assert proc.stdout.count("| failed |") == 1  # job 10
    assert cells(sweep)[("strong", 10)]["failed"] == "0"


def test_plots_one_png_per_metric_against_the_chosen_keys(tmp_path):
    sweep = make_sweep(tmp_path / "sweep")
    proc = run_cli("transferlab-report", str(sweep))
    for name in ("gain_acc", "finetune_test_acc", "scratch_test_acc"):  # the defaults
        path = sweep / f"{name}_vs_data.target.samples_per_class.png"
        assert path.read_bytes()[:8] == PNG and str(path) in proc.stdout
    run_cli(
        "transferlab-report",
        str(sweep),
        "--x",
        "recipe",
        "--line",
        "data.target.samples_per_class",
        "--metrics",
        "finetune/test/f1",
    )
    assert (sweep / "finetune_test_f1_vs_recipe.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize("option", [["--x", "lr"], ["--metrics", "finetune/test/nope"]])
def test_an_unknown_key_or_metric_is_named_with_the_choices(tmp_path, option):
    sweep = make_sweep(tmp_path / "sweep")
    proc = run_cli("transferlab-report", str(sweep), *option, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert option[1] in proc.stderr and ("recipe" in proc.stderr or "finetune/test/acc" in proc.stderr)


@pytest.mark.parametrize("missing", ["config.yaml", "overrides.yaml", ".hydra"])
def test_a_job_folder_without_its_hydra_files_is_named(tmp_path, missing):
    sweep = make_sweep(tmp_path / "sweep")
    target = sweep / "4" / ".hydra" / missing if missing != ".hydra" else sweep / "4" / ".hydra"
    subprocess.run(["rm", "-r", str(target)], check=True)
    proc = run_cli("transferlab-report", str(sweep), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"job folder {sweep / '4'} has no .hydra/" in proc.stderr
    assert "config.yaml" in proc.stderr and "overrides.yaml" in proc.stderr


def test_a_folder_with_no_jobs_or_a_run_folder_is_named(tmp_path):
    (tmp_path / "empty" / "plots").mkdir(parents=True)
    proc = run_cli("transferlab-report", str(tmp_path / "empty"), check=False)
    assert proc.returncode == 2 and "no job folders under" in proc.stderr and str(tmp_path / "empty") in proc.stderr
    run = make_job(tmp_path, 0, ["seed=0"], {"finetune/test/acc": 0.5})
    proc = run_cli("transferlab-report", str(run), check=False)
    assert proc.returncode == 2 and "a single run's folder" in proc.stderr
    proc = run_cli("transferlab-report", str(tmp_path / "nowhere"), check=False)
    assert proc.returncode == 2 and "is not a folder" in proc.stderr


def test_matplotlib_is_imported_only_when_a_plot_is_drawn(tmp_path):
    for seed in range(2):  # a seed-only sweep: one cell, nothing to plot against
        make_job(tmp_path, seed, [f"seed={seed}"], {"finetune/test/acc": 0.5 + seed / 10})
    code = (
        "import sys; from pathlib import Path; from transferlab.analysis import sweep_report as r; "
        f"p = Path({str(tmp_path)!r}); paths = r.write(p, r.collect(p)); "
        "print(len(paths), 'matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["3", "False"]
    assert "0.5500 ± 0.0707 (n=2)" in (tmp_path / "report.md").read_text()


def test_the_sweep_callback_writes_the_report_even_for_a_narrowed_sweep(tmp_path, capsys):
    """experiment=lowdata_study ends with ReportAtEnd; a sweep that fixes the recipe has no `recipe` line key."""
    from omegaconf import OmegaConf

    from transferlab.analysis.sweep_report import ReportAtEnd

    for seed in range(2):
        for size in (10, 100):
            make_job(
                tmp_path,
                2 * seed + (size == 100),
                ["recipe=mission", f"data.target.samples_per_class={size}", f"seed={seed}"],
                {"gain/acc": 0.1 * (seed + 1)},
            )
    ReportAtEnd(x="data.target.samples_per_class", line="recipe").on_multirun_end(
        OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    )
    assert "| 10 | 2 | 0 | 0.1500 ± 0.0707 (n=2) |" in capsys.readouterr().out
    assert (tmp_path / "gain_acc_vs_data.target.samples_per_class.png").read_bytes()[:8] == PNG


def test_jobs_that_repeat_a_seed_are_one_sample_and_are_named(tmp_path):
    """`seed=0,0,1,2` ran seed 0 twice: the same experiment, not a fourth draw. n counts distinct seeds."""
    accs = {"0.1": [(0, 0.5), (0, 0.7), (1, 0.6), (2, 0.8)], "0.01": [(0, 0.4), (1, 0.5), (2, 0.6)]}
    num = 0
    for lr, runs in accs.items():
        for seed, acc in runs:
            make_job(tmp_path, num, [f"stages.finetune.optimizer.lr={lr}", f"seed={seed}"], {"finetune/test/acc": acc})
            num += 1
    run_cli("transferlab-report", str(tmp_path))
    with open(tmp_path / "report_cells.csv") as f:
        table = {r["stages.finetune.optimizer.lr"]: r for r in csv.DictReader(f)}
    row = table["0.1"]
    assert (row["jobs"], row["finetune/test/acc n"]) == ("4", "3")  # 4 jobs, 3 samples
    assert float(row["finetune/test/acc mean"]) == pytest.approx((0.6 + 0.6 + 0.8) / 3, abs=1e-4)  # seed 0: the mean
    assert float(row["finetune/test/acc std"]) == pytest.approx(0.1155, abs=1e-4)
    assert (row["seeds"], row["duplicates"]) == ("0 1 2", "seed 0: jobs 0 1")
    assert (table["0.01"]["duplicates"], table["0.01"]["finetune/test/acc n"]) == ("", "3")
    report = (tmp_path / "report.md").read_text()
    assert "| 0.1 | 4 | 0 | 0.6667 ± 0.1155 (n=3) |" in report
    assert "- stages.finetune.optimizer.lr=0.1: jobs that ran the same seed (seed 0: jobs 0 1) count once" in report


def test_the_same_overrides_with_another_config_are_separate_cells(tmp_path):
    """Two sweeps merged into one folder, the config file edited in between (finetune epochs 2 -> 3): their jobs
    have the same overrides but are different experiments. Paths and seed differ per job and do not split."""
    overrides = ["stages.finetune.optimizer.lr=0.01"]
    num = 0
    for epochs, accs in ((2, [0.5, 0.7]), (3, [0.8, 0.9])):
        for seed, acc in enumerate(accs):
            cfg = compose_config(
                tmp_path / f"out{num}" / str(num), [f"stages.finetune.epochs={epochs}", f"seed={seed}"]
            )
            make_job(
                tmp_path, num, [*overrides, f"seed={seed}"], {"finetune/test/acc": acc}, config=OmegaConf.to_yaml(cfg)
            )
            num += 1
    run_cli("transferlab-report", str(tmp_path))
    with open(tmp_path / "report_cells.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["jobs"], r["seeds"], r["finetune/test/acc n"]) for r in rows] == [("2", "0 1", "2")] * 2
    assert [float(r["finetune/test/acc mean"]) for r in rows] == pytest.approx([0.6, 0.85], abs=1e-4)
    assert [r["config"] for r in rows] == ["stages.finetune.epochs=2", "stages.finetune.epochs=3"]
    report = (tmp_path / "report.md").read_text()
    assert "| config | jobs | failed jobs | finetune/test/acc |" in report
    assert "- jobs 2 3 (stages.finetune.epochs=3): other jobs with the same overrides ran another config" in report


HOLDER = """
import sys, time
from pathlib import Path
from transferlab.run.runlock import hold
with hold(sys.argv[1]):
    Path(sys.argv[2]).touch()
    time.sleep(600)
"""


def test_a_job_whose_folder_a_live_run_holds_is_running_until_its_holder_dies(tmp_path):
    """Job 2 is being trained by another process (it holds the folder's lock): running, not failed, and not
    averaged. Killed with SIGKILL, it holds nothing: failed. A job no run started (no lock file) gets none."""
    sweep = tmp_path / "sweep"
    for seed in range(4):
        make_job(sweep, seed, [f"seed={seed}"], {"finetune/test/acc": 0.5 + seed / 10} if seed < 2 else None)
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(sweep / "2"), str(ready)])
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert holder.poll() is None and time.monotonic() < deadline, "the holder did not take the lock"
            time.sleep(0.1)
        proc = run_cli("transferlab-report", str(sweep))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert "| 2 | running |" in proc.stdout and "| 3 | failed |" in proc.stdout
    assert "0.5500 ± 0.0707 (n=2 of 4, failed=1, running=1)" in proc.stdout
    with open(sweep / "report_cells.csv") as f:
        [row] = csv.DictReader(f)
    assert (row["jobs"], row["failed"], row["running"], row["finetune/test/acc n"]) == ("4", "1", "1", "2")
    assert "## Running jobs\n\n- job 2: a live run holds its folder; not averaged" in proc.stdout

    proc = run_cli("transferlab-report", str(sweep))  # the holder was killed: its lock went with it
    with open(sweep / "report_cells.csv") as f:
        [row] = csv.DictReader(f)
    assert (row["failed"], row["running"]) == ("2", "0") and "| 2 | failed |" in proc.stdout
    assert "- job 2: no results.json, and no live run holds its folder (failed, or killed)" in proc.stdout
    assert (sweep / "2" / ".transferlab.lock").is_file() and not (sweep / "3" / ".transferlab.lock").exists()


def test_a_cut_short_results_json_is_named_with_the_way_to_write_it_again(tmp_path):
    sweep = make_sweep(tmp_path / "sweep")
    text = (sweep / "4" / "results.json").read_text()
    (sweep / "4" / "results.json").write_text(text[: len(text) // 2])  # a kill in the middle of its write
    proc = run_cli("transferlab-report", str(sweep))
    assert "- job 4: its results.json cannot be read (cut short?): run the sweep's command again" in proc.stdout
    assert "| 4 | failed |" in proc.stdout


@contextmanager
def read_only(folder):
    """`folder` read-only, also for root: a read-only bind mount where this user may mount, else chmod a-w."""
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", folder, folder], capture_output=True).returncode == 0
    if not mounted:
        for path in (folder, *folder.rglob("*")):
            path.chmod(path.stat().st_mode & ~0o222)
    try:
        if os.access(folder, os.W_OK) and not mounted:
            pytest.skip("cannot make a folder read-only here (root without the right to mount)")
        yield
    finally:
        if mounted:
            subprocess.run(["umount", folder], check=True)


def test_a_read_only_sweep_folder_is_named_instead_of_a_traceback(tmp_path):
    """A colleague's sweep, a read-only snapshot: the report cannot go there, and the lock of its failed job
    cannot be tried for writing."""
    sweep = make_sweep(tmp_path / "sweep", fail=("strong", 100, 1))
    (sweep / "10" / ".transferlab.lock").touch()  # its run took the lock, then failed
    with read_only(sweep):
        proc = run_cli("transferlab-report", str(sweep), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"the report goes into the sweep folder, and {sweep} cannot be written to (" in proc.stderr
    assert "rsync -a --exclude='*.ckpt'" in proc.stderr and not (sweep / "report.md").exists()


def test_report_of_a_folder_without_jobs_says_what_it_needs(tmp_path):
    proc = run_cli("transferlab-report", str(tmp_path), check=False)
    assert proc.returncode == 2 and "no job folders" in proc.stderr
