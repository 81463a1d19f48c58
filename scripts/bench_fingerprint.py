"""What the content fingerprint of the data costs: first run (every file read and hashed) and re-run (the index in
the data cache says which files are unchanged: one stat per file), on the real CIFAR-10 copy and on a generated
ImageNet-layout folder of small JPEGs.

    python scripts/bench_fingerprint.py                 # 100,000 JPEGs (train/<wnid>/, 1,000 classes)
    python scripts/bench_fingerprint.py --files 20000   # quicker

The real CIFAR-10 copy is built from $TRANSFERLAB_SHARED_DATA/cifar10 (default ../shared/data) with its
build_cifar10.py. The first run reads files from the page cache when they were just written: it measures hashing,
not a cold disk (a cold disk adds its read time, about 140 GB for the full ImageNet). Report:
outputs/bench/fingerprint.json.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from studylib import write_json

from transferlab.data import CIFAR10DataModule
from transferlab.data.fingerprint import RACY_S, files_digest

REPO = Path(__file__).resolve().parents[1]


def timed(files: list[Path], index_dir: Path) -> float:
    start = time.perf_counter()
    files_digest(files, index_dir)
    return time.perf_counter() - start


def write_imagenet_layout(root: Path, n_files: int, classes: int = 1000) -> list[Path]:
    """train/<wnid>/<i>.JPEG: small JPEGs (64 x 64), a few distinct images written under many names."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    blobs = []
    for _ in range(64):
        path = root / "blob.jpg"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
        blobs.append(path.read_bytes())
        path.unlink()
    files = []
    for i in range(n_files):
        folder = root / "train" / f"n{i % classes:08d}"
        if i < classes:
            folder.mkdir(parents=True)
        path = folder / f"{i}.JPEG"
        path.write_bytes(blobs[i % len(blobs)] + i.to_bytes(4, "little"))  # each file different
        files.append(path)
    return files


def measure(name: str, files: list[Path], index_dir: Path) -> dict:
    time.sleep(RACY_S + 1)  # files changed in the last RACY_S seconds are not indexed (see fingerprint.py)
    first = timed(files, index_dir)
    rerun = timed(files, index_dir)
    size = sum(f.stat().st_size for f in files)
    row = {
        "files": len(files),
        "bytes": size,
        "first_run_s": first,
        "rerun_s": rerun,
        "first_run_mb_per_s": size / first / 1e6,
    }
    print(
        f"{name}: {len(files):,} files, {size / 1e6:,.1f} MB: first run {first:.2f} s "
        f"({row['first_run_mb_per_s']:,.0f} MB/s), re-run {rerun:.2f} s",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=100_000, help="JPEGs in the ImageNet-layout folder")
    parser.add_argument("--out", default="outputs/bench/fingerprint.json")
    args = parser.parse_args()
    shared = Path(os.environ.get("TRANSFERLAB_SHARED_DATA", REPO.parent / "shared" / "data"))
    tmp = Path(tempfile.mkdtemp(prefix="bench_fingerprint_"))
    report = {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()}
    try:
        subprocess.run(
            [sys.executable, str(shared / "cifar10" / "build_cifar10.py"), str(tmp / "cifar")],
            check=True,
            capture_output=True,
        )
        cifar = CIFAR10DataModule(root=str(tmp / "cifar"), cache_dir=str(tmp / "cache"))
        report["cifar10"] = measure("CIFAR-10 (real copy)", cifar.data_files(), tmp / "cache")
        start = time.perf_counter()
        files = write_imagenet_layout(tmp / "imagenet", args.files)
        report["imagenet_layout_write_s"] = time.perf_counter() - start
        report["imagenet_layout"] = measure("ImageNet layout", files, tmp / "cache")
        report["index_bytes"] = sum(f.stat().st_size for f in (tmp / "cache").glob("fingerprint-*.json"))
        print(f"fingerprint index files: {report['index_bytes'] / 1e6:.1f} MB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["load_average_at_end"] = os.getloadavg()
    out = Path(args.out)
    write_json(out, report, echo=False)
    print(f"report: {out}")


if __name__ == "__main__":
    main()
