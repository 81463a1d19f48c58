"""Data modules on files in the real layouts (generated here, and the real copies in ../shared/data)."""

import pickle

import pytest
import torch
from helpers.datasets import SHARED_DATA, needs_shared_data, write_cifar10, write_imagenet

from transferlab.core.errors import UserError
from transferlab.data import BuiltinDataModule, CIFAR10DataModule, ImageNetDataModule
from transferlab.data.inputs import random_crop_flip
from transferlab.data.splits import stratified_split


def batches(loader):
    return [b for b in loader]


# -- builtin ---------------------------------------------------------------------------------------
def test_builtin_is_deterministic_and_shaped():
    a = BuiltinDataModule(task="target", train_per_class=10, test_per_class=5)
    b = BuiltinDataModule(task="target", train_per_class=10, test_per_class=5)
    a.setup(), b.setup()
    for split in ("train", "val", "test"):
        assert torch.equal(a.splits[split][0], b.splits[split][0])
        assert torch.equal(a.splits[split][1], b.splits[split][1])
    images, labels = a.splits["test"]
    assert images.dtype == torch.uint8 and images.shape == (50, 3, 32, 32)
    assert a.num_classes == 10 and set(labels.tolist()) == set(range(10))


def test_builtin_target_classes_are_blends_of_source_classes():
    source = BuiltinDataModule(task="source", source_classes=8)
    target = BuiltinDataModule(task="target", source_classes=8)
    assert source.num_classes == 8 and target.num_classes == 10
    blends = {
        (i, j)
        for i in range(8)
        for j in range(i + 1, 8)
        if torch.allclose((source.prototypes[i] + source.prototypes[j]) / 2, target.prototypes[0])
    }
    assert len(blends) == 1


# -- splits ----------------------------------------------------------------------------------------
def test_stratified_split_is_disjoint_deterministic_and_low_data():
    labels = torch.arange(10).repeat_interleave(50)
    train, val = stratified_split(labels, 0.2, None, None, seed=0)
    assert len(set(train.tolist()) & set(val.tolist())) == 0 and len(train) + len(val) == 500
    assert torch.bincount(labels[val]).tolist() == [10] * 10
    assert torch.equal(train, stratified_split(labels, 0.2, None, None, seed=0)[0])
    assert not torch.equal(train, stratified_split(labels, 0.2, None, None, seed=1)[0])
    few, val2 = stratified_split(labels, 0.2, 7, None, seed=0)
    assert torch.bincount(labels[few]).tolist() == [7] * 10 and torch.equal(val, val2)  # val unchanged
    frac, _ = stratified_split(labels, 0.2, None, 0.25, seed=0)
    assert torch.bincount(labels[frac]).tolist() == [10] * 10


def test_class_subset_renumbers_labels(tmp_path):
    dm = CIFAR10DataModule(root=str(write_cifar10(tmp_path)), classes=[3, 7], val_fraction=0.2, augment=False)
    dm.setup()
    assert dm.num_classes == 2
    for split in ("train", "val", "test"):
        assert set(dm.splits[split][1].tolist()) == {0, 1}


# -- CIFAR-10 --------------------------------------------------------------------------------------
def test_cifar10_memory_and_workers_paths_agree(tmp_path):
    root = str(write_cifar10(tmp_path))
    kwargs = dict(root=root, augment=False, val_fraction=0.2, batch_size=8)
    memory, workers = CIFAR10DataModule(loader="memory", **kwargs), CIFAR10DataModule(loader="workers", **kwargs)
    memory.setup(), workers.setup()
    assert memory.split_sizes() == workers.split_sizes() == {"train": 40, "val": 10, "test": 20}
    for loader in ("val_dataloader", "test_dataloader"):
        mem = [memory.on_after_batch_transfer(b, 0) for b in batches(getattr(memory, loader)())]
        work = batches(getattr(workers, loader)())
        x_mem, y_mem = torch.cat([b[0] for b in mem]), torch.cat([b[1] for b in mem])
        x_work, y_work = torch.cat([b[0] for b in work]), torch.cat([b[1] for b in work])
        assert torch.equal(y_mem, y_work)
        assert torch.allclose(x_mem, x_work, atol=1e-5)


def test_cifar10_reencoded_real_copy_loads(real_cifar10):
    dm = CIFAR10DataModule(root=str(real_cifar10), val_fraction=0.1)
    dm.setup()
    assert dm.split_sizes() == {"train": 45000, "val": 5000, "test": 10000}
    images, labels = dm.splits["test"]
    assert images.shape == (10000, 3, 32, 32) and torch.bincount(labels).tolist() == [1000] * 10


def test_cifar10_root_may_name_the_batches_folder(tmp_path):
    dm = CIFAR10DataModule(root=str(write_cifar10(tmp_path) / "cifar-10-batches-py"), val_fraction=0.2)
    assert dm.split_sizes()["test"] == 20


def test_cifar10_missing_root_names_path_layout_and_download(tmp_path):
    with pytest.raises(UserError) as err:
        CIFAR10DataModule(root=str(tmp_path / "nowhere")).setup()
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message and "data_batch_1" in message and "download=true" in message


def test_cifar10_truncated_batch_is_named(tmp_path):
    root = write_cifar10(tmp_path)
    bad = root / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:1000])
    with pytest.raises(UserError, match="data_batch_3 is truncated or corrupt"):
        CIFAR10DataModule(root=str(root)).setup()


def test_cifar10_labels_out_of_range_are_reported(tmp_path):
    root = write_cifar10(tmp_path)
    path = root / "cifar-10-batches-py" / "test_batch"
    entry = pickle.loads(path.read_bytes())
    entry["labels"][0] = 12
    path.write_bytes(pickle.dumps(entry))
    with pytest.raises(UserError, match=r"out of range 0..9: \[12\]"):
        CIFAR10DataModule(root=str(root)).setup()


