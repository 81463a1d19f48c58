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
from pathlib import Path

import pytest
from helpers.cli import assert_user_error
from helpers.config import REPO, TINY
from packaging.requirements import Requirement


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_top_levels() -> set[str]:
    """Top-level modules imported anywhere in src/transferlab (at module level or inside functions)."""
    names = set()
    for path in (REPO / "src" / "transferlab").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"transferlab", "__future__"}


def test_every_imported_library_is_a_declared_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {normalized(re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0]) for dep in project["dependencies"]}
    providers = importlib.metadata.packages_distributions()
    undeclared = {}
    for module in sorted(imported_top_levels()):
        distributions = {normalized(d) for d in providers.get(module, [])}
        assert distributions, f"{module} is imported by transferlab but not installed"
        if not distributions & declared:
            undeclared[module] = sorted(distributions)
    assert not undeclared, f"imported but not in pyproject's dependencies: {undeclared}"


def declared_closure() -> set[str]:
    """The distributions `pip install transferlab` (no extras) installs: the declared dependencies and, through
    their metadata, everything they require in turn (each with the extras asked for it, environment markers
    evaluated here)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    todo = [Requirement(dep) for dep in project["dependencies"]]
    closure = set()
    while todo:
        requirement = todo.pop()
        name = normalized(requirement.name)
        if name in closure:
            continue
        closure.add(name)
        for line in importlib.metadata.requires(name) or []:
            sub = Requirement(line)
            extras = {"", *requirement.extras}
            if sub.marker is None or any(sub.marker.evaluate({"extra": extra}) for extra in extras):
                todo.append(sub)
    return closure


def declared_only_python(root: Path) -> Path:
    """A virtual environment holding only `declared_closure()`, linked from this one's installed files (no
    download): an install without extras, as `pip install -e .` makes it. A folder that several distributions
    share (a namespace package such as hydra_plugins) is made here and linked one level down."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = next((root / "lib").glob("python*/site-packages"))
    keep = declared_closure()
    owners: dict[tuple[str, ...], set[str]] = {}
    where: dict[tuple[str, ...], Path] = {}
    for dist in importlib.metadata.distributions():
        name = normalized(dist.metadata["Name"])
        for file in dist.files or []:
            if file.parts[0] == ".." or name == "transferlab":
                continue
            for depth in (1, 2):
                if len(file.parts) >= depth:
                    prefix = file.parts[:depth]
                    owners.setdefault(prefix, set()).add(name)
                    where[prefix] = Path(dist.locate_file("")).joinpath(*prefix)
    for prefix in [p for p in owners if len(p) == 1]:
        if owners[prefix] <= keep:
            (site / prefix[0]).symlink_to(where[prefix])
        elif owners[prefix] & keep:  # shared: the kept owners' entries only
            (site / prefix[0]).mkdir()
            for sub in [p for p in owners if len(p) == 2 and p[0] == prefix[0] and owners[p] <= keep]:
                (site / prefix[0] / sub[1]).symlink_to(where[sub])
    return root / "bin" / "python"


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
