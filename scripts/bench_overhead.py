"""What the CLI costs over a plain PyTorch loop doing the same work, on the real CIFAR-10.

The work: train the reference ConvNet (SGD lr 0.01, batch 64, crop + flip) on the 45,000-image train split,
validate on the 5,000-image val split after every epoch (and save a checkpoint), test on the 10,000 test images.

- `cli` / `cli_no_bar`: one stage through the real `transferlab` command (in a pseudo-terminal, so the progress
  bar draws as it does for a user), with and without the progress bar. A timing callback added with
  `+callbacks.bench_timer` records train, validation and test time inside the process (start-up is
  scripts/bench_startup.py's business).
- `plain`: the same model, batches, augmentation, evaluation and checkpoint saves as a hand-written loop.

Rounds are interleaved (cli, cli_no_bar, plain, then plain, cli_no_bar, cli, ...) so that a machine shared with
other jobs slows all three alike; `ratio` is of the medians, `per_round` each round's ratio (mean ± std over
rounds). The model runs alike in both: the plain loop uses the eval batch and channels_last that `auto` picks for
the CLI on this machine. Writes outputs/bench/overhead.json.

    python scripts/bench_overhead.py                 # 45k train, 2 epochs, 3 rounds
    python scripts/bench_overhead.py --quick         # 3k train, 1 epoch, 2 rounds (~10 min on 2 shared cores)
"""

import argparse
import json
import os
import pty
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRANSFERLAB_SHARED_DATA", REPO.parent / "shared" / "data"))


class BenchTimer(L.Callback):
    """Train / validation / test seconds and images of one stage, written to $BENCH_TIMER as JSON."""

    def __init__(self):
        self.times = {"train": 0.0, "val": 0.0, "test": 0.0, "fit": 0.0}
        self.cpu = dict(self.times)
        self.images = {"train": 0, "val": 0, "test": 0}
        self._t: dict[str, tuple[float, float]] = {}

    def _start(self, what):
        self._t[what] = (time.perf_counter(), time.process_time())

    def _stop(self, what):
        wall, cpu = self._t.pop(what)
        self.times[what] += time.perf_counter() - wall
        self.cpu[what] += time.process_time() - cpu

    def on_fit_start(self, *_):
        self._start("fit")

    def on_fit_end(self, *_):
        self._stop("fit")

    def on_train_epoch_start(self, *_):
        self._start("train")

    def on_validation_start(self, trainer, *_):
        if "train" in self._t:
            self._stop("train")
        self._start("val")

    def on_validation_end(self, *_):
        self._stop("val")

    def on_train_epoch_end(self, *_):
        if "train" in self._t:
            self._stop("train")

    def on_test_start(self, *_):
        self._start("test")

    def on_test_end(self, trainer, *_):
        self._stop("test")
        dm = trainer.datamodule
        sizes = dm.split_sizes()
        self.images = {
            "train": sizes["train"] * trainer.current_epoch,
            "val": sizes["val"] * trainer.current_epoch,
            "test": sizes["test"],
        }
        Path(os.environ["BENCH_TIMER"]).write_text(
            json.dumps({"times": self.times, "cpu": self.cpu, "images": self.images})
        )


