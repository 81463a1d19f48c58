"""What the CLI costs over a plain PyTorch loop doing the same work, on the real CIFAR-10.

The work: train the reference ConvNet (SGD lr 0.01, batch 64, crop + flip) on the 45,000-image train split,
validate on the 5,000-image val split after every epoch (and save a checkpoint), test on the 10,000 test images.

- `cli` / `cli_no_bar`: one stage through the real `transferlab` command (in a pseudo-terminal, so the progress
  bar draws as it does for a user), with and without the progress bar. A timing callback added with
  `+callbacks.bench_timer` records train, validation and test time inside the process, and the work's time from
  the start of fit to the end of the test's teardown (start-up is scripts/bench_startup.py's business).
- `plain`: the same model, batches, augmentation, evaluation and checkpoint saves as a hand-written loop, each
  round in a new process as the CLI's runs are (in this script's own process it started warm from earlier rounds:
  2,635 training img/s there against 2,543 in a new process, in two runs 10 minutes apart).

Rounds are interleaved (cli, cli_no_bar, plain, then plain, cli_no_bar, cli, ...) so that a machine shared with
other jobs slows all three alike; `ratio` is of the medians, `per_round` each round's ratio (mean ± std over
rounds). The model runs alike in both: the plain loop uses the eval batch and channels_last that `auto` picks for
the CLI on this machine. Writes outputs/bench/overhead.json.

The progress bar's cost is also measured directly inside the `cli` run (`bar_share`): the time spent in the bar's
callbacks (stopping it included) plus the time its refresh thread spends redrawing, over the work's time. It needs
no second variant, so it is not lost in the round-to-round spread of `cli` against `cli_no_bar` (a few percent on
shared cores).

On a GPU machine (`--device cuda`, the default where one is present) both run there: the CLI with `trainer=gpu`,
the plain loop with the precision, layout and eval batch that `auto` picks for the GPU, the data copied per batch
from pinned memory, or kept on the GPU with `--device-resident` (`data.device_resident=true` for the CLI).

    python scripts/bench_overhead.py                 # 45k train, 2 epochs, 3 rounds
    python scripts/bench_overhead.py --quick         # 3k train, 1 epoch, 2 rounds (~10 min on 2 shared cores)
    python scripts/bench_overhead.py --device cuda --device-resident --epochs 3 --rounds 5
"""

import argparse
import atexit
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
from studylib import cifar_root, write_json
from torch import nn
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]


