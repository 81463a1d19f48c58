"""Data from a stranger or a tired user, on real files: pickles that would run code, 16-bit and float images,
symlink loops and links between splits, more labels asked for than there are, a damaged fingerprint index."""

import json
import logging
import os
import pickle
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli import run_cli
from helpers.config import TINY, compose_config
from helpers.datasets import write_cifar10, write_imagenet32
from PIL import Image

from transferlab.core.errors import UserError
from transferlab.data import (
    BuiltinDataModule,
    CIFAR10DataModule,
    CIFAR100DataModule,
    DownsampledImageNetDataModule,
    ImageFolderDataModule,
    ImageNetDataModule,
)
from transferlab.data.files import ImageLoader
from transferlab.data.fingerprint import RACY_S
from transferlab.run.pipeline import run
from transferlab.train.factories import build


# -- pickles that would run code ---------------------------------------------------------------------
class RunsCode:
    """What a crafted pickle holds: unpickling it calls os.system (pickled as `posix.system`)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    """Turn a dataset file into one that still reads as the data but runs `touch marker` when read."""
    path.write_bytes(pickle.dumps(pickle.loads(path.read_bytes()) | {"note": RunsCode(marker)}))


@pytest.mark.parametrize("name", ["batches.meta", "data_batch_3", "train_data_batch_2"])
def test_a_pickle_that_would_run_code_is_refused_before_it_runs(tmp_path, name):
    marker = tmp_path / "ran"
    if name == "train_data_batch_2":
        path = write_imagenet32(tmp_path / "in32") / "Imagenet32_train" / name
        dm = DownsampledImageNetDataModule(root=str(tmp_path / "in32"), cache_dir=str(tmp_path / "cache"))
    else:
        path = write_cifar10(tmp_path / "c10") / "cifar-10-batches-py" / name
        dm = CIFAR10DataModule(root=str(tmp_path / "c10"), val_fraction=0.2)
    plant(path, marker)
    with pytest.raises(UserError) as err:
        dm.setup()
    assert not marker.exists()
    assert f"{path} asks to call or build `posix.system`" in str(err.value)
    assert "nothing from the file was run" in str(err.value) and "replace it with one" in str(err.value)


def test_the_cli_refuses_a_crafted_batches_meta_in_one_line(tmp_path):
    marker = tmp_path / "ran"
    plant(write_cifar10(tmp_path / "c10") / "cifar-10-batches-py" / "batches.meta", marker)
    proc = run_cli(
        "transferlab",
        "data=builtin_cifar10",
        f"data.target.root={tmp_path / 'c10'}",
        "data.target.val_fraction=0.2",  # a run that trains to the end, when the file is read as it was
        *[o for o in TINY if not o.startswith("data.")],
        f"hydra.run.dir={tmp_path / 'run'}",
        "~stages.source",
        "~stages.pretrain",
        "~stages.finetune",
        "stages.scratch.epochs=1",
        "objective=scratch/test/acc",
        check=False,
    )
    assert not marker.exists() and proc.returncode == 2, proc.stderr
    assert "batches.meta asks to call or build `posix.system`" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("protocol", range(6))
def test_dataset_pickles_of_every_protocol_still_load(tmp_path, protocol):
    """The restricted unpickler admits what numpy and Python write: arrays, numpy scalars, bytes (the official
    Python-2 pickles: the real copy, tests/test_data.py::test_cifar10_reencoded_real_copy_loads)."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 100), ("test", 20)):
        fine = np.arange(n) % 100
        entry = {
            "batch_label": b"training batch",
            "fine_labels": [np.int64(f) for f in fine],
            "coarse_labels": fine // 5,
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=protocol))
    meta = {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    dm = CIFAR100DataModule(root=str(tmp_path), val_fraction=0.0, classes=["f3", "f7"])
    assert dm.split_sizes() == {"train": 2, "val": 0, "test": 2}
    images, labels = dm.splits["train"]
    assert labels.tolist() == [0, 1] and torch.equal(images[0].flatten(), torch.from_numpy(entry_data(folder)[3]))


def entry_data(folder: Path) -> np.ndarray:
    return pickle.loads((folder / "train").read_bytes())["data"]


# -- 16-bit and float images ---------------------------------------------------------------------------
def write_16bit(path: Path, values: np.ndarray) -> None:
    """16-bit greyscale as microscopes and scanners write it: PNG and TIFF (Pillow mode I;16), PGM (mode I)."""
    Image.fromarray(values.astype(np.uint16)).save(path)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".pgm", "float.tif"])
