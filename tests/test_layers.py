"""The package's layers (`[tool.importlinter]` in pyproject.toml, run by .ci/run as `lint-imports`): the contracts
hold for the package as it is, and they are not vacuous: an upward import, an import between the two sibling
layers or an import loop, put into a copy of the package, breaks them."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.config import REPO

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint(package_root: Path) -> subprocess.CompletedProcess:
    """lint-imports with the project's contracts, on the package found under `package_root` (a `src` folder)."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(REPO / "pyproject.toml")],
        cwd=package_root,
        env={**os.environ, "PYTHONPATH": str(package_root)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_package_keeps_its_layers():
    proc = lint(REPO / "src")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Contracts: 2 kept, 0 broken." in proc.stdout


@pytest.mark.parametrize(
    "module, line, broken",
    [
        # train is below run: the deliberate upward import
        ("train/module.py", "from transferlab.run import pipeline", "transferlab.train is not allowed to import"),
        # data and models are one layer of two independent siblings
        ("data/base.py", "from transferlab.models import convnet", "transferlab.data is not allowed to import"),
        # core imports nothing of transferlab's: errors <- fileio already, so fileio <- errors is a loop
        ("core/errors.py", "from transferlab.core import fileio", "No cycles are allowed in transferlab.core"),
    ],
)
def test_a_broken_layer_fails_the_contract(tmp_path, module, line, broken):
    shutil.copytree(REPO / "src" / "transferlab", tmp_path / "transferlab", ignore=shutil.ignore_patterns("*.pyc"))
    target = tmp_path / "transferlab" / module
    target.write_text(f"{line}  # noqa: F401\n" + target.read_text())
    proc = lint(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert broken in proc.stdout, proc.stdout
