"""The results table a user reads: per-stage test metrics and the transfer gain of finetune over scratch."""

import json
import math
from pathlib import Path

METRICS = ("acc", "acc_top5", "f1", "auroc")


def summarise(stages: dict) -> dict:
    """Flatten the manifest's stages into `{"<stage>/test/<metric>": value, "gain/<metric>": value}`."""
    flat = {f"{name}/test/{m}": s["test"][m] for name, s in stages.items() if s.get("status") == "done"
            for m in METRICS if m in s["test"]}
    for m in METRICS:
        if f"finetune/test/{m}" in flat and f"scratch/test/{m}" in flat:
            flat[f"gain/{m}"] = flat[f"finetune/test/{m}"] - flat[f"scratch/test/{m}"]
    return {"metrics": flat, "stages": stages}


def table(results: dict) -> str:
    stages = results["stages"]
    lines = ["| stage | task | init | test acc | top-5 | macro F1 | macro AUROC | epochs | wall time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in stages.items():
        t = s.get("test", {})
        cells = [_fmt(t.get(m), percent=m != "auroc") for m in METRICS]
        lines.append(f"| {name} | {s.get('task', '')} | {s.get('init') or 'random'} | " + " | ".join(cells)
                     + f" | {s.get('epochs', '')} | {s.get('wall_time_s', '')} s |")
    gain = results["metrics"].get("gain/acc")
    if gain is not None:
        lines += ["", f"**Transfer gain** (finetune − scratch, test accuracy): **{gain * 100:+.2f} points**"]
    return "\n".join(lines) + "\n"


def write(run_dir: Path, results: dict) -> None:
    (run_dir / "results.json").write_text(json.dumps(results["metrics"], indent=2))
    text = table(results)
    (run_dir / "results.md").write_text(f"# Results of {run_dir}\n\n{text}")
    print(f"\nResults ({run_dir}):\n\n{text}")


def _fmt(value, percent: bool) -> str:
    if value is None or math.isnan(value):
        return ""
    return f"{value * 100:.2f} %" if percent else f"{value:.4f}"
