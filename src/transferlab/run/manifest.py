"""`<run>/manifest.json`: what each stage of a run produced, under which config, from which attempt.

A stage's record is a `StageRecord` (the one place its fields are named); `Manifest` loads the file (a
damaged one is a UserError, not a traceback), records a stage and saves atomically (rank zero only). Every reader
of run folders (the pipeline, the sweep report, ranking) loads manifests through `Manifest.load`.
"""

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from transferlab.core.errors import UserError
from transferlab.core.fileio import write_json_atomic

if TYPE_CHECKING:
    from transferlab.run.plan import StagePlan

STATUSES = ("running", "done", "failed", "interrupted")
RUN_ADVICE = "Restore it from a backup, or run into a new folder (hydra.run.dir=...); the folder is left as it was."
READER_ADVICE = "Leave that run folder out, or run it again into its folder (the same hydra.run.dir)."


@dataclass
class StageRecord:
    """One stage of a run. `config_hash`/`config` are what its checkpoints were trained under (`config` is the
    hashed values, so a changed re-run can be shown the keys that differ); `attempts` are the numbers of the
    run's attempts (`.hydra/attempts/<n>/`) that trained it, all under that one hash."""

    status: str
    task: str | None = None
    config_hash: str | None = None
    config: dict | None = None
    attempts: list[int] = field(default_factory=list)  # of the run folder that trained it (trained_in if cached)
    init: str | None = None
    best_ckpt: str | None = None  # relative to the run folder (absolute for a given checkpoint)
    last_ckpt: str | None = None
    best_val: float | None = None
    epochs: int | None = None
    splits: dict | None = None
    data: dict | None = None
    test: dict = field(default_factory=dict)
    wall_time_s: float = 0.0
    provenance: dict | None = None  # of the run that trained it (for a cached stage too)
    reason: str | None = None  # why it failed
    given_ckpt: bool = False  # stages.<name>.ckpt: a file used as the result, not trained
    cached: bool = False  # reused from the stage cache ...
    cached_from: str | None = None  # ... entry <cache_dir>/stages/<name>-<hash>
    trained_in: str | None = None  # the run folder that trained it, when reused from the cache

    @classmethod
    def of(cls, plan: "StagePlan", status: str, provenance: dict | None, **fields) -> "StageRecord":
        """A record of the stage `plan` describes, in `status`: the fields every such record has are written here
        once; `fields` are the state's own (attempts and last_ckpt while it trains, reason when it failed, ...)."""
        return cls(status, plan.stage.task, plan.hash, plan.config, provenance=provenance, **fields)

    def done(self, **results) -> "StageRecord":
        """This (running) record, done: `results` are its best checkpoint, metrics, epochs, splits, data, time."""
        return replace(self, status="done", **results)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data, where: str = "") -> "StageRecord":
        """A record as written by `to_json`; anything else (a hand edit, a file cut short) is a ValueError naming
        the field, so that no later step trips over a null checkpoint or a string where a list belongs."""
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or data.get("status") not in STATUSES or set(data) - names:
            found = sorted(set(data) - names) if isinstance(data, dict) else type(data).__name__
            raise ValueError(
                f"{where}is not a stage record (status one of {', '.join(STATUSES)}; "
                f"unexpected: {found or data.get('status')!r})"
            )
        for name, value in data.items():
            if not _TYPES[name](value):
                raise ValueError(f"{where}has {name}={value!r}, which a stage record cannot hold")
        if data["status"] == "done" and not (data.get("best_ckpt") and isinstance(data.get("test"), dict)):
            raise ValueError(f"{where}is done but names no best checkpoint or test metrics")
        return cls(**data)


_optional = lambda *types: lambda v: v is None or (isinstance(v, types) and not isinstance(v, bool))
_number = lambda v: isinstance(v, int | float) and not isinstance(v, bool)
_TYPES = {  # field -> what its JSON value may be
    "status": lambda v: v in STATUSES,
    "task": _optional(str),
    "config_hash": _optional(str),
    "config": _optional(dict),
    "attempts": lambda v: isinstance(v, list) and all(isinstance(a, int) and not isinstance(a, bool) for a in v),
    "init": _optional(str),
    "best_ckpt": _optional(str),
    "last_ckpt": _optional(str),
    "best_val": lambda v: v is None or _number(v),
    "epochs": _optional(int),
    "splits": _optional(dict),
    "data": _optional(dict),
    "test": lambda v: isinstance(v, dict) and all(_number(x) for x in v.values()),
    "wall_time_s": _number,
    "provenance": _optional(dict),
    "reason": _optional(str),
    "given_ckpt": lambda v: isinstance(v, bool),
    "cached": lambda v: isinstance(v, bool),
    "cached_from": _optional(str),
    "trained_in": _optional(str),
}


class Manifest:
    """The manifest of one run folder: header (config, seed, provenance of the latest attempt) + stage records."""

    def __init__(self, path: Path, stages: dict[str, StageRecord] | None = None, header: dict | None = None):
        self.path, self.stages, self.header = Path(path), stages or {}, header or {}

    @classmethod
    def load(cls, run_dir: Path, advice: str = RUN_ADVICE) -> "Manifest":
        """The manifest of `run_dir` (an empty one where there is none); a damaged one is a UserError naming the
        problem, then `advice`: what the reader's user can do about it."""
        path = Path(run_dir) / "manifest.json"
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
                raise ValueError("expected an object with a 'stages' object")
            stages = {name: StageRecord.from_json(s, f"stage {name!r} ") for name, s in data["stages"].items()}
        except (OSError, ValueError, TypeError) as err:
            raise UserError(
                f"{path} is not a transferlab manifest ({err}): it was cut short, edited or written by "
                f"another tool. {advice}"
            ) from None
        return cls(path, stages, {k: v for k, v in data.items() if k != "stages"})

    def get(self, name: str) -> StageRecord | None:
        return self.stages.get(name)

    def record(self, name: str, record: StageRecord) -> None:
        """Set a stage's record and save the manifest."""
        self.stages[name] = record
        self.save()

    def save(self) -> None:
        """Written by rank zero only. Lightning is imported here, not at import: reading a sweep needs none of it."""
        from transferlab.core.console import global_rank

        if global_rank() == 0:
            write_json_atomic(self.path, {**self.header, "stages": {n: r.to_json() for n, r in self.stages.items()}})

    def trained_by(self, attempt: int) -> list[str]:
        """The stages that attempt `attempt` of this run folder trained (not those it reused from the cache)."""
        return [name for name, r in self.stages.items() if attempt in r.attempts and r.trained_in is None]

    def checkpoint(self, name: str) -> Path:
        """The best checkpoint of stage `name` (done): relative paths are relative to the run folder."""
        best = self.stages[name].best_ckpt
        assert best is not None  # a done record names its best checkpoint (StageRecord.from_json)
        return self.path.parent / best
