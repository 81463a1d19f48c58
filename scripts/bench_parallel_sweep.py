#!/usr/bin/env python
"""Wall time of one 4-job fine-tuning sweep run sequentially (Hydra's basic launcher) against the same sweep run
2 jobs at once (`hydra/launcher=joblib hydra.launcher.n_jobs=2`), on this machine.

Rounds are interleaved (A B, B A, A B, ...) so that the machine's drift hits both arms alike, and each sweep gets
a fresh stage cache (its own output root): the shared source and pretrain stages are trained once per sweep in both
arms, and the check says so (exactly one job trained each; the others reused it from the cache). The ratio of each
round is sequential / parallel (above 1: the parallel sweep was faster); the report gives each round's and their
median, and per sweep where the time went (each job's stage wall times, its torch threads).

    python scripts/bench_parallel_sweep.py                     # 4 rounds -> outputs/bench/parallel_sweep.json
    python scripts/bench_parallel_sweep.py --rounds 5 --n-jobs 2 stages.finetune.epochs=8   # extra overrides last
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from studylib import BENCH, environment, write_json

REPO = Path(__file__).resolve().parents[1]
LRS = "0.03,0.01,0.003,0.001"
# The built-in data at a size where one sweep takes 1-1.5 minutes on 2 cores: a shared source and pretrain stage,
# then 4 fine-tuning runs (the swept lr); no scratch stage (it would be shared too).
SIZE = [
    "data.source.train_per_class=100",
    "data.source.test_per_class=20",
    "data.target.train_per_class=200",
    "data.target.test_per_class=20",
    "stages.source.epochs=2",
    "stages.pretrain.epochs=2",
    "stages.finetune.epochs=6",
    "~stages.scratch",
    "trainer.enable_progress_bar=false",
]


def sweep(arm: str, n_jobs: int, root: Path, extra: list[str]) -> dict:
    """One sweep into `root` (its own stage cache): wall seconds, and what each job's manifest says."""
    launcher = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={n_jobs}"] if arm == "parallel" else []
    folder = root / "sweep"
    args = ["-m", *launcher, f"stages.finetune.optimizer.lr={LRS}", *SIZE, *extra]
    command = [str(Path(sys.executable).parent / "transferlab"), *args, f"paths.output_root={root}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    print("+ transferlab", " ".join(args), flush=True)
    load, cpu, start = os.getloadavg()[0], _children_cpu_s(), time.time()
    proc = subprocess.run(
        [*command, f"hydra.sweep.dir={folder}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=3600
    )
    wall, cpu = time.time() - start, _children_cpu_s() - cpu
    if proc.returncode != 0:
        raise SystemExit(f"{arm} sweep exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    jobs = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: int(p.name))
    manifests = [json.loads((job / "manifest.json").read_text()) for job in jobs]
    trained = {s: sum(not m["stages"][s]["cached"] for m in manifests) for s in ("source", "pretrain", "finetune")}
    return {
        "wall_s": round(wall, 1),
        # CPU seconds of the sweep's processes (workers included): the work done, which other jobs on the machine
        # barely change; and the 1-minute load average before it (above the core count: other jobs were running)
        "cpu_s": round(cpu, 1),
        "load_average_before": round(load, 2),
        "jobs_done": sum((job / "results.json").is_file() for job in jobs),
        "trained": trained,  # how many jobs trained each stage; the check wants 1, 1, 4
        "torch_threads": [m["provenance"]["machine"]["torch_threads"] for m in manifests],
        "stage_wall_s": [{s: round(r["wall_time_s"], 1) for s, r in m["stages"].items()} for m in manifests],
    }


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for descendants: the loky workers too
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--out", default=str(BENCH / "parallel_sweep.json"))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both arms")
    args = parser.parse_args()
    env = environment()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench_parallel_") as tmp:
        for i in range(args.rounds):
            order = ("sequential", "parallel") if i % 2 == 0 else ("parallel", "sequential")
            result = {"order": list(order)}
            for arm in order:
                result[arm] = sweep(arm, args.n_jobs, Path(tmp) / f"round{i}-{arm}", args.overrides)
            result["ratio"] = round(result["sequential"]["wall_s"] / result["parallel"]["wall_s"], 3)
            print(
                f"round {i}: sequential {result['sequential']['wall_s']} s, parallel {result['parallel']['wall_s']} s,"
                f" ratio {result['ratio']}",
                flush=True,
            )
            rounds.append(result)
    correct = all(
        r[arm]["jobs_done"] == 4 and r[arm]["trained"] == {"source": 1, "pretrain": 1, "finetune": 4}
        for r in rounds
        for arm in ("sequential", "parallel")
    )
    report = {
        "what": "wall time of a 4-job finetune-lr sweep: sequential (basic launcher) / parallel (joblib); above 1: "
        "parallel faster",
        "command": {
            "sequential": f"transferlab -m stages.finetune.optimizer.lr={LRS} {' '.join(SIZE + args.overrides)}",
            "parallel": f"transferlab -m hydra/launcher=joblib hydra.launcher.n_jobs={args.n_jobs} "
            f"stages.finetune.optimizer.lr={LRS} {' '.join(SIZE + args.overrides)}",
        },
        "ratio_median": statistics.median(r["ratio"] for r in rounds),
        "ratios": [r["ratio"] for r in rounds],
        "sequential_wall_s": [r["sequential"]["wall_s"] for r in rounds],
        "parallel_wall_s": [r["parallel"]["wall_s"] for r in rounds],
        "sequential_cpu_s": [r["sequential"]["cpu_s"] for r in rounds],
        "parallel_cpu_s": [r["parallel"]["cpu_s"] for r in rounds],
        "load_average_before": [[r[arm]["load_average_before"] for arm in r["order"]] for r in rounds],
        "one_source_training_per_sweep": correct,
        "rounds": rounds,
        "cpus": os.cpu_count(),
        "environment": env,
        "load_average_at_end": os.getloadavg(),
    }
    write_json(args.out, report, echo=False)
    print(json.dumps({k: report[k] for k in ("ratio_median", "ratios", "one_source_training_per_sweep")}))
    print(f"wrote {args.out}")
    if not correct:
        raise SystemExit("a sweep did not train its shared stages exactly once (see the report)")


if __name__ == "__main__":
    main()
