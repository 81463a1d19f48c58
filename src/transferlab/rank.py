"""`transferlab-rank data=... candidates=[...]`: which source model to start from, before fine-tuning any.

One forward pass per candidate over the target task's training split gives its features (backbone output) and
its source head's logits; `transferability` turns them into LogME, LEEP, NCE and H-score. Features are cached
per (checkpoint content, data fingerprint), so re-ranking with another candidate list costs only the new ones.
With `results=...` (fine-tuned accuracies of the same candidates), each score's Kendall tau-b and Pearson r
against them say how well it predicts.
"""

import csv
import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from transferlab import provenance, report
from transferlab.cli import CONF_DIR, _report_user_errors
from transferlab.errors import UserError
from transferlab.factories import build
from transferlab.fileio import atomic_write, read_json, write_json_atomic
from transferlab.module import ClassifierModule
from transferlab.transfer import load_checkpoint
from transferlab.transferability import SCORES, all_scores, kendall_tau_b, pearson_r

log = logging.getLogger(__name__)
FEATURES_VERSION = 1  # bump when what a cached .npz holds changes


@dataclass
class Candidate:
    name: str
    given: str
    path: Path | None = None  # None: random init
    digest: str = ""  # sha256 of the checkpoint file
    classes: int | None = None  # head size of a random-init candidate
    model: dict | None = None  # architecture of a random-init candidate
    seed: int = 0
    row: dict = field(default_factory=dict)


def rank(cfg: DictConfig) -> dict:
    """Score every candidate, write ranking.{md,csv,json} into the run folder, print the table."""
    if cfg.sort_by not in SCORES:
        raise UserError(f"sort_by={cfg.sort_by!r}: use one of {', '.join(SCORES)}.")
    if cfg.device not in ("auto", "cpu", "cuda") or (cfg.device == "cuda" and not torch.cuda.is_available()):
        raise UserError(f"device={cfg.device!r}: use auto, cpu, or cuda (where a GPU is visible).")
    if not isinstance(cfg.data.get(cfg.task), DictConfig):
        raise UserError(f"task={cfg.task!r}: the data config has tasks source and target.")
    candidates = resolve_candidates(cfg)
    results = read_results(cfg, candidates) if cfg.results else {}
    datamodule = build(cfg.data[cfg.task], augment=False)  # features of the images as they are
    fingerprint = datamodule.fingerprint()
    heads = [load_candidate(c).hparams.num_classes for c in candidates if c.path]  # bad ones fail here, first
    for c in candidates:
        if c.path is None:  # random init: as many classes as the first checkpoint's head, else the target's
            c.classes = cfg.random_classes or (heads[0] if heads else datamodule.num_classes)
    cache_dir = Path(cfg.paths.cache_dir) / "rank"
    labels = None
    for c in candidates:
        start = time.time()
        features, logits, y = candidate_outputs(cfg, c, datamodule, fingerprint, cache_dir)
        forward_s = time.time() - start
        labels = y if labels is None else labels
        if not np.array_equal(labels, y):
            raise UserError(f"Cached features of {c.name} were computed on other labels: delete {cache_dir}.")
        start = time.time()
        scores = {k: float(f"{v:.10g}") for k, v in all_scores(features, logits, labels).items()}  # round-off
        c.row = {
            "candidate": c.name,
            **scores,
            "feature_dim": features.shape[1],  # ties stay ties for tau-b
            "source_classes": logits.shape[1],
            "forward_s": round(forward_s, 2),
            "scores_s": round(time.time() - start, 2),
            "checkpoint": str(c.path or "random"),
        }
    for c in candidates:
        accs = results.get(c.name, [])
        c.row |= {"finetuned_acc": float(np.mean(accs)) if accs else None, "finetuned_n": len(accs)}
    rows = sorted((c.row for c in candidates), key=lambda r: -r[cfg.sort_by] if np.isfinite(r[cfg.sort_by]) else np.inf)
    out = {
        "task": cfg.task,
        "split": "train",
        "samples": int(len(labels)),
        "data": fingerprint,
        "sort_by": cfg.sort_by,
        "candidates": rows,
        "correlations": correlations(rows) if results else {},
        "provenance": provenance.collect(),
    }
    write_tables(Path(cfg.paths.run_dir), out)
    return out


def resolve_candidates(cfg: DictConfig) -> list[Candidate]:
    """`candidates` as a list (names derived) or a {name: path} mapping; run folders -> their stage's checkpoint."""
    given = _plain(cfg.candidates)
    pairs = list(given.items()) if isinstance(given, dict) else [(None, str(g)) for g in given]
    if not pairs:
        raise UserError(
            "No candidates to rank: pass candidates=[<checkpoint>,<run folder>,...] (and `random` for "
            "a random-init baseline), e.g. candidates=[outputs/runs/<run>,random]."
        )
    out = []
    for name, item in pairs:
        if str(item) == "random":
            out.append(
                Candidate(
                    name or "random", "random", model=OmegaConf.to_container(cfg.model, resolve=True), seed=cfg.seed
                )
            )
            continue
        path = checkpoint_of(Path(str(item)).expanduser(), cfg.stage)
        out.append(Candidate(name or _short_name(path, cfg.stage), str(item), path.resolve(), file_digest(path)))
    names = [c.name for c in out]
    for c in out:  # two checkpoints with the same short name: use what the user typed
        if names.count(c.name) > 1:
            c.name = c.given
    if len({c.name for c in out}) < len(out):
        raise UserError(f"Candidates given twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}.")
    return out


