#!/usr/bin/env python
"""CPU speed levers at equal accuracy: the mission's ConvNet from scratch on the full CIFAR-10 (45k train / 5k val /
10k test, 10 epochs, the mission's recipe), once per lever, through the real `transferlab` command, rounds
interleaved (seed s: every lever, then seed s+1).

    python scripts/bench_cpu_levers.py [--root DIR] [--seeds 0 1 2] [--epochs 10] [--levers fp32 channels_last ...]
        [--name cpu_levers] [overrides...]

Levers (LEVERS): `fp32` (contiguous weights, eager), `channels_last` (channels-last conv weights), `compile`
(torch.compile of the backbone; its compile time is in the stage's time, as a user pays it), `bf16` (bf16-mixed
autocast with channels-last weights: compare it with `channels_last`, the same layout in fp32; this answers the bf16
question on a given CPU: `--levers channels_last bf16 --name precision_cpu`). Each run's speed is its stage's images
per second: epochs x training images over the stage's wall time (training, validation every epoch, checkpoints);
the speed ratios are against the first lever given, on the same seed. Writes outputs/bench/<name>.json and .png.
"""

import argparse

from bench_cifar10_best import run_one
from studylib import bar_figure, cifar_root, environment, fmt, mean_std, save, stamp

LEVERS = {
    "fp32": ["recipe=mission", "channels_last=false", "compile=false"],
    "channels_last": ["recipe=mission", "channels_last=true", "compile=false"],
    "compile": ["recipe=mission", "channels_last=false", "compile=true"],
    "bf16": ["recipe=mission", "channels_last=true", "compile=false", "precision=bf16-mixed"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="folder holding cifar-10-batches-py/ (default: built from the shared copy)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--levers", nargs="+", default=["fp32", "channels_last", "compile"], choices=list(LEVERS))
    parser.add_argument("--name", default="cpu_levers", help="outputs/bench/<name>.json and .png")
    args, extra = parser.parse_known_args()
    root, tag, env = cifar_root(args.root), stamp(), environment()
    runs = []
    for seed in args.seeds:  # interleaved: every lever for one seed, then the next seed
        for lever in args.levers:
            run = run_one(root, lever, LEVERS[lever], seed, args.epochs, extra, f"levers-{tag}")
            if run["stage_wall_time_s"]:
                run["img_s"] = round(args.epochs * run["splits"]["train"] / run["stage_wall_time_s"], 1)
            runs.append(run)
            print(f"seed {seed} {lever}: test acc {run['test_acc']}, {run.get('img_s')} img/s", flush=True)
    by_lever = {lever: [r for r in runs if r["recipe"] == lever] for lever in args.levers}
    first = args.levers[0]  # the baseline of the speed ratios, measured in the same rounds
    baseline = {r["seed"]: r.get("img_s") for r in by_lever[first]}
    summary = {
        lever: {
            "test_acc": mean_std([r["test_acc"] for r in rs]),
            "img_s": mean_std([r.get("img_s") for r in rs]),
            "speed_vs_baseline_same_seed": mean_std(
                [r["img_s"] / baseline[r["seed"]] for r in rs if r.get("img_s") and baseline.get(r["seed"])]
            ),
        }
        for lever, rs in by_lever.items()
    }
    report = {
        "what": __doc__.splitlines()[0],
        "epochs": args.epochs,
        "seeds": args.seeds,
        "levers": {lever: LEVERS[lever] for lever in args.levers},
        "baseline": first,
        "extra_overrides": extra,
        "summary": summary,
        "runs": runs,
        "environment": env,
    }
    for lever, s in summary.items():
        ratio = fmt(s["speed_vs_baseline_same_seed"], 1.0)
        print(f"{lever}: test acc {fmt(s['test_acc'])} %, {fmt(s['img_s'], 1.0)} img/s, x {first} {ratio}")
    panels = [("test_acc", "test accuracy"), ("img_s", "images/s (stage)")]
    fig = bar_figure(summary, panels, f"ConvNet, CIFAR-10 scratch, {args.epochs} epochs, seeds {args.seeds}")
    save(args.name, report, fig)


if __name__ == "__main__":
    main()
