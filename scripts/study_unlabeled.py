#!/usr/bin/env python
"""The target's unlabeled images, measured on the real CIFAR-10: semi-supervised fine-tuning on the class split,
and domain adaptation to a corrupted CIFAR-10; test accuracy mean ± sample std over seeds, and each method's time
per training epoch and per step against plain fine-tuning in the same sweep.

    python scripts/study_unlabeled.py semi  [--root DIR] [--sizes 10 25 100] [--seeds 0 1 2] [overrides...]
    python scripts/study_unlabeled.py adapt [--root DIR] [--corruptions fog contrast] [--seeds 0 1 2] [overrides...]

semi: `experiment=lowdata_study` (data=cifar10_split; one source model, trained once, seeds on the target side) with
recipe=strong (the best supervised recipe), fixmatch and mean_teacher, which differ from it only in the finetune
stage (the same source and pretrain models: the stage cache trains them once per seed and size). Paired by seed:
method - strong at the same labels per class.

adapt: data=cifar10_shifted (source = the clean, labelled CIFAR-10 training images; target = the same images under
one CIFAR-10-C corruption at severity 5, unlabeled for training; every figure on the corrupted official test
images). The source stage has its own seed (one model per corruption, as with downloaded weights); the seeds vary
the adapt stage. Methods: the adapt stage with no unlabeled loss (plain fine-tuning on the source for the same
epochs), dann, mcc and self_training (pseudo-labels of the source model). Paired by seed: method - source-only.

Writes outputs/bench/unlabeled_<study>.json and .png (the numbers, the commands, the machine).
"""

import argparse
import json
import math
import statistics
from pathlib import Path

from studylib import BENCH, cifar_root, environment, fmt, mean_std, save, stamp, transferlab

SEMI = {"strong": "best supervised (strong)", "fixmatch": "+ FixMatch", "mean_teacher": "+ mean teacher"}
ADAPT = {
    "plain": "source-only, fine-tuned on the source as long",
    "dann": "DANN",
    "mcc": "MCC",
    "self_training": "pseudo-labels (self-training)",
}


def jobs(sweep: Path) -> list[dict]:
    """Each job's overrides, metrics (results.json) and stage records (manifest.json); None where it did not
    finish."""
    out = []
    for job in sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        overrides = dict(
            line.removeprefix("- ").strip().split("=", 1)
            for line in (job / ".hydra" / "overrides.yaml").read_text().splitlines()
            if "=" in line
        )
        results, manifest = job / "results.json", job / "manifest.json"
        done = None
        if results.is_file():
            record = json.loads(manifest.read_text())
            batch = record["config"]["data"]["batch_size"]
            done = {"metrics": json.loads(results.read_text()), "stages": record["stages"], "batch": batch}
        out.append({"job": str(job), "overrides": overrides, "results": done})
    return out


def stage_cost(results: dict, stage: str) -> dict | None:
    """Seconds per epoch and per training step of a stage trained in this job (None if it came from the stage
    cache). Steps per epoch: the longer of the labelled and the unlabeled loader (max_size_cycle)."""
    record = results["stages"][stage]
    if record.get("cached_from") or not record.get("wall_time_s"):
        return None
    per_epoch = record["wall_time_s"] / (record.get("epochs") or 1)
    batch, unlabeled = results["batch"], record["data"].get("unlabeled")
    steps = math.ceil(record["splits"]["train"] / batch)
    if unlabeled:
        steps = max(steps, math.ceil(unlabeled["images"] / (batch * unlabeled["ratio"])))
    return {"s_per_epoch": per_epoch, "steps_per_epoch": steps, "s_per_step": per_epoch / steps}


def table(rows: list[dict], axis: str, methods: list[str], seeds: list[int], stage: str, base: str, key) -> dict:
    """Per value of `axis` and method: the stage's test accuracy, the paired gain over `base` and the time ratio."""
    got = {}
    for r in rows:
        if r["results"]:
            got[(r["overrides"].get(axis), key(r["overrides"]), int(r["overrides"].get("seed", 0)))] = r["results"]
    out = {}
    for value in sorted({k[0] for k in got}, key=lambda v: (len(v), v)):
        cells = {}
        base_acc = {s: got.get((value, base, s), {}).get("metrics", {}).get(f"{stage}/test/acc") for s in seeds}
        if base == "source":  # domain adaptation: the source-only model's accuracy on the target
            any_run = next((got[k] for k in got if k[0] == value), None)
            acc = any_run["metrics"].get("source/test/acc") if any_run else None
            cells["source-only"] = {"test_acc": mean_std([acc]), "note": "one source model (its own seed)"}
            base_acc = {s: acc for s in seeds}
        plain_cost = {s: stage_cost(got[(value, methods[0], s)], stage) for s in seeds if (value, methods[0], s) in got}
        for m in methods:
            acc = [got.get((value, m, s), {}).get("metrics", {}).get(f"{stage}/test/acc") for s in seeds]
            gain = [a - base_acc[s] if a is not None and base_acc[s] is not None else None for a, s in zip(acc, seeds)]
            ratios, step_ratios, steps = [], [], None
            for s in seeds:
                cost = stage_cost(got[(value, m, s)], stage) if (value, m, s) in got else None
                plain = plain_cost.get(s)
                if cost and plain:
                    ratios.append(cost["s_per_epoch"] / plain["s_per_epoch"])
                    step_ratios.append(cost["s_per_step"] / plain["s_per_step"])
                    steps = cost["steps_per_epoch"]
            cells[m] = {
                "test_acc": mean_std(acc),
                "gain": mean_std(gain),
                "time_per_epoch_ratio": statistics.median(ratios) if ratios else None,
                "time_per_epoch_ratios": ratios,
                "time_per_step_ratio": statistics.median(step_ratios) if step_ratios else None,
                "steps_per_epoch": steps,
            }
        out[value] = cells
    return out