def sync() -> None:
    """Wait for the GPU's queued work, so that a clock read covers it (nothing to wait for on a CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


BAR_S = {"hooks": 0.0, "redraws": 0.0}  # seconds the progress bar took, in its callbacks and its refresh thread
LAST_TEARDOWN = {"wall": 0.0, "cpu": 0.0}  # clocks when the last callback's teardown returned


def mark_teardown() -> None:
    sync()
    LAST_TEARDOWN.update(wall=time.perf_counter(), cpu=time.process_time())


def time_bar(bar: L.Callback) -> None:
    """Count the time `bar` spends in its callback hooks, setup and teardown included (outermost calls only), and
    in redraws off the main thread (Lightning's rich bar redraws from a refresh thread, which holds the GIL while it
    renders); note when its teardown returns (stopping the bar joins that thread)."""
    depth = [0]

    def timed(hook):
        def call(*args, **kwargs):
            depth[0] += 1
            start = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    BAR_S["hooks"] += time.perf_counter() - start

        return call

    for name in dir(L.Callback):
        if name.startswith("on_") or name == "setup":
            setattr(bar, name, timed(getattr(bar, name)))
    teardown = timed(bar.teardown)
    bar.teardown = lambda *args, **kwargs: (teardown(*args, **kwargs), mark_teardown())[0]
    from rich.live import Live

    refresh = Live.refresh

    def timed_refresh(live):
        if threading.current_thread() is threading.main_thread():
            return refresh(live)  # inside a hook: counted there
        start = time.perf_counter()
        try:
            return refresh(live)
        finally:
            BAR_S["redraws"] += time.perf_counter() - start

    Live.refresh = timed_refresh


class BenchTimer(L.Callback):
    """Train / validation / test seconds and images of one stage, and the progress bar's own time, written to
    $BENCH_TIMER as JSON when the process exits. `work`: from the start of fit to the end of the test's teardown,
    all that happens between included (the fit's teardown, loading the best checkpoint)."""

    def __init__(self):
        self.times = {"train": 0.0, "val": 0.0, "test": 0.0, "fit": 0.0}
        self.cpu = dict(self.times)
        self.images = {"train": 0, "val": 0, "test": 0}
        self._t: dict[str, tuple[float, float]] = {}
        self._bar_timed = False

    def setup(self, trainer, pl_module, stage):
        if trainer.progress_bar_callback is not None and not self._bar_timed:
            time_bar(trainer.progress_bar_callback)
            self._bar_timed = True
        if stage == "fit":
            atexit.register(self.write)

    def teardown(self, trainer, pl_module, stage):
        mark_teardown()
        if stage == "test":
            sizes, epochs = trainer.datamodule.split_sizes(), trainer.current_epoch
            self.images = {"train": sizes["train"] * epochs, "val": sizes["val"] * epochs, "test": sizes["test"]}

    def write(self):
        begin = self._t.pop("work")
        self.times["work"] = max(LAST_TEARDOWN["wall"] - begin[0], 0.0)
        self.cpu["work"] = max(LAST_TEARDOWN["cpu"] - begin[1], 0.0)
        bar = {"bar_s": dict(BAR_S)} if self._bar_timed else {}
        Path(os.environ["BENCH_TIMER"]).write_text(
            json.dumps({"times": self.times, "cpu": self.cpu, "images": self.images, **bar})
        )

    def _start(self, what):
        sync()
        self._t[what] = (time.perf_counter(), time.process_time())

    def _stop(self, what):
        sync()
        wall, cpu = self._t.pop(what)
        self.times[what] += time.perf_counter() - wall
        self.cpu[what] += time.process_time() - cpu

    def on_fit_start(self, *_):
        self._start("fit")
        self._start("work")

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

    def on_test_end(self, *_):
        self._stop("test")


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
    if args.device == "cuda":
        overrides += ["trainer=gpu", f"data.target.device_resident={str(args.device_resident).lower()}"]
    master, slave = pty.openpty()  # a terminal, so that the bar is drawn as a user sees it
    drained = []
    reader = threading.Thread(target=lambda: _drain(master, drained), daemon=True)
    reader.start()
    start = time.time()
    command = [
        sys.executable,
        "-m",
        "transferlab.commands.main",
        *overrides,
    ]  # the console script's code, installed or not
    proc = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, timeout=7200)
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
    this device (the precision, eval batch and channels_last that `auto` picks here), so the ratio is the CLI's
    overhead."""
    from transferlab.data import CIFAR10DataModule
    from transferlab.data.base import auto_eval_batch
    from transferlab.data.inputs import random_crop_flip
    from transferlab.models import build_backbone
    from transferlab.train.speed import resolve_channels_last, resolve_precision

    device = torch.device(args.device)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    dm = CIFAR10DataModule(root=str(cifar), samples_per_class=args.train_per_class or None, seed=0)
    dm.setup()
    splits = {s: dm.splits[s] for s in ("train", "val", "test")}
    if args.device_resident:
        splits = {s: (x.to(device), y.to(device)) for s, (x, y) in splits.items()}
    (xtr, ytr), (xva, yva), (xte, yte) = splits.values()
    mean = torch.tensor(dm.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(dm.std, device=device).view(1, -1, 1, 1)
    norm = lambda x: x.float().mul_(1 / (255 * std)).sub_(mean / std)
    pinned = device.type == "cuda" and not args.device_resident

    def on_device(x, y):  # what Lightning's batch transfer does: pinned host memory, copied without blocking
        if pinned:
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    precision = resolve_precision("auto", accelerator)
    if precision not in ("32-true", "bf16-mixed"):
        raise SystemExit(f"the plain loop runs 32-true and bf16-mixed, not {precision}")
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    torch.manual_seed(0)
    backbone, features = build_backbone("convnet")
    model = nn.Sequential(backbone, nn.Linear(features, dm.num_classes)).to(device)
    if resolve_channels_last("auto", accelerator):
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    order_gen, augment_gen = torch.Generator().manual_seed(0), torch.Generator(device=device).manual_seed(0)
    eval_batch = auto_eval_batch(device.type, 64)

    def evaluate(x, y):
        model.eval()
        correct = torch.zeros((), dtype=torch.long, device=device)
        with torch.no_grad(), autocast():
            for i in range(0, len(x), eval_batch):
                xb, yb = on_device(x[i : i + eval_batch], y[i : i + eval_batch])
                correct += (model(norm(xb)).argmax(1) == yb).sum()
        return correct.item() / len(x)

    times = {"train": 0.0, "val": 0.0, "test": 0.0}
    cpu = dict(times)
    clock = lambda: (sync(), time.perf_counter(), time.process_time())[1:]
    best = -1.0
    fit_start, fit_cpu = clock()
    for _ in range(args.epochs):
        t, c = clock()
        model.train()
        for idx in torch.randperm(len(xtr), generator=order_gen).to(ytr.device).split(64):
            xb, yb = on_device(xtr[idx], ytr[idx])
            with autocast():
                loss = F.cross_entropy(model(norm(random_crop_flip(xb, padding=4, generator=augment_gen))), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        t2, c2 = clock()
        times["train"] += t2 - t
        cpu["train"] += c2 - c
        acc = evaluate(xva, yva)
        t, c = clock()
        times["val"] += t - t2
        cpu["val"] += c - c2
        state = {"model": model.state_dict(), "optimizer": opt.state_dict()}  # ModelCheckpoint's work
        torch.save(state, tmp / "last.pt")
        if acc > best:
            best = acc
            torch.save(state, tmp / "best.pt")
    t, c = clock()
    times["fit"], cpu["fit"] = t - fit_start, c - fit_cpu
    model.load_state_dict(torch.load(tmp / "best.pt")["model"])
    evaluate(xte, yte)
    t2, c2 = clock()
    times["test"], cpu["test"] = t2 - t, c2 - c
    times["work"], cpu["work"] = t2 - fit_start, c2 - fit_cpu
    return {
        "times": times,
        "cpu": cpu,
        "images": {"train": len(xtr) * args.epochs, "val": len(xva) * args.epochs, "test": len(xte)},
    }


def run_plain(cifar: Path, tmp: Path, n: int) -> dict:
    """The plain loop in a new process of its own, as each CLI run is (the same cold start: allocator, oneDNN's
    kernels, page cache), with this invocation's arguments."""
    out = tmp / f"plain{n}" / "plain.json"
    out.parent.mkdir(parents=True)
    subprocess.run([sys.executable, __file__, *sys.argv[1:], "--plain-once", str(out)], check=True, timeout=7200)
    return json.loads(out.read_text())


