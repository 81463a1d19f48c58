"""transferlab-rank: each score against a small case worked out independently, then the command end to end."""

import csv
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli import run_cli
from helpers.config import TINY, compose_config
from helpers.datasets import write_imagenet

from transferlab.analysis.transferability import SCORES, h_score, kendall_tau_b, leep, logme, logme_fit, nce, pearson_r
from transferlab.core.errors import UserError

RNG = np.random.default_rng(0)


def log_marginal_likelihood(f, y, alpha, beta):
    """log N(y | 0, beta^-1 I + alpha^-1 F F^T): the evidence written directly, with the N x N covariance."""
    n = len(y)
    cov = np.eye(n) / beta + f @ f.T / alpha
    _, logdet = np.linalg.slogdet(cov)
    return -0.5 * (n * np.log(2 * np.pi) + logdet + y @ np.linalg.solve(cov, y))


def toy(n, d, classes=3):
    labels = np.arange(n) % classes
    features = RNG.normal(size=(n, d)) + 1.5 * np.eye(classes, d)[labels]
    return features, labels


@pytest.mark.parametrize("n, d", [(40, 6), (9, 25)])  # N > D, and N < D (F^T F singular)
def test_logme_evidence_is_the_log_marginal_likelihood(n, d):
    f, labels = toy(n, d)
    fit = logme_fit(f, labels)
    for c, entry in enumerate(fit):
        direct = log_marginal_likelihood(f, (labels == c).astype(float), entry["alpha"], entry["beta"]) / n
        assert entry["evidence"] == pytest.approx(direct, rel=1e-9, abs=1e-12)
    assert logme(f, labels) == pytest.approx(np.mean([e["evidence"] for e in fit]))


def test_logme_fixed_point_maximises_the_evidence():
    """Run to convergence, the fixed point is a maximum of the evidence over (alpha, beta); the default (11 steps,
    1 % tolerance) lands within a hair of it."""
    f, labels = toy(60, 8)
    y = (labels == 0).astype(float)
    [exact] = logme_fit(f, labels, max_iter=1000, tol=1e-12)[:1]
    a, b = exact["alpha"], exact["beta"]
    best = log_marginal_likelihood(f, y, a, b)
    for da, db in [(1.2, 1), (1 / 1.2, 1), (1, 1.2), (1, 1 / 1.2), (1.2, 1.2)]:
        assert log_marginal_likelihood(f, y, a * da, b * db) < best
    assert logme_fit(f, labels)[0]["evidence"] == pytest.approx(best / 60, abs=1e-4)


def test_leep_of_a_source_whose_predictions_determine_the_label_is_zero():
    z = np.array([0, 1, 2, 3, 0, 2])
    y = np.array([0, 1, 1, 0, 0, 1])  # z -> y: 0->0, 1->1, 2->1, 3->0
    assert leep(np.eye(4)[z], y) == pytest.approx(0.0, abs=1e-12)


def test_leep_worked_example():
    """theta = [[1, 0], [.5, .5]], y = [0, 1]: P(y|z=0) = (2/3, 1/3), P(y|z=1) = (0, 1); both samples' expected
    empirical prediction of their label is 2/3."""
    assert leep(np.array([[1.0, 0.0], [0.5, 0.5]]), np.array([0, 1])) == pytest.approx(np.log(2 / 3))


def test_nce_of_a_deterministic_source_mapping_is_zero_and_a_worked_example():
    assert nce(np.array([0, 1, 2, 2, 1]), np.array([1, 0, 0, 0, 0])) == pytest.approx(0.0, abs=1e-12)
    # z = [0, 0, 1, 1], y = [0, 1, 1, 1]: H(Y|Z) = 1/2 * log 2 (z = 0 is a coin flip) + 1/2 * 0
    assert nce(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])) == pytest.approx(-0.5 * np.log(2))


def test_h_score_against_a_direct_numpy_computation():
    f, labels = toy(50, 5)
    g = np.stack([f[labels == c].mean(0) for c in labels])  # E[f | y] for each sample
    direct = np.trace(np.linalg.inv(np.cov(f, rowvar=False)) @ np.cov(g, rowvar=False))
    assert h_score(f, labels) == pytest.approx(direct, rel=1e-9)


