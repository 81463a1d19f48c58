"""Where a number came from: code version, library versions and machine, recorded in the manifest."""

import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import hydra
import lightning
import torch


def collect() -> dict:
    """Code (git commit, dirty flag), Python/torch/Lightning/Hydra versions, and the machine."""
    return {
        "git": git_state(Path(__file__).resolve().parent),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "hydra": hydra.__version__,
        },
        "machine": {
            "host": socket.gethostname(),
            "platform": platform.platform(),
            "cpu": cpu_name(),
            "cpu_count": _cpu_count(),
            "torch_threads": torch.get_num_threads(),  # OMP_NUM_THREADS / torch.set_num_threads: speed depends on it
            "gpu_count": torch.cuda.device_count(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        },
        "command": sys.argv,
    }


def git_state(folder: Path) -> dict | None:
    """The commit of the checkout that holds `folder`, or None outside a git checkout (an installed wheel)."""

    def git(*args):
        return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(), "dirty": dirty}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_count() -> int | None:  # None: os.cpu_count cannot tell
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
