#!/usr/bin/env python
"""What each fine-tuning method costs per training step: ClassifierModule.training_step + backward + SGD step on
random 32x32 batches, for plain fine-tuning, L2-SP, BSS and the strong recipe's options, in interleaved rounds.

    python scripts/bench_methods.py [--model convnet|resnet18] [--batch 64] [--steps 5] [--rounds 7]

Prints one line per method: median ms per step and the ratio to plain fine-tuning.
"""

import argparse
import statistics
import time
import warnings

import torch

from transferlab.train.module import ClassifierModule

warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer here: training_step's logging is a no-op

METHODS = {
    "plain": {},
    "l2sp": {"l2sp": {"alpha": 0.01, "beta": 0.01}},
    "bss": {"bss": {"weight": 0.001, "k": 1}},
    "layer_decay+no_decay_norm_bias+smoothing": {"layer_decay": 0.7, "decay_norm_bias": False, "label_smoothing": 0.1},
}


def step_time(options: dict, model: dict, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    module = ClassifierModule(
        model=model, num_classes=10, optimizer={"name": "sgd", "lr": 0.01, "momentum": 0.9}, **options
    )
    optimizer = module.configure_optimizers()
    module.on_train_start()  # takes L2-SP's starting point, as a Trainer would
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        module.training_step((x, y), 0).backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="convnet")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    model = {"name": args.model} | ({"small_input": True} if args.model != "convnet" else {})
    times = {name: [] for name in METHODS}
    for _ in range(args.rounds):
        for name, options in METHODS.items():
            times[name].append(step_time(options, model, args.batch, args.steps))
    plain = statistics.median(times["plain"])
    print(f"{args.model}, batch {args.batch}, {torch.get_num_threads()} threads, median of {args.rounds} rounds:")
    for name, values in times.items():
        print(f"  {name:42s} {statistics.median(values):7.1f} ms/step  x{statistics.median(values) / plain:.2f}")


if __name__ == "__main__":
    main()
