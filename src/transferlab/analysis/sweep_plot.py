"""The plot of `transferlab-report`: a metric's mean over seeds against one swept key, one line per value of
another (and of any further swept key), error bars one sample standard deviation. Imports matplotlib, so it
is imported only when a plot is drawn."""

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(sweep_dir: Path, cells: list[dict], metric: str, x: str, line: str | None) -> Path:
    """`<metric>_vs_<x>.png` in `sweep_dir`; a point whose cell lost seeds is labelled `n/seeds`; cells split by
    config (see `sweep_report.aggregate`) are lines of their own."""
    xs = [c["values"][x] for c in cells]
    numeric = all(_is_number(v) for v in xs)
    order = sorted(set(xs), key=float) if numeric else list(dict.fromkeys(xs))
    position = {v: (float(v) if numeric else i) for i, v in enumerate(order)}
    lines: dict[str, list[dict]] = {}
    for cell in cells:
        named = [f"{v}" if k == line else f"{k}={v}" for k, v in cell["values"].items() if k != x]
        label = ", ".join([*named, *([cell["config"]] if cell["config"] else [])])
        lines.setdefault(label, []).append(cell)
    values = sorted(position.values())
    log_x = numeric and values[0] > 0 and values[-1] / values[0] >= 10
    gap = min((b - a for a, b in zip(values, values[1:])), default=1.0)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, members) in enumerate(lines.items()):
        dodge = 0.03 * (i - (len(lines) - 1) / 2)  # lines side by side, so their error bars stay apart
        points = sorted(
            (position[c["values"][x]], c["stats"][metric], len(c["seeds"]))
            for c in members
            if c["stats"][metric]["n"] > 0
        )
        if points:
            _draw_line(ax, points, [p * 10**dodge if log_x else p + dodge * gap for p, _, _ in points], label or metric)
    if log_x:
        ax.set_xscale("log")
    if numeric:
        ax.set_xticks([float(v) for v in order], order)
        ax.minorticks_off()
    else:
        ax.set_xticks(range(len(order)), order)
    ax.set_xlabel(x)
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    if len(lines) > 1 or line:
        ax.legend(title=line, fontsize=8)
    fig.tight_layout()
    path = sweep_dir / f"{metric.replace('/', '_')}_vs_{x.replace('/', '_')}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draw_line(ax, points: list[tuple], px: list[float], label: str) -> None:
    """A line of (x, stats, seeds) points drawn at `px`, error bars one std; a point that lost seeds says n/seeds."""
    ys = [s["mean"] for _, s, _ in points]
    err = [0.0 if math.isnan(s["std"]) else s["std"] for _, s, _ in points]
    ax.errorbar(px, ys, yerr=err, marker="o", capsize=3, label=label)
    for p, (_, s, seeds) in zip(px, points):
        if s["n"] < seeds:
            ax.annotate(
                f"n={s['n']}/{seeds}",
                (p, s["mean"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color="red",
            )


def _is_number(value) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False
