#!/usr/bin/env python
"""The low-data study on the CIFAR-10 class split: labels per class x method x seed; test accuracy and the gain
over scratch, mean ± sample std over seeds.

    python scripts/study_lowdata.py [--root DIR] [--sizes 10 25 100 500] [--seeds 0 1 2] [--quick] [overrides...]

One command underneath: `transferlab -m experiment=lowdata_study data=cifar10_split ...` (the source stage is
trained once, with its own seed, through the stage cache; the sweep folder gets its own report.md/csv/png). Methods:
scratch (the mission recipe's scratch stage), the mission's recipe, LP-FT, L2-SP, discriminative LR and the
best recipe (`recipe=strong`, whose own scratch stage is reported too); a recipe this checkout lacks is listed
as not run. Gains are paired by seed and labels per class: finetune(method, seed) - scratch(mission, seed).
--quick: 10 and 100 labels per class, seed 0, every stage capped at 2 epochs: checks the chain, not a result.
Writes outputs/bench/lowdata[_quick].json and .png.
"""

import argparse

from studylib import (
    BENCH,
    cifar_root,
    environment,
    fmt,
    has_config,
    mean_std,
    save,
    split_data,
    stamp,
    transferlab,
)

from transferlab.analysis.sweep_report import collect

METHODS = {
    "mission": "the mission's recipe",
    "lp_ft": "LP-FT",
    "l2sp": "L2-SP",
    "discriminative": "discriminative LR",
    "strong": "best recipe (strong)",
}


def analyse(rows: list[dict], methods: list[str], sizes: list[int], seeds: list[int]) -> dict:
    """Per labels-per-class and method: test accuracy, gain over its own scratch and over the mission's scratch."""
    runs = {
        (
            r["overrides"].get("recipe"),
            int(r["overrides"]["data.target.samples_per_class"]),
            int(r["overrides"].get("seed", 0)),
        ): r["metrics"] if r["status"] == "done" else {}
        for r in rows
    }
    get = lambda m, size, seed, key: runs.get((m, size, seed), {}).get(key)
    table = {}
    for size in sizes:
        mission_scratch = [get("mission", size, s, "scratch/test/acc") for s in seeds]
        cells = {"scratch (mission)": {"test_acc": mean_std(mission_scratch)}}
        if "strong" in methods:
            cells["scratch (best recipe)"] = {
                "test_acc": mean_std([get("strong", size, s, "scratch/test/acc") for s in seeds])
            }
        for m in methods:
            acc = [get(m, size, s, "finetune/test/acc") for s in seeds]
            paired = [a - b if a is not None and b is not None else None for a, b in zip(acc, mission_scratch)]
            cells[m] = {
                "test_acc": mean_std(acc),
                "gain_over_own_scratch": mean_std([get(m, size, s, "gain/acc") for s in seeds]),
                "gain_over_mission_scratch": mean_std(paired),
            }
        table[str(size)] = cells
    return table


def targets(table: dict, methods: list[str]) -> dict:
    """The issue's targets at 100 labels per class, computed from the table (None where not measured)."""
    cells = table.get("100")
    if not cells or "mission" not in methods:
        return {"measured": False}
    gains = {m: cells[m]["gain_over_mission_scratch"] for m in methods if cells[m]["gain_over_mission_scratch"]["n"]}
    if not gains:
        return {"measured": False}
    best = max(gains, key=lambda m: gains[m]["mean"])
    mission_std = cells["mission"]["gain_over_mission_scratch"]["std"]
    over_best_scratch = None
    if "strong" in methods and cells["scratch (best recipe)"]["test_acc"]["n"]:
        over_best_scratch = cells[best]["test_acc"]["mean"] - cells["scratch (best recipe)"]["test_acc"]["mean"]
    return {
        "measured": True,
        "best_method": best,
        "best_gain_over_mission_scratch": gains[best],
        "all_seeds_ran": all(cells[m][k]["n"] == cells[m][k]["of"] for m in methods for k in cells[m]),
        "gain_at_least_20_points": gains[best]["mean"] >= 0.20,
        "spread_at_most_half_the_missions": (
            None if gains[best]["std"] is None or mission_std is None else gains[best]["std"] <= mission_std / 2
        ),
        "best_minus_best_recipe_scratch": over_best_scratch,
    }


