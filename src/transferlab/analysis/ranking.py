"""`transferlab-rank data=... candidates=[...]`: which source model to start from, before fine-tuning any.

One forward pass per candidate over the target task's training split gives its features (backbone output) and
its source head's logits; `transferability` turns them into LogME, LEEP, NCE and H-score. Features are cached
per (checkpoint content, data fingerprint, what sets the pixels: image size, normalisation, loader), so re-ranking
with another candidate list costs only the new ones.
With `results=...` (fine-tuned accuracies of the same candidates), each score's Kendall tau-b and Pearson r
against them say how well it predicts.
"""

import io
import json
import logging
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from transferlab.analysis.rank_results import correlations, plain, read_results, write_tables
from transferlab.analysis.transferability import SCORES, all_scores
from transferlab.core import provenance
from transferlab.core.checks import MAX_SEED, choice, config_dict, show, whole_number
from transferlab.core.digests import file_digest, json_digest
from transferlab.core.errors import UserError
from transferlab.core.fileio import atomic_write
from transferlab.models import INPUT_SIZES
from transferlab.run.manifest import READER_ADVICE, Manifest
from transferlab.train.factories import build
from transferlab.train.module import ClassifierModule
from transferlab.train.weights import load_module

log = logging.getLogger(__name__)
FEATURES_VERSION = 2  # bump when what a cached .npz holds, or what its key covers, changes (2: the pixels' settings)


@dataclass
class Candidate:
    name: str
    given: str
    path: Path | None = None  # None: random init
    digest: str = ""  # sha256 of the checkpoint file
    classes: int | None = None  # head size (a checkpoint's: from its hyperparameters)
    model: dict | None = None  # architecture (a checkpoint's: from its hyperparameters)
    seed: int = 0
    row: dict = field(default_factory=dict)


def rank(cfg: DictConfig) -> dict:
    """Score every candidate, write ranking.{md,csv,json} into the run folder, print the table."""
    check_settings(cfg)
    candidates = resolve_candidates(cfg)
    results = read_results(cfg, candidates) if cfg.results else {}
    datamodule = build(cfg.data[cfg.task], augment=False)  # features of the images as they are
    fingerprint = datamodule.fingerprint()
    describe(cfg, candidates, datamodule)
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
        c.row = {
            "candidate": c.name,
            **candidate_scores(c, features, logits, labels),
            "feature_dim": features.shape[1],  # ties stay ties for tau-b
            "source_classes": logits.shape[1],
            "forward_s": round(forward_s, 2),
            "scores_s": round(time.time() - start, 2),
            "checkpoint": str(c.path or "random"),
        }
        accs = results.get(c.name, [])
        c.row |= {"finetuned_acc": float(np.mean(accs)) if accs else None, "finetuned_n": len(accs)}
    assert labels is not None  # resolve_candidates gives at least one candidate
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


def describe(cfg: DictConfig, candidates: list[Candidate], datamodule) -> None:
    """Each candidate's architecture and head size, from its checkpoint (bad ones fail here, before any forward
    pass) or, for random init, as many classes as the first checkpoint's head (else the task's); a backbone that
    cannot take the task's image size is refused."""
    for c in candidates:
        if c.path:
            hparams = load_candidate(c).hparams
            c.model, c.classes = hparams["model"], hparams["num_classes"]
    heads = [c.classes for c in candidates if c.path]
    for c in candidates:
        if c.path is None:
            c.classes = cfg.random_classes or (heads[0] if heads else datamodule.num_classes)
        assert c.model is not None  # the checkpoint's (above) or, for random init, cfg.model (resolve_candidates)
        need = INPUT_SIZES.get(c.model["name"])
        if need is not None and need != datamodule.image_size:
            raise UserError(
                f"Candidate {c.name} ({c.model['name']}) cannot take the {cfg.task} images: it takes {need}x{need}, "
                f"data.{cfg.task}.image_size is {datamodule.image_size}. Rank it on {need}x{need} images "
                f"(data.{cfg.task}.image_size={need}), or leave it out of candidates."
            )


