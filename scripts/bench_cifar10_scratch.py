#!/usr/bin/env python
"""The mission's recipe from scratch on the real CIFAR-10: ConvNet, SGD lr 0.01, batch 64, 10 epochs.

    python scripts/bench_cifar10_scratch.py [--root DIR] [--no-augment] [extra Hydra overrides]

Without --root it builds the official layout from ../shared/data/cifar10 into outputs/data/ (once).
Runs only the `scratch` stage of the pipeline (same Trainer, data module and metrics as every run)
and writes outputs/bench/cifar10_scratch[_noaug].json.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from studylib import write_json

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10"


def cifar_root(root: str | None) -> Path:
    if root:
        return Path(root)
    out = REPO / "outputs" / "data" / "cifar10"
    if not (out / "cifar-10-batches-py" / "test_batch").is_file():
        subprocess.run([sys.executable, str(SHARED_CIFAR / "build_cifar10.py"), str(out)], check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="folder holding cifar-10-batches-py/")
    parser.add_argument("--no-augment", action="store_true", help="no random crop / flip (as a plain loop)")
    args, overrides = parser.parse_known_args()
    suffix = "_noaug" if args.no_augment else ""
    run_dir = REPO / "outputs" / "bench" / f"cifar10_scratch{suffix}-{time.strftime('%Y%m%d-%H%M%S')}"
    command = [
        str(Path(sys.executable).parent / "transferlab"),
        "data=builtin_cifar10",
        f"data.target.root={cifar_root(args.root)}",
        f"data.target.augment={not args.no_augment}",
        "~stages.source",
        "~stages.pretrain",
        "~stages.finetune",
        "stages.scratch.epochs=10",
        "objective=scratch/test/acc",
        f"hydra.run.dir={run_dir}",
        "trainer.enable_progress_bar=false",
        "cache=false",
        *overrides,
    ]
    start = time.time()
    subprocess.run(command, check=True, cwd=REPO)
    stage = json.loads((run_dir / "manifest.json").read_text())["stages"]["scratch"]
    report = {
        "command": " ".join(command[1:]),
        "augment": not args.no_augment,
        "test": stage["test"],
        "best_val_acc": stage["best_val"],
        "splits": stage["splits"],
        "stage_wall_time_s": stage["wall_time_s"],
        "wall_time_s": round(time.time() - start, 1),
        "cpus": os.cpu_count(),
        "run_dir": str(run_dir),
    }
    out = REPO / "outputs" / "bench" / f"cifar10_scratch{suffix}.json"
    write_json(out, report)


if __name__ == "__main__":
    main()
