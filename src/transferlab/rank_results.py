"""The other half of `transferlab-rank`: the fine-tuned accuracies a ranking is checked against (`results=`),
each score's Kendall tau-b and Pearson r against them, and the ranking tables (markdown, CSV, JSON)."""

import csv
import hashlib
import io
import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from transferlab import report
from transferlab.errors import UserError
from transferlab.fileio import atomic_write, read_json, write_json_atomic
from transferlab.transferability import SCORES, kendall_tau_b, pearson_r

log = logging.getLogger(__name__)


def plain(node):
    """A config value as plain Python: a list or dict stays one, a single value becomes a one-item list."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return [] if node is None else [node]


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_results(cfg: DictConfig, candidates: list) -> dict[str, list[float]]:
    """Fine-tuned accuracies per candidate name, from a CSV/JSON file or run/sweep folders (see conf/rank.yaml)."""
    given = plain(cfg.results)
    sources = [Path(str(p)).expanduser() for p in (given if isinstance(given, list) else [given])]
    missing = [str(p) for p in sources if not p.exists()]
    if missing:
        raise UserError(
            f"results: {', '.join(missing)} does not exist. Give a .csv (candidate,accuracy), a .json "
            "{candidate: accuracy}, or the run/sweep folders that fine-tuned from the candidates."
        )
    by_key = {k: c.name for c in candidates for k in (c.name, c.given, str(c.path))}
    found: dict[str, list[float]] = {}
    unknown = []
    for source in sources:
        if source.is_dir():
            pairs = _results_from_runs(cfg, source, {c.digest: c.name for c in candidates if c.path})
        elif source.suffix == ".csv":
            with open(source, newline="") as f:
                pairs = [(r["candidate"], float(r["accuracy"])) for r in csv.DictReader(f)]
        elif source.suffix == ".json":
            pairs = [
                (k, float(a))
                for k, v in json.loads(source.read_text()).items()
                for a in (v if isinstance(v, list) else [v])
            ]
        else:
            raise UserError(
                f"results={source}: give a .csv (candidate,accuracy), a .json {{candidate: accuracy}}, "
                "or run/sweep folders."
            )
        for key, acc in pairs:
            if key in by_key:
                found.setdefault(by_key[key], []).append(acc)
            else:
                unknown.append(key)
    if unknown:
        log.warning("results for candidates not being ranked, ignored: %s", ", ".join(sorted(set(unknown))))
    if not found:
        raise UserError(
            f"results={given}: none of it matches a candidate ({', '.join(c.name for c in candidates)}). "
            "Name the candidates as in the table, or give the runs that fine-tuned from them."
        )
    return found


def _results_from_runs(cfg: DictConfig, folder: Path, by_digest: dict[str, str]) -> list[tuple[str, float]]:
    """Runs (folder itself, or its job folders) whose `results_stage` checkpoint has a candidate's content."""
    pairs = []
    for manifest_path in sorted({*folder.glob("manifest.json"), *folder.glob("*/manifest.json")}):
        manifest = read_json(manifest_path)
        entry = manifest.get("stages", {}).get(cfg.results_stage, {})
        metric = report.summarise(manifest.get("stages", {}))["metrics"].get(cfg.results_metric)
        ckpt = manifest_path.parent / entry["best_ckpt"] if entry.get("best_ckpt") else None
        if metric is None or ckpt is None or not ckpt.is_file():
            continue
        name = by_digest.get(file_digest(ckpt))
        if name is not None:
            pairs.append((name, float(metric)))
    return pairs


def correlations(rows: list[dict]) -> dict:
    scored = [r for r in rows if r["finetuned_acc"] is not None]
    acc = [r["finetuned_acc"] for r in scored]
    return {
        s: {
            "kendall_tau": kendall_tau_b([r[s] for r in scored], acc),
            "pearson_r": pearson_r([r[s] for r in scored], acc),
            "n": len(scored),
        }
        for s in SCORES
    }


COLUMNS = [
    "rank",
    "candidate",
    *SCORES,
    "finetuned_acc",
    "finetuned_n",
    "feature_dim",
    "source_classes",
    "forward_s",
    "scores_s",
    "checkpoint",
]


def write_tables(run_dir: Path, out: dict) -> None:
    rows = [{"rank": i + 1, **r} for i, r in enumerate(out["candidates"])]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(run_dir / "ranking.csv", buffer.getvalue())
    write_json_atomic(run_dir / "ranking.json", out)
    fmt = lambda v: "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
    shown = COLUMNS[:6] + (["finetuned_acc", "finetuned_n"] if out["correlations"] else [])
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in shown) + " |" for r in rows]
    if out["correlations"]:
        lines += ["", "| score | Kendall tau-b | Pearson r | n |", "|---|---|---|---|"]
        lines += [
            f"| {s} | {fmt(v['kendall_tau'])} | {fmt(v['pearson_r'])} | {v['n']} |"
            for s, v in out["correlations"].items()
        ]
    text = (
        f"Ranking for the {out['task']} task ({out['samples']} training images, data {out['data']['hash']}), "
        f"by {out['sort_by']}:\n\n" + "\n".join(lines) + "\n"
    )
    atomic_write(run_dir / "ranking.md", f"# Source ranking ({run_dir})\n\n{text}")
    print(f"\n{text}\nWritten: {run_dir}/ranking.md, ranking.csv, ranking.json")
