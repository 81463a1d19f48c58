"""The other half of `transferlab-rank`: the fine-tuned accuracies a ranking is checked against (`results=`),
each score's Kendall tau-b and Pearson r against them, and the ranking tables (markdown, CSV, JSON)."""

import csv
import io
import json
import logging
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from transferlab.analysis.transferability import SCORES, kendall_tau_b, pearson_r
from transferlab.core.digests import file_digest
from transferlab.core.errors import UserError
from transferlab.core.fileio import atomic_write, write_json_atomic
from transferlab.core.tables import markdown_table
from transferlab.run import results as report
from transferlab.run.manifest import READER_ADVICE, Manifest

log = logging.getLogger(__name__)
MIN_PAIRS = 3  # fewer (score, accuracy) pairs say nothing: two points always give tau and r of +-1
FORMS = (
    'a .csv with the header row candidate,accuracy (then e.g. random,0.41), a .json {"<candidate>": accuracy or '
    "[accuracies]}, or the run/sweep folders that fine-tuned from the candidates"
)


def plain(node):
    """A config value as plain Python: a list or dict stays one, a single value becomes a one-item list."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return [] if node is None else [node]


def read_results(cfg: DictConfig, candidates: list) -> dict[str, list[float]]:
    """Fine-tuned accuracies per candidate name, from a CSV/JSON file or run/sweep folders (see conf/rank.yaml)."""
    given = plain(cfg.results)
    sources = [Path(str(p)).expanduser() for p in (given if isinstance(given, list) else [given])]
    missing = [str(p) for p in sources if not p.exists()]
    if missing:
        raise UserError(f"results: {', '.join(missing)} does not exist. Give {FORMS}.")
    by_key = {k: c.name for c in candidates for k in (c.name, c.given, str(c.path))}
    found: dict[str, list[float]] = {}
    unknown = []
    for source in sources:
        if source.is_dir():
            pairs = _results_from_runs(cfg, source, {c.digest: c.name for c in candidates if c.path})
        elif source.suffix == ".csv":
            pairs = _results_from_csv(source)
        elif source.suffix == ".json":
            pairs = _results_from_json(source)
        else:
            raise UserError(f"results={source}: give {FORMS}.")
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


def _accuracy(value, where: str) -> float:
    """A fine-tuned accuracy: a finite number, a fraction or a percent (tau and r do not depend on the scale, so
    long as one scale is used throughout)."""
    number = value
    if isinstance(value, str):  # a CSV cell
        try:
            number = float(value)
        except ValueError:
            pass
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
        raise UserError(
            f"{where}: the accuracy {json.dumps(value)} is not a finite number. Give each fine-tuned accuracy as a "
            "number (e.g. 0.41 or 41.0), and leave out a candidate whose fine-tuning failed."
        )
    return float(number)


def _results_from_csv(path: Path) -> list[tuple[str, float]]:
    """(candidate, accuracy) per row; a spreadsheet's byte-order mark and spaces after the commas are allowed."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, skipinitialspace=True)
            if not {"candidate", "accuracy"} <= set(reader.fieldnames or ()):
                raise UserError(
                    f"results={path}: its first row is {','.join(reader.fieldnames or ['(empty)'])}, not the header "
                    f"candidate,accuracy. Give {FORMS}."
                )
            return [
                (
                    (r["candidate"] or "").strip(),
                    _accuracy(r["accuracy"] or "", f"results={path} line {reader.line_num}"),
                )
                for r in reader
            ]
    except UnicodeDecodeError:
        raise UserError(f"results={path} is not a text file. Give {FORMS}.") from None


def _results_from_json(path: Path) -> list[tuple[str, float]]:
    """(candidate, accuracy) per accuracy of a JSON object {candidate: accuracy or [accuracies]}."""
    try:
        given = json.loads(path.read_bytes())
    except ValueError as err:
        raise UserError(f"results={path} is not valid JSON ({err}). Give {FORMS}.") from None
    if not isinstance(given, dict):
        raise UserError(f"results={path} holds a JSON {type(given).__name__}, not an object. Give {FORMS}.")
    return [
        (k, _accuracy(a, f"results={path} key {k!r}"))
        for k, v in given.items()
        for a in (v if isinstance(v, list) else [v])
    ]


def _results_from_runs(cfg: DictConfig, folder: Path, by_digest: dict[str, str]) -> list[tuple[str, float]]:
    """Runs (folder itself, or its job folders) whose `results_stage` checkpoint has a candidate's content."""
    pairs = []
    for manifest_path in sorted({*folder.glob("manifest.json"), *folder.glob("*/manifest.json")}):
        manifest = Manifest.load(manifest_path.parent, READER_ADVICE)
        record = manifest.get(cfg.results_stage)
        metric = report.summarise(manifest.stages)["metrics"].get(cfg.results_metric)
        ckpt = manifest.checkpoint(cfg.results_stage) if record and record.best_ckpt else None
        if metric is None or ckpt is None or not ckpt.is_file():
            continue
        name = by_digest.get(file_digest(ckpt))
        if name is not None:
            pairs.append((name, float(metric)))
    return pairs


def correlations(rows: list[dict]) -> dict:
    """Each score's Kendall tau-b and Pearson r against the fine-tuned accuracy, over the candidates whose score and
    accuracy are both finite (`n`, per score: a diverged candidate's NaN or a missing accuracy leaves that one out,
    not every correlation NaN). From fewer than MIN_PAIRS pairs tau and r are None (null in ranking.json, `n < 3`
    in the table) and a warning says so: two points always give +-1, which is no evidence."""
    out: dict[str, dict] = {}
    for s in SCORES:
        pairs = [
            (r[s], r["finetuned_acc"])
            for r in rows
            if r["finetuned_acc"] is not None and math.isfinite(r[s]) and math.isfinite(r["finetuned_acc"])
        ]
        x, y = [p[0] for p in pairs], [p[1] for p in pairs]
        enough = len(pairs) >= MIN_PAIRS
        out[s] = {
            "kendall_tau": kendall_tau_b(x, y) if enough else None,
            "pearson_r": pearson_r(x, y) if enough else None,
            "n": len(pairs),
        }
    few = [f"{s} (n = {v['n']})" for s, v in out.items() if v["n"] < MIN_PAIRS]
    if few:
        log.warning(
            "Not correlated, fewer than %d candidates with both a finite score and a fine-tuned accuracy: %s.",
            MIN_PAIRS,
            ", ".join(few),
        )
    return out


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
    lines = [markdown_table(shown, [[fmt(r[k]) for k in shown] for r in rows])]
    if out["correlations"]:
        shown_r = lambda v, key: fmt(v[key]) if v["n"] >= MIN_PAIRS else f"n < {MIN_PAIRS}"
        correlations = [
            [s, shown_r(v, "kendall_tau"), shown_r(v, "pearson_r"), v["n"]] for s, v in out["correlations"].items()
        ]
        lines += ["", markdown_table(["score", "Kendall tau-b", "Pearson r", "n"], correlations)]
    text = (
        f"Ranking for the {out['task']} task ({out['samples']} training images, data {out['data']['hash']}), "
        f"by {out['sort_by']}:\n\n" + "\n".join(lines) + "\n"
    )
    atomic_write(run_dir / "ranking.md", f"# Source ranking ({run_dir})\n\n{text}")
    print(f"\n{text}\nWritten: {run_dir}/ranking.md, ranking.csv, ranking.json")