def _plain(node):
    """A config value as plain Python: a list or dict stays one, a single value becomes a one-item list."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return [] if node is None else [node]


def checkpoint_of(path: Path, stage: str) -> Path:
    """A .ckpt file as is; a run folder -> its manifest's `stage` best checkpoint (or <stage>/checkpoints/best.ckpt)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise UserError(f"Candidate {path} does not exist: give a checkpoint file, a run folder, or `random`.")
    entry = (read_json(path / "manifest.json") or {}).get("stages", {}).get(stage, {})
    ckpt = path / entry["best_ckpt"] if entry.get("best_ckpt") else path / stage / "checkpoints" / "best.ckpt"
    if not ckpt.is_file():
        raise UserError(
            f"Run folder {path} has no best checkpoint for stage {stage!r} ({ckpt} is missing): pick "
            f"another stage with stage=<name>, or give the checkpoint file itself."
        )
    return ckpt


def _short_name(path: Path, stage: str) -> str:
    parts = path.parts
    if len(parts) >= 4 and parts[-2] == "checkpoints":  # <run>/<stage>/checkpoints/<file>
        return parts[-4] if parts[-3] == stage and path.name == "best.ckpt" else f"{parts[-4]}/{parts[-3]}/{path.stem}"
    return path.stem


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_candidate(c: Candidate) -> ClassifierModule:
    """The candidate's ClassifierModule: from its checkpoint (weights only), or its model at random init (seeded)."""
    if c.path is None:
        torch.manual_seed(c.seed)
        return ClassifierModule(model=c.model, num_classes=c.classes, optimizer={"name": "sgd", "lr": 0.1})
    checkpoint = load_checkpoint(c.path)
    hparams = checkpoint.get("hyper_parameters")
    if not hparams or "model" not in hparams or "state_dict" not in checkpoint:
        raise UserError(
            f"Candidate {c.name} ({c.path}) is not a transferlab ClassifierModule checkpoint (no model "
            "hyperparameters): give a checkpoint written by transferlab, e.g. <run>/source/checkpoints/"
            "best.ckpt."
        )
    module = ClassifierModule(**hparams)
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise UserError(
            f"Candidate {c.name} ({c.path}): its weights do not fit the architecture its hyperparameters "
            f"name ({hparams['model']}): {first[:300]}. The file is damaged or was edited; use the "
            "checkpoint as transferlab wrote it."
        ) from None
    return module


def candidate_outputs(cfg, c: Candidate, datamodule, fingerprint: dict, cache_dir: Path):
    """(features N x D float32, logits N x C_s float32, labels N) of one candidate: from the cache, or computed."""
    what = {"version": FEATURES_VERSION, "task": cfg.task, "data": fingerprint["hash"], "splits": fingerprint["splits"]}
    what |= (
        {"ckpt": c.digest}
        if c.path
        else {"random": c.model, "seed": c.seed, "classes": c.classes, "torch": torch.__version__}
    )
    key = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = cache_dir / f"{key}.npz"
    if cfg.cache and path.is_file():
        with np.load(path) as cached:
            log.info("Candidate %s: features from the cache (%s)", c.name, path)
            return cached["features"], cached["logits"], cached["labels"]
    module = load_candidate(c)
    features, logits, labels = forward(module, datamodule, cfg, c.name)
    if cfg.cache:
        buffer = io.BytesIO()
        np.savez(buffer, features=features, logits=logits, labels=labels)
        atomic_write(path, buffer.getbuffer())
    return features, logits, labels


@torch.inference_mode()
def forward(module: ClassifierModule, datamodule, cfg: DictConfig, name: str):
    """One pass over the training split, in order, without augmentation (the data module's own normalisation)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    module.eval().to(device)
    datamodule.setup()
    feats, logits, labels = [], [], []
    for batch in datamodule._loader("train", cfg.batch_size, shuffle=False):
        x, y = datamodule.on_after_batch_transfer([t.to(device) for t in batch], 0)
        try:
            h = module.backbone(x)
        except RuntimeError as err:
            raise UserError(
                f"Candidate {name} ({module.hparams.model}) cannot take the {cfg.task} images "
                f"(batch {tuple(x.shape)}): {str(err).splitlines()[0][:200]}. Rank it on data of the "
                "image size it was trained for."
            ) from None
        feats.append(h.flatten(1).float().cpu())
        logits.append(module.head(h).float().cpu())
        labels.append(y.cpu())
    return torch.cat(feats).numpy(), torch.cat(logits).numpy(), torch.cat(labels).numpy()


def read_results(cfg: DictConfig, candidates: list[Candidate]) -> dict[str, list[float]]:
    """Fine-tuned accuracies per candidate name, from a CSV/JSON file or run/sweep folders (see conf/rank.yaml)."""
    given = _plain(cfg.results)
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


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="rank")
@_report_user_errors
def main(cfg: DictConfig) -> dict:
    return rank(cfg)


if __name__ == "__main__":
    main()