def candidate_scores(c: Candidate, features: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> dict:
    """Every score of one candidate; NaN for all where its features are not finite (NaN features still give a
    finite NCE, every argmax 0, and H-score, 0: neither is a score)."""
    if np.isfinite(features).all() and np.isfinite(logits).all():
        return {k: float(f"{v:.10g}") for k, v in all_scores(features, logits, labels).items()}  # round-off
    log.warning(
        "Candidate %s: its features are not finite (NaN/inf), a diverged checkpoint: every score is NaN.", c.name
    )
    return dict.fromkeys(SCORES, float("nan"))


def check_settings(cfg: DictConfig) -> None:
    """rank.yaml's own values, each refused with one message before anything is read or computed."""
    choice("sort_by", cfg.sort_by, SCORES)
    if cfg.device not in ("auto", "cpu", "cuda") or (cfg.device == "cuda" and not torch.cuda.is_available()):
        raise UserError(f"device={cfg.device!r}: use auto, cpu, or cuda (where a GPU is visible).")
    if not isinstance(cfg.data.get(cfg.task), DictConfig):
        raise UserError(f"task={cfg.task!r}: the data config has tasks source and target.")
    whole_number("batch_size", cfg.batch_size)
    whole_number("seed", cfg.seed, minimum=0, maximum=MAX_SEED)
    whole_number("random_classes", cfg.random_classes, optional=True)
    if not isinstance(cfg.cache, bool):
        raise UserError(f"cache must be true or false, got {show(cfg.cache)}.")
    for key in ("candidate_stage", "results_stage", "results_metric"):
        if not isinstance(cfg[key], str):
            raise UserError(f"{key} must be a name (see conf/rank.yaml), got {show(cfg[key])}.")


def resolve_candidates(cfg: DictConfig) -> list[Candidate]:
    """`candidates` as a list (names derived) or a {name: path} mapping; run folders -> their stage's checkpoint."""
    given = plain(cfg.candidates)
    pairs = [(str(k), v) for k, v in given.items()] if isinstance(given, dict) else [(None, g) for g in given]
    if not all(isinstance(item, str) for _, item in pairs):
        raise UserError(
            f"candidates={json.dumps(given)}: each candidate is a checkpoint file, a run folder or `random`, as a "
            "list (candidates=[<run>,random]) or a mapping {name: path}, not a number, null or a nested list."
        )
    if not pairs:
        raise UserError(
            "No candidates to rank: pass candidates=[<checkpoint>,<run folder>,...] (and `random` for "
            "a random-init baseline), e.g. candidates=[outputs/runs/<run>,random]."
        )
    out = []
    for name, item in pairs:
        if str(item) == "random":
            out.append(Candidate(name or "random", "random", model=config_dict(cfg.model), seed=cfg.seed))
            continue
        path = checkpoint_of(Path(item).expanduser(), cfg.candidate_stage)
        out.append(Candidate(name or _short_name(path, cfg.candidate_stage), item, path.resolve(), file_digest(path)))
    names = [c.name for c in out]
    for c in out:  # two checkpoints with the same short name: use what the user typed
        if names.count(c.name) > 1:
            c.name = c.given
    if len({c.name for c in out}) < len(out):
        raise UserError(f"Candidates given twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}.")
    return out


def checkpoint_of(path: Path, stage: str) -> Path:
    """A .ckpt file as is; a run folder -> its manifest's `stage` best checkpoint (or <stage>/checkpoints/best.ckpt)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise UserError(f"Candidate {path} does not exist: give a checkpoint file, a run folder, or `random`.")
    manifest = Manifest.load(path, READER_ADVICE)
    record = manifest.get(stage)
    ckpt = manifest.checkpoint(stage) if record and record.best_ckpt else path / stage / "checkpoints" / "best.ckpt"
    if not ckpt.is_file():
        raise UserError(
            f"Run folder {path} has no best checkpoint for stage {stage!r} ({ckpt} is missing): pick "
            f"another stage with candidate_stage=<name>, or give the checkpoint file itself."
        )
    return ckpt


def _short_name(path: Path, stage: str) -> str:
    parts = path.parts
    if len(parts) >= 4 and parts[-2] == "checkpoints":  # <run>/<stage>/checkpoints/<file>
        return parts[-4] if parts[-3] == stage and path.name == "best.ckpt" else f"{parts[-4]}/{parts[-3]}/{path.stem}"
    return path.stem


def load_candidate(c: Candidate) -> ClassifierModule:
    """The candidate's ClassifierModule: from its checkpoint (weights only), or its model at random init (seeded)."""
    if c.path is None:
        assert c.model is not None and c.classes is not None  # random init: set by resolve_candidates and describe
        torch.manual_seed(c.seed)
        return ClassifierModule(model=c.model, num_classes=c.classes, optimizer={"name": "sgd", "lr": 0.1})
    try:  # as transferlab-eval loads it (from_hparams: also checkpoints saved before `train` was renamed)
        return load_module(c.path)[0]
    except UserError as err:
        raise UserError(f"Candidate {c.name}: {err}") from None


def candidate_outputs(cfg, c: Candidate, datamodule, fingerprint: dict, cache_dir: Path):
    """(features N x D float32, logits N x C_s float32, labels N) of one candidate: from the cache, or computed."""
    what = {"version": FEATURES_VERSION, "task": cfg.task, "data": fingerprint["hash"], "splits": fingerprint["splits"]}
    what["pixels"] = {  # what else sets the pixels `forward` feeds (no augmentation): the size, the normalisation
        "dataset": type(datamodule).__name__,
        "image_size": datamodule.image_size,
        "mean": list(datamodule.mean),
        "std": list(datamodule.std),
        "loader": datamodule.loader,
    }
    what |= (
        {"ckpt": c.digest}
        if c.path
        else {"random": c.model, "seed": c.seed, "classes": c.classes, "torch": torch.__version__}
    )
    key = json_digest(what, 20)
    path = cache_dir / f"{key}.npz"
    if cfg.cache and path.is_file():
        try:
            with np.load(path) as cached:
                out = cached["features"], cached["logits"], cached["labels"]
            log.info("Candidate %s: features from the cache (%s)", c.name, path)
            return out
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:  # cut short, or not ours
            log.warning("Candidate %s: cached features %s are unreadable (%s): computed again.", c.name, path, err)
    module = load_candidate(c)
    features, logits, labels = forward(module, datamodule, cfg, c.name)
    if cfg.cache:
        buffer = io.BytesIO()
        np.savez(buffer, features=features, logits=logits, labels=labels)
        try:
            atomic_write(path, buffer.getbuffer())
        except OSError as err:  # a full or read-only cache folder costs the reuse, never the ranking
            log.warning(
                "Candidate %s: features not cached (%s): free space in %s, or set cache=false.", c.name, err, cache_dir
            )
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
                f"Candidate {name} ({module.hparams['model']}) cannot take the {cfg.task} images "
                f"(batch {tuple(x.shape)}): {str(err).splitlines()[0][:200]}. Rank it on data of the "
                "image size it was trained for."
            ) from None
        feats.append(h.flatten(1).float().cpu())
        logits.append(module.head(h).float().cpu())
        labels.append(y.cpu())
    return torch.cat(feats).numpy(), torch.cat(logits).numpy(), torch.cat(labels).numpy()