# -- ImageNet --------------------------------------------------------------------------------------
def test_imagenet_folder_with_greyscale_images(tmp_path):
    dm = ImageNetDataModule(root=str(write_imagenet(tmp_path)), val_fraction=0.25, batch_size=4)
    dm.setup()
    assert dm.num_classes == 3 and dm.split_sizes() == {"train": 9, "val": 3, "test": 12}
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    grey, _ = dm.splits["test"][0]  # the first test image is the greyscale JPEG
    assert grey.shape == (3, 32, 32)


def test_imagenet_class_subset_by_count_and_wnid(tmp_path):
    root = str(write_imagenet(tmp_path))
    assert ImageNetDataModule(root=root, classes=2).num_classes == 2
    dm = ImageNetDataModule(root=root, classes=["n01484850"], val_fraction=0.25)
    dm.setup()
    assert dm.num_classes == 1 and dm.split_sizes()["test"] == 4


@needs_shared_data
def test_imagenet_real_sample(tmp_path):
    dm = ImageNetDataModule(root=str(SHARED_DATA / "imagenet-sample"), val_fraction=0.0, eval_batch_size=50)
    assert dm.num_classes == 1000
    dm.setup()
    assert dm.split_sizes()["test"] == 1300
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (50, 3, 32, 32) and int(y.max()) < 1000


def test_imagenet_missing_root_and_empty_class(tmp_path):
    with pytest.raises(UserError, match="train/<wnid>/\\*.JPEG"):
        ImageNetDataModule(root=str(tmp_path / "nowhere")).setup()
    root = write_imagenet(tmp_path / "in")
    (root / "train" / "n09999999").mkdir()
    with pytest.raises(UserError, match="needs at least one image"):
        ImageNetDataModule(root=str(root)).setup()


# -- the memory path's loader and on-device augmentation ---------------------------------------------
def test_memory_loader_shards_are_disjoint_and_cover_the_data():
    dm = BuiltinDataModule(task="target", train_per_class=10, val_fraction=0.0, batch_size=7)
    dm.setup()
    from transferlab.data.inputs import InMemoryBatches

    images, labels = dm.splits["train"]
    seen = []
    for rank in range(2):
        shard = InMemoryBatches(images, labels, 7, True, 0, lambda: 3, rank, 2)
        seen.append(torch.cat([y for _, y in shard]))
        assert len(list(shard)) == len(shard)
    assert len(seen[0]) == len(seen[1]) == 50
    order = [InMemoryBatches(images, labels, 7, True, 0, lambda: 3, r, 2)._shard() for r in range(2)]
    assert not set(order[0].tolist()) & set(order[1].tolist())
    assert set(order[0].tolist()) | set(order[1].tolist()) == set(range(100))


def test_random_crop_flip_statistics():
    torch.manual_seed(0)
    x = torch.arange(32, dtype=torch.float32).repeat(2000, 3, 32, 1)  # each row 0..31: column index
    out = random_crop_flip(x, padding=4, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    increasing = out[:, 0, 16, 20] > out[:, 0, 16, 10]  # row 16 is never padding
    assert 0.45 < increasing.float().mean() < 0.55  # about half flipped
    unflipped = out[increasing]
    offsets = unflipped[:, 0, 16, 10] - 10  # horizontal shift of the crop, -4..4
    assert offsets.min() >= -4 and offsets.max() <= 4 and len(offsets.unique()) == 9
    same = random_crop_flip(x[:8], padding=4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(same, random_crop_flip(x[:8], padding=4, generator=torch.Generator().manual_seed(5)))


def test_memory_path_augments_in_training_only_deterministically_per_seed_and_epoch():
    from types import SimpleNamespace

    images = torch.arange(32, dtype=torch.uint8).mul(4).repeat(200, 3, 32, 1)  # pixel value = 4 x column
    batch = (images, torch.zeros(200, dtype=torch.long))

    def first_batch(epoch, training=True, seed=0):  # a fresh data module: the first batch of that epoch
        dm = BuiltinDataModule(task="target", augment=True, seed=seed)
        dm.trainer = SimpleNamespace(training=training, current_epoch=epoch, global_rank=0)
        return dm.on_after_batch_transfer(batch, 0)[0]

    plain = first_batch(0, training=False)
    assert torch.allclose(plain, (images.float() / 255 - 0.5) / 0.5)  # eval: normalised only
    first = first_batch(0)
    assert torch.equal(first, first_batch(0))  # same seed and epoch: same augmentation (a resumed run)
    assert not torch.equal(first, first_batch(1)) and not torch.equal(first, first_batch(0, seed=1))
    row = (first[:, 0, 16] * 0.5 + 0.5) * 255 / 4  # back to column indices (row 16 is never padding)
    flipped = row[:, 20] < row[:, 10]
    assert 0.35 < flipped.float().mean() < 0.65  # about half flipped
    shift = torch.where(flipped, row[:, 10].round() - 21, row[:, 10].round() - 10)  # crop offset -4..4
    assert shift.min() == -4 and shift.max() == 4 and len(shift.unique()) == 9


def test_cifar10_images_of_the_wrong_size_name_the_expected_shape(tmp_path):
    root = write_cifar10(tmp_path)
    path = root / "cifar-10-batches-py" / "data_batch_2"
    entry = pickle.loads(path.read_bytes())
    entry["data"] = entry["data"][:, :1000]  # neither 3 x 32 x 32 nor a multiple of it
    path.write_bytes(pickle.dumps(entry))
    with pytest.raises(UserError, match=r"data_batch_2 holds data of shape \(10, 1000\); expected N x 3072"):
        CIFAR10DataModule(root=str(root)).setup()