def summary(runs: list[dict]) -> dict:
    """Medians over rounds; `*_cpu_s`: process CPU time (all threads), which other jobs on the machine change
    much less than wall time."""
    med = lambda key: statistics.median(r["times"][key] for r in runs)
    images = runs[0]["images"]
    work = lambda r, what="times": r[what]["work"]
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
            {"bar_share": round(statistics.median(sum(r["bar_s"].values()) / work(r) for r in runs), 4)}
            if "bar_s" in runs[0]
            else {}
        ),
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
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--device-resident", action="store_true", help="keep the splits on the GPU (--device cuda)")
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench" / "overhead.json"))
    parser.add_argument("--plain-once", metavar="JSON", help=argparse.SUPPRESS)  # one plain run, in this process
    args = parser.parse_args()
    if args.device_resident and args.device != "cuda":
        parser.error("--device-resident keeps the splits on a GPU: it needs --device cuda")
    args.epochs = args.epochs or (1 if args.quick else 2)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.train_per_class = args.train_per_class or (300 if args.quick else None)
    cifar = cifar_root(None)
    if args.plain_once:
        Path(args.plain_once).write_text(json.dumps(plain_loop(args, cifar, Path(args.plain_once).parent)))
        return
    load_before = os.getloadavg()
    runs: dict[str, list] = {"cli": [], "cli_no_bar": [], "plain": []}
    tmp = REPO / "outputs" / "bench" / "overhead_tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # the script's scratch folder: run folders of an earlier invocation go
    tmp.mkdir(parents=True)
    variants = {
        "cli": lambda n: run_cli(args, cifar, tmp, 2 * n, bar=True),
        "cli_no_bar": lambda n: run_cli(args, cifar, tmp, 2 * n + 1, bar=False),
        "plain": lambda n: run_plain(cifar, tmp, n),
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
    work = lambda r: r["times"]["work"]
    paired = {  # per round, each variant against the plain loop of the same round: the spread of the ratio
        "cli_vs_plain": [work(p) / work(c) for c, p in zip(runs["cli"], runs["plain"])],
        "cli_no_bar_vs_plain": [work(p) / work(c) for c, p in zip(runs["cli_no_bar"], runs["plain"])],
        "bar_cost": [work(c) / work(b) - 1 for c, b in zip(runs["cli"], runs["cli_no_bar"])],
        "bar_share": [sum(c["bar_s"].values()) / work(c) for c in runs["cli"]],
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
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "device_resident": args.device_resident,
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
    write_json(args.out, result)


if __name__ == "__main__":
    main()