def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path, suffix):
    values = np.random.default_rng(0).integers(0, 65536, (24, 20))
    copy_8bit = values >> 8
    path = tmp_path / f"image{suffix}"
    if suffix == "float.tif":  # 0..1 floats
        Image.fromarray((copy_8bit / 255).astype(np.float32)).save(path)
    else:
        write_16bit(path, values)
    loaded = np.asarray(ImageLoader(False, "data.target")(str(path))).astype(int)
    assert loaded.shape == (24, 20, 3)
    assert np.abs(loaded - copy_8bit[..., None]).max() <= 1


def test_a_16_bit_image_folder_gives_the_tensors_of_its_8_bit_copy(tmp_path):
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        for i in range(5):
            image = rng.integers(0, 256, (20, 24), dtype=np.uint8)
            for bits in (8, 16):
                (tmp_path / str(bits) / "train" / c).mkdir(parents=True, exist_ok=True)
                pixels = image if bits == 8 else image.astype(np.uint16) * 257
                Image.fromarray(pixels).save(tmp_path / str(bits) / "train" / c / f"{i}.png")

    def tensors(bits):
        dm = ImageFolderDataModule(root=str(tmp_path / str(bits)), augment=False, val_fraction=0.2, batch_size=4)
        dm.setup()
        return [torch.stack([x for x, _ in dm.splits[s]]) for s in ("train", "val", "test")]

    assert all(torch.equal(x16, x8) for x16, x8 in zip(tensors(16), tensors(8)))


# -- links in image folders ------------------------------------------------------------------------------
def write_folder(root: Path, classes=("ant", "bee"), per_class=5, splits=("train",)) -> Path:
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("dataset", ["image_folder", "imagenet"])
def test_a_symlink_loop_in_a_class_folder_reads_each_image_once(tmp_path, dataset, caplog):
    root = write_folder(tmp_path / "d", splits=("train", "val"))
    elsewhere = write_folder(tmp_path / "elsewhere", classes=("cat",)) / "train" / "cat"
    (root / "train" / "cat").symlink_to(elsewhere)  # a class folder linked in from elsewhere: a legitimate use
    write_folder(tmp_path / "v", classes=("cat",)).joinpath("train", "cat").rename(root / "val" / "cat")
    loop = root / "train" / "ant" / "loop"
    loop.symlink_to(root / "train" / "ant")
    (root / "train" / "bee" / "again.png").symlink_to(root / "train" / "bee" / "0.png")  # the same file twice
    with caplog.at_level(logging.WARNING, logger="transferlab.data.files"):
        if dataset == "imagenet":  # val/ is the test split; val is taken from train
            dm = ImageNetDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), val_fraction=0.2)
        else:  # the other way round
            dm = ImageFolderDataModule(root=str(root), test_fraction=0.2)
        dm.setup()
        assert caplog.text.count(f"{loop} leads to {root / 'train' / 'ant'}, read already") == 1
    samples = dm.load_split("train").samples
    assert len(samples) == 15 and len({os.path.realpath(p) for p, _ in samples}) == 15
    assert torch.bincount(torch.tensor([t for _, t in samples])).tolist() == [5, 5, 5]
    held_out, given = ("val", "test") if dataset == "imagenet" else ("test", "val")
    assert dm.split_sizes() == {"train": 12, held_out: 3, given: 15}


