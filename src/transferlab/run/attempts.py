"""Every attempt at a run folder keeps its Hydra config, so the folder shows which config produced what.

Hydra writes `<run>/.hydra/{config,overrides,hydra}.yaml` before transferlab starts, so a re-run that is then
refused (or fails before training) would leave the folder claiming a config that produced none of its
checkpoints. Each attempt copies those files to `.hydra/attempts/<n>/` first (the stage records name the
attempts that trained them) and, at its end, writes `outcome.json` there; an attempt that trained nothing and
failed puts back the top-level files of the last attempt that trained (one without an outcome was killed, so
it may have). `transferlab-report` keeps reading the top-level files.
"""

import json
import shutil
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only

from transferlab.core.console import global_rank
from transferlab.core.errors import user_message
from transferlab.core.fileio import copy_file, write_json_atomic

HYDRA_FILES = ("config.yaml", "overrides.yaml", "hydra.yaml")


def _folder(run_dir: Path) -> Path:
    return Path(run_dir) / ".hydra" / "attempts"


def begin(run_dir: Path) -> int:
    """Number this attempt (1, 2, ...) and keep a copy of the config Hydra wrote for it."""
    if global_rank() != 0:
        return 0  # only rank zero writes records
    attempts = _folder(run_dir)
    number = max((int(p.name) for p in attempts.glob("*") if p.name.isdigit()), default=0) + 1
    (attempts / str(number)).mkdir(parents=True)
    for name in HYDRA_FILES:
        if (attempts.parent / name).is_file():
            shutil.copyfile(attempts.parent / name, attempts / str(number) / name)
    return number


@rank_zero_only
def end(run_dir: Path, number: int, trained: list[str], error: BaseException | None) -> None:
    """Write the attempt's outcome; a failed attempt that trained nothing restores the last trained config."""
    attempts = _folder(run_dir)
    outcome = "done" if error is None else "failed" if trained else "refused (trained nothing)"
    write_json_atomic(
        attempts / str(number) / "outcome.json",
        {"outcome": outcome, "trained": trained, "error": user_message(error) if error else None},
    )
    if error is None or trained:
        return
    for earlier in range(number - 1, 0, -1):
        folder = attempts / str(earlier)
        if not folder.is_dir():
            continue
        done = folder / "outcome.json"
        if not done.is_file() or json.loads(done.read_text()).get("trained"):
            for name in HYDRA_FILES:
                if (folder / name).is_file():
                    copy_file(folder / name, attempts.parent / name)
            return


def restore_latest(run_dir: Path) -> None:
    """A run refused at the folder's lock: Hydra has already rewritten the top-level files with the refused
    config; put back those of the attempt that holds the folder (the latest)."""
    numbers = [int(p.name) for p in _folder(run_dir).glob("*") if p.name.isdigit()]
    if numbers:
        latest = _folder(run_dir) / str(max(numbers))
        for name in HYDRA_FILES:
            if (latest / name).is_file():
                copy_file(latest / name, _folder(run_dir).parent / name)
