"""The stage cache, shared by runs: a stage whose hash (its recipe, data, model, seed, trainer and upstream
stages) matches an earlier run's is reused, not trained again. (The decoded-data cache, `data/decoded_cache.py`, is
another.)

`<cache_dir>/stages/<stage>-<hash>/` holds the stage's best checkpoint (read-only), its sha256 and its record, as
the run that trained it wrote it (its provenance included). It is published whole or not at all (`fileio.atomic_dir`),
and fetched by copying the checkpoint into the run folder: a run folder never shares a file (an inode) with the
cache or another run, so editing one cannot change the others. A lock per hash makes parallel jobs that need
the same stage train it once: the first trains and publishes, the others wait and reuse it.
"""

import contextlib
import json
import os
from dataclasses import replace
from pathlib import Path

from transferlab.core.digests import file_digest
from transferlab.core.errors import UserError
from transferlab.core.fileio import atomic_dir, copy_file, lock
from transferlab.run.manifest import StageRecord
from transferlab.train.checkpoint_files import verify_checkpoint

DIGEST = "best.ckpt.sha256"  # of the checkpoint as published: a file replaced in the entry is not handed on


class StageCache:
    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir)

    def _entry_dir(self, name: str, key: str) -> Path:
        return self.dir / f"{name}-{key}"

    def has(self, name: str, key: str) -> bool:
        return (self._entry_dir(name, key) / "entry.json").is_file()

    def fetch(self, name: str, key: str, run_dir: Path) -> StageRecord | None:
        """The cached record, its checkpoint copied to `<run>/<name>/checkpoints/best.ckpt`, or None."""
        entry_dir = self._entry_dir(name, key)
        if not self.has(name, key):
            return None
        try:
            entry = json.loads((entry_dir / "entry.json").read_text())
            record = StageRecord.from_json(entry, "its entry.json ")
        except ValueError as err:
            raise UserError(
                f"Stage cache entry {entry_dir} is damaged ({err}): delete that folder (the stage is "
                "then trained again), or run with cache=false."
            ) from None
        verify_checkpoint(entry_dir / "best.ckpt", "cache")  # a damaged entry is named, never handed on
        target = run_dir / name / "checkpoints" / "best.ckpt"
        copy_file(entry_dir / "best.ckpt", target)
        published = entry_dir / DIGEST
        if published.is_file() and published.read_text().strip() != file_digest(target):  # none: an older entry
            target.unlink()
            raise UserError(
                f"Stage cache entry {entry_dir}: its best.ckpt is not the checkpoint that was published there (its "
                "sha256 differs: it was replaced or edited after the stage was cached). Delete that folder (the "
                "stage is then trained again), or run with cache=false."
            )
        return replace(
            record,
            best_ckpt=os.path.relpath(target, run_dir),
            last_ckpt=None,
            cached=True,
            cached_from=str(entry_dir.resolve()),
            wall_time_s=0.0,
        )

    def publish(self, name: str, key: str, run_dir: Path, record: StageRecord) -> None:
        """Add a stage this run trained (under `key`, all of it) to the cache, unless another job did first."""
        entry_dir = self._entry_dir(name, key)
        if entry_dir.exists():
            return
        assert record.best_ckpt is not None  # a done record names its best checkpoint
        with atomic_dir(entry_dir) as tmp:
            copy_file(run_dir / record.best_ckpt, tmp / "best.ckpt", read_only=True)
            (tmp / DIGEST).write_text(file_digest(tmp / "best.ckpt"))
            entry = replace(record, trained_in=str(run_dir.resolve()))
            (tmp / "entry.json").write_text(json.dumps(entry.to_json(), indent=2))
            os.chmod(tmp / "entry.json", 0o444)

    def lock(self, name: str, key: str):
        return lock(self.dir / f"{name}-{key}.lock")


class NoCache:
    """`cache=false`: every stage trains."""

    def has(self, name, key):
        return False

    def fetch(self, name, key, run_dir):
        return None

    def publish(self, name, key, run_dir, record):
        pass

    def lock(self, name, key):
        return contextlib.nullcontext()