def test_hidden_files_and_folders_in_a_class_folder_are_left_out(tmp_path):
    """Jupyter's .ipynb_checkpoints (copies of the images: the same image in train and test) and macOS's ._*
    files (not images), as hidden class folders are."""
    root = write_folder(tmp_path / "d")
    ant = root / "train" / "ant"
    shutil.copytree(ant, ant / ".ipynb_checkpoints")
    (root / "train" / "bee" / "._0.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    dm = ImageFolderDataModule(root=str(root), val_fraction=0.2, test_fraction=0.2)
    assert len(dm.load_split("train").samples) == 10 and dm.split_sizes() == {"train": 6, "val": 2, "test": 2}
    assert len(list(dm.train_dataloader())) == 1


@pytest.mark.parametrize("link", ["folder", "files"])
def test_validation_images_that_are_training_images_are_refused(tmp_path, link):
    root = write_folder(tmp_path / "d")
    if link == "folder":  # ln -s train val
        (root / "val").symlink_to(root / "train")
    else:  # links made instead of moves
        for c in ("ant", "bee"):
            (root / "val" / c).mkdir(parents=True)
            (root / "val" / c / "x.png").symlink_to(root / "train" / c / "1.png")
    with pytest.raises(UserError, match=r"images of .*/val are training images too \(e\.g\. .*/val/ant/.* is "):
        ImageFolderDataModule(root=str(root)).setup()


# -- more labels asked for than there are ------------------------------------------------------------------
def test_samples_per_class_beyond_what_a_class_has_is_named(tmp_path):
    with pytest.raises(UserError) as err:  # 30 per class, 6 held out for validation
        BuiltinDataModule(task="target", train_per_class=30, val_fraction=0.2, samples_per_class=1000).setup()
    assert "data.target.samples_per_class=1000 is more training images than these 10 classes have" in str(err.value)
    assert "class 0: 24" in str(err.value) and "at most 24, or to null" in str(err.value)
    root = write_cifar10(tmp_path / "c10", n_train=100)  # 10 per class, 2 held out, 8 left
    kwargs = dict(root=str(root), val_fraction=0.2, role="source", classes=["cat", "dog"])
    with pytest.raises(
        UserError, match=r"data.source.samples_per_class=9 is .* class 3 \(cat\): 8, class 5 \(dog\): 8"
    ):
        CIFAR10DataModule(samples_per_class=9, **kwargs).setup()
    assert CIFAR10DataModule(samples_per_class=8, **kwargs).split_sizes()["train"] == 16


def test_samples_per_class_on_the_built_in_data(tmp_path):
    """The README's `transferlab data.target.samples_per_class=100 seed=1`: composes on the built-in data, and is
    refused there for what it is (24 per class); a number that fits is what each target class trains on."""
    cfg = compose_config(tmp_path / "readme", ["data.target.samples_per_class=100", "seed=1"])
    with pytest.raises(UserError, match="at most 24"):
        build(cfg.data.target).setup()
    cfg = compose_config(
        tmp_path / "run",
        [*TINY, "data.target.samples_per_class=5", "~stages.source", "~stages.pretrain", "~stages.finetune"]
        + ["stages.scratch.epochs=1", "objective=scratch/test/acc"],
    )
    run(cfg)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["scratch"]["splits"]["train"] == 5 * 10


# -- a damaged fingerprint index; a packed CIFAR archive ---------------------------------------------------------
def test_a_damaged_fingerprint_index_is_rebuilt(tmp_path, caplog):
    root = write_cifar10(tmp_path / "c10")
    time.sleep(RACY_S + 0.2)  # old enough to be indexed
    cifar = lambda: CIFAR10DataModule(root=str(root), cache_dir=str(tmp_path / "cache"))
    before = cifar().data_hash()
    [index] = (tmp_path / "cache").glob("fingerprint-*.json")
    whole = index.read_bytes()
    assert len(json.loads(whole)["files"]) == 7
    for damaged in (whole[: len(whole) // 2], b"\xff\xfe\x00", b'"an index"'):  # cut short, not text, not an object
        index.write_bytes(damaged)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="transferlab.data.fingerprint"):
            assert cifar().data_hash() == before
        assert caplog.text.count(f"Fingerprint index {index} is damaged") == 1
        assert json.loads(index.read_bytes()) == json.loads(whole)


def test_a_cifar_archive_not_yet_unpacked_is_named(tmp_path):
    write_cifar10(tmp_path / "src")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", "cifar-10-batches-py")
    for root in (tmp_path, tmp_path / "cifar-10-python.tar.gz"):
        with pytest.raises(UserError, match=r"still packed in cifar-10-python.tar.gz: unpack it there \(tar -xzf"):
            CIFAR10DataModule(root=str(root)).setup()
