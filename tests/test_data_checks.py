"""Data identity is content (the fingerprint), the data checks done where the data is built, CIFAR-100, image
folders, every dataset as source or target, and the memory path's device-resident split."""

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.config import REPO, compose_config
from helpers.datasets import write_cifar10, write_cifar100, write_folder
from PIL import Image

from transferlab.core.errors import UserError
from transferlab.data import CIFAR10DataModule, CIFAR100DataModule, ImageFolderDataModule, ImageNetDataModule
from transferlab.train.factories import build


def cifar(tmp_path, **kwargs) -> CIFAR10DataModule:
    root = tmp_path / "c10" if (tmp_path / "c10").is_dir() else write_cifar10(tmp_path / "c10")
    kwargs = dict(val_fraction=0.2) | kwargs
    return CIFAR10DataModule(root=str(root), cache_dir=str(tmp_path / "cache"), **kwargs)


# -- the fingerprint: content, cheaply ---------------------------------------------------------------
def test_fingerprint_changes_when_equal_size_files_are_swapped(tmp_path):
    folder = write_cifar10(tmp_path / "c10", n_train=50, n_test=10) / "cifar-10-batches-py"
    a, b = folder / "data_batch_1", folder / "test_batch"  # 10 images each: of equal size, as in the real set
    for path in (a, b):
        path.write_bytes(pickle.dumps(pickle.loads(path.read_bytes()) | {"batch_label": "batch"}))
    before = cifar(tmp_path).fingerprint()
    assert a.stat().st_size == b.stat().st_size
    tmp = folder / "swap"
    a.rename(tmp), b.rename(a), tmp.rename(b)
    after = cifar(tmp_path).fingerprint()
    assert after["hash"] != before["hash"] and after["bytes"] == before["bytes"]


