"""Every ImageNet layout (folders, the official devkit layout, downsampled Imagenet32/64), the memory-mapped
cache, bad input, and DDP sharding with real processes: on generated files in the official layouts, and on
the real files of ../shared/data."""

import io
import json
import logging
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.config import REPO
from helpers.datasets import SHARED_DATA, needs_shared_data, write_imagenet, write_imagenet32

from transferlab.core.errors import UserError
from transferlab.data import DownsampledImageNetDataModule, ImageNetDataModule
from transferlab.data.inputs import Rows

WNIDS = ("n01440764", "n01443537", "n01484850")


def downsampled(root: Path, tmp_path: Path, **kwargs) -> DownsampledImageNetDataModule:
    kwargs = dict(val_fraction=0.2, batch_size=8, augment=False) | kwargs
    return DownsampledImageNetDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), **kwargs)


def all_batches(dm, split: str):
    """Every (image, label) of a split as the model gets it (memory path: after the on-device step)."""
    loader = getattr(dm, f"{split}_dataloader")()
    out = [dm.on_after_batch_transfer(b, 0) for b in loader]
    return torch.cat([x for x, _ in out]), torch.cat([y for _, y in out])


# -- downsampled ImageNet (Imagenet32 / Imagenet64) ----------------------------------------------------
@pytest.mark.parametrize("npz", [False, True])
def test_imagenet32_release_layout(tmp_path, npz):
    root = write_imagenet32(tmp_path / "in", n_train=60, n_val=20, npz=npz)
    dm = downsampled(root, tmp_path)
    dm.setup()
    assert dm.num_classes == 1000 and dm.split_sizes() == {"train": 50, "val": 10, "test": 20}
    images, labels = dm.splits["test"]
    with open(root / "Imagenet32_val" / ("val_data.npz" if npz else "val_data"), "rb") as f:
        raw = dict(np.load(f)) if npz else pickle.load(f)
    assert torch.equal(images[torch.arange(20)], torch.from_numpy(raw["data"].reshape(20, 3, 32, 32)))
    assert labels.tolist() == [label - 1 for label in raw["labels"]]  # 1..1000 -> 0..999
    assert isinstance(dm.splits["train"][0], Rows)  # splits index into the shared map, no copy
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.uint8


def test_imagenet64_and_wrong_image_size_names_the_expected_shape(tmp_path):
    root = write_imagenet32(tmp_path / "in", size=64)
    dm = downsampled(root, tmp_path, image_size=64)
    dm.setup()
    assert dm.splits["test"][0].shape == (20, 3, 64, 64)
    with pytest.raises(UserError, match=r"expected N x 3072 uint8 \(3 x 32 x 32.*set image_size=64"):
        downsampled(root, tmp_path / "other").setup()


def test_one_channel_data_is_rejected(tmp_path):
    root = write_imagenet32(tmp_path / "in")
    path = root / "Imagenet32_train" / "train_data_batch_2"
    entry = pickle.loads(path.read_bytes())
    entry["data"] = entry["data"][:, :1024]
    path.write_bytes(pickle.dumps(entry))
    with pytest.raises(UserError, match=r"train_data_batch_2 holds data of shape \(20, 1024\).*N x 3072.*one-channel"):
        downsampled(root, tmp_path).setup()


def test_truncated_batch_file_is_named(tmp_path):
    root = write_imagenet32(tmp_path / "in")
    path = root / "Imagenet32_train" / "train_data_batch_3"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UserError, match="train_data_batch_3 is truncated or corrupt"):
        downsampled(root, tmp_path).setup()
    assert not list((tmp_path / "cache").glob("imagenet32_train*/"))  # nothing half-built left behind


def test_labels_out_of_range_are_reported(tmp_path):
    root = write_imagenet32(tmp_path / "in", npz=True)
    path = root / "Imagenet32_val" / "val_data.npz"
    entry = dict(np.load(path))
    entry["labels"][[0, 3]] = [0, 1001]
    np.savez(path, **entry)
    with pytest.raises(UserError, match=r"val_data.npz has labels out of range 1..1000: \[0, 1001\]"):
        downsampled(root, tmp_path).setup()


def test_missing_files_name_the_layout(tmp_path):
    with pytest.raises(UserError, match="train_data_batch_1..10 and val_data"):
        downsampled(tmp_path, tmp_path).setup()
    with pytest.raises(UserError, match="data/source=imagenet32"):  # the folder module points to the right one
        ImageNetDataModule(root=str(write_imagenet32(tmp_path / "in"))).setup()


