"""Training throughput (images/s: forward, backward, SGD step) of the ConvNet and ResNet-18 (32 px, 3x3 stem) on
whatever device is present, over batch size, fp32/bf16 autocast, channels_last and torch.compile; and of timm's
ResNet-50 and ViT-S/16 at their 224 px (`--models timm_resnet50 timm_vit_s16`, for a GPU).

The data sit on the device as uint8 (as `data.device_resident` keeps them on a GPU): a step indexes a random
batch, converts and normalises it on the device, so the figure is the model's, not the input pipeline's. Every
configuration is warmed up first (torch.compile compiles there) and timed for at least `--seconds`; with
`--rounds N` the whole grid is timed N times, interleaved, and each row gives the median, the per-round values and
its ratio to the fp32 / contiguous / eager row of the same model, batch and round (median over rounds).
Writes outputs/bench/throughput.json, with the CPU's bf16 flags and the load average next to the numbers.

    python scripts/bench_throughput.py            # every combination
    python scripts/bench_throughput.py --quick    # CPU: fewer combinations and shorter timings (a few minutes)
    python scripts/bench_throughput.py --models convnet --batches 64 --precisions 32-true --rounds 3
    python scripts/bench_throughput.py --models timm_resnet50 timm_vit_s16 --batches 128 --precisions bf16-mixed
"""

import argparse
import itertools
import json
import os
import statistics
import time
from pathlib import Path

import torch
from studylib import write_json
from torch import nn
from torch.nn import functional as F

from transferlab.models import build_backbone, model_input
from transferlab.train.speed import NATIVE_BF16_FLAGS, cpu_flags

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "convnet": {"name": "convnet"},
    "resnet18": {"name": "resnet18", "small_input": True},
    "timm_resnet50": {"library": "timm", "name": "resnet50"},
    "timm_vit_s16": {"library": "timm", "name": "vit_small_patch16_224"},
}
DEFAULT_MODELS = ["convnet", "resnet18"]  # the timm rows at 224 px are for a GPU: asked for by name


def measure(
    model_name: str,
    batch: int,
    bf16: bool,
    channels_last: bool,
    compiled: bool,
    device: torch.device,
    seconds: float,
    warmup: int,
) -> float:
    torch.manual_seed(0)
    backbone, features = build_backbone(**MODELS[model_name])
    model = nn.Sequential(backbone, nn.Linear(features, 10)).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    size = (model_input(MODELS[model_name]) or {"size": 32})["size"]  # a timm model's own input size
    images = torch.randint(0, 256, (max(4 * batch, 2048), 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (len(images),), device=device)

    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    run = torch.compile(step) if compiled else step

    def one():
        idx = torch.randint(0, len(images), (batch,), device=device)
        x = images[idx].float().div_(255).sub_(0.5).div_(0.5).contiguous(memory_format=fmt)
        run(x, labels[idx])

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        one()
    sync()
    steps, start = 0, time.perf_counter()
    while True:
        one()
        steps += 1
        if steps % 5 == 0 or device.type == "cpu":
            sync()
            if time.perf_counter() - start >= seconds:
                break
    return steps * batch / (time.perf_counter() - start)


def configurations(args, device):
    grid = itertools.product(args.models, args.batches, args.bf16, (False, True), args.compile)
    for model, batch, bf16, cl, compiled in grid:
        if args.quick and device.type == "cpu":  # 2 shared cores: the rows that decide the CPU preset
            if model == "resnet18" and (batch > 64 or compiled or cl):
                continue
            if compiled and (bf16 or batch > 64):
                continue
        yield model, batch, bf16, cl, compiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 512])
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"], choices=["32-true", "bf16-mixed"])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench" / "throughput.json"))
    args = parser.parse_args()
    args.compile = [c == "on" for c in args.compile]
    args.bf16 = [p == "bf16-mixed" for p in args.precisions]
    args.seconds = args.seconds or (2.0 if args.quick else 10.0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    flags = cpu_flags()
    rows: dict[tuple, dict] = {}
    for n in range(args.rounds):  # interleaved: the whole grid once per round
        for model, batch, bf16, cl, compiled in configurations(args, device):
            warmup = 3 if not compiled else 5
            ips = measure(model, batch, bf16, cl, compiled, device, args.seconds, warmup)
            row = rows.setdefault(
                (model, batch, bf16, cl, compiled),
                {
                    "model": model,
                    "batch": batch,
                    "precision": "bf16-mixed" if bf16 else "32-true",
                    "channels_last": cl,
                    "compile": compiled,
                    "rounds_img_s": [],
                    "load_average": [],
                },
            )
            row["rounds_img_s"].append(round(ips, 1))
            row["load_average"].append(os.getloadavg()[0])
            print(f"round {n + 1}: {json.dumps(row)}", flush=True)
    for (model, batch, *_), row in rows.items():
        row["img_s"] = statistics.median(row["rounds_img_s"])
        base = rows.get((model, batch, False, False, False))
        if base:
            row["x_fp32_contiguous_eager"] = round(
                statistics.median(r / b for r, b in zip(row["rounds_img_s"], base["rounds_img_s"])), 3
            )
    rows = list(rows.values())
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "cpu_bf16_flags": sorted(f for f in NATIVE_BF16_FLAGS if f in flags),
        "rounds": args.rounds,
        "torch": torch.__version__,
        "rows": rows,
    }
    write_json(args.out, result, echo=False)
    for row in rows:
        what = f"{row['model']} batch {row['batch']} {row['precision']}"
        what += f" channels_last={row['channels_last']} compile={row['compile']}"
        print(f"{what}: {row['img_s']:,.0f} img/s, x{row.get('x_fp32_contiguous_eager', float('nan')):.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