def markdown(table: dict, methods: list[str]) -> str:
    lines = [
        "| labels/class | method | test acc (%) | gain over own scratch (points) | gain over mission scratch |",
        "|---|---|---|---|---|",
    ]
    for size, cells in table.items():
        for name, c in cells.items():
            label = METHODS.get(name, name)
            own, paired = c.get("gain_over_own_scratch"), c.get("gain_over_mission_scratch")
            lines.append(
                f"| {size} | {label} | {fmt(c['test_acc'])} | {fmt(own) if own else ''} | "
                f"{fmt(paired) if paired else ''} |"
            )
    return "\n".join(lines)


def figure(table: dict, methods: list[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, gain) = plt.subplots(1, 2, figsize=(10, 4))
    sizes = [int(s) for s in table]
    for name in [*methods, "scratch (mission)", "scratch (best recipe)"]:
        for ax, key in ((acc, "test_acc"), (gain, "gain_over_mission_scratch")):
            stats = [table[str(s)].get(name, {}).get(key) for s in sizes]
            points = [(s, st) for s, st in zip(sizes, stats) if st and st["n"]]
            if points:
                ax.errorbar(
                    [s for s, _ in points],
                    [st["mean"] * 100 for _, st in points],
                    yerr=[(st["std"] or 0) * 100 for _, st in points],
                    marker="o",
                    capsize=3,
                    linestyle="--" if name.startswith("scratch") else "-",
                    label=METHODS.get(name, name),
                )
    for ax, label in ((acc, "target test accuracy (%)"), (gain, "gain over the mission's scratch (points)")):
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("labels per class")
        ax.set_ylabel(f"{label}, mean ± std over seeds")
        ax.grid(alpha=0.3)
    acc.legend(fontsize=7)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="folder holding cifar-10-batches-py/ (default: built from the shared copy)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 25, 100, 500])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="10 and 100 labels, seed 0, stages capped at 2 epochs")
    args, extra = parser.parse_known_args()
    sizes, seeds = ([10, 100], [0]) if args.quick else (args.sizes, args.seeds)
    methods = [m for m in METHODS if has_config("recipe", m)]
    sweep, env = BENCH / "runs" / f"lowdata-{stamp()}", environment()
    overrides = [
        "experiment=lowdata_study",
        *split_data(cifar_root(args.root)),
        f"data.target.samples_per_class={','.join(map(str, sizes))}",
        f"recipe={','.join(m for m in methods)}",
        f"seed={','.join(map(str, seeds))}",
        f"hydra.sweep.dir={sweep}",
        *(["trainer.max_epochs_per_stage=2"] if args.quick else []),
        *extra,
    ]
    rc, wall = transferlab("-m", *overrides)
    rows = collect(sweep)
    table = analyse(rows, methods, sizes, seeds)
    report = {
        "what": __doc__.splitlines()[0],
        "quick": args.quick,
        "command": "transferlab -m " + " ".join(overrides),
        "exit_code": rc,
        "wall_time_s": wall,
        "jobs": len(rows),
        "failed_jobs": [r["job"] for r in rows if r["status"] != "done"],
        "not_run": [m for m in METHODS if m not in methods],
        "sizes": sizes,
        "seeds": seeds,
        "table": table,
        "targets_at_100": targets(table, methods),
        "sweep_dir": str(sweep),
        "environment": env,
    }
    print(markdown(table, methods))
    print(
        {
            k: v
            for k, v in report.items()
            if k in ("exit_code", "wall_time_s", "failed_jobs", "not_run", "targets_at_100")
        }
    )
    save(
        "lowdata_quick" if args.quick else "lowdata",
        report | {"markdown": markdown(table, methods)},
        figure(table, methods),
    )


if __name__ == "__main__":
    main()