def markdown(tab: dict, names: dict, axis: str, base: str) -> str:
    lines = [
        f"| {axis} | method | test acc (%) | gain over {base} (points) | time per epoch × {base} | steps per epoch "
        f"| time per step × {base} |",
        "|---|---|---|---|---|---|---|",
    ]
    for value, cells in tab.items():
        for m, c in cells.items():
            gain = fmt(c["gain"]) if c.get("gain") else ""
            ratio = f"{c['time_per_epoch_ratio']:.2f}" if c.get("time_per_epoch_ratio") else ""
            step = f"{c['time_per_step_ratio']:.2f}" if c.get("time_per_step_ratio") else ""
            steps = c.get("steps_per_epoch") or ""
            lines.append(
                f"| {value} | {names.get(m, m)} | {fmt(c['test_acc'])} | {gain} | {ratio} | {steps} | {step} |"
            )
    return "\n".join(lines)


def figure(tab: dict, names: dict, xlabel: str, log_x: bool):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    values = list(tab)
    methods = list(next(iter(tab.values()))) if tab else []
    for m in methods:
        stats = [tab[v].get(m, {}).get("test_acc") for v in values]
        xs = [int(v) for v in values] if log_x else list(range(len(values)))
        ax.errorbar(
            xs,
            [(s["mean"] or 0) * 100 if s else 0 for s in stats],
            yerr=[(s["std"] or 0) * 100 if s else 0 for s in stats],
            marker="o",
            capsize=3,
            label=names.get(m, m),
        )
    if log_x:
        ax.set_xscale("log")
        ax.set_xticks([int(v) for v in values], values)
        ax.minorticks_off()
    else:
        ax.set_xticks(range(len(values)), values)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("target test accuracy (%), mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", choices=["semi", "adapt"])
    parser.add_argument("--root", help="folder holding cifar-10-batches-py/ (default: built from the shared copy)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 25, 100])
    parser.add_argument("--corruptions", nargs="+", default=["fog", "contrast"])
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sweep", help="analyse this finished sweep folder instead of running one")
    args, extra = parser.parse_known_args()
    root, seeds = cifar_root(args.root), args.seeds
    sweep = Path(args.sweep) if args.sweep else BENCH / "runs" / f"unlabeled-{args.study}-{stamp()}"
    env = environment()
    if args.study == "semi":
        overrides = [
            "experiment=lowdata_study",
            f"data.root={root}",
            f"data.target.samples_per_class={','.join(map(str, args.sizes))}",
            f"recipe={','.join(SEMI)}",
            f"seed={','.join(map(str, seeds))}",
            f"hydra.sweep.dir={sweep}",
            *extra,
        ]
        names, axis, stage, base = SEMI, "data.target.samples_per_class", "finetune", "strong"
        key = lambda o: o["recipe"]
    else:
        overrides = [
            "recipe=dann",
            "data=cifar10_shifted",
            f"data.root={root}",
            "stages.source.seed=0",
            "data.source.seed=0",
            f"data.target.severity={args.severity}",
            f"data.target.corruption={','.join(args.corruptions)}",
            "stages.adapt.unlabeled.method=none,dann,mcc,pseudo_label",
            f"seed={','.join(map(str, seeds))}",
            "trainer.enable_progress_bar=false",
            f"hydra.sweep.dir={sweep}",
            *extra,
        ]
        names = {"none": ADAPT["plain"], "dann": "DANN", "mcc": "MCC", "pseudo_label": ADAPT["self_training"]}
        axis, stage, base = "data.target.corruption", "adapt", "source"
        key = lambda o: o["stages.adapt.unlabeled.method"]
    rc, wall = (None, None) if args.sweep else transferlab("-m", *overrides)
    rows = jobs(sweep)
    methods = list(names)
    tab = table(rows, axis, methods, seeds, stage, base, key)
    md = markdown(tab, names, axis, "strong" if base == "strong" else "source-only")
    report = {
        "what": __doc__.splitlines()[0],
        "study": args.study,
        "command": "transferlab -m " + " ".join(overrides),
        "exit_code": rc,
        "wall_time_s": wall,
        "jobs": len(rows),
        "failed_jobs": [r["job"] for r in rows if r["results"] is None],
        "seeds": seeds,
        "table": tab,
        "markdown": md,
        "sweep_dir": str(sweep),
        "environment": env,
    }
    print(md)
    save(f"unlabeled_{args.study}", report, figure(tab, names, axis, log_x=args.study == "semi"))


if __name__ == "__main__":
    main()
