"""Start-up time: from starting `transferlab` to its first training step, with warm caches.

Runs the real console script on a one-stage built-in config with a probe callback (added with
`+callbacks.startup_probe`) that records the wall time when the first training batch starts and then ends the
process. It reports wall time and the process's CPU time (user + sys), which a machine loaded by other jobs
barely changes. The first round warms the caches (Python bytecode, matplotlib's font cache, the page cache)
and is not counted; PYTHONDONTWRITEBYTECODE, where the environment sets it, is dropped for the measured process, so
transferlab's own bytecode is cached as on a user's machine. Each round also times the upstream floor, a bare
`python -c "import lightning, hydra.utils"` (interleaved): what no change of transferlab can remove. With
`-X importtime` it also lists what the big libraries cost to import on the way (lightning, torch, torchvision,
matplotlib, scipy, tensorboard, optuna, submitit, ...).

Given several environments (`--python`, one interpreter each), it times them all in the same rounds, interleaved,
and reports each one's figures and the per-round differences from the first: e.g. an install with the optuna extra
(which brings scipy) against one without. `--with OVERRIDES` adds an arm on the first interpreter with these
overrides, timed in the same rounds: e.g. what a timm model costs (`--with "model=timm model.name=resnet18"`).

    python scripts/bench_startup.py              # 5 rounds  -> outputs/bench/startup.json
    python scripts/bench_startup.py --rounds 2
    python scripts/bench_startup.py --python .venv/bin/python /tmp/core/bin/python   # two installs, interleaved
    python scripts/bench_startup.py --with "model=timm model.name=resnet18"            # the default model vs timm's
"""

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
from studylib import write_json

REPO = Path(__file__).resolve().parents[1]
WATCHED = (
    "matplotlib",
    "tensorboard",
    "optuna",
    "submitit",
    "torchvision",
    "torchvision.models",
    "scipy.signal",
    "torch._dynamo",
    "pandas",
    "sklearn",
    "rich",
    "torchmetrics",
    "lightning",
    "torch",
    "hydra",
    "timm",
    "huggingface_hub",
)
ARGS = [
    "data.source.source_classes=6",
    "data.source.train_per_class=20",
    "data.source.test_per_class=5",
    "~stages.pretrain",
    "~stages.finetune",
    "~stages.scratch",
    "objective=source/test/acc",
    "cache=false",
    "stages.source.epochs=1",
    "+callbacks.startup_probe._target_=bench_startup.FirstStepProbe",
]


