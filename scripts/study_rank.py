#!/usr/bin/env python
"""Does `transferlab-rank` predict which source model fine-tunes best? Seven candidate sources for the CIFAR-10
class split's target, each fine-tuned on it; Kendall tau-b and Pearson r of LogME, LEEP, NCE and H-score against
the fine-tuned test accuracy (mean over seeds).

    python scripts/study_rank.py [--root DIR] [--seeds 0 1 2] [--quick] [overrides for every run...]

Candidates, each a `source` stage trained by `transferlab` on the split's source classes (CANDIDATES): 10, 3 and
1 epochs; 10 % of the source images; the two vehicle classes only; the three animal classes only; and a
near-random init (one SGD step). Sources are trained with the stage cache and the low-data study's
source seed, so src_10ep is the low-data study's source model (trained once, whichever study runs first).
Each is fine-tuned with the mission's recipe (pretrain + finetune, given as `stages.source.result_ckpt=`) at the
preset's 100 labels per class, once per seed; then `transferlab-rank` scores all
seven on the target's training split (seed 0's) with those accuracies as `results=`.
--quick: fewer source epochs (3/2/1), one seed, fine-tuning capped at 2 epochs. Writes outputs/bench/rank_study
[_quick].json and .png.
"""

import argparse
import json

from studylib import BENCH, cifar_root, environment, fmt, mean_std, save, split_data, stamp, transferlab

# name -> (overrides of the source run, source epochs in full / --quick mode)
CANDIDATES = {
    "src_10ep": ([], (10, 3)),
    "src_3ep": ([], (3, 2)),
    "src_1ep": ([], (1, 1)),
    "src_10pct_data": (["data.source.label_fraction=0.1"], (10, 3)),
    "src_vehicles_2cls": (["data.source.classes=[airplane,automobile]"], (10, 3)),
    "src_animals_3cls": (["data.source.classes=[bird,cat,deer]"], (10, 3)),
    "random_1step": (["trainer.limit_train_batches=1"], (1, 1)),
}
SCORES = ("logme", "leep", "nce", "hscore")


def train_source(data: list[str], name: str, overrides: list[str], epochs: int, out, extra) -> str | None:
    run = out / "sources" / name
    rc, _ = transferlab(
        *data,
        f"recipe={'mission'}",
        "~stages.pretrain",
        "~stages.finetune",
        "~stages.scratch",
        f"stages.source.epochs={epochs}",
        "objective=source/test/acc",
        "stages.source.seed=0",  # as experiment=lowdata_study trains its source: src_10ep is that model (cache)
        "data.source.seed=0",
        "seed=0",
        f"hydra.run.dir={run}",
        *overrides,
        *extra,
        log=run.with_suffix(".log"),
    )
    ckpt = run / "source" / "checkpoints" / "best.ckpt"
    return str(ckpt) if rc == 0 and ckpt.is_file() else None


def finetune(data: list[str], name: str, ckpt: str, seed: int, out, quick: bool, extra) -> float | None:
    run = out / "finetune" / f"{name}-seed{seed}"
    rc, _ = transferlab(
        *data,
        f"recipe={'mission'}",
        f"stages.source.result_ckpt={ckpt}",
        "~stages.scratch",
        f"seed={seed}",
        f"hydra.run.dir={run}",
        *(["trainer.max_epochs_per_stage=2"] if quick else []),
        *extra,
        log=run.with_suffix(".log"),
    )
    results = run / "results.json"
    return json.loads(results.read_text()).get("finetune/test/acc") if rc == 0 and results.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="folder holding cifar-10-batches-py/ (default: built from the shared copy)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="fewer source epochs, one seed, short fine-tuning")
    args, extra = parser.parse_known_args()
    seeds = [args.seeds[0]] if args.quick else args.seeds
    data, out, env = split_data(cifar_root(args.root)), BENCH / "runs" / f"rank_study-{stamp()}", environment()
    sources = {
        name: train_source(data, name, o, e[1] if args.quick else e[0], out, extra)
        for name, (o, e) in CANDIDATES.items()
    }
    trained = {name: ckpt for name, ckpt in sources.items() if ckpt}
    accs = {
        name: [finetune(data, name, ckpt, s, out, args.quick, extra) for s in seeds] for name, ckpt in trained.items()
    }
    results = out / "finetuned.json"
    results.write_text(json.dumps({n: [a for a in v if a is not None] for n, v in accs.items()}))
    candidates = "{" + ",".join(f"{n}:'{p}'" for n, p in trained.items()) + "}"
    rank_dir = out / "rank"
    rc, rank_wall = transferlab(
        *data,
        "task=target",
        f"candidates={candidates}",
        f"results={results}",
        "seed=0",
        f"hydra.run.dir={rank_dir}",
        *extra,
        module="transferlab.commands.rank",
        log=out / "rank.log",
    )
    ranking = json.loads((rank_dir / "ranking.json").read_text()) if (rank_dir / "ranking.json").is_file() else {}
    correlations = ranking.get("correlations", {})
    best = max(correlations, key=lambda s: correlations[s]["kendall_tau"] or -2, default=None)
    report = {
        "what": __doc__.splitlines()[0],
        "quick": args.quick,
        "seeds": seeds,
        "candidates": {
            n: {
                "overrides": o,
                "epochs": e[1] if args.quick else e[0],
                "checkpoint": sources[n],
                "finetuned_test_acc": mean_std(accs.get(n, [None] * len(seeds))),
            }
            for n, (o, e) in CANDIDATES.items()
        },
        "rank_exit_code": rc,
        "rank_wall_time_s": rank_wall,
        "scores": ranking.get("candidates"),
        "correlations": correlations,
        "best_score": best,
        "best_tau_at_least_0.6": None if best is None else correlations[best]["kendall_tau"] >= 0.6,
        "run_dir": str(out),
        "environment": env,
    }
    for n, c in report["candidates"].items():
        print(f"{n}: fine-tuned test acc {fmt(c['finetuned_test_acc'])}")
    print(json.dumps(correlations, indent=1))
    save("rank_study_quick" if args.quick else "rank_study", report, figure(ranking))


def figure(ranking: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SCORES), figsize=(14, 3.5))
    rows = [r for r in ranking.get("candidates", []) if r.get("finetuned_acc") is not None]
    for ax, score in zip(axes, SCORES):
        ax.scatter([r[score] for r in rows], [r["finetuned_acc"] * 100 for r in rows])
        for r in rows:
            ax.annotate(r["candidate"], (r[score], r["finetuned_acc"] * 100), fontsize=6)
        c = ranking.get("correlations", {}).get(score, {})
        tau, r_ = c.get("kendall_tau"), c.get("pearson_r")
        ax.set_title(
            f"{score}: tau={tau if tau is None else round(tau, 2)}, r={r_ if r_ is None else round(r_, 2)}", fontsize=8
        )
        ax.set_xlabel(score)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fine-tuned test acc (%)")
    return fig


if __name__ == "__main__":
    main()