def test_kendall_tau_b_and_pearson_r_hand_computed():
    assert kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)  # 5 concordant, 1 discordant
    # ties: pairs (sgn dx, sgn dy): 12 ++, 13 ++, 14 ++, 23 0+, 24 ++, 34 +0 -> 4 / sqrt(5 x 5)
    assert kendall_tau_b([1, 2, 2, 3], [1, 2, 3, 3]) == pytest.approx(0.8)
    assert np.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))
    # x - mean = (-1, 0, 1), y - mean = (-4/3, -1/3, 5/3): r = 3 / sqrt(2 x 42/9)
    assert pearson_r([1, 2, 3], [1, 2, 4]) == pytest.approx(3 / np.sqrt(2 * 42 / 9))
    stats = pytest.importorskip("scipy.stats")
    x, y = RNG.integers(0, 4, 12), RNG.normal(size=12)
    assert kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x, y).statistic)
    assert pearson_r(x, y) == pytest.approx(stats.pearsonr(x, y).statistic)


# -- the command -----------------------------------------------------------------------------------------------
TARGET = [o for o in TINY if o.startswith(("data.target", "data.source.source_classes"))]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny `transferlab` run: its source stage and its finetune checkpoint are the candidates."""
    from transferlab.run.pipeline import run

    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    run(
        compose_config(
            run_dir,
            [
                *TINY,
                "stages.source.epochs=1",
                "stages.pretrain.epochs=1",
                "stages.finetune.epochs=1",
                "~stages.scratch",
            ],
        )
    )
    return run_dir


def rank_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The `transferlab-rank` console script in its own process, on the tiny target."""
    return run_cli(
        "transferlab-rank",
        *TARGET,
        f"hydra.run.dir={tmp_path / 'rank'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        *overrides,
        check=False,
    )


