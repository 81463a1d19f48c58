"""The results table a user reads: per-stage test metrics and the transfer gain (config `gain`: by default finetune
over scratch), from the stage records of a run's manifest."""

import json
import math
from pathlib import Path

from transferlab.core.fileio import atomic_write
from transferlab.core.tables import markdown_table
from transferlab.run.manifest import StageRecord
from transferlab.run.plan import TESTED_ON
from transferlab.train.metrics import METRICS, metric_key

COLUMNS = ["stage", "task", "init", "test acc", "top-5", "macro F1", "macro AUROC", "epochs", "wall time"]


def summarise(records: dict[str, StageRecord], compare: str | None = None, baseline: str | None = None) -> dict:
    """`metrics`: `{"<stage>/test/<metric>": value, "gain/<metric>": value}`, the gain being stage `compare`'s
    metric minus stage `baseline`'s (when both were tested); `stages`: the records as JSON; `gain`: the two names."""
    flat = {
        metric_key(name, "test", m): record.test[m]
        for name, record in records.items()
        if record.status == "done"
        for m in METRICS
        if m in record.test
    }
    for m in METRICS:
        compared, base = metric_key(str(compare), "test", m), metric_key(str(baseline), "test", m)
        if compared in flat and base in flat:
            flat[metric_key("gain", m)] = flat[compared] - flat[base]
    stages = {name: record.to_json() for name, record in records.items()}
    return {"metrics": flat, "stages": stages, "gain": {"compare": compare, "baseline": baseline}}


def table(results: dict) -> str:
    rows = [
        [
            name,
            (s.get("task") or "")
            + "".join(f" → {k.split('.')[1].split()[0]}" for k in s.get("config") or {} if k.endswith(TESTED_ON)),
            s.get("init") or "random",
            *(_fmt(s.get("test", {}).get(m), percent=m != "auroc") for m in METRICS),
            s.get("epochs", ""),
            f"{s.get('wall_time_s', '')} s",
        ]
        for name, s in results["stages"].items()
    ]
    lines = [markdown_table(COLUMNS, rows)]
    gain, names = results["metrics"].get(metric_key("gain", "acc")), results.get("gain") or {}
    if gain is not None:
        lines += [
            "",
            f"**Transfer gain** ({names['compare']} − {names['baseline']}, test accuracy): "
            f"**{gain * 100:+.2f} points**",
        ]
    elif names.get("compare") or names.get("baseline"):  # the gain line was dropped: say why
        lines += ["", f"No transfer gain: {_no_gain(results['stages'], names)} (gain=null leaves this line out)."]
    return "\n".join(lines) + "\n"


def _no_gain(stages: dict, names: dict) -> str:
    for key in ("compare", "baseline"):
        stage = stages.get(names.get(key))
        if stage is None:
            return f"gain.{key}={names.get(key)} is not a stage of this run"
        if not stage.get("test"):
            return f"gain.{key}={names.get(key)} was not tested ({stage.get('status')})"
    return "the stages have no test accuracy"


def write(run_dir: Path, results: dict) -> None:
    """results.json and results.md, each written whole or not at all; the table printed."""
    atomic_write(run_dir / "results.json", json.dumps(results["metrics"], indent=2))
    text = table(results)
    atomic_write(run_dir / "results.md", f"# Results of {run_dir}\n\n{text}")
    print(f"\nResults ({run_dir}):\n\n{text}")


def _fmt(value, percent: bool) -> str:
    if value is None or math.isnan(value):
        return ""
    return f"{value * 100:.2f} %" if percent else f"{value:.4f}"
