"""A cache of finished stages shared by runs: a stage whose hash (its recipe, data, model, seed, trainer and
upstream stages) matches an earlier run is reused, not trained again.

`<cache_dir>/<stage>-<hash>/` holds the stage's best checkpoint and its manifest entry; it is published
atomically (written to a temporary folder, then renamed), so a reader sees all of it or nothing. A file
lock per hash makes parallel jobs that need the same stage train it once: the first trains and publishes,
the others wait and reuse it.
"""

import contextlib
import json
import os
import shutil
from pathlib import Path

from filelock import FileLock


class StageCache:
    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir)

    def _entry_dir(self, name: str, key: str) -> Path:
        return self.dir / f"{name}-{key}"

    def has(self, name: str, key: str) -> bool:
        return (self._entry_dir(name, key) / "entry.json").is_file()

    def fetch(self, name: str, key: str, run_dir: Path) -> dict | None:
        """The cached manifest entry, with its checkpoint linked into `<run>/<name>/checkpoints/`, or None."""
        entry_dir = self._entry_dir(name, key)
        if not (entry_dir / "entry.json").is_file():
            return None
        entry = json.loads((entry_dir / "entry.json").read_text())
        target = run_dir / name / "checkpoints" / "best.ckpt"
        target.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(entry_dir / "best.ckpt", target)
        return entry | {"best_ckpt": os.path.relpath(target, run_dir), "last_ckpt": None,
                        "cached_from": str(entry_dir.resolve()), "wall_time_s": 0.0}

    def publish(self, name: str, key: str, run_dir: Path, entry: dict) -> None:
        entry_dir = self._entry_dir(name, key)
        if entry_dir.exists():
            return
        tmp = entry_dir.with_name(f".{entry_dir.name}.{os.getpid()}.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        _link_or_copy(run_dir / entry["best_ckpt"], tmp / "best.ckpt")
        (tmp / "entry.json").write_text(json.dumps(entry | {"trained_in": str(run_dir.resolve())}, indent=2))
        try:
            os.rename(tmp, entry_dir)
        except OSError:  # published meanwhile by another job
            shutil.rmtree(tmp, ignore_errors=True)

    def lock(self, name: str, key: str):
        self.dir.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.dir / f"{name}-{key}.lock"))


class NoCache:
    """`cache=false`: every stage trains."""

    def has(self, name, key):
        return False

    def fetch(self, name, key, run_dir):
        return None

    def publish(self, name, key, run_dir, entry):
        pass

    def lock(self, name, key):
        return contextlib.nullcontext()


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (no copy of a large checkpoint) where the filesystem allows, else a copy; atomic."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)
