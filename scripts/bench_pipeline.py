#!/usr/bin/env python
"""Time `transferlab` with its defaults (four stages on the built-in data, stage cache off so every stage
trains) and report the transfer gain.

    python scripts/bench_pipeline.py [extra Hydra overrides]

Writes outputs/bench/pipeline.json and prints it.
"""

import json
import os
import platform
import sys
import time
from pathlib import Path

from studylib import transferlab, write_json

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    run_dir = REPO / "outputs" / "bench" / f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}"
    args = [f"hydra.run.dir={run_dir}", "cache=false", "trainer.enable_progress_bar=false", *sys.argv[1:]]
    code, wall = transferlab(*args)  # this checkout's code, in a new process
    if code != 0:
        raise SystemExit(f"transferlab exited {code}")
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    results = json.loads((run_dir / "results.json").read_text())
    report = {
        "command": " ".join(["transferlab", *args]),
        "wall_time_s": wall,
        "stage_wall_time_s": {name: s["wall_time_s"] for name, s in manifest.items()},
        "test_acc": {name: round(s["test"]["acc"], 4) for name, s in manifest.items()},
        "transfer_gain_points": round(results["gain/acc"] * 100, 2),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "run_dir": str(run_dir),
    }
    out = REPO / "outputs" / "bench" / "pipeline.json"
    write_json(out, report)


if __name__ == "__main__":
    main()
