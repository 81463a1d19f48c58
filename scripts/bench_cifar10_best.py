#!/usr/bin/env python
"""The mission's ConvNet from scratch on the full CIFAR-10 (45k train / 5k val / 10k test), 10 epochs: the
mission's recipe next to a best recipe, same machine, same run, rounds interleaved (seed s: mission, then best).

    python scripts/bench_cifar10_best.py [--root DIR] [--seeds 0 1 2] [--epochs 10] [--quick] [overrides...]

The best recipe (BEST; --best replaces it): `recipe=strong` (SGD, Nesterov momentum 0.9, weight decay 5e-4
without norm/bias decay, label smoothing 0.1, one epoch of per-step linear warm-up then per-step cosine to zero),
batch 128 and lr 0.02 (the mission's 0.01 at batch 64, scaled linearly), crop + flip as in the mission's runs.
Where this checkout has no `strong` recipe, BEST_TODAY: what today's options give (no label smoothing or warm-up,
cosine per epoch). --quick: one seed, one epoch (the per-epoch time). Writes outputs/bench/cifar10_best[_quick]
.json and .png.
"""

import argparse
import json

from studylib import BENCH, bar_figure, cifar_root, environment, fmt, has_config, mean_std, save, stamp, transferlab

BEST = ["recipe=strong", "data.batch_size=128", "stages.scratch.optimizer.lr=0.02"]
BEST_TODAY = [
    "stages.scratch.optimizer.lr=0.02",
    "stages.scratch.optimizer.momentum=0.9",
    "+stages.scratch.optimizer.nesterov=true",
    "stages.scratch.optimizer.weight_decay=5e-4",
    "stages.scratch.scheduler.name=cosine",
    "data.batch_size=128",
]


def recipes(best: list[str] | None) -> dict[str, list[str]]:
    mission = [f"recipe={'mission'}"]
    return {"mission": mission, "best": best or (BEST if has_config("recipe", "strong") else [*mission, *BEST_TODAY])}


def run_one(root, name: str, overrides: list[str], seed: int, epochs: int, extra: list[str], tag: str) -> dict:
    run_dir = BENCH / "runs" / f"cifar10_best-{tag}-{name}-seed{seed}"
    rc, wall = transferlab(
        "data=builtin_cifar10",
        f"data.target.root={root}",
        *overrides,
        "~stages.source",
        "~stages.pretrain",
        "~stages.finetune",
        f"stages.scratch.epochs={epochs}",
        f"seed={seed}",
        "objective=scratch/test/acc",
        f"hydra.run.dir={run_dir}",
        "trainer.enable_progress_bar=false",
        "cache=false",
        *extra,
        log=run_dir.with_suffix(".log"),
    )
    manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").is_file() else {}
    stage = manifest.get("stages", {}).get("scratch", {})
    done = rc == 0 and stage.get("status") == "done"
    return {
        "recipe": name,
        "seed": seed,
        "rc": rc,
        "status": stage.get("status", "failed"),
        "run_dir": str(run_dir),
        "test_acc": stage["test"]["acc"] if done else None,
        "best_val_acc": stage.get("best_val"),
        "splits": stage.get("splits"),
        "stage_wall_time_s": stage.get("wall_time_s"),
        "process_wall_time_s": wall,
        "epoch_time_s": round(stage["wall_time_s"] / epochs, 1) if done else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="folder holding cifar-10-batches-py/ (default: built from the shared copy)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="one seed, one epoch: the per-epoch time")
    parser.add_argument("--best", nargs="+", help="the best recipe's overrides (default: BEST)")
    args, extra = parser.parse_known_args()
    seeds, epochs = ([args.seeds[0]], 1) if args.quick else (args.seeds, args.epochs)
    root, tag, env = cifar_root(args.root), stamp(), environment()
    runs = [
        run_one(root, name, overrides, seed, epochs, extra, tag)
        for seed in seeds
        for name, overrides in recipes(args.best).items()
    ]  # interleaved: seed by seed
    summary = {
        name: {
            "test_acc": mean_std([r["test_acc"] for r in runs if r["recipe"] == name]),
            "stage_wall_time_s": mean_std([r["stage_wall_time_s"] for r in runs if r["recipe"] == name]),
            "epoch_time_s": mean_std([r["epoch_time_s"] for r in runs if r["recipe"] == name]),
        }
        for name in recipes(args.best)
    }
    report = {
        "what": __doc__.splitlines()[0],
        "quick": args.quick,
        "epochs": epochs,
        "seeds": seeds,
        "recipes": recipes(args.best),
        "extra_overrides": extra,
        "summary": summary,
        "runs": runs,
        "environment": env,
    }
    for name, s in summary.items():
        print(f"{name}: test acc {fmt(s['test_acc'])} %, epoch {fmt(s['epoch_time_s'], 1)} s")
    panels = [("test_acc", "test accuracy"), ("stage_wall_time_s", "wall time (s)")]
    fig = bar_figure(summary, panels, f"ConvNet, CIFAR-10 scratch, {epochs} epoch(s), seeds {seeds}")
    save("cifar10_best_quick" if args.quick else "cifar10_best", report, fig)


if __name__ == "__main__":
    main()
