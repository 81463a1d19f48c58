"""Installs that the packaging and extras tests run in: what `pip install transferlab` alone brings (the declared
dependencies and what they require), as a virtual environment linked from this one's installed files."""

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from helpers.config import REPO


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_closure(extras: tuple[str, ...] = ()) -> set[str]:
    """The distributions `pip install transferlab` (no extras, or `transferlab[<extras>]`) installs: the declared
    dependencies and, through their metadata, everything they require in turn (each with the extras asked for it,
    environment markers evaluated here)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    todo = [Requirement(dep) for dep in project["dependencies"]]
    todo += [Requirement(dep) for extra in extras for dep in project["optional-dependencies"][extra]]
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


def declared_only_python(root: Path, extras: tuple[str, ...] = ()) -> Path:
    """A virtual environment holding only `declared_closure(extras)`, linked from this one's installed files (no
    download): an install without extras (or with `extras`), as `pip install -e .` makes it. A folder that several
    distributions share (a namespace package such as hydra_plugins) is made here and linked one level down."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = next((root / "lib").glob("python*/site-packages"))
    keep = declared_closure(extras)
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
        elif (
            owners[prefix] & keep
        ):  # shared (a namespace package, mlflow-skinny beside mlflow): the kept owners' entries
            (site / prefix[0]).mkdir()
            for sub in [p for p in owners if len(p) == 2 and p[0] == prefix[0] and owners[p] & keep]:
                (site / prefix[0] / sub[1]).symlink_to(where[sub])
    return root / "bin" / "python"
