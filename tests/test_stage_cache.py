"""The stage cache: a stage whose determining config matches an earlier run is reused, not retrained;
parallel jobs needing the same stage train it once; a given checkpoint replaces a stage."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.cli import run_cli
from helpers.config import REPO, compose_config
from helpers.config import TINY as TINY_NO_CACHE

from transferlab.core.errors import UserError
from transferlab.run.pipeline import run
from transferlab.train.weights import load_checkpoint

TINY = [o for o in TINY_NO_CACHE if o != "cache=false"]


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())["stages"]


def test_changing_only_the_finetune_lr_reuses_source_and_pretrain(tmp_path):
    first = compose_config(tmp_path / "a", [*TINY, "~stages.scratch"])
    run(first)
    second = compose_config(tmp_path / "b", [*TINY, "~stages.scratch", "stages.finetune.optimizer.lr=0.05"])
    run(second)
    stages = manifest(tmp_path / "b")
    assert [stages[s]["cached"] for s in ("source", "pretrain", "finetune")] == [True, True, False]
    assert stages["source"]["cached_from"] == str(
        (tmp_path / "cache" / "stages").resolve() / f"source-{stages['source']['config_hash']}"
    )
    assert not (tmp_path / "b" / "source" / "csv").exists()  # no Trainer ran for source: no training step
    assert stages["source"]["test"] == manifest(tmp_path / "a")["source"]["test"]
    reused = load_checkpoint(tmp_path / "b" / "source" / "checkpoints" / "best.ckpt")["state_dict"]
    original = load_checkpoint(tmp_path / "a" / "source" / "checkpoints" / "best.ckpt")["state_dict"]
    assert all((reused[k] == original[k]).all() for k in original)


def test_cache_false_trains_every_stage(tmp_path):
    run(compose_config(tmp_path / "a", [*TINY, "~stages.scratch", "~stages.finetune"]))
    run(compose_config(tmp_path / "b", [*TINY, "~stages.scratch", "~stages.finetune", "cache=false"]))
    assert [s["cached"] for s in manifest(tmp_path / "b").values()] == [False, False]
    assert (tmp_path / "b" / "source" / "csv").is_dir()


def test_two_parallel_jobs_train_the_shared_source_stage_once(tmp_path):
    script = Path(sys.executable).parent / "transferlab"
    jobs = [
        subprocess.Popen(
            [
                str(script),
                *TINY,
                "~stages.scratch",
                f"stages.finetune.optimizer.lr={lr}",
                f"paths.output_root={tmp_path}",
                f"hydra.run.dir={tmp_path / name}",
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, lr in (("a", 0.01), ("b", 0.02))
    ]
    for job in jobs:
        out, _ = job.communicate(timeout=600)
        assert job.returncode == 0, out[-3000:]
    sources = [manifest(tmp_path / name)["source"] for name in ("a", "b")]
    assert sorted(s["cached"] for s in sources) == [False, True]
    assert sum((tmp_path / name / "source" / "csv").is_dir() for name in ("a", "b")) == 1
    assert sources[0]["test"] == sources[1]["test"]


def test_a_given_source_checkpoint_replaces_the_source_stage(tmp_path):
    run(compose_config(tmp_path / "a", [*TINY, "~stages.scratch", "~stages.finetune", "~stages.pretrain"]))
    given = tmp_path / "a" / "source" / "checkpoints" / "best.ckpt"
    cfg = compose_config(
        tmp_path / "b",
        [
            *TINY,
            "~stages.scratch",
            "~stages.finetune",
            "cache=false",
            f"stages.source.result_ckpt={given}",
            "objective=pretrain/test/acc",
        ],
    )
    run(cfg)
    stages = manifest(tmp_path / "b")
    assert stages["source"]["given_ckpt"] and stages["source"]["best_ckpt"] == str(given.resolve())
    assert not (tmp_path / "b" / "source").exists()
    assert stages["pretrain"]["status"] == "done"


def test_a_given_checkpoint_that_does_not_exist_is_named(tmp_path):
    proc = run_cli(
        "transferlab",
        *TINY,
        f"stages.source.result_ckpt={tmp_path}/nope.ckpt",
        f"hydra.run.dir={tmp_path}/r",
        check=False,
    )
    assert proc.returncode == 2 and f"stages.source.result_ckpt={tmp_path}/nope.ckpt does not exist" in proc.stderr


def test_a_stage_with_its_own_seed_is_trained_once_across_run_seeds(tmp_path):
    """stages.source.seed (+ data.source.seed) fixes the source whatever the run's seed: a seed sweep reuses one
    source from the cache and trains what follows under each run's seed."""
    fixed = ["stages.source.seed=0", "data.source.seed=0", "~stages.scratch", "~stages.finetune"]
    run(compose_config(tmp_path / "a", [*TINY, *fixed, "seed=0"]))
    run(compose_config(tmp_path / "b", [*TINY, *fixed, "seed=1"]))
    a, b = manifest(tmp_path / "a"), manifest(tmp_path / "b")
    assert [b[s]["cached"] for s in ("source", "pretrain")] == [True, False]
    assert b["source"]["config_hash"] == a["source"]["config_hash"]
    assert b["pretrain"]["config"]["seed"] == 1 and b["source"]["config"]["seed"] == 0
    run(compose_config(tmp_path / "c", [*TINY, "~stages.scratch", "~stages.finetune", "seed=1"]))
    assert not manifest(tmp_path / "c")["source"]["cached"]  # without its own seed the source follows the run's