def refused(tmp_path: Path, monkeypatch, capsys, *overrides: str) -> str:
    """The console script's function in this process (argv as a user types it) exits 2 with one error line and no
    traceback: that line."""
    from transferlab.commands.rank import main

    argv = [*TARGET, *overrides, f"hydra.run.dir={tmp_path / 'r'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    monkeypatch.setattr(sys, "argv", ["transferlab-rank", *argv])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2, (overrides, err)
    errors = [line for line in err.splitlines() if line.startswith("transferlab: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def one_line_exit_2(proc: subprocess.CompletedProcess) -> str:
    """A console script's run that refused its input: exit 2, one error line, no traceback; that line."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("transferlab: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def test_rank_command_end_to_end(tiny_run, tmp_path):
    finetuned = tiny_run / "finetune" / "checkpoints" / "best.ckpt"
    (tmp_path / "acc.csv").write_text("candidate,accuracy\nrandom,0.2\nrandom,0.4\nft,0.9\n")
    proc = rank_cli(
        tmp_path,
        f"candidates={{src:{tiny_run},ft:{finetuned},random:random}}",
        f"results=[{tiny_run},{tmp_path / 'acc.csv'}]",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "rank"
    rows = {r["candidate"]: r for r in csv.DictReader(open(out / "ranking.csv"))}
    assert set(rows) == {"src", "ft", "random"}
    assert [r["rank"] for r in rows.values()] == ["1", "2", "3"]
    assert all(np.isfinite(float(r[s])) for r in rows.values() for s in ("logme", "leep", "nce", "hscore"))
    assert rows["src"]["source_classes"] == "6" and rows["ft"]["source_classes"] == "10"
    assert rows["random"]["source_classes"] == "6"  # the first checkpoint's head size
    finetune_acc = json.loads((tiny_run / "results.json").read_text())["finetune/test/acc"]
    assert float(rows["src"]["finetuned_acc"]) == pytest.approx(finetune_acc)  # matched by the run's source ckpt
    assert float(rows["random"]["finetuned_acc"]) == pytest.approx(0.3) and rows["random"]["finetuned_n"] == "2"
    report = json.loads((out / "ranking.json").read_text())
    assert report["samples"] == 80 and report["correlations"]["logme"]["n"] == 3
    logmes = [float(rows[n]["logme"]) for n in ("src", "ft", "random")]
    accs = [finetune_acc, 0.9, 0.3]
    assert report["correlations"]["logme"]["kendall_tau"] == pytest.approx(kendall_tau_b(logmes, accs))
    assert "Kendall tau-b" in (out / "ranking.md").read_text() and "| src |" in proc.stdout
    assert len(list((tmp_path / "cache" / "rank").glob("*.npz"))) == 3

    # again, in-process: every candidate's features come from the cache, the scores are the same
    from transferlab.analysis.ranking import rank

    cfg = compose_config(
        tmp_path / "again",
        [*TARGET, f"candidates=[{tiny_run},random]", f"paths.cache_dir={tmp_path / 'cache'}"],
        config_name="rank",
    )
    again = {r["candidate"]: r for r in rank(cfg)["candidates"]}
    assert again["run"]["logme"] == pytest.approx(float(rows["src"]["logme"]))
    assert again["random"]["forward_s"] < 0.5 and len(list((tmp_path / "cache" / "rank").glob("*.npz"))) == 3


def test_rank_refuses_bad_input_with_one_message_and_exit_2(tiny_run, tmp_path, monkeypatch, capsys):
    """Checkpoints from a stranger (another architecture's weights, an option this transferlab does not know, a
    bare tensor) and a run folder whose manifest.json was cut short: one message each, exit 2."""
    state = torch.load(tiny_run / "source" / "checkpoints" / "best.ckpt", weights_only=True)
    state["hyper_parameters"]["model"] = {"name": "resnet18", "small_input": True}
    torch.save(state, tmp_path / "other_arch.ckpt")
    state = torch.load(tiny_run / "source" / "checkpoints" / "best.ckpt", weights_only=True)
    state["hyper_parameters"]["option_of_a_newer_version"] = 1
    torch.save(state, tmp_path / "newer.ckpt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    cut = tmp_path / "cut_run"
    (cut / "source" / "checkpoints").mkdir(parents=True)
    (cut / "manifest.json").write_text((tiny_run / "manifest.json").read_text()[:300])
    edited = tmp_path / "edited_run"  # a hand edit: the source stage done, but its best checkpoint nulled
    (edited / "source" / "checkpoints").mkdir(parents=True)
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    manifest["stages"]["source"]["best_ckpt"] = None
    (edited / "manifest.json").write_text(json.dumps(manifest))
    cases = {
        f"candidates=[{tmp_path / 'missing.ckpt'},random]": "does not exist",
        f"candidates=[{tmp_path / 'other_arch.ckpt'}]": "do not fit the model",
        f"candidates=[{tmp_path / 'newer.ckpt'}]": "option_of_a_newer_version",
        f"candidates=[{tmp_path / 'tensor.pt'}]": "is not a transferlab ClassifierModule checkpoint",
        f"candidates=[{cut}]": f"{cut / 'manifest.json'} is not a transferlab manifest",
        f"candidates=[{edited}]": "stage 'source' is done but names no best checkpoint",
        "candidates=[]": "No candidates",
    }
    for override, message in cases.items():
        assert message in refused(tmp_path, monkeypatch, capsys, override)


def test_rank_refuses_a_plain_state_dict_and_unmatched_results(tiny_run, tmp_path):
    from transferlab.analysis.ranking import rank

    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
    compose = lambda *o: compose_config(tmp_path / "r", [*TARGET, *o], config_name="rank")
    with pytest.raises(UserError, match="not a transferlab ClassifierModule checkpoint"):
        rank(compose(f"candidates=[{tmp_path / 'plain.pt'}]"))
    (tmp_path / "acc.json").write_text(json.dumps({"someone_else": 0.5}))
    with pytest.raises(UserError, match="none of it matches a candidate"):
        rank(compose("candidates=[random]", f"results={tmp_path / 'acc.json'}"))


def test_results_from_a_sweep_folder_match_candidates_by_checkpoint_content(tiny_run, tmp_path):
    """A copy of a run's source checkpoint, given as the candidate, is matched to that run's fine-tuned accuracy
    when the folder holding the run (as a sweep folder holds its jobs) is given as results."""
    import shutil

    from transferlab.analysis.ranking import rank

    copy = tmp_path / "elsewhere" / "source_model.ckpt"
    copy.parent.mkdir()
    shutil.copy(tiny_run / "source" / "checkpoints" / "best.ckpt", copy)
    cfg = compose_config(
        tmp_path / "r",
        [*TARGET, f"candidates=[{copy},random]", f"results={tiny_run.parent}", f"paths.cache_dir={tmp_path / 'cache'}"],
        config_name="rank",
    )
    rows = {r["candidate"]: r for r in rank(cfg)["candidates"]}
    finetune_acc = json.loads((tiny_run / "results.json").read_text())["finetune/test/acc"]
    assert rows["source_model"]["finetuned_acc"] == pytest.approx(finetune_acc)
    assert rows["random"]["finetuned_acc"] is None and rows["random"]["finetuned_n"] == 0


def test_features_are_cached_per_image_size(tiny_run, tmp_path):
    """The cache key covers what sets the pixels (image size, normalisation, loader), not only the files: the same
    images at 64 px are not served the 32-px features, and the ConvNet, which takes 32x32 only, is refused at 64 px
    with one message instead of being ranked from the cache."""
    from transferlab.analysis.ranking import rank

    ckpt = tiny_run / "source" / "checkpoints" / "best.ckpt"
    data = [
        "data/target=image_folder",
        f"data.target.root={write_imagenet(tmp_path / 'images')}",  # class folders of JPEGs
        f"paths.cache_dir={tmp_path / 'cache'}",
        "model=resnet18",  # the random candidate: takes any size
        "random_classes=6",
    ]
    at = lambda size, *o: compose_config(tmp_path / f"r{size}", [*data, f"data.target.image_size={size}", *o], "rank")
    small = {r["candidate"]: r for r in rank(at(32, f"candidates=[{ckpt},random]"))["candidates"]}
    cached = tmp_path / "cache" / "rank"
    assert len(list(cached.glob("*.npz"))) == 2
    large = {r["candidate"]: r for r in rank(at(64, "candidates=[random]"))["candidates"]}
    assert len(list(cached.glob("*.npz"))) == 3  # computed for 64 px, not served the 32-px entry
    assert large["random"]["logme"] != small["random"]["logme"]
    proc = run_cli(
        "transferlab-rank",
        *data,
        "data.target.image_size=64",
        f"candidates=[{ckpt}]",
        f"hydra.run.dir={tmp_path / 'r'}",
        check=False,
    )
    assert "cannot take the target images: it takes 32x32" in one_line_exit_2(proc)
    assert not (tmp_path / "r" / "ranking.csv").exists()


def test_a_diverged_checkpoint_scores_nan_and_stays_out_of_the_correlations(tiny_run, tmp_path):
    """NaN weights give NaN features, which gave a finite NCE (every argmax 0) and H-score (0) that then entered the
    correlations: now every score is NaN, one warning names the candidate, and each score is correlated over the
    three others (n = 3)."""
    source = tiny_run / "source" / "checkpoints" / "best.ckpt"
    state = torch.load(source, weights_only=True)
    state["state_dict"]["backbone.0.weight"].fill_(float("nan"))
    torch.save(state, tmp_path / "diverged.ckpt")
    (tmp_path / "acc.csv").write_text("candidate,accuracy\nsrc,0.5\ndiverged,0.9\nft,0.7\nrandom,0.2\n")
    proc = rank_cli(
        tmp_path,
        f"candidates={{src:{source},diverged:{tmp_path / 'diverged.ckpt'},"
        f"ft:{tiny_run / 'finetune' / 'checkpoints' / 'best.ckpt'},random:random}}",
        f"results={tmp_path / 'acc.csv'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "rank" / "ranking.json").read_text())
    rows = {r["candidate"]: r for r in report["candidates"]}
    assert all(np.isnan(rows["diverged"][s]) for s in SCORES) and rows["diverged"]["finetuned_acc"] == 0.9
    assert all(np.isfinite(rows[n][s]) for n in ("src", "ft", "random") for s in SCORES)
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if "not finite" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: Candidate diverged:"), warnings  # one plain line
    assert {v["n"] for v in report["correlations"].values()} == {3}
    logmes = [rows[n]["logme"] for n in ("src", "ft", "random")]
    assert report["correlations"]["logme"]["kendall_tau"] == pytest.approx(kendall_tau_b(logmes, [0.5, 0.7, 0.2]))


def test_correlations_use_the_finite_pairs_of_each_score_and_none_from_fewer_than_3(caplog):
    from transferlab.analysis.rank_results import correlations

    def row(name, score, acc):
        return {"candidate": name, **dict.fromkeys(SCORES, score), "finetuned_acc": acc}

    nan = float("nan")
    rows = [row("a", 1.0, 0.1), row("b", 2.0, 0.3), row("c", 3.0, 0.2), row("d", 4.0, nan), row("e", nan, 0.9)]
    rows.append(row("f", 5.0, None))  # no fine-tuned result
    out = correlations(rows)
    for s in SCORES:  # a, b, c only
        assert out[s]["n"] == 3
        assert out[s]["kendall_tau"] == pytest.approx(kendall_tau_b([1, 2, 3], [0.1, 0.3, 0.2]))
        assert out[s]["pearson_r"] == pytest.approx(pearson_r([1, 2, 3], [0.1, 0.3, 0.2]))
    rows[0]["logme"] = nan
    with caplog.at_level(logging.WARNING):
        out = correlations(rows)
    assert out["logme"] == {"kendall_tau": None, "pearson_r": None, "n": 2} and out["leep"]["n"] == 3
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "fewer than 3" in warning and "logme (n = 2)" in warning and "leep" not in warning


def test_two_results_give_no_correlation_but_say_why(tiny_run, tmp_path, caplog):
    """Two candidates with a result: tau and r would be +-1 whatever the scores; the table says `n < 3` instead."""
    from transferlab.analysis.ranking import rank

    (tmp_path / "acc.csv").write_text("candidate,accuracy\nrun,0.6\nrandom,0.2\n")
    cfg = compose_config(
        tmp_path / "r",
        [*TARGET, f"candidates=[{tiny_run},random]", f"results={tmp_path / 'acc.csv'}"],
        config_name="rank",
    )
    with caplog.at_level(logging.WARNING):
        out = rank(cfg)
    assert out["correlations"]["logme"] == {"kendall_tau": None, "pearson_r": None, "n": 2}
    assert "| logme | n < 3 | n < 3 | 2 |" in (tmp_path / "r" / "ranking.md").read_text()
    assert any("fewer than 3" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_bad_results_files_are_one_message_naming_the_file(tiny_run, tmp_path, monkeypatch, capsys):
    files = {
        "no_header.csv": ("random,0.2\n", "its first row is random,0.2, not the header candidate,accuracy"),
        "words.csv": ("candidate,accuracy\nrandom,high\n", 'line 2: the accuracy "high" is not a finite number'),
        "empty.csv": ("candidate,accuracy\nrun,0.5\nrandom,\n", 'line 3: the accuracy "" is not a finite number'),
        "nan.csv": ("candidate,accuracy\nrandom,nan\n", 'line 2: the accuracy "nan" is not a finite number'),
        "list.json": ("[0.5]", "holds a JSON list, not an object"),
        "words.json": ('{"random": "high"}', "key 'random': the accuracy \"high\" is not a finite number"),
        "nulls.json": ('{"random": [0.5, null]}', "key 'random': the accuracy null is not a finite number"),
        "cut.json": ('{"random": 0.', "is not valid JSON"),
    }
    for name, (text, message) in files.items():
        (tmp_path / name).write_text(text)
        line = refused(tmp_path, monkeypatch, capsys, "candidates=[random]", f"results={tmp_path / name}")
        assert f"results={tmp_path / name}" in line and message in line, line
    sweep = tmp_path / "sweep"  # a sweep folder whose job's manifest.json was cut short
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "manifest.json").write_text((tiny_run / "manifest.json").read_text()[:500])
    line = one_line_exit_2(rank_cli(tmp_path, "candidates=[random]", f"results={sweep}"))
    assert f"{sweep / '0' / 'manifest.json'} is not a transferlab manifest" in line
    assert "Leave that run folder out" in line


def test_a_csv_saved_by_a_spreadsheet_is_read(tiny_run, tmp_path):
    """A byte-order mark before the header and spaces after the commas (a spreadsheet's "CSV UTF-8")."""
    from transferlab.analysis.ranking import rank

    (tmp_path / "acc.csv").write_text("\ufeffcandidate, accuracy\r\nrandom, 0.25\r\n", encoding="utf-8")
    cfg = compose_config(
        tmp_path / "r", [*TARGET, "candidates=[random]", f"results={tmp_path / 'acc.csv'}"], config_name="rank"
    )
    assert rank(cfg)["candidates"][0]["finetuned_acc"] == 0.25


def test_rank_settings_are_checked_before_anything_runs(tmp_path, monkeypatch, capsys):
    cases = {
        "batch_size=0": "batch_size must be a whole number of at least 1, got 0",
        "batch_size=-3": "batch_size must be a whole number of at least 1, got -3",
        "batch_size=1.5": "batch_size must be a whole number of at least 1, got 1.5",
        "batch_size=true": "batch_size must be a whole number of at least 1, got true",
        "seed=-1": "seed must be a whole number from 0 to 4294967295, got -1",
        "seed=4294967296": "seed must be a whole number from 0 to 4294967295, got 4294967296",
        "random_classes=0": "random_classes must be null or a whole number of at least 1, got 0",
        "random_classes=2.5": "random_classes must be null or a whole number of at least 1, got 2.5",
        "cache=yes": 'cache must be true or false, got "yes"',
        "cache=1": "cache must be true or false, got 1",
        "candidates=[random,null]": "each candidate is a checkpoint file, a run folder or `random`",
        "candidates={a:3}": "each candidate is a checkpoint file, a run folder or `random`",
        "results_metric=3": "results_metric must be a name",
        "sort_by=best": "sort_by='best' is unknown; available: logme, leep, nce, hscore",
    }
    for override, message in cases.items():
        overrides = [override] if override.startswith("candidates") else ["candidates=[random]", override]
        assert message in refused(tmp_path, monkeypatch, capsys, *overrides)
    line = one_line_exit_2(rank_cli(tmp_path, "candidates=[random]", "batch_size=0"))
    assert "batch_size must be a whole number of at least 1, got 0" in line


def test_a_checkpoint_from_before_the_rename_is_ranked(tiny_run, tmp_path):
    """Checkpoints saved before `train` was renamed `trainable` build their module as in transferlab-eval."""
    from transferlab.analysis.ranking import rank

    source = tiny_run / "source" / "checkpoints" / "best.ckpt"
    state = torch.load(source, weights_only=True)
    state["hyper_parameters"]["train"] = state["hyper_parameters"].pop("trainable")
    torch.save(state, tmp_path / "old.ckpt")
    cfg = compose_config(tmp_path / "r", [*TARGET, f"candidates={{old:{tmp_path / 'old.ckpt'},now:{source}}}"], "rank")
    rows = {r["candidate"]: r for r in rank(cfg)["candidates"]}
    assert np.isfinite(rows["old"]["logme"]) and rows["old"]["logme"] == rows["now"]["logme"]


def test_candidate_stage_picks_another_stage_of_a_run_folder(tiny_run, tmp_path):
    """Was `stage`, which Hydra reads as the config group conf/stage/: `stage=finetune` could not be given."""
    from transferlab.analysis.ranking import rank

    cfg = compose_config(tmp_path / "r", [*TARGET, f"candidates=[{tiny_run}]", "candidate_stage=finetune"], "rank")
    [row] = rank(cfg)["candidates"]
    assert row["source_classes"] == 10 and row["checkpoint"].endswith("finetune/checkpoints/best.ckpt")


def test_a_damaged_or_unwritable_feature_cache_costs_only_the_reuse(tmp_path, caplog):
    """A cache entry cut short (a full disk, a killed copy) is computed again and rewritten; a cache folder that
    cannot be written (here: below a file) gives a warning and the ranking."""
    from transferlab.analysis.ranking import rank

    def scores(cache_dir):
        cfg = compose_config(tmp_path / "r", [*TARGET, "candidates=[random]", f"paths.cache_dir={cache_dir}"], "rank")
        return rank(cfg)["candidates"][0]

    first = scores(tmp_path / "cache")
    [entry] = (tmp_path / "cache" / "rank").glob("*.npz")
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        again = scores(tmp_path / "cache")
    assert again["logme"] == first["logme"] and any("unreadable" in r.getMessage() for r in caplog.records)
    with np.load(entry) as rewritten:
        assert rewritten["features"].shape == (80, again["feature_dim"])
    (tmp_path / "a_file").write_text("")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        elsewhere = scores(tmp_path / "a_file" / "cache")
    assert elsewhere["logme"] == first["logme"] and any("not cached" in r.getMessage() for r in caplog.records)
