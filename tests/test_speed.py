"""precision=auto resolves from the machine's real capabilities (its CPU flags, its GPU), never assumed."""

from pathlib import Path

import pytest
import torch
from conftest import compose_config

from transferlab.speed import cpu_flags, native_bf16, resolve_precision


def test_cpu_flags_are_this_machines():
    flags = cpu_flags()
    if not Path("/proc/cpuinfo").is_file():
        pytest.skip("no /proc/cpuinfo on this system")
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    line = next(ln for ln in lines if ln.split(":")[0].strip() in ("flags", "Features"))
    assert flags == set(line.split(":", 1)[1].split()) and flags


def test_auto_on_cpu_follows_native_bf16_of_this_cpu():
    expected = "bf16-mixed" if {"avx512_bf16", "amx_bf16"} & cpu_flags() else "32-true"
    assert resolve_precision("auto", "cpu") == expected
    assert native_bf16({"avx2", "amx_bf16"}) and native_bf16({"avx512_bf16"}) and not native_bf16({"avx2", "avx512f"})
    assert resolve_precision("auto", "cpu", flags={"avx2"}) == "32-true"
    assert resolve_precision("auto", "cpu", flags={"avx512f", "avx512_bf16"}) == "bf16-mixed"


def test_auto_on_gpu_follows_the_gpu_and_explicit_values_pass_through():
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert resolve_precision("auto", "gpu") == ("bf16-mixed" if gpu_bf16 else "32-true")
    for value in ("32-true", "16-mixed", "bf16-mixed", 32):
        assert resolve_precision(value, "cpu") == str(value)


def test_the_composed_trainer_gets_the_resolved_precision(tmp_path):
    cfg = compose_config(tmp_path / "run")
    assert cfg.precision == "auto" and cfg.trainer.precision == resolve_precision("auto", "cpu")
    assert compose_config(tmp_path / "run", ["precision=16-mixed"]).trainer.precision == "16-mixed"