def test_imagenet32_class_subsets_and_per_class_cap(tmp_path):
    root = write_imagenet32(tmp_path / "in", n_train=120)
    dm = downsampled(root, tmp_path, classes=3, samples_per_class=5)
    dm.setup()
    assert dm.num_classes == 3 and torch.bincount(dm.splits["train"][1]).tolist() == [5, 5, 5]
    assert set(dm.splits["test"][1].tolist()) == {0, 1, 2}
    (root / "map_clsloc.txt").write_text("n02119789 1 kit_fox\nn02100735 2 English_setter\nn02110185 3 husky\n")
    dm = downsampled(root, tmp_path, classes=["n02110185", "n02119789"])
    dm.setup()
    assert dm.class_ids == [2, 0] and dm.split_sizes()["test"] == 8
    with pytest.raises(UserError, match="n09999999"):
        downsampled(root, tmp_path, classes=["n09999999"])


def test_memory_and_workers_paths_agree_on_imagenet32(tmp_path):
    root = write_imagenet32(tmp_path / "in")
    memory, workers = downsampled(root, tmp_path, loader="memory"), downsampled(root, tmp_path, loader="workers")
    memory.setup(), workers.setup()
    for split in ("val", "test"):
        x_mem, y_mem = all_batches(memory, split)
        x_work, y_work = all_batches(workers, split)
        assert torch.equal(y_mem, y_work) and torch.allclose(x_mem, x_work, atol=1e-5)


def test_cache_is_reused_then_rebuilt_when_the_source_changes(tmp_path, monkeypatch):
    from transferlab.data import imagenet_downsampled

    root = write_imagenet32(tmp_path / "in")
    reads = []
    real_read = imagenet_downsampled.read_batch
    monkeypatch.setattr(imagenet_downsampled, "read_batch", lambda p: reads.append(p.name) or real_read(p))
    downsampled(root, tmp_path).setup()
    assert reads.count("train_data_batch_1") == 2  # checked, then decoded into the cache
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir())
    reads.clear()
    second = downsampled(root, tmp_path)
    second.setup()
    assert reads == [] and sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()) == entries
    path = root / "Imagenet32_train" / "train_data_batch_2"
    entry = pickle.loads(path.read_bytes())
    entry["data"][0] = 7
    path.write_bytes(pickle.dumps(entry))
    third = downsampled(root, tmp_path)
    third.setup()
    assert "train_data_batch_2" in reads
    now = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir())
    assert len(now) == 2 and now != entries and [e for e in entries if "test" in e] == [e for e in now if "test" in e]
    assert (third.splits["train"][0].base[20] == 7).all()  # the changed image, from the rebuilt entry


# -- the official ILSVRC-2012 layout: flat val/ with the devkit ground truth -------------------------------
def write_devkit_layout(root: Path, meta: str = "bin") -> tuple[Path, list[str]]:
    """train/<wnid>/ as in the folder layout, val/ flat (ILSVRC2012_val_*.JPEG), and meta.bin (what torchvision
    writes from the devkit) or the devkit archive itself (meta.mat + validation ground truth)."""
    write_imagenet(root, WNIDS)
    val_files = sorted((root / "val").rglob("*.JPEG"))
    val_wnids = []
    for i, path in enumerate(val_files):
        val_wnids.append(path.parent.name)
        path.rename(root / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
    for wnid in WNIDS:
        (root / "val" / wnid).rmdir()
    names = {w: (f"class {w}",) for w in WNIDS}
    if meta == "bin":
        torch.save((names, val_wnids), root / "meta.bin")
    else:  # the devkit archive, as torchvision's own tests build it
        import scipy.io

        synsets = np.array(
            [(i + 1, w, names[w][0], "", 0) for i, w in enumerate(WNIDS)],
            dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O")],
        )
        mat, truth = io.BytesIO(), "".join(f"{WNIDS.index(w) + 1}\n" for w in val_wnids).encode()
        scipy.io.savemat(mat, {"synsets": synsets})
        with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
            for name, data in (("meta.mat", mat.getvalue()), ("ILSVRC2012_validation_ground_truth.txt", truth)):
                info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/data/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root, val_wnids


@pytest.mark.parametrize("meta", ["bin", "archive"])
def test_imagenet_devkit_layout_matches_the_folder_layout(tmp_path, monkeypatch, meta):
    if meta == "archive":
        pytest.importorskip("scipy")
        from torchvision.datasets import imagenet

        monkeypatch.setattr(imagenet, "_verify_archive", lambda *a: None)  # ours is not the official file's md5
    root, val_wnids = write_devkit_layout(tmp_path / "official", meta)
    before = sorted(str(p) for p in root.rglob("*"))
    dm = ImageNetDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), val_fraction=0.25, batch_size=4)
    assert dm.resolved_layout() == "devkit"
    dm.setup()
    test = dm.splits["test"]
    assert [test.data.targets[i] for i in test.indices] == [WNIDS.index(w) for w in val_wnids]
    assert sorted(str(p) for p in root.rglob("*")) == before  # the user's folder is not written to
    reference = ImageNetDataModule(root=str(write_imagenet(tmp_path / "sorted", WNIDS)), val_fraction=0.25)
    reference.setup()
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 32, 32)
    ours = sorted((int(label), image.sum().item()) for image, label in (test[i] for i in range(len(test))))
    theirs = sorted(
        (int(label), image.sum().item())
        for image, label in (reference.splits["test"][i] for i in range(len(reference.splits["test"])))
    )
    assert [label for label, _ in ours] == [label for label, _ in theirs]
    assert np.allclose([s for _, s in ours], [s for _, s in theirs])
    assert test.data.classes[0] == ("class n01440764",)  # class names from the devkit


