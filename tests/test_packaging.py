"""What `pip install transferlab` brings must be enough to run it: every library the package's code imports is one
of its declared dependencies, not something another dependency (or an extra) happens to pull in; and an install
without extras runs the pipeline."""

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib

import pytest
from helpers.cli import assert_user_error
from helpers.config import REPO, TINY
from helpers.installs import declared_only_python, normalized


def imported_top_levels(module_level_only: bool = False) -> set[str]:
    """Top-level modules imported anywhere in src/transferlab (at module level or inside functions), or at module
    level only: what importing the package imports."""
    names = set()
    for path in (REPO / "src" / "transferlab").rglob("*.py"):
        for node in _walk(ast.parse(path.read_text(), str(path)), module_level_only):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"transferlab", "__future__"}


def _walk(node: ast.AST, module_level_only: bool):
    yield node
    for child in ast.iter_child_nodes(node):
        if not (module_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))):
            yield from _walk(child, module_level_only)


def test_every_imported_library_is_a_declared_dependency():
    """... or the library of an extra (mlflow, wandb), imported only inside the functions that use it: importing the
    package never needs an extra."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    name = lambda dep: normalized(re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0])
    declared = {name(dep) for dep in project["dependencies"]}
    extras = {name(dep) for extra, deps in project["optional-dependencies"].items() if extra != "dev" for dep in deps}
    at_import = imported_top_levels(module_level_only=True)
    providers = importlib.metadata.packages_distributions()
    undeclared = {}
    for module in sorted(imported_top_levels()):
        distributions = {normalized(d) for d in providers.get(module, [])}
        assert distributions, f"{module} is imported by transferlab but not installed"
        if not distributions & declared and not (distributions & extras and module not in at_import):
            undeclared[module] = sorted(distributions)
    assert not undeclared, (
        f"imported but not in pyproject's dependencies (or an extra's, imported lazily): {undeclared}"
    )


@pytest.fixture(scope="module")
def bare_install(tmp_path_factory):
    """(python, environment) of an install without extras, running this checkout's code."""
    python = declared_only_python(tmp_path_factory.mktemp("bare") / "venv")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return python, env


def test_an_install_without_extras_runs_the_pipeline(bare_install, tmp_path):
    """Everything a run needs comes with the declared dependencies: with the bar on (Lightning's RichProgressBar
    needs rich, which only an extra had brought in), the four stages train and the results are printed."""
    python, env = bare_install
    args = [a for a in TINY if a != "trainer.enable_progress_bar=false"]
    proc = subprocess.run(
        [str(python), "-m", "transferlab.commands.main", *args, f"hydra.run.dir={tmp_path / 'run'}"],
        env={**env, "TRANSFERLAB_OUTPUT_ROOT": str(tmp_path / "outputs")},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Transfer gain" in proc.stdout
    flat = json.loads((tmp_path / "run" / "results.json").read_text())
    assert flat["gain/acc"] == pytest.approx(flat["finetune/test/acc"] - flat["scratch/test/acc"])


def test_without_the_optuna_extra_nothing_imports_scipy(bare_install):
    """The start-up saving the extra exists for: torchmetrics imports scipy.signal (0.9 s) wherever scipy is
    installed, and only optuna brings it."""
    python, env = bare_install
    program = (
        "import sys, lightning, transferlab.commands.main, transferlab.run.pipeline; print('scipy' in sys.modules)"
    )
    proc = subprocess.run([str(python), "-c", program], env=env, capture_output=True, text=True, check=True)
    assert proc.stdout.split()[-1] == "False"


@pytest.mark.parametrize("search", ["hparams_search=optuna", "hydra/sweeper=optuna"])
def test_a_search_without_the_optuna_extra_says_what_to_install(bare_install, tmp_path, search):
    """Instead of Hydra's `Could not find 'hydra/sweeper/optuna'`: exit 2, the install command, nothing written."""
    python, env = bare_install
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run(
        [str(python), "-m", "transferlab.commands.main", "-m", search, f"hydra.sweep.dir={sweep_dir}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert_user_error(proc, "pip install 'transferlab[optuna]'")
    assert not sweep_dir.exists()
