"""The CIFAR-10-C corruptions (transferlab.data.corruptions) and the shifted CIFAR-10 target (data=cifar10_shifted):
each corruption changes images and stays uint8, grows with severity, is the same in another process and differs
with another seed; a run on CIFAR-10 in the real layout tests on the corrupted images; bad options are one message."""

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers.cli import assert_user_error, run_cli
from helpers.config import QUIET, REPO, compose_config
from helpers.datasets import write_cifar10
from helpers.run_folder import snapshot

from transferlab.data import CIFAR10DataModule, ShiftedCIFAR10DataModule
from transferlab.data.corruptions import CORRUPTIONS, corrupt_split
from transferlab.train.factories import build

# Smooth images with edges (random pixels would hide blur and warp): gradients plus a bright square.
YY, XX = np.mgrid[0:32, 0:32]
IMAGES = np.stack(
    [np.stack([(XX * 4 + k * 9) % 256, (YY * 5 + k * 13) % 256, ((XX + YY) * 3 + k * 29) % 256], -1) for k in range(8)]
).astype(np.uint8)
IMAGES[:, 10:20, 12:22] = 230
# CIFAR-10-C's own tables are not monotone for these: saturate desaturates at 1-2 and saturates at 3-5; elastic's
# affine part is largest at severity 1.
NOT_MONOTONE = {"saturate", "elastic_transform"}


def clean(dm: ShiftedCIFAR10DataModule, split: str) -> np.ndarray:
    """The split's images before the corruption (N x 3 x 32 x 32)."""
    return CIFAR10DataModule.load_split(dm, split).images.numpy()


def distance(corrupted: np.ndarray, clean: np.ndarray = IMAGES) -> float:
    return float(np.abs(corrupted.astype(np.int16) - clean).mean())


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_changes_images_stays_uint8_and_grows_with_severity(name):
    out = [CORRUPTIONS[name](IMAGES, s, np.random.default_rng(0)) for s in range(1, 6)]
    assert all(o.dtype == np.uint8 and o.shape == IMAGES.shape for o in out)
    diffs = [distance(o) for o in out]
    assert min(diffs) > 0.2, diffs
    if name not in NOT_MONOTONE:
        assert diffs[4] > diffs[0] and all(b >= a - 0.5 for a, b in zip(diffs, diffs[1:])), diffs
    single = CORRUPTIONS[name](IMAGES[0], 3, np.random.default_rng(0))  # one H x W x 3 image
    assert single.shape == IMAGES[0].shape and single.dtype == np.uint8


SPLIT = "import sys, numpy as np; from transferlab.data.corruptions import corrupt_split; " + (
    "rng = np.random.default_rng(1); x = rng.integers(0, 256, (1200, 32, 32, 3), dtype=np.uint8); "
    "sys.stdout.buffer.write(corrupt_split(x, sys.argv[1], 3, 7, 'test').tobytes())"
)


@pytest.mark.parametrize("name", ["gaussian_noise", "motion_blur", "fog", "zoom_blur", "elastic_transform"])
def test_corrupted_split_is_the_same_in_another_process_and_differs_with_the_seed(name):
    x = np.random.default_rng(1).integers(0, 256, (1200, 32, 32, 3), dtype=np.uint8)  # two chunks
    here = corrupt_split(x, name, 3, 7, "test")
    other = subprocess.run([sys.executable, "-c", SPLIT, name], capture_output=True, check=True, cwd=REPO).stdout
    assert np.array_equal(here, np.frombuffer(other, np.uint8).reshape(x.shape))
    if name != "zoom_blur":  # zoom blur has no randomness
        assert not np.array_equal(here, corrupt_split(x, name, 3, 8, "test"))
        assert not np.array_equal(here, corrupt_split(x, name, 3, 7, "train"))
    # image i depends on i only: the second chunk is the same whatever comes before it in the call
    assert np.array_equal(here[1000:], corrupt_split(x, name, 3, 7, "test")[1000:])