def test_imagenet_devkit_layout_without_ground_truth(tmp_path):
    root, _ = write_devkit_layout(tmp_path / "official")
    (root / "meta.bin").unlink()
    with pytest.raises(UserError, match="ILSVRC2012_devkit_t12.tar.gz.*meta.bin"):
        ImageNetDataModule(root=str(root), cache_dir=str(tmp_path / "cache")).setup()


@needs_shared_data
def test_real_imagenet_sample_in_the_devkit_layout(tmp_path):
    """The real photos of ../shared/data (greyscale among them), re-arranged as released: flat val/ + meta.bin."""
    sample = SHARED_DATA / "imagenet-sample"
    root = tmp_path / "ilsvrc"
    (root / "val").mkdir(parents=True)
    (root / "train").symlink_to(sample / "train")
    val = sorted((sample / "val").glob("*/*.JPEG"), key=lambda p: p.name)
    for path in val:
        (root / "val" / path.name).symlink_to(path)
    wnids = [line.split()[0] for line in (sample / "synset_words.txt").read_text().splitlines()]
    torch.save(({w: (w,) for w in wnids}, [p.parent.name for p in val]), root / "meta.bin")
    dm = ImageNetDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), val_fraction=0.0, eval_batch_size=100)
    assert dm.resolved_layout() == "devkit" and dm.wnids == wnids  # sorted folders = the standard class order
    dm.setup()
    test = dm.splits["test"]
    assert len(test) == 1300
    assert [test.data.samples[i][1] for i in test.indices] == [
        wnids.index(p.parent.name) for p in sorted(val, key=lambda p: (p.parent.name, p.name))
    ]
    modes = {}
    for image, _ in (test.data[i] for i in range(0, 1300, 13)):
        modes[image.mode] = modes.get(image.mode, 0) + 1
    assert modes == {"RGB": 100}  # greyscale JPEGs come out as RGB
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (100, 3, 32, 32) and int(y.max()) < 1000


# -- unreadable JPEGs ---------------------------------------------------------------------------------
def corrupt_one(root: Path) -> Path:
    bad = sorted((root / "val" / WNIDS[1]).glob("*.JPEG"))[0]
    bad.write_bytes(bad.read_bytes()[:200])
    return bad


@pytest.mark.parametrize("num_workers", [0, 1])
def test_unreadable_jpeg_is_named(tmp_path, num_workers):
    root = write_imagenet(tmp_path / "in", WNIDS)
    bad = corrupt_one(root)
    dm = ImageNetDataModule(root=str(root), val_fraction=0.25, eval_batch_size=20, num_workers=num_workers)
    with pytest.raises(UserError) as err:
        next(iter(dm.test_dataloader()))
    message = str(err.value)
    assert message.startswith(f"Cannot read image {bad}") and "skip_corrupt=true" in message
    assert "Traceback" not in message  # also when it came from a worker process


def test_unreadable_jpeg_is_skipped_and_counted(tmp_path, caplog):
    root = write_imagenet(tmp_path / "in", WNIDS)
    bad = corrupt_one(root)
    dm = ImageNetDataModule(root=str(root), val_fraction=0.25, eval_batch_size=20, skip_corrupt=True)
    with caplog.at_level(logging.WARNING, logger="transferlab.data.imagenet"):
        x, y = next(iter(dm.test_dataloader()))
    assert len(y) == 11 and x.shape == (11, 3, 32, 32)
    assert f"Skipped unreadable image {bad}" in caplog.text and "1 skipped so far" in caplog.text


# -- DDP: two real processes (gloo) read disjoint shards that cover the data ----------------------------
@pytest.mark.slow  # ~25 s: two real processes start Lightning
def test_two_ddp_ranks_read_disjoint_shards_that_cover_the_dataset(tmp_path):
    root = write_imagenet32(tmp_path / "in", n_train=93, n_val=10)  # 3 batch files of 31
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO / "tests")]))
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "ddp_shards.py"), str(root), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}
    n_train = 83  # 93 less 2 per class (of 5) held out for validation
    for epoch in ("0", "1"):
        a, b = set(seen[0][epoch]), set(seen[1][epoch])
        assert (
            len(seen[0][epoch]) == len(seen[1][epoch]) == 42
        )  # ceil(83 / 2): padded by wrapping, as DistributedSampler
        assert len(a | b) == n_train and len(a & b) == 1  # the one padding sample
    assert seen[0]["0"] != seen[0]["1"]  # reshuffled each epoch
    assert len(list((tmp_path / "cache").glob("imagenet32_train*-*"))) == 1  # the ranks shared one cache entry