def test_fingerprint_changes_on_an_in_place_edit_with_size_mtime_and_inode_kept(tmp_path):
    path = tmp_path / "c10"
    write_cifar10(path)
    batch = path / "cifar-10-batches-py" / "test_batch"
    os.utime(batch, ns=(1_000_000_000, 1_000_000_000))  # indexed long ago: not a "racy" entry
    before = cifar(tmp_path).fingerprint()["hash"]
    assert cifar(tmp_path).fingerprint()["hash"] == before  # re-run: same hash, from the index
    st = batch.stat()
    with open(batch, "r+b") as f:  # same inode, same size
        f.seek(st.st_size // 2)  # inside the pixel data
        f.write(bytes(20))
    os.utime(batch, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back
    now = batch.stat()
    assert (now.st_size, now.st_mtime_ns, now.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    assert cifar(tmp_path).fingerprint()["hash"] != before  # the ctime changed: re-hashed
    assert cifar(tmp_path).data_hash() == cifar(tmp_path).fingerprint()["hash"]


def test_fingerprint_rerun_reads_only_changed_files(tmp_path, monkeypatch):
    from transferlab.data import fingerprint

    monkeypatch.setattr(fingerprint, "RACY_S", 0.0)  # files changed just now are indexed too
    cifar(tmp_path).fingerprint()
    read = []
    real = fingerprint.file_digest
    monkeypatch.setattr(fingerprint, "file_digest", lambda p: read.append(Path(p).name) or real(p))
    old = 1_000_000_000
    for f in (tmp_path / "c10" / "cifar-10-batches-py").iterdir():
        os.utime(f, ns=(old, old))  # older than the racy window: indexed from now on
    cifar(tmp_path).data_hash()
    assert len(read) == 7  # the utime changed every ctime: all re-hashed once
    read.clear()
    cifar(tmp_path).data_hash()
    assert read == []


# -- checks where the data is built ------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(classes=[3, 3]), r"classes lists \[3\] more than once"),
        (dict(classes=["cat", 3]), "more than once"),
        (dict(classes=[]), r"classes=\[\] selects no class"),
        (dict(classes=[10]), r"\[10\] is not a class of this dataset \(class ids 0..9; class names: airplane"),
        (dict(classes=["kitten"]), "'kitten'.* not a class"),
        (dict(classes=True), "give null"),
        (dict(samples_per_class=0), "samples_per_class must be a whole number >= 1"),
        (dict(samples_per_class=-1), "samples_per_class must be a whole number >= 1"),
        (dict(samples_per_class=1.5), "samples_per_class must be a whole number >= 1"),
        (dict(samples_per_class="abc"), "samples_per_class must be a whole number"),
        (dict(batch_size=True), "batch_size must be a whole number"),
        (dict(label_fraction=0), r"label_fraction must be a number in \(0, 1\]"),
    ],
)
def test_bad_class_and_sample_settings_are_named(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        cifar(tmp_path, **kwargs).setup()


def test_classes_by_name_and_empty_or_missing_splits(tmp_path):
    dm = cifar(tmp_path, classes=["cat", "dog"])
    assert dm.class_ids == [3, 5] and dm.split_sizes()["test"] == 4
    with pytest.raises(UserError, match="the val split is empty.*val_fraction=0.01"):
        cifar(tmp_path, val_fraction=0.01).setup()
    folder = tmp_path / "c10" / "cifar-10-batches-py"
    for name in [f"data_batch_{i}" for i in range(1, 6)]:  # class 9 has test images, but none in train
        entry = pickle.loads((folder / name).read_bytes())
        entry["labels"] = [0 if y == 9 else y for y in entry["labels"]]
        (folder / name).write_bytes(pickle.dumps(entry))
    with pytest.raises(UserError, match=r"classes \['9 \(truck\)'\] have no training images \(2 test images\)"):
        cifar(tmp_path).setup()


def test_out_of_range_cifar_labels_name_the_file(tmp_path):
    folder = write_cifar10(tmp_path / "c10") / "cifar-10-batches-py"
    entry = pickle.loads((folder / "data_batch_4").read_bytes())
    entry["labels"][0] = 10
    (folder / "data_batch_4").write_bytes(pickle.dumps(entry))
    with pytest.raises(UserError, match=r"data_batch_4: labels out of range 0..9: \[10\]"):
        cifar(tmp_path).setup()


def run_as_nobody(code: str) -> subprocess.CompletedProcess:
    """A real process without the right to read what root made unreadable (root reads everything)."""
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    if drop and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot make a folder unreadable to this process")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MPLCONFIGDIR": "/tmp"}
    return subprocess.run([*drop, sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")


@pytest.mark.parametrize("dataset", ["image_folder", "imagenet"])
def test_an_unreadable_folder_is_not_called_empty(tmp_path, dataset):
    base = Path(os.environ.get("TMPDIR", "/tmp")) / f"unreadable-{os.getpid()}-{dataset}"
    try:
        root = write_folder(base, classes=("n01", "n02"), splits=("train", "val"))
        for p in [base, *base.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        (root / "train" / "n02").chmod(0)
        module = "ImageFolderDataModule" if dataset == "image_folder" else "ImageNetDataModule"
        proc = run_as_nobody(
            f"from transferlab.data import {module}\nfrom transferlab.core.errors import UserError\n"
            f"try:\n    {module}(root='{root}').setup()\nexcept UserError as e:\n    print(e)"
        )
        assert f"Cannot read class folder {root / 'train' / 'n02'}: permission denied" in proc.stdout, proc.stderr
        assert "needs at least one image" not in proc.stdout
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)


def test_an_unreadable_cifar_file_is_not_called_corrupt():
    base = Path(os.environ.get("TMPDIR", "/tmp")) / f"unreadable-{os.getpid()}-cifar"
    try:
        folder = write_cifar10(base) / "cifar-10-batches-py"
        for p in [base, folder, *folder.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        (folder / "data_batch_2").chmod(0)
        proc = run_as_nobody(
            "from transferlab.data import CIFAR10DataModule\n"
            "from transferlab.core.errors import UserError\n"
            f"try:\n    CIFAR10DataModule(root='{base}', val_fraction=0.5).setup()\n"
            "except UserError as e:\n    print(e)"
        )
        assert f"Cannot read CIFAR-10 file {folder / 'data_batch_2'}: permission denied" in proc.stdout, proc.stderr
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)


# -- CIFAR-100 and image folders -----------------------------------------------------------------------
def test_cifar100_fine_and_coarse_labels(tmp_path):
    root = str(write_cifar100(tmp_path))
    fine = CIFAR100DataModule(root=root, val_fraction=0.0)
    assert fine.num_classes == 100 and fine.split_sizes() == {"train": 200, "val": 0, "test": 100}
    coarse = CIFAR100DataModule(root=root, label_type="coarse", val_fraction=0.1, classes=["coarse3", "coarse0"])
    coarse.setup()
    assert coarse.class_ids == [3, 0] and coarse.split_sizes() == {"train": 18, "val": 2, "test": 10}
    assert set(coarse.splits["test"][1].tolist()) == {0, 1}
    assert coarse.data_hash() != CIFAR100DataModule(root=root, val_fraction=0.1, classes=[3, 0]).data_hash()
    with pytest.raises(UserError, match="label_type='medium'"):
        CIFAR100DataModule(root=root, label_type="medium")
    with pytest.raises(UserError, match="cifar-100-python/\\{train, test, meta\\}"):
        CIFAR100DataModule(root=str(tmp_path / "none")).setup()


def test_image_folder_with_and_without_val_and_test(tmp_path):
    plain = ImageFolderDataModule(
        root=str(write_folder(tmp_path / "a", per_class=10)), val_fraction=0.2, test_fraction=0.2, batch_size=4
    )
    assert plain.num_classes == 3 and plain.split_sizes() == {"train": 18, "val": 6, "test": 6}
    x, y = next(iter(plain.train_dataloader()))
    assert x.shape == (4, 3, 32, 32)
    other_seed = ImageFolderDataModule(root=plain.root, val_fraction=0.2, test_fraction=0.2, seed=5)
    other_seed.setup()
    assert plain.splits["test"].indices == other_seed.splits["test"].indices  # the test split does not move
    full = write_folder(tmp_path / "b", splits=("train", "val", "test"))
    dm = ImageFolderDataModule(root=str(full), classes=["cat", "ant"])
    assert dm.class_ids == [2, 0] and dm.split_sizes() == {"train": 12, "val": 12, "test": 12}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda r: r.mkdir(), "has no train/ folder"),
        (
            lambda r: (r / "ant").mkdir(parents=True),
            r"holds the folders \['ant'\]: if these are the classes, move them",
        ),
        (lambda r: (r / "train").mkdir(parents=True) or (r / "train" / "x.png").write_bytes(b""), "holds files"),
        (lambda r: write_folder(r) and (r / "train" / "dog").mkdir(), "needs at least one image"),
        (lambda r: write_folder(r, splits=("train", "val")) and (r / "val" / "eel").mkdir(), r"lacks: \['eel'\]"),
    ],
)
def test_image_folder_bad_layouts_are_named(tmp_path, make, message):
    make(tmp_path / "r")
    with pytest.raises(UserError, match=message):
        ImageFolderDataModule(root=str(tmp_path / "r")).setup()