def run_cli(args, cifar: Path, tmp: Path, n: int, bar: bool) -> dict:
    out = tmp / f"timer{n}.json"
    env = dict(
        os.environ,
        BENCH_TIMER=str(out),
        COLUMNS="120",
        PYTHONPATH=os.pathsep.join([str(REPO / "scripts"), str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    overrides = [
        "data=builtin_cifar10",
        f"data.target.root={cifar}",
        "~stages.source",
        "~stages.pretrain",
        "~stages.finetune",
        f"stages.scratch.epochs={args.epochs}",
        "objective=scratch/test/acc",
        "cache=false",
        "logger=csv",
        f"trainer.enable_progress_bar={str(bar).lower()}",
        f"hydra.run.dir={tmp / f'run{n}'}",
        "+callbacks.bench_timer._target_=bench_overhead.BenchTimer",
    ]
    if args.train_per_class:
        overrides.append(f"data.target.samples_per_class={args.train_per_class}")
    master, slave = pty.openpty()  # a terminal, so that the bar is drawn as a user sees it
    drained = []
    reader = threading.Thread(target=lambda: _drain(master, drained), daemon=True)
    reader.start()
    start = time.time()
    script = Path(sys.executable).parent / "transferlab"
    proc = subprocess.run(
        [str(script), *overrides], env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, timeout=7200
    )
    wall = time.time() - start
    os.close(slave)
    reader.join(timeout=5)
    if proc.returncode != 0 or not out.is_file():
        console = b"".join(drained).decode(errors="replace")
        raise SystemExit(f"the CLI run failed (exit {proc.returncode}):\n{console[-4000:]}")
    result = json.loads(out.read_text())
    result["process_wall_s"] = wall
    return result


def _drain(fd, sink):
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            return
        if not chunk:
            return
        sink.append(chunk)


def plain_loop(args, cifar: Path, tmp: Path) -> dict:
    """The same work by hand: the data module only provides the split tensors; the model runs as the CLI's does on
    this machine (the eval batch and channels_last that `auto` picks here), so the ratio is the CLI's overhead."""
    from transferlab.data import CIFAR10DataModule
    from transferlab.data.base import auto_eval_batch
    from transferlab.data.inputs import random_crop_flip
    from transferlab.models import build_backbone
    from transferlab.speed import resolve_channels_last

    dm = CIFAR10DataModule(root=str(cifar), samples_per_class=args.train_per_class or None, seed=0)
    dm.setup()
    (xtr, ytr), (xva, yva), (xte, yte) = (dm.splits[s] for s in ("train", "val", "test"))
    mean = torch.tensor(dm.mean).view(1, -1, 1, 1)
    std = torch.tensor(dm.std).view(1, -1, 1, 1)
    norm = lambda x: x.float().mul_(1 / (255 * std)).sub_(mean / std)
    torch.manual_seed(0)
    backbone, features = build_backbone("convnet")
    model = nn.Sequential(backbone, nn.Linear(features, dm.num_classes))
    if resolve_channels_last("auto", "cpu"):
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    eval_batch = auto_eval_batch("cpu", 64)

    def evaluate(x, y):
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(x), eval_batch):
                correct += (model(norm(x[i : i + eval_batch])).argmax(1) == y[i : i + eval_batch]).sum().item()
        return correct / len(x)

    times = {"train": 0.0, "val": 0.0, "test": 0.0}
    cpu = dict(times)
    best, fit_start, fit_cpu = -1.0, time.perf_counter(), time.process_time()
    for _ in range(args.epochs):
        t, c = time.perf_counter(), time.process_time()
        model.train()
        for idx in torch.randperm(len(xtr), generator=gen).split(64):
            x = norm(random_crop_flip(xtr[idx], padding=4, generator=gen))
            loss = F.cross_entropy(model(x), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times["train"] += time.perf_counter() - t
        cpu["train"] += time.process_time() - c
        t, c = time.perf_counter(), time.process_time()
        acc = evaluate(xva, yva)
        times["val"] += time.perf_counter() - t
        cpu["val"] += time.process_time() - c
        state = {"model": model.state_dict(), "optimizer": opt.state_dict()}  # ModelCheckpoint's work
        torch.save(state, tmp / "last.pt")
        if acc > best:
            best = acc
            torch.save(state, tmp / "best.pt")
    times["fit"], cpu["fit"] = time.perf_counter() - fit_start, time.process_time() - fit_cpu
    t, c = time.perf_counter(), time.process_time()
    model.load_state_dict(torch.load(tmp / "best.pt")["model"])
    evaluate(xte, yte)
    times["test"], cpu["test"] = time.perf_counter() - t, time.process_time() - c
    return {
        "times": times,
        "cpu": cpu,
        "images": {"train": len(xtr) * args.epochs, "val": len(xva) * args.epochs, "test": len(xte)},
    }


def cifar10_copy() -> Path:
    out = REPO / "outputs" / "cifar10"
    if not (out / "cifar-10-batches-py").is_dir():
        subprocess.run([sys.executable, str(SHARED / "cifar10" / "build_cifar10.py"), str(out)], check=True)
    return out


def summary(runs: list[dict]) -> dict:
    """Medians over rounds; `*_cpu_s`: process CPU time (all threads), which other jobs on the machine change
    much less than wall time."""
    med = lambda key: statistics.median(r["times"][key] for r in runs)
    images = runs[0]["images"]
    work = lambda r, what="times": r[what]["fit"] + r[what]["test"]
    return {
        "work_s": round(statistics.median(work(r) for r in runs), 2),
        "work_cpu_s": round(statistics.median(work(r, "cpu") for r in runs), 2),
        "train_cpu_s": round(statistics.median(r["cpu"]["train"] for r in runs), 2),
        "val_cpu_s": round(statistics.median(r["cpu"]["val"] for r in runs), 2),
        "train_img_s": round(images["train"] / med("train")),
        "val_img_s": round(images["val"] / med("val")),
        "test_img_s": round(images["test"] / med("test")),
        "val_over_train": round((images["val"] / med("val")) / (images["train"] / med("train")), 2),
        "rounds_work_s": [round(work(r), 2) for r in runs],
        **(
            {"process_wall_s": round(statistics.median(r["process_wall_s"] for r in runs), 1)}
            if "process_wall_s" in runs[0]
            else {}
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 train images per class, 1 epoch, 2 rounds")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--train-per-class", type=int, help="default: all (4,500 per class)")
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench" / "overhead.json"))
    args = parser.parse_args()
    args.epochs = args.epochs or (1 if args.quick else 2)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.train_per_class = args.train_per_class or (300 if args.quick else None)
    cifar = cifar10_copy()
    load_before = os.getloadavg()
    runs: dict[str, list] = {"cli": [], "cli_no_bar": [], "plain": []}
    tmp = REPO / "outputs" / "bench" / "overhead_tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # the script's scratch folder: run folders of an earlier invocation go
    tmp.mkdir(parents=True)
    variants = {
        "cli": lambda n: run_cli(args, cifar, tmp, 2 * n, bar=True),
        "cli_no_bar": lambda n: run_cli(args, cifar, tmp, 2 * n + 1, bar=False),
        "plain": lambda n: plain_loop(args, cifar, tmp),
    }
    for n in range(args.rounds):
        for name in list(variants)[:: 1 if n % 2 == 0 else -1]:  # odd rounds in reverse: no variant always first
            runs[name].append(variants[name](n))
        done = "; ".join(
            f"{k} "
            + ", ".join(f"{part} {t:.1f} s ({v[-1]['cpu'][part]:.1f} cpu)" for part, t in v[-1]["times"].items())
            for k, v in runs.items()
        )
        print(f"round {n + 1}/{args.rounds}: {done}", flush=True)
    result = {name: summary(v) for name, v in runs.items()}
    plain = result["plain"]["work_s"]
    plain_cpu = result["plain"]["work_cpu_s"]
    result["ratio"] = {
        "cli_vs_plain": round(plain / result["cli"]["work_s"], 3),
        "cli_no_bar_vs_plain": round(plain / result["cli_no_bar"]["work_s"], 3),
        "bar_cost": round(result["cli"]["work_s"] / result["cli_no_bar"]["work_s"] - 1, 3),
        "cpu_cli_vs_plain": round(plain_cpu / result["cli"]["work_cpu_s"], 3),
        "cpu_cli_no_bar_vs_plain": round(plain_cpu / result["cli_no_bar"]["work_cpu_s"], 3),
        "cpu_bar_cost": round(result["cli"]["work_cpu_s"] / result["cli_no_bar"]["work_cpu_s"] - 1, 3),
    }
    work = lambda r: r["times"]["fit"] + r["times"]["test"]
    paired = {  # per round, each variant against the plain loop of the same round: the spread of the ratio
        "cli_vs_plain": [work(p) / work(c) for c, p in zip(runs["cli"], runs["plain"])],
        "cli_no_bar_vs_plain": [work(p) / work(c) for c, p in zip(runs["cli_no_bar"], runs["plain"])],
        "bar_cost": [work(c) / work(b) - 1 for c, b in zip(runs["cli"], runs["cli_no_bar"])],
    }
    result["per_round"] = {
        k: {
            "values": [round(v, 3) for v in vs],
            "mean": round(statistics.fmean(vs), 3),
            "std": round(statistics.stdev(vs), 3) if len(vs) > 1 else None,
        }
        for k, vs in paired.items()
    }
    result["setup"] = {
        "epochs": args.epochs,
        "rounds": args.rounds,
        "train_per_class": args.train_per_class,
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
