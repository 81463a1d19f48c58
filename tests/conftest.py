"""Fixtures and hooks only (what the test files import is in tests/helpers): output folders out of the checkout,
the tiny config, the real CIFAR-10 copy, a finished source stage to re-run into, SLURM tests on one worker."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.cli import run_cli
from helpers.config import ONLY_SOURCE, REPO, TESTS, TINY, compose_config
from helpers.datasets import SHARED_DATA
from helpers.run_folder import manifest


@pytest.fixture(scope="session", autouse=True)
def _no_outputs_in_the_repo(tmp_path_factory):
    """Console scripts started by module-scoped fixtures write under a session folder, not the checkout."""
    os.environ["TRANSFERLAB_OUTPUT_ROOT"] = str(tmp_path_factory.mktemp("outputs"))


@pytest.fixture(autouse=True)
def _outputs_in_tmp(tmp_path, monkeypatch):
    """Console scripts started by a test write outputs (and the stage cache) under its tmp_path."""
    monkeypatch.setenv("TRANSFERLAB_OUTPUT_ROOT", str(tmp_path / "outputs"))


@pytest.fixture
def tiny_cfg(tmp_path):
    return lambda *overrides: compose_config(tmp_path / "run", [*TINY, *overrides])


@pytest.fixture(scope="session")
def real_cifar10(tmp_path_factory) -> Path:
    """The real CIFAR-10 copy of ../shared/data, built into the official layout (about 6 s)."""
    if not (SHARED_DATA / "cifar10").is_dir():
        pytest.skip(f"the real-data copy is not at {SHARED_DATA}: set TRANSFERLAB_SHARED_DATA")
    out = tmp_path_factory.mktemp("cifar10")
    subprocess.run(
        [sys.executable, str(SHARED_DATA / "cifar10" / "build_cifar10.py"), str(out)], check=True, capture_output=True
    )
    return out


@pytest.fixture
def helpers_on_path(monkeypatch):
    """Subprocesses import the test callbacks (`helpers.callbacks.X`) and this worktree's package. A test file whose
    runs need it says `pytestmark = pytest.mark.usefixtures("helpers_on_path")`."""
    paths = [str(REPO / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)


# -- a finished source stage that the bad-input tests re-run into -------------------------------------
@pytest.fixture(scope="session")
def source_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("source") / "run"
    run_cli("transferlab", *TINY, *ONLY_SOURCE, f"hydra.run.dir={run_dir}")
    return run_dir


@pytest.fixture
def after_source(source_run, tmp_path):
    """A copy of a run whose source stage is done; returns (run folder, check that source is intact)."""
    run_dir = tmp_path / "run"
    shutil.copytree(source_run, run_dir)
    files = {p: p.read_bytes() for p in (run_dir / "source" / "checkpoints").iterdir()}

    def source_intact():
        stages = manifest(run_dir)["stages"]
        assert stages["source"]["status"] == "done"
        assert {p: p.read_bytes() for p in (run_dir / "source" / "checkpoints").iterdir()} == files
        assert not list(run_dir.rglob("*.tmp"))
        return stages

    return run_dir, source_intact


def pytest_collection_modifyitems(items):
    """Under pytest-xdist (`-n`), the tests that share the one local SLURM cluster run on one worker, in turn."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