def test_a_given_checkpoint_replaced_by_another_of_the_same_size_is_not_served_from_the_cache(tmp_path):
    """`result_ckpt` entered the stage hash as path + size, `init_ckpt` as the path alone: a file replaced by
    another checkpoint of the same size (another seed's) had the stages trained from the old weights reused."""
    only_source = [*TINY, "~stages.scratch", "~stages.finetune", "~stages.pretrain"]
    run(compose_config(tmp_path / "a", [*only_source, "seed=0"]))
    run(compose_config(tmp_path / "b", [*only_source, "seed=1"]))
    given = tmp_path / "given.ckpt"
    other = tmp_path / "b" / "source" / "checkpoints" / "best.ckpt"
    (given).write_bytes((tmp_path / "a" / "source" / "checkpoints" / "best.ckpt").read_bytes())
    assert given.stat().st_size == other.stat().st_size and given.read_bytes() != other.read_bytes()
    uses = {
        "result_ckpt": [f"stages.source.result_ckpt={given}", "~stages.finetune", "objective=pretrain/test/acc"],
        "init_ckpt": [
            "~stages.source",
            "stages.pretrain.init=null",
            f"stages.pretrain.init_ckpt={given}",
            "~stages.finetune",
            "objective=pretrain/test/acc",
        ],
    }
    for use, overrides in uses.items():
        given.write_bytes((tmp_path / "a" / "source" / "checkpoints" / "best.ckpt").read_bytes())
        run(compose_config(tmp_path / f"{use}-1", [*TINY, "~stages.scratch", *overrides]))
        given.write_bytes(other.read_bytes())  # same path, same size, other weights
        run(compose_config(tmp_path / f"{use}-2", [*TINY, "~stages.scratch", *overrides]))
        first, second = manifest(tmp_path / f"{use}-1"), manifest(tmp_path / f"{use}-2")
        assert not second["pretrain"]["cached"], use  # trained again from the new weights
        assert second["pretrain"]["config_hash"] != first["pretrain"]["config_hash"], use
        run(compose_config(tmp_path / f"{use}-3", [*TINY, "~stages.scratch", *overrides]))
        assert manifest(tmp_path / f"{use}-3")["pretrain"]["cached"], use  # the same file's stage is reused


def test_a_cached_checkpoint_replaced_by_another_is_not_handed_on(tmp_path):
    """A colleague's `cp other.ckpt <cache>/stages/source-<hash>/best.ckpt` (a valid checkpoint, another stage's):
    it was served as the cached stage. The entry keeps the sha256 of what was published and checks it."""
    only_source = [*TINY, "~stages.scratch", "~stages.finetune", "~stages.pretrain"]
    run(compose_config(tmp_path / "a", [*only_source, "seed=0"]))
    run(compose_config(tmp_path / "b", [*only_source, "seed=1"]))
    entries = sorted((tmp_path / "cache" / "stages").glob("source-*/entry.json"))
    assert len(entries) == 2
    entry = entries[0].parent
    other = next(e.parent for e in entries if e.parent != entry) / "best.ckpt"
    cached = entry / "best.ckpt"
    cached.chmod(0o644)
    cached.write_bytes(other.read_bytes())  # a whole, valid checkpoint: only its content says it is another
    trained_in = json.loads((entry / "entry.json").read_text())["trained_in"]
    seed = json.loads((Path(trained_in) / "manifest.json").read_text())["seed"]
    with pytest.raises(UserError, match=f"Stage cache entry {entry}: its best.ckpt is not the checkpoint that was"):
        run(compose_config(tmp_path / "c", [*only_source, f"seed={seed}"]))
    assert not (tmp_path / "c" / "source" / "checkpoints" / "best.ckpt").exists()
