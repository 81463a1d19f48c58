"""The results table a user reads: per-stage test metrics and the transfer gain (config `gain`: by default finetune
over scratch)."""

import json
import math
from pathlib import Path

METRICS = ("acc", "acc_top5", "f1", "auroc")


def summarise(stages: dict, compare: str | None = None, baseline: str | None = None) -> dict:
    """Flatten the manifest's stages into `{"<stage>/test/<metric>": value, "gain/<metric>": value}`, the gain
    being stage `compare`'s metric minus stage `baseline`'s (when both were tested)."""
    flat = {
        f"{name}/test/{m}": s["test"][m]
        for name, s in stages.items()
        if s.get("status") == "done"
        for m in METRICS
        if m in s["test"]
    }
    for m in METRICS:
        if f"{compare}/test/{m}" in flat and f"{baseline}/test/{m}" in flat:
            flat[f"gain/{m}"] = flat[f"{compare}/test/{m}"] - flat[f"{baseline}/test/{m}"]
    return {"metrics": flat, "stages": stages, "gain": {"compare": compare, "baseline": baseline}}


def table(results: dict) -> str:
    stages = results["stages"]
    lines = [
        "| stage | task | init | test acc | top-5 | macro F1 | macro AUROC | epochs | wall time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in stages.items():
        t = s.get("test", {})
        cells = [_fmt(t.get(m), percent=m != "auroc") for m in METRICS]
        lines.append(
            f"| {name} | {s.get('task', '')} | {s.get('init') or 'random'} | "
            + " | ".join(cells)
            + f" | {s.get('epochs', '')} | {s.get('wall_time_s', '')} s |"
        )
    gain = results["metrics"].get("gain/acc")
    names = results.get("gain") or {}
    if gain is not None:
        lines += [
            "",
            f"**Transfer gain** ({names['compare']} − {names['baseline']}, test accuracy): "
            f"**{gain * 100:+.2f} points**",
        ]
    elif names.get("compare") or names.get("baseline"):  # the gain line was dropped: say why
        lines += ["", f"No transfer gain: {_no_gain(stages, names)} (gain=null leaves this line out)."]
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
    (run_dir / "results.json").write_text(json.dumps(results["metrics"], indent=2))
    text = table(results)
    (run_dir / "results.md").write_text(f"# Results of {run_dir}\n\n{text}")
    print(f"\nResults ({run_dir}):\n\n{text}")


def _fmt(value, percent: bool) -> str:
    if value is None or math.isnan(value):
        return ""
    return f"{value * 100:.2f} %" if percent else f"{value:.4f}"
