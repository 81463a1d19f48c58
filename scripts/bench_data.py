"""Input-pipeline throughput next to the ConvNet's training throughput, on this machine.

    python scripts/bench_data.py            # CIFAR-10-sized (50,000) and Imagenet32-sized (1,281,167) data
    python scripts/bench_data.py --quick    # 10,000 and 100,000 images, fewer steps

Measures images/s of
- `convnet_train`: the reference ConvNet's training step (forward, backward, SGD) at the mission's batch 64;
- `memory`: the in-memory path as training runs it: shuffled batches of the uint8 tensor, then random crop,
  flip and normalisation batched on the device (CPU here), on CIFAR-10 files in the official layout;
- `workers`: per-sample PIL transforms in DataLoader worker processes, on the same files;
- `memory_imagenet32`: the memory path over a generated Imagenet32-sized memory-mapped cache entry (the
  format `data/decoded_cache.py` writes), indexed without copying.
All data is generated (random pixels), so it runs offline; the report goes to outputs/bench/data.json.
Every measurement uses the same number of torch threads (`--threads`, default 1).
"""

import argparse
import os
import pickle
import platform
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from studylib import write_json

from transferlab.data import CIFAR10DataModule, ClassificationDataModule
from transferlab.data.decoded_cache import cached_arrays
from transferlab.data.inputs import ArrayData
from transferlab.models.convnet import ConvNetBackbone

IMAGENET32_TRAIN = 1_281_167


def convnet_train(steps: int, batch: int = 64) -> float:
    model = torch.nn.Sequential(ConvNetBackbone(), torch.nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    for i in range(steps + 5):
        if i == 5:
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def training_like(dm: ClassificationDataModule) -> ClassificationDataModule:
    """What the Trainer provides the data module during fit: rank, epoch, and `training`."""
    dm.trainer = SimpleNamespace(training=True, global_rank=0, world_size=1, current_epoch=0)
    return dm


def loader_throughput(dm: ClassificationDataModule, max_images: int) -> float:
    """images/s of the train loader, including the on-device step (augment + normalise) of the memory path."""
    dm.setup()
    seen, start = 0, time.perf_counter()
    for batch in dm.train_dataloader():
        x, y = dm.on_after_batch_transfer(batch, 0)
        seen += len(y)
        if seen >= max_images:
            break
    return seen / (time.perf_counter() - start)


def write_cifar10_sized(root: Path, n_train: int, n_test: int = 1000) -> Path:
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, n in [*((f"data_batch_{i}", n_train // 5) for i in range(1, 6)), ("test_batch", n_test)]:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    return root


class GeneratedImagenet32(ClassificationDataModule):
    """Imagenet32-sized random data in the memory-mapped cache format, split without copying (like the real one)."""

    num_classes_total = 1000
    copy_subsets = False

    def __init__(self, n: int, cache_dir: Path, **kwargs):
        super().__init__(**kwargs)
        self.n, self.cache_dir = n, cache_dir

    def load_split(self, split: str):
        n = self.n if split == "train" else 1000

        def build():
            def fill(images):
                rng = np.random.default_rng(1)
                for start in range(0, n, 100_000):
                    stop = min(n, start + 100_000)
                    images[start:stop] = rng.integers(0, 256, (stop - start, 3, 32, 32), dtype=np.uint8)
                    yield rng.integers(0, 1000, stop - start)

            return (n, 3, 32, 32), fill

        return ArrayData(*cached_arrays(self.cache_dir, f"bench_imagenet32_{split}", str(n), build))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller data and fewer steps (about a minute)")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size of the input paths")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers of the workers path")
    parser.add_argument("--out", default="outputs/bench/data.json")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for every measurement (default 1: on a shared machine, "
        "threads that wait for busy cores make every figure erratic)",
    )
    parser.add_argument("--keep-cache", action="store_true", help="keep the generated Imagenet32-sized cache entry")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cifar_n, in32_n = (10_000, 100_000) if args.quick else (50_000, IMAGENET32_TRAIN)
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1_5_15min_at_start": os.getloadavg(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "args": vars(args),
        "images_per_s": {},
    }
    ips = report["images_per_s"]

    ips["convnet_train_batch64"] = convnet_train(steps=30 if args.quick else 150)
    print(f"ConvNet training (batch 64): {ips['convnet_train_batch64']:,.0f} images/s", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        root = write_cifar10_sized(tmp / "cifar", cifar_n)
        common = dict(root=str(root), val_fraction=0.0, batch_size=args.batch_size, augment=True)
        ips["memory_cifar10"] = loader_throughput(training_like(CIFAR10DataModule(loader="memory", **common)), cifar_n)
        print(f"memory path, CIFAR-10-sized ({cifar_n:,}): {ips['memory_cifar10']:,.0f} images/s", flush=True)
        workers = CIFAR10DataModule(loader="workers", num_workers=args.workers, **common)
        ips["workers_cifar10"] = loader_throughput(training_like(workers), 5_000 if args.quick else 20_000)
        print(f"workers path ({args.workers} workers): {ips['workers_cifar10']:,.0f} images/s", flush=True)

        cache = Path(args.out).parent / "cache"
        start = time.perf_counter()
        dm = training_like(GeneratedImagenet32(in32_n, cache, val_fraction=0.0, batch_size=args.batch_size))
        dm.setup()
        report["imagenet32_generate_and_split_s"] = time.perf_counter() - start
        report["imagenet32_cache_bytes"] = sum(f.stat().st_size for f in cache.rglob("*.npy"))
        ips["memory_imagenet32"] = loader_throughput(dm, in32_n)
        print(
            f"memory path, Imagenet32-sized ({in32_n:,}, memory-mapped, one epoch): "
            f"{ips['memory_imagenet32']:,.0f} images/s",
            flush=True,
        )
        if not args.keep_cache:
            shutil.rmtree(cache, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    report["machine"]["load_average_1_5_15min_at_end"] = (
        os.getloadavg()
    )  # the machine is shared: context for the figures
    report["memory_over_convnet"] = min(ips["memory_cifar10"], ips["memory_imagenet32"]) / ips["convnet_train_batch64"]
    report["memory_fast_enough"] = report["memory_over_convnet"] >= 5
    out = Path(args.out)
    write_json(out, report, echo=False)
    print(f"memory path / ConvNet training: {report['memory_over_convnet']:.1f}x (needs >= 5x); report: {out}")


if __name__ == "__main__":
    main()