def test_shifted_module_corrupts_train_and_test_and_its_hash_follows_the_options(tmp_path):
    root = str(write_cifar10(tmp_path / "d", n_train=100, n_test=30))
    kwargs = dict(root=root, val_fraction=0.2, augment=False, cache_dir=str(tmp_path / "cache"))
    fog5 = ShiftedCIFAR10DataModule(corruption="fog", severity=5, **kwargs)
    for split in ("train", "test"):
        assert distance(fog5.load_split(split).images.numpy(), clean(fog5, split)) > 5
    clean_test = clean(fog5, "test").transpose(0, 2, 3, 1)
    expected = corrupt_split(clean_test, "fog", 5, 0, "test").transpose(0, 3, 1, 2)
    assert np.array_equal(fog5.load_split("test").images.numpy(), expected)
    assert list((tmp_path / "cache").glob("cifar10c-fog-5-0-test-*"))  # kept in the decoded-data cache
    hashes = {
        ShiftedCIFAR10DataModule(corruption=c, severity=s, corruption_seed=seed, **kwargs).data_hash()
        for c, s, seed in [("fog", 5, 0), ("fog", 4, 0), ("contrast", 5, 0), ("fog", 5, 1)]
    }
    assert len(hashes) == 4 and fog5.describe() == "ShiftedCIFAR10DataModule (fog, severity 5)"


PAIR = ["data=cifar10_shifted", "data.batch_size=16", "data.target.corruption=contrast", "data.target.severity=4"]
SHORT = ["~stages.scratch", "gain=null", *(f"stages.{s}.epochs=1" for s in ("source", "pretrain", "finetune"))]


def test_a_run_on_the_shifted_pair_tests_on_the_corrupted_images(tmp_path):
    root = write_cifar10(tmp_path / "d", n_train=200, n_test=50)
    run_dir = tmp_path / "run"
    args = [*QUIET, *SHORT, *PAIR, f"data.root={root}", "data.target.val_fraction=0.2", f"hydra.run.dir={run_dir}"]
    proc = run_cli("transferlab", *args)
    assert "ShiftedCIFAR10DataModule (contrast, severity 4)" in proc.stdout + proc.stderr
    manifest = json.loads((run_dir / "manifest.json").read_text())
    target = build(compose_config(run_dir, [*PAIR, f"data.root={root}", "data.target.val_fraction=0.2"]).data.target)
    hashes = {manifest["stages"][s]["data"]["hash"] for s in ("pretrain", "finetune")}
    assert hashes == {target.data_hash()}  # the stages were trained and tested on this data
    target.setup()
    expected = corrupt_split(clean(target, "test").transpose(0, 2, 3, 1), "contrast", 4, 0, "test")
    expected = expected.transpose(0, 3, 1, 2)
    assert np.array_equal(target.splits["test"][0].numpy(), expected)


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "data.target.corruption=fgo",
            'data.target.corruption="fgo" is not a CIFAR-10-C corruption (did you mean '
            "fog?); available: gaussian_noise, shot_noise",
        ),  # fmt: skip
        ("data.target.corruption=[fog,contrast]", 'data.target.corruption=["fog", "contrast"] is not a CIFAR-10-C'),
        ("data.target.severity=6", "data.target.severity must be a whole number from 1 to 5, got 6."),
        ("data.target.severity=2.5", "data.target.severity must be a whole number from 1 to 5, got 2.5."),
        ("data.target.severity=abc", 'data.target.severity must be a whole number from 1 to 5, got "abc".'),
    ],
)
def test_bad_corruption_options_are_one_message_and_nothing_written(tmp_path, override, message):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "transferlab", *QUIET, *PAIR, "data.root=/nowhere", override, f"hydra.run.dir={run_dir}", check=False
    )
    assert_user_error(proc, message)
    assert proc.stderr.count("transferlab: error:") == 1
    assert snapshot(run_dir, leave_out=".hydra") == {}  # Hydra's own files and the log only


@pytest.mark.slow
def test_real_cifar10_corrupted_test_set_is_recognisable_but_different(real_cifar10):
    def psnr(a: np.ndarray, b: np.ndarray) -> float:
        mse = ((a.astype(np.float64) - b) ** 2).mean()
        return float(10 * np.log10(255**2 / mse))

    images = clean(ShiftedCIFAR10DataModule(root=str(real_cifar10)), "test")[:2000].transpose(0, 2, 3, 1)
    for name in ("gaussian_noise", "defocus_blur", "fog", "jpeg_compression", "contrast"):
        values = [psnr(corrupt_split(images, name, s, 0, "test"), images) for s in (1, 5)]
        assert 12 < values[1] < values[0] < 45, (name, values)  # changed, more at 5, never beyond recognition