class FirstStepProbe(L.Callback):
    """Writes the time the first training batch starts to $STARTUP_PROBE, then ends the process."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        Path(os.environ["STARTUP_PROBE"]).write_text(repr(time.time()))
        sys.stdout.flush()
        os._exit(0)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def child_env(**extra) -> dict:
    """This environment, with bytecode caching on (as Python's default) and this checkout's code first."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    paths = [str(REPO / "scripts"), str(REPO / "src"), os.environ.get("PYTHONPATH", "")]
    return {**env, "PYTHONPATH": os.pathsep.join(paths), **extra}


def floor_round(python: str) -> float:
    """Wall seconds from starting a new Python process to the end of its `import lightning, hydra.utils` (not its
    exit, which tears the modules down): the upstream floor of start-up."""
    program = "import lightning, hydra.utils, time; print(repr(time.time()))"
    start = time.time()
    proc = subprocess.run(
        [python, "-c", program], env=child_env(), capture_output=True, text=True, check=True, timeout=600
    )
    return float(proc.stdout.split()[-1]) - start


def one_round(python: str, run_dir: Path, importtime: bool = False, extra: tuple = ()) -> tuple[float, float, str]:
    """(wall seconds to the first step, CPU seconds the process used, its stderr) of the `transferlab` installed
    beside `python`, with the `extra` overrides"""
    probe = run_dir.with_name(run_dir.name + ".probe")
    env = child_env(STARTUP_PROBE=str(probe))
    if importtime:
        env["PYTHONPROFILEIMPORTTIME"] = "1"
    script = Path(python).parent / "transferlab"
    start, cpu = time.time(), cpu_seconds()
    proc = subprocess.run(
        [str(script), *ARGS, *extra, f"hydra.run.dir={run_dir}"], env=env, capture_output=True, text=True, timeout=600
    )
    if not probe.is_file():
        raise SystemExit(f"no training step was reached (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return float(probe.read_text()) - start, cpu_seconds() - cpu, proc.stderr


def installed(python: str, module: str) -> bool:
    program = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([python, "-c", program], env=child_env()).returncode == 0


def imported(stderr: str) -> dict[str, float]:
    """Cumulative import time (s) of each watched top-level package, from -X importtime's lines."""
    found = {}
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)(\S+)$", line)
        if m and m.group(3) in WATCHED:
            found[m.group(3)] = max(found.get(m.group(3), 0.0), int(m.group(1)) / 1e6)
    return found


def summary(arm: tuple, rounds: list, floors: list[float], stderr: str) -> dict:
    times, cpu = [r[0] for r in rounds], [r[1] for r in rounds]
    python = arm[0]
    return {
        "python": python,
        "overrides": list(arm[1]),
        "scipy_installed": installed(python, "scipy"),  # torchmetrics imports scipy.signal at import when it is
        "optuna_installed": installed(python, "optuna"),
        "to_first_step_s": {
            "median": round(statistics.median(times), 2),
            "min": round(min(times), 2),
            "rounds": [round(t, 2) for t in times],
        },
        "upstream_floor_s": {  # `import lightning, hydra.utils` alone, same rounds
            "median": round(statistics.median(floors), 2),
            "rounds": [round(t, 2) for t in floors],
        },
        "transferlab_s": round(statistics.median(t - f for t, f in zip(times, floors)), 2),  # per round, above it
        # CPU time (user + sys) barely depends on other jobs: on an idle machine, wall time is about this
        "cpu_s": {"median": round(statistics.median(cpu), 2), "rounds": [round(c, 2) for c in cpu]},
        "imported_s": {k: round(v, 3) for k, v in sorted(imported(stderr).items(), key=lambda kv: -kv[1])},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--python", nargs="+", default=[sys.executable], help="the interpreters of the installs to time (interleaved)"
    )
    parser.add_argument("--with", dest="overrides", help="overrides of one more arm, on the first interpreter")
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench" / "startup.json"))
    args = parser.parse_args()
    arms = [(py, ()) for py in args.python]
    if args.overrides:
        arms.append((args.python[0], tuple(args.overrides.split())))
    rounds: dict[tuple, list] = {arm: [] for arm in arms}
    floors: dict[tuple, list] = {arm: [] for arm in arms}
    stderr = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, (py, extra) in enumerate(arms):
            one_round(py, Path(tmp) / f"warm{k}", extra=extra)  # warm-up: bytecode, font cache, page cache
        for i in range(1, args.rounds + 1):  # alternating which arm, and which of run and floor, goes first
            for k, arm in enumerate(arms if i % 2 else arms[::-1]):
                py, extra = arm
                if i % 2:
                    rounds[arm].append(one_round(py, Path(tmp) / f"run{k}-{i}", extra=extra))
                    floors[arm].append(floor_round(py))
                else:
                    floors[arm].append(floor_round(py))
                    rounds[arm].append(one_round(py, Path(tmp) / f"run{k}-{i}", extra=extra))
        for k, (py, extra) in enumerate(arms):
            stderr[(py, extra)] = one_round(py, Path(tmp) / f"importtime{k}", importtime=True, extra=extra)[2]
    result: dict = {"installs": [summary(arm, rounds[arm], floors[arm], stderr[arm]) for arm in arms]}
    for arm in arms[1:]:  # paired by round: what the machine's drift does to both cancels
        first = arms[0]
        result.setdefault("difference_from_first_s", {})[" ".join([arm[0], *arm[1]])] = {
            "to_first_step": round(statistics.median(b[0] - a[0] for a, b in zip(rounds[first], rounds[arm])), 2),
            "upstream_floor": round(statistics.median(b - a for a, b in zip(floors[first], floors[arm])), 2),
        }
    result.update(load_average=os.getloadavg(), cpus=os.cpu_count())
    write_json(args.out, result)


if __name__ == "__main__":
    main()
