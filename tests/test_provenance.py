"""What a run records of where its numbers come from: seed, config, git commit, library versions, machine and
the data's fingerprint (which follows the files and the settings); a stage reused from the stage cache is a
copy that shares no file with the cache or another run, and carries the provenance of the run that trained it."""

import stat
import subprocess

import pytest
import torch
from helpers.cli import transferlab
from helpers.config import CACHED_SOURCE, REPO
from helpers.datasets import write_cifar10
from helpers.run_folder import cache_entries, manifest

pytestmark = pytest.mark.usefixtures("helpers_on_path")  # runs in other processes: this src, helpers.callbacks


def test_manifest_records_provenance(source_run):
    m = manifest(source_run)
    assert m["seed"] == 0 and m["config"]["stages"]["source"]["optimizer"]["lr"] == 0.01
    prov = m["provenance"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert prov["git"]["commit"] == head and isinstance(prov["git"]["dirty"], bool)
    assert set(prov["versions"]) == {"python", "torch", "lightning", "hydra"}
    assert prov["versions"]["torch"] == torch.__version__
    assert prov["machine"]["cpu"] and prov["machine"]["gpu_count"] == torch.cuda.device_count()
    source = m["stages"]["source"]
    assert source["provenance"] == prov
    assert source["data"]["splits"] == source["splits"] == {"train": 216, "val": 24, "test": 60}
    assert source["data"]["dataset"] == "BuiltinDataModule" and len(source["data"]["hash"]) == 16


def test_dataset_fingerprint_follows_files_and_settings(tmp_path):
    from transferlab.data import BuiltinDataModule, CIFAR10DataModule

    root = write_cifar10(tmp_path)
    first = CIFAR10DataModule(root=str(root), val_fraction=0.2).fingerprint()
    assert first["files"] == 7 and first["splits"] == {"train": 40, "val": 10, "test": 20}
    assert CIFAR10DataModule(root=str(root), val_fraction=0.2).fingerprint() == first
    assert CIFAR10DataModule(root=str(root), val_fraction=0.4).fingerprint()["hash"] != first["hash"]
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(batch.read_bytes() + b"\0")  # another size: another file list hash
    assert CIFAR10DataModule(root=str(root), val_fraction=0.2).fingerprint()["hash"] != first["hash"]
    builtin = lambda **kw: BuiltinDataModule(task="target", train_per_class=10, test_per_class=5, **kw).fingerprint()
    assert builtin() == builtin() and builtin(noise=0.4)["hash"] != builtin()["hash"]


def test_cache_and_runs_share_no_file_and_a_reused_stage_keeps_its_provenance(tmp_path):
    """Items 7 and 8: the cache publishes and fetches by copy (its files read-only), so overwriting a run's
    checkpoint changes neither another run's nor the cache's; a reused stage names the cache entry and the run
    that trained it, and carries that run's provenance."""
    a, b = tmp_path / "a", tmp_path / "b"
    for run_dir in (a, b):
        transferlab(run_dir, *CACHED_SOURCE, check=True)
    [entry] = cache_entries(tmp_path)
    in_a, in_b, cached = a / "source/checkpoints/best.ckpt", b / "source/checkpoints/best.ckpt", entry / "best.ckpt"
    assert len({p.stat().st_ino for p in (in_a, in_b, cached)}) == 3
    assert stat.S_IMODE(cached.stat().st_mode) == 0o444
    before = {p: p.read_bytes() for p in (in_b, cached)}
    other = tmp_path / "other.ckpt"
    other.write_bytes(b"another file")
    subprocess.run(["cp", str(other), str(in_a)], check=True)
    assert in_a.read_bytes() == b"another file" and {p: p.read_bytes() for p in (in_b, cached)} == before

    trained, reused = manifest(a)["stages"]["source"], manifest(b)["stages"]["source"]
    assert not trained["cached"] and trained["trained_in"] is None
    assert reused["cached"] and reused["cached_from"] == str(entry.resolve()) and reused["trained_in"] == str(a)
    assert reused["provenance"] == trained["provenance"] != manifest(b)["provenance"]
    assert f"hydra.run.dir={a}" in reused["provenance"]["command"]
