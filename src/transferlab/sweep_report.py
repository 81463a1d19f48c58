"""`transferlab-report <sweep folder>`: one table (markdown and CSV) of every job's swept values and
metrics, and a plot of the objective against each swept parameter."""

import argparse
import csv
import json
import math
from pathlib import Path

import yaml


def collect(sweep_dir: Path) -> list[dict]:
    """One row per job folder (a folder with .hydra/overrides.yaml): its overrides, objective, metrics."""
    rows = []
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml"), key=lambda p: _job_key(p.parents[1])):
        job = overrides_file.parents[1]
        overrides = dict(o.split("=", 1) for o in yaml.safe_load(overrides_file.read_text()) or [] if "=" in o)
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        results = job / "results.json"
        metrics = json.loads(results.read_text()) if results.is_file() else {}
        objective = metrics.get(config.get("objective"), float("nan"))
        rows.append({"job": job.name, "status": "done" if metrics else "failed", "overrides": overrides,
                     "objective": objective, "metrics": metrics})
    return rows


def _job_key(job: Path):
    return (0, int(job.name)) if job.name.isdigit() else (1, job.name)


def write(sweep_dir: Path, rows: list[dict]) -> list[Path]:
    swept = sorted(k for k in {k for r in rows for k in r["overrides"]}  # keys whose value differs by job
                   if len({r["overrides"].get(k) for r in rows}) > 1)
    metric_names = sorted({k for r in rows for k in r["metrics"]})
    header = ["job", "status", *swept, "objective", *metric_names]
    table = [[r["job"], r["status"], *[r["overrides"].get(k, "") for k in swept], _fmt(r["objective"]),
              *[_fmt(r["metrics"].get(m)) for m in metric_names]] for r in rows]
    with open(sweep_dir / "report.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *table])
    shown = [i for i, name in enumerate(header) if i < 3 + len(swept) or name.endswith("/acc")]  # md: accuracies
    lines = ["| " + " | ".join(header[i] for i in shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(str(row[i]) for i in shown) + " |" for row in table]
    (sweep_dir / "report.md").write_text(f"# Sweep {sweep_dir}\n\n" + "\n".join(lines) + "\n")
    return [sweep_dir / "report.md", sweep_dir / "report.csv", *plot(sweep_dir, rows, swept)]


def plot(sweep_dir: Path, rows: list[dict], swept: list[str]) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name in swept:
        points = [(r["overrides"][name], r["objective"]) for r in rows
                  if name in r["overrides"] and not math.isnan(r["objective"])]
        if not points:
            continue
        xs = [_number(x) for x, _ in points]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        if all(isinstance(x, float) for x in xs):
            ax.scatter(xs, [y for _, y in points])
            if min(xs) > 0 and max(xs) / min(xs) >= 100:
                ax.set_xscale("log")
        else:
            ax.scatter([str(x) for x, _ in points], [y for _, y in points])
        ax.set_xlabel(name)
        ax.set_ylabel("objective")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = sweep_dir / f"objective_vs_{name.replace('/', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _number(value: str):
    try:
        return float(value)
    except ValueError:
        return value


def _fmt(value) -> str:
    if value is None:
        return ""
    return "nan" if isinstance(value, float) and math.isnan(value) else f"{value:.4f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder, e.g. outputs/multirun/<date_time>")
    args = parser.parse_args(argv)
    rows = collect(args.sweep_dir)
    if not rows:
        parser.error(f"no job folders (with .hydra/overrides.yaml) under {args.sweep_dir}: "
                     "give the folder of a `transferlab -m ...` sweep")
    for path in write(args.sweep_dir, rows):
        print(path)
    print((args.sweep_dir / "report.md").read_text())


if __name__ == "__main__":
    main()
