"""transferlab-rank: each score against a small case worked out independently, then the command end to end."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TINY, compose_config

from transferlab.errors import UserError
from transferlab.transferability import h_score, kendall_tau_b, leep, logme, logme_fit, nce, pearson_r

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
    from transferlab.pipeline import run

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
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "transferlab.rank",
            *TARGET,
            f"hydra.run.dir={tmp_path / 'rank'}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            *overrides,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )


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
    from transferlab.rank import rank

    cfg = compose_config(
        tmp_path / "again",
        [*TARGET, f"candidates=[{tiny_run},random]", f"paths.cache_dir={tmp_path / 'cache'}"],
        config_name="rank",
    )
    again = {r["candidate"]: r for r in rank(cfg)["candidates"]}
    assert again["run"]["logme"] == pytest.approx(float(rows["src"]["logme"]))
    assert again["random"]["forward_s"] < 0.5 and len(list((tmp_path / "cache" / "rank").glob("*.npz"))) == 3


def test_rank_refuses_bad_input_with_one_message_and_exit_2(tiny_run, tmp_path, monkeypatch, capsys):
    """The console script's function, in this process (argv as a user types it): exit 2, one line, no traceback."""
    from transferlab.rank import main

    state = torch.load(tiny_run / "source" / "checkpoints" / "best.ckpt", weights_only=True)
    state["hyper_parameters"]["model"] = {"name": "resnet18", "small_input": True}
    torch.save(state, tmp_path / "other_arch.ckpt")
    cases = {
        f"candidates=[{tmp_path / 'missing.ckpt'},random]": "does not exist",
        f"candidates=[{tmp_path / 'other_arch.ckpt'}]": "do not fit the architecture",
        "candidates=[]": "No candidates",
    }
    for override, message in cases.items():
        monkeypatch.setattr(sys, "argv", ["transferlab-rank", *TARGET, override, f"hydra.run.dir={tmp_path / 'r'}"])
        with pytest.raises(SystemExit) as exit_:
            main()
        err = capsys.readouterr().err
        assert exit_.value.code == 2, (override, err)
        errors = [line for line in err.splitlines() if line.startswith("transferlab: error:")]
        assert len(errors) == 1 and message in errors[0], err
        assert "Traceback" not in err


def test_rank_refuses_a_plain_state_dict_and_unmatched_results(tiny_run, tmp_path):
    from transferlab.rank import rank

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

    from transferlab.rank import rank

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
