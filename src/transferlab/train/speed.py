"""Speed settings chosen from the machine a run is on, never assumed.

`precision=auto` (the default) resolves, per trainer preset, to:
- CPU: `32-true` on every CPU. bf16 autocast on a CPU is a different path per CPU (emulated, and many times
  slower, without avx512_bf16/amx_bf16; native with them), so a CPU default that followed the flags would run a
  configuration the test suite runs only on some machines; `precision=bf16-mixed` opts in. Why, with the
  figures: docs/performance.md (precision on a CPU).
- GPU: `bf16-mixed` when the GPU supports bf16 (torch.cuda.is_bf16_supported), else `32-true`.
Any explicit value (`32-true`, `16-mixed`, `bf16-mixed`, ...) is used as given.

`channels_last=auto` (the default) stores conv weights channels-last where that was measured faster: on an x86
CPU with AVX2 or AVX-512 (oneDNN's convolutions run NHWC natively; measured with scripts/bench_cpu_levers.py, the
figures in docs/performance.md); elsewhere, GPUs included, contiguous until measured there.
`compile=true` compiles the backbone with torch.compile: off by default (slower for the ConvNet on the reference
CPU, and each stage pays its compile time). Both change results only within float rounding, and both are part of
a stage's hash (trainer config).
"""

from pathlib import Path

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # recorded by the benchmarks, next to their bf16 figures
NHWC_CPU_FLAGS = ("avx2", "avx512f")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo does not exist, e.g. macOS)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def resolve_precision(precision, accelerator="cpu") -> str:
    """`precision=auto` -> `32-true` on a CPU, `bf16-mixed` on a GPU that supports it (see module doc)."""
    precision = str(precision)
    if precision != "auto":
        return precision
    if str(accelerator) in ("gpu", "cuda"):
        import torch  # only here: the config is composed before anything heavy is imported

        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    return "32-true"


def resolve_channels_last(value, accelerator="cpu", flags: set[str] | None = None):
    """`channels_last=auto` -> whether channels-last weights are the faster layout on this machine (module doc);
    an explicit value is returned as given (validation says what is allowed)."""
    if str(value) != "auto":
        return value
    flags = cpu_flags() if flags is None else flags
    return str(accelerator) == "cpu" and any(f in flags for f in NHWC_CPU_FLAGS)
