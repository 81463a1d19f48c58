"""How long `transferlab-rank` takes: 5 ConvNet candidates on a 5,000-image target (built-in data, offline), and
LogME alone at feature dimension 2,048 (a ResNet-50's) on N = 5,000.

    python scripts/bench_rank.py            # writes outputs/bench/rank.json
    python scripts/bench_rank.py --quick    # 1,000 target images, LogME at N = 1,000

The candidates are ConvNet checkpoints at different random inits (the forward pass and the scores cost the same
as for trained ones). The command runs as a user runs it (a new process), first with an empty feature cache, then
again with the cache filled; the JSON records both wall times, the per-candidate forward and score times from
ranking.json, and the machine and versions.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from studylib import write_json

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from transferlab import provenance  # noqa: E402
from transferlab.analysis.transferability import h_score, logme  # noqa: E402
from transferlab.train.module import ClassifierModule  # noqa: E402


def write_candidates(folder: Path, n: int = 5) -> list[Path]:
    """ConvNet checkpoints in transferlab's format (state_dict + plain hyperparameters), heads of 40 classes."""
    paths = []
    for seed in range(n):
        torch.manual_seed(seed)
        module = ClassifierModule(model={"name": "convnet"}, num_classes=40, optimizer={"name": "sgd", "lr": 0.01})
        path = folder / f"candidate{seed}.ckpt"
        torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
        paths.append(path)
    return paths


def run_rank(candidates: list[Path], images: int, out: Path, cache: Path) -> dict:
    """The command in a new process: its wall time, and its CPU time (user + sys, all threads; on a machine shared
    with other jobs the wall time grows with the load, the CPU time much less)."""
    per_class = images // 10  # the built-in target has 10 classes; val_fraction=0: all of them are training images
    cmd = [
        sys.executable,
        "-m",
        "transferlab.commands.rank",
        f"candidates=[{','.join(map(str, candidates))}]",
        f"data.target.train_per_class={per_class}",
        "data.target.val_fraction=0",
        "data.target.test_per_class=1",
        f"hydra.run.dir={out}",
        f"paths.cache_dir={cache}",
        "device=cpu",
    ]
    before, start = _children_cpu(), time.perf_counter()
    subprocess.run(
        cmd, check=True, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO / "src")}
    )
    return {
        "wall_s": round(time.perf_counter() - start, 1),
        "cpu_s": round(_children_cpu() - before, 1),
        "load_average_1min": os.getloadavg()[0],
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_scores(n: int, d: int = 2048, classes: int = 10) -> dict:
    rng = np.random.default_rng(0)
    labels = np.arange(n) % classes
    features = np.maximum(rng.normal(size=(n, d)) + 0.5 * np.eye(classes, d)[labels], 0).astype(np.float32)
    out = {"n": n, "d": d, "classes": classes, "load_average_1min": os.getloadavg()[0]}
    for name, score in (("logme", logme), ("hscore", h_score)):
        wall, cpu = time.perf_counter(), time.process_time()
        out[name] = score(features, labels)
        out[f"{name}_wall_s"] = round(time.perf_counter() - wall, 2)
        out[f"{name}_cpu_s"] = round(time.process_time() - cpu, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,000 target images instead of 5,000")
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench" / "rank.json"))
    args = parser.parse_args()
    images = 1000 if args.quick else 5000
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        candidates = write_candidates(tmp)
        cold = run_rank(candidates, images, tmp / "rank_cold", tmp / "cache")
        ranking = json.loads((tmp / "rank_cold" / "ranking.json").read_text())
        warm = run_rank(candidates, images, tmp / "rank_warm", tmp / "cache")
    rows = ranking["candidates"]
    result = {
        "rank": {
            "candidates": len(rows),
            "model": "convnet",
            "target_images": ranking["samples"],
            "feature_dim": rows[0]["feature_dim"],
            "cold_cache": cold,
            "warm_cache": warm,
            "forward_s": [r["forward_s"] for r in rows],
            "scores_s": [r["scores_s"] for r in rows],
        },
        "logme_d2048": time_scores(images),
        "torch_threads": torch.get_num_threads(),
        "provenance": provenance.collect() | {"numpy": np.__version__},
    }
    write_json(args.out, result, echo=False)
    print(json.dumps({k: v for k, v in result.items() if k != "provenance"}, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