def test_imagenet_val_class_missing_from_train_is_named(tmp_path):
    root = write_folder(tmp_path / "in", classes=("n01", "n02"), splits=("train", "val"))
    (root / "val" / "n03").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val" / "n03" / "x.JPEG")
    with pytest.raises(UserError, match=r"lacks: \['n03'\]"):
        ImageNetDataModule(root=str(root)).setup()


# -- every dataset as source or target; the CIFAR-10 class split -----------------------------------------
@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "imagenet", "imagenet32", "image_folder", "builtin"])
@pytest.mark.parametrize("role", ["source", "target"])
def test_every_dataset_composes_as_source_and_target(tmp_path, dataset, role):
    cfg = compose_config(tmp_path / "run", [f"data/{role}={dataset}"])
    assert cfg.data[role].role == role if dataset != "builtin" else cfg.data[role].task == role
    if dataset in ("cifar10", "cifar100"):
        root = write_cifar10(tmp_path / "d") if dataset == "cifar10" else write_cifar100(tmp_path / "d")
        cfg.data[role].root, cfg.data[role].val_fraction = str(root), 0.5
        dm = build(cfg.data[role])
        assert dm.key == f"data.{role}" and dm.split_sizes()["train"] > 0
    elif dataset != "builtin":
        with pytest.raises(UserError, match=f"data.{role}.root"):  # messages name the key of this role
            build(cfg.data[role]).setup()


def test_cifar10_split_preset(tmp_path):
    root = write_cifar10(tmp_path / "d", n_train=500, n_test=100)
    cfg = compose_config(
        tmp_path / "run", ["data=cifar10_split", f"data.root={root}", "data.target.samples_per_class=5"]
    )
    source, target = build(cfg.data.source), build(cfg.data.target)
    assert source.class_ids == [0, 1, 2, 3, 4] and target.class_ids == [5, 6, 7, 8, 9]
    assert source.split_sizes() == {"train": 225, "val": 25, "test": 50}
    assert target.split_sizes() == {"train": 25, "val": 25, "test": 50}


# -- the memory path on the device -----------------------------------------------------------------
def test_device_resident_gives_identical_batches(tmp_path):
    def batches(**kwargs):
        dm = cifar(tmp_path, batch_size=7, augment=True, **kwargs)
        dm.trainer = SimpleNamespace(
            training=True,
            current_epoch=1,
            global_rank=0,
            world_size=1,
            strategy=SimpleNamespace(root_device=torch.device("cpu")),
        )
        loader = dm.train_dataloader()
        return dm, [dm.on_after_batch_transfer(b, 0) for b in loader]

    plain_dm, plain = batches()
    resident_dm, resident = batches(device_resident=True)
    assert len(plain) == len(resident) == 6
    for (x, y), (xr, yr) in zip(plain, resident):
        assert torch.equal(x, xr) and torch.equal(y, yr)
    assert resident_dm._resident and not plain_dm._resident  # the resident copy was made and used
    assert not resident_dm.pin(torch.device("cpu")) and resident_dm.pin(torch.device("cuda"))
    assert cifar(tmp_path, pin_memory=False).pin(torch.device("cuda")) is False
    with pytest.raises(UserError, match="device_resident=true .* needs loader=memory"):
        cifar(tmp_path, device_resident=True, loader="workers")


def test_device_resident_under_a_real_trainer(tmp_path):
    import lightning as L

    from transferlab.data import BuiltinDataModule
    from transferlab.train.module import ClassifierModule

    dm = BuiltinDataModule(task="target", train_per_class=10, test_per_class=5, batch_size=8, device_resident=True)
    module = ClassifierModule(
        model={"name": "convnet"}, num_classes=dm.num_classes, optimizer={"name": "sgd", "lr": 0.01}
    )
    trainer = L.Trainer(
        fast_dev_run=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    assert ("train", torch.device("cpu")) in dm._resident and ("val", torch.device("cpu")) in dm._resident
