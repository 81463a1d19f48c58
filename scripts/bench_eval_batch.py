"""Evaluation throughput of the ConvNet against the eval batch size, next to its training throughput, on whatever
CPU this is: which `data.<task>.eval_batch_size` makes validation fast here.

Random 32x32 inputs already in memory (the model's cost, not the input pipeline's), the weights in the layout
`channels_last=auto` picks on this machine (`--channels-last true|false` to choose), evaluation under
torch.inference_mode as Lightning's val/test loops run it. Rounds are interleaved: each round times every batch
size once, then a training pass at the training batch; the figures are the medians.
Writes outputs/bench/eval_batch.json.

    python scripts/bench_eval_batch.py                      # batch sizes 64 128 256 500 1000, 5 rounds
    python scripts/bench_eval_batch.py --sizes 128 500 --rounds 3
"""

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from studylib import write_json
from torch.nn import functional as F

from transferlab.models import build_backbone
from transferlab.train.speed import resolve_channels_last

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 500, 1000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--channels-last", default="auto", choices=["auto", "true", "false"])
    args = parser.parse_args()
    channels_last = resolve_channels_last({"true": True, "false": False}.get(args.channels_last, "auto"), "cpu")
    torch.manual_seed(0)
    backbone, features = build_backbone("convnet")
    model = torch.nn.Sequential(backbone, torch.nn.Linear(features, 10))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x, y = torch.randn(args.images, 3, 32, 32), torch.randint(0, 10, (args.images,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    load_before = os.getloadavg()
    evals, trains = {b: [] for b in args.sizes}, []
    for _ in range(args.rounds + 1):  # the first round warms up and is dropped
        model.eval()
        with torch.inference_mode():
            for b in args.sizes:
                start = time.perf_counter()
                for i in range(0, args.images, b):
                    model(x[i : i + b])
                evals[b].append(args.images / (time.perf_counter() - start))
        model.train()
        start = time.perf_counter()
        for i in range(0, args.images, args.train_batch):
            loss = F.cross_entropy(model(x[i : i + args.train_batch]), y[i : i + args.train_batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        trains.append(args.images / (time.perf_counter() - start))
    train = statistics.median(trains[1:])
    report = {
        "what": __doc__.splitlines()[0],
        "train_img_s": round(train),
        "train_batch": args.train_batch,
        "eval_img_s": {b: round(statistics.median(v[1:])) for b, v in evals.items()},
        "eval_over_train": {b: round(statistics.median(v[1:]) / train, 2) for b, v in evals.items()},
        "channels_last": channels_last,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "torch": torch.__version__,
    }
    out = REPO / "outputs" / "bench" / "eval_batch.json"
    write_json(out, report)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
