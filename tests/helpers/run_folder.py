"""What a run leaves behind, read back: its manifest, its stage records, the stage cache's entries, every file
of a folder."""

import json
from pathlib import Path


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def stages(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())["stages"]


def cache_entries(tmp_path: Path, stage: str = "source") -> list[Path]:
    return sorted(p for p in (tmp_path / "outputs" / "cache" / "stages").glob(f"{stage}-*") if p.is_dir())


def snapshot(root: Path, leave_out: str = "attempts") -> dict:
    """Every file under `root` and its bytes, but logs, the run lock's files (`.transferlab.*`: who holds the
    folder now) and `leave_out` (the record of attempts grows by design; a first attempt's `.hydra/` is new)."""
    return {
        p: p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and leave_out not in p.parts and p.suffix != ".log" and not p.name.startswith(".transferlab.")
    }
