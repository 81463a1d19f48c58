"""What the study scripts share: the real CIFAR-10 copy, running `transferlab` as a user does, the machine and
versions, and writing outputs/bench/<name>.json + .png. Not a test helper: the scripts are benchmarks."""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "outputs" / "bench"
sys.path.insert(0, str(REPO / "src"))  # this checkout's transferlab, installed or not
SHARED_DATA = Path(os.environ.get("TRANSFERLAB_SHARED_DATA", REPO.parent / "shared" / "data"))


def cifar_root(root: str | None) -> Path:
    """The folder holding cifar-10-batches-py/: the given one, else built once from the shared copy."""
    if root:
        return Path(root)
    out = REPO / "outputs" / "data" / "cifar10"
    if not (out / "cifar-10-batches-py" / "test_batch").is_file():
        subprocess.run([sys.executable, str(SHARED_DATA / "cifar10" / "build_cifar10.py"), str(out)], check=True)
    return out


def split_data(root: Path) -> list[str]:
    """The CIFAR-10 class split (`data=cifar10_split`: classes 0-4 as the source, 5-9 as the target)."""
    return ["data=cifar10_split", f"data.root={root}"]


def has_config(group: str, name: str) -> bool:
    return (REPO / "conf" / group / f"{name}.yaml").is_file()


def transferlab(*args: str, log: Path | None = None, module: str = "transferlab.commands.main") -> tuple[int, float]:
    """Run `transferlab` (or `module`, e.g. transferlab.commands.rank) in a new process, this checkout's code, as a user
    runs the console script; its output goes to `log` (or the terminal). -> (exit code, seconds)."""
    command = [sys.executable, "-m", module, *args]
    print("+", module.replace("transferlab.commands.main", "transferlab"), " ".join(args), flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    start = time.time()
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") if log else open(os.devnull, "w") as out:
        proc = subprocess.run(
            command, cwd=REPO, env=env, stdout=out if log else None, stderr=subprocess.STDOUT if log else None
        )
    return proc.returncode, round(time.time() - start, 1)


def environment() -> dict:
    """Machine, versions and code: where the numbers come from (as each run's manifest records them)."""
    from transferlab.core import provenance

    info = provenance.collect()
    info["load_average_at_start"] = os.getloadavg()
    return info


def mean_std(values: list[float]) -> dict:
    """Mean, sample standard deviation (ddof=1) and n of the finite values."""
    xs = [v for v in values if v is not None and v == v]
    return {
        "mean": statistics.fmean(xs) if xs else None,
        "std": statistics.stdev(xs) if len(xs) > 1 else None,
        "n": len(xs),
        "of": len(values),
    }


def fmt(stat: dict, scale: float = 100.0) -> str:
    """'61.32 ± 0.85 (n=3)' in percent points; a missing run shows as 'n=2 of 3'."""
    if not stat["n"]:
        return f"— (n=0 of {stat['of']})"
    spread = f" ± {stat['std'] * scale:.2f}" if stat["std"] is not None else ""
    missing = "" if stat["n"] == stat["of"] else f" of {stat['of']}"
    return f"{stat['mean'] * scale:.2f}{spread} (n={stat['n']}{missing})"


def bar_figure(summary: dict, panels: list[tuple[str, str]], title: str):
    """One bar chart per (key, label) in `panels`: a bar per row of `summary` ({name: {key: mean_std(...)}}),
    error bars one std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
    for ax, (key, label) in zip(axes, panels):
        stats = [summary[name][key] for name in summary]
        ax.bar(list(summary), [s["mean"] or 0 for s in stats], yerr=[s["std"] or 0 for s in stats], capsize=4)
        ax.set_ylabel(f"{label}, mean ± std")
    fig.suptitle(title, fontsize=9)
    return fig


def write_json(out: str | Path, report: dict, echo: bool = True) -> Path:
    """`report` as indented JSON at `out` (its folder made), and on the console when `echo`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    if echo:
        print(json.dumps(report, indent=2, default=str))
    return out


def save(name: str, report: dict, figure=None) -> Path:
    """outputs/bench/<name>.json (and <name>.png when a matplotlib figure is given)."""
    out = write_json(BENCH / f"{name}.json", report, echo=False)
    if figure is not None:
        figure.tight_layout()
        figure.savefig(BENCH / f"{name}.png", dpi=110)
        print(f"wrote {BENCH / f'{name}.png'}")
    print(f"wrote {out}")
    return out


def stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")
