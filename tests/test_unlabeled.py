"""The target's unlabeled images: which images they are, how they reach a stage (both input paths, beside the
labelled batches), the losses of the methods that use them (each against its formula, so a broken implementation
fails), the EMA of the weights, and the methods in the pipeline: CLI runs, the stage cache, a sweep, bad input,
and a stage killed by a real signal that resumes to the same numbers."""

import math
import signal
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers.cli import assert_user_error, run_cli, start_as_shell_job
from helpers.config import DETERMINISTIC, SIZES, TINY, compose_config
from helpers.datasets import write_folder
from helpers.run_folder import manifest
from PIL import Image

from transferlab.data.builtin import BuiltinDataModule
from transferlab.data.unlabeled import UnlabeledBatches, unlabeled_images
from transferlab.data.views import cutout, rand_augment
from transferlab.run.datasets import Datasets
from transferlab.run.plan import plan_stages
from transferlab.train import unlabeled as semi
from transferlab.train.callbacks import EMAWeights, ema_average
from transferlab.train.module import ClassifierModule

pytestmark = pytest.mark.usefixtures("helpers_on_path")

FEW_LABELS = ["data.target.samples_per_class=4"]  # of the tiny target's 8 training images per class after val
ONLY_FINETUNE = ["~stages.scratch", "objective=finetune/test/acc"]


def builtin_target(**kw) -> BuiltinDataModule:
    """The tiny target of the CLI tests: 10 classes, 10 training images each, 2 held out, 4 labelled, 4 left."""
    settings = dict(train_per_class=10, test_per_class=4, batch_size=8, samples_per_class=4, val_fraction=0.2)
    dm = BuiltinDataModule(task="target", role="target", **settings, **kw)
    dm.setup()
    return dm


# -- which images ----------------------------------------------------------------------------------------------
def test_rest_is_the_training_images_without_their_labels_and_never_val_or_test():
    dm = builtin_target()
    rest, every = unlabeled_images(dm, include_train=False), unlabeled_images(dm, include_train=True)
    train, unused = set(dm.train_idx.tolist()), set(dm.unused_idx.tolist())
    assert len(rest) == len(unused) == 10 * (8 - 4)  # 10 classes x (8 after val - 4 labelled)
    assert not train & unused
    images = dm.train_data.images
    labelled_rows = {images[i].numpy().tobytes() for i in train}
    val_rows = {r.numpy().tobytes() for r in dm.splits["val"][0]}
    rest_rows = {r.numpy().tobytes() for r in rest.images}
    assert not rest_rows & labelled_rows and not rest_rows & val_rows  # none is labelled, none is validated on
    assert len(every) == len(rest) + len(train)  # adapting from the source: the labelled target images too


def test_an_unlabeled_folder_is_read_at_the_labelled_size(tmp_path):
    folder = tmp_path / "unlabeled"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (48, 40), (i * 40, 0, 0)).save(folder / f"{i}.png")
    dm = builtin_target(unlabeled=str(folder))
    images = unlabeled_images(dm, include_train=False)
    assert len(images) == 5 and len(images.files) == 5
    first = images.images[0]
    assert first.dtype == torch.uint8 and tuple(first.shape) == (3, 32, 32)


def test_batches_hold_ratio_times_the_labelled_batch_and_last_the_longer_loader():
    dm = builtin_target()
    dm.unlabeled_batches = UnlabeledBatches(unlabeled_images(dm, False), ratio=2, views=("weak", "strong"))
    batches = list(iter(dm.train_dataloader()))
    labelled_steps, unlabeled_steps = math.ceil(40 / 8), math.ceil(40 / 16)
    assert len(batches) == max(labelled_steps, unlabeled_steps)
    batch = batches[0][0]
    assert batch["labeled"][0].shape[0] == 8 and batch["unlabeled"][0].shape[0] == 16
    views = dm.on_after_batch_transfer(batch, 0)["unlabeled"]
    assert set(views) == {"weak", "strong"} and views["weak"].dtype == torch.float32
    assert not torch.equal(views["weak"], views["strong"])


def test_the_workers_path_serves_the_same_views(tmp_path):
    from transferlab.data.image_folder import ImageFolderDataModule

    root = write_folder(tmp_path / "images", per_class=8)
    dm = ImageFolderDataModule(
        root=str(root), samples_per_class=3, batch_size=4, val_fraction=0.25, role="target", image_size=32
    )
    dm.setup()
    dm.unlabeled_batches = UnlabeledBatches(unlabeled_images(dm, False), ratio=2, views=("plain", "weak"))
    batch = next(iter(dm.train_dataloader()))[0]
    assert batch["unlabeled"].dtype == torch.uint8 and batch["unlabeled"].shape[1:] == (3, 32, 32)
    views = dm.on_after_batch_transfer(batch, 0)["unlabeled"]
    assert views["plain"].shape == views["weak"].shape == (len(dm.unused_idx), 3, 32, 32)  # all of them: < 8


def test_strong_views_change_images_and_stay_in_range():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), generator=gen).float()
    strong = cutout(rand_augment(x, gen), gen)
    assert strong.min() >= 0 and strong.max() <= 255
    changed = (strong - x).abs().flatten(1).amax(1) > 0
    assert changed.all()  # cutout alone changes every image
    grey = (strong == 128).flatten(1).float().mean(1)
    assert grey.min() >= 0.05 and grey.max() >= 0.25  # a half-side square, clipped at the borders, is grey


def test_views_and_order_repeat_for_the_same_stage_seed_and_epoch_only():
    """A resumed stage makes the same views in the same order: they depend on (stage seed, epoch) only; another
    seed draws others, with the data's seed (the labelled side) held fixed."""
    dm = builtin_target()
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)

    def drawn(seed: int):
        batches = UnlabeledBatches(unlabeled_images(dm, False), ratio=2, views=("weak", "strong"), seed=seed)
        order = [b[1].tolist() for b in batches.loader(dm)]
        return order, batches.on_device(dm, (images, None))

    (order_a, va), (order_b, vb), (order_c, vc) = drawn(0), drawn(0), drawn(1)
    assert order_a == order_b and all(torch.equal(va[k], vb[k]) for k in va)
    assert order_a != order_c and not torch.equal(va["strong"], vc["strong"])


# -- the losses, against their formulas --------------------------------------------------------------------------
def test_fixmatch_masks_the_images_below_the_threshold():
    teacher = torch.tensor([[4.0, 0.0, 0.0], [0.2, 0.1, 0.0], [0.0, 0.0, 5.0]])  # confident, unsure, confident
    student = torch.randn(3, 3, requires_grad=True)
    loss, mask = semi.confident_cross_entropy(teacher, student, threshold=0.9)
    assert mask.tolist() == [1.0, 0.0, 1.0]
    expected = (
        torch.nn.functional.cross_entropy(student[0:1], torch.tensor([0]))
        + torch.nn.functional.cross_entropy(student[2:3], torch.tensor([2]))
    ) / 3  # FixMatch: the mean over the whole unlabeled batch
    assert torch.allclose(loss, expected)
    loss.backward()
    assert student.grad[1].abs().sum() == 0  # the unsure image teaches nothing
    assert student.grad[0].abs().sum() > 0
    assert semi.confident_cross_entropy(teacher, student, threshold=1.0)[1].sum() == 0


def test_the_teacher_gets_no_gradient():
    teacher = torch.randn(4, 3, requires_grad=True)
    student = torch.randn(4, 3, requires_grad=True)
    (semi.confident_cross_entropy(teacher, student, 0.0)[0] + semi.consistency(teacher, student)).backward()
    assert teacher.grad is None and student.grad is not None


def test_mean_teacher_consistency_is_the_squared_distance_of_probabilities():
    teacher, student = torch.randn(5, 4), torch.randn(5, 4)
    expected = ((student.softmax(1) - teacher.softmax(1)) ** 2).sum(1).mean()
    assert torch.allclose(semi.consistency(teacher, student), expected)
    assert semi.consistency(teacher, teacher) == 0


def test_gradient_reversal_flips_the_sign_of_the_domain_gradient():
    x = torch.randn(6, 4, requires_grad=True)
    (semi.reverse_gradient(x, 0.3) * torch.arange(4.0)).sum().backward()
    assert torch.allclose(x.grad, -0.3 * torch.arange(4.0).expand(6, 4))
    # in DANN: the discriminator descends the domain loss, the features ascend it
    torch.manual_seed(0)
    disc = semi.DomainDiscriminator(4, hidden=8)
    src, tgt = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    loss, _ = semi.dann(disc, src, tgt, coeff=1.0)
    loss.backward()
    reversed_grad, disc_grad = src.grad.clone(), [p.grad.clone() for p in disc.parameters()]
    src.grad = None
    disc.zero_grad()
    logits = disc(torch.cat([src, tgt])).squeeze(1)
    domain = torch.cat([torch.ones(5), torch.zeros(5)])
    torch.nn.functional.binary_cross_entropy_with_logits(logits, domain).backward()
    assert torch.allclose(reversed_grad, -src.grad)
    assert all(torch.allclose(a, p.grad) for a, p in zip(disc_grad, disc.parameters()))


def test_dann_coefficient_grows_from_zero_to_one():
    assert semi.dann_coefficient(0.0) == 0.0
    assert 0.98 < semi.dann_coefficient(0.5) < semi.dann_coefficient(1.0) < 1.0
    assert math.isclose(semi.dann_coefficient(0.1), 2 / (1 + math.exp(-1)) - 1)


def test_mcc_is_zero_without_confusion_and_its_gradient_removes_confusion():
    confident = torch.eye(4) * 50
    assert semi.mcc(confident, temperature=1.0).abs() < 1e-6
    logits = torch.randn(16, 4, requires_grad=True)
    before = semi.mcc(logits, 2.5)
    assert before > 0
    optimizer = torch.optim.SGD([logits], lr=50.0)
    for _ in range(100):
        optimizer.zero_grad()
        semi.mcc(logits, 2.5).backward()
        optimizer.step()
    assert semi.mcc(logits, 2.5) < before / 10


def test_mcc_equals_its_formula():
    """Jin et al.: certainty weights 1 + exp(-H), rescaled to sum to B; confusion P^T W P, normalised; the
    off-diagonal sum over classes."""
    torch.manual_seed(1)
    logits, t = torch.randn(8, 3), 2.5
    p = torch.softmax(logits / t, 1)
    h = -(p * torch.log(p + 1e-5)).sum(1)
    w = 1 + torch.exp(-h)
    w = 8 * w / w.sum()
    c = (p * w[:, None]).T @ p
    c = c / c.sum(1)
    assert torch.allclose(semi.mcc(logits, t), (c.sum() - c.trace()) / 3, atol=1e-5)


# -- the EMA of the weights ----------------------------------------------------------------------------------------
class RecordWeights(L.Callback):
    def __init__(self):
        self.steps: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(torch.nn.utils.parameters_to_vector(pl_module.parameters()).detach().clone())


def test_the_ema_equals_its_formula_and_is_the_stage_result():
    from helpers.training import fit

    torch.manual_seed(0)
    module = ClassifierModule(
        model={"name": "convnet"}, num_classes=4, optimizer={"name": "sgd", "lr": 0.1}, ema_decay=0.9
    )
    recorder = RecordWeights()
    fit(module, epochs=2, callbacks=[recorder], n=48)
    ema = recorder.steps[0]
    for n, w in enumerate(recorder.steps[1:], start=1):
        rate = min(0.9, (1 + n) / (10 + n))
        ema = rate * ema + (1 - rate) * w
    final = torch.nn.utils.parameters_to_vector(module.parameters()).detach()
    assert torch.allclose(final, ema, atol=1e-6)  # training ends with the EMA in the module
    assert not torch.allclose(final, recorder.steps[-1])
    assert ema_average(0.999)(torch.tensor(1.0), torch.tensor(0.0), 0) == pytest.approx(0.1)  # rate (1 + 0) / (10 + 0)


@pytest.mark.slow
def test_a_stage_with_an_ema_is_tested_on_the_ema_weights(tmp_path):
    """The stage's test metrics are the EMA's: those transferlab-eval gives for the EMA weights of best.ckpt, not
    those of the training weights the checkpoint also holds (for resume)."""
    run_dir = tmp_path / "run"
    run_cli("transferlab", *TINY, *ONLY_FINETUNE, "stages.finetune.ema_decay=0.999", f"hydra.run.dir={run_dir}")
    finetune = manifest(run_dir)["stages"]["finetune"]
    best = run_dir / finetune["best_ckpt"]
    ckpt = torch.load(best, weights_only=True)
    assert any(not torch.equal(ckpt["state_dict"][k], ckpt["current_model_state"][k]) for k in ckpt["state_dict"])
    proc = run_cli("transferlab-eval", f"ckpt={best}", "task=target", *(o for o in TINY if o.startswith("data.")))
    assert f"test/acc: {finetune['test']['acc']:.4f}" in proc.stdout


def test_the_ema_callback_is_added_only_when_asked():
    plain = ClassifierModule(model={"name": "convnet"}, num_classes=3, optimizer={"name": "sgd", "lr": 0.1})
    ema = ClassifierModule(
        model={"name": "convnet"}, num_classes=3, optimizer={"name": "sgd", "lr": 0.1}, ema_decay=0.99
    )
    assert not any(isinstance(c, EMAWeights) for c in plain.configure_callbacks())
    assert any(isinstance(c, EMAWeights) for c in ema.configure_callbacks())


# -- in the pipeline -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "recipe",
    [
        "fixmatch",
        pytest.param("mean_teacher", marks=pytest.mark.slow),
        pytest.param("pseudo_label", marks=pytest.mark.slow),
    ],
)
def test_semi_supervised_recipes_run_through_the_pipeline(tmp_path, recipe):
    run_dir = tmp_path / "run"
    proc = run_cli("transferlab", *TINY, *FEW_LABELS, f"recipe={recipe}", f"hydra.run.dir={run_dir}")
    stages = manifest(run_dir)["stages"]
    finetune = stages["finetune"]
    assert finetune["status"] == "done" and "acc" in finetune["test"]
    assert finetune["data"]["unlabeled"]["images"] == 40  # 10 classes x 4 unused
    assert "unlabeled" not in stages["pretrain"]["data"]
    log = proc.stdout + proc.stderr
    assert f"+ 40 unlabeled ({recipe}, 7 per labelled image)" in log
    metrics = (run_dir / "finetune" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "train/unlabeled_loss" in metrics
    assert ("train/unlabeled_kept" in metrics) == (recipe != "mean_teacher")


@pytest.mark.slow
def test_fixmatch_on_an_image_folder_target_reads_the_unlabeled_files_in_workers(tmp_path):
    """The workers input path end to end: a target of image files, the unlabeled ones decoded by 2 workers."""
    root = write_folder(tmp_path / "images", per_class=12)
    run_dir = tmp_path / "run"
    run_cli(
        "transferlab",
        *(o for o in TINY if not o.startswith("data.target.")),
        "data/target=image_folder",
        f"data.target.root={root}",
        "data.target.samples_per_class=3",
        "data.target.image_size=32",
        "data.num_workers=2",
        "recipe=fixmatch",
        *ONLY_FINETUNE,
        f"hydra.run.dir={run_dir}",
    )
    finetune = manifest(run_dir)["stages"]["finetune"]
    assert finetune["status"] == "done" and finetune["data"]["unlabeled"]["images"] > 0


def test_the_default_recipe_with_fixmatch_runs_as_shipped(tmp_path):
    """recipe=fixmatch with every default a user gets (progress bar, precision=auto, loggers, stage cache)."""
    run_dir = tmp_path / "run"
    proc = run_cli("transferlab", *SIZES, *FEW_LABELS, "recipe=fixmatch", f"hydra.run.dir={run_dir}")
    assert "Transfer gain" in proc.stdout
    assert manifest(run_dir)["stages"]["finetune"]["data"]["unlabeled"]["ratio"] == 7


def test_the_unlabeled_setting_enters_the_hash_of_the_stages_that_use_it(tmp_path):
    def hashes(*overrides):
        cfg = compose_config(tmp_path / "run", [*TINY, *FEW_LABELS, *overrides])
        return {p.name: p.hash for p in plan_stages(cfg, Datasets(cfg).hashes())}

    folder = tmp_path / "u"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "a.png")
    plain, fixmatch = hashes(), hashes("recipe=fixmatch")
    other_folder = hashes("recipe=fixmatch", f"data.target.unlabeled={folder}")
    ratio = hashes("recipe=fixmatch", "stages.finetune.unlabeled.ratio=3")
    assert hashes("recipe=strong")["pretrain"] == fixmatch["pretrain"]  # only finetune changes
    assert len({fixmatch["finetune"], other_folder["finetune"], ratio["finetune"]}) == 3
    assert plain["finetune"] == hashes(f"data.target.unlabeled={folder}")["finetune"]  # unused: no change
    Image.new("RGB", (32, 32), (255, 0, 0)).save(folder / "a.png")
    assert hashes("recipe=fixmatch", f"data.target.unlabeled={folder}")["finetune"] != other_folder["finetune"]


@pytest.mark.slow
def test_a_sweep_over_methods_shares_the_stages_before_them(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli(
        "transferlab",
        "-m",
        *[o for o in TINY if o != "cache=false"],
        *FEW_LABELS,
        *ONLY_FINETUNE,
        "recipe=strong",
        "stages.finetune.unlabeled.method=none,fixmatch",
        f"hydra.sweep.dir={sweep}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    )
    first, second = (manifest(sweep / str(i))["stages"] for i in (0, 1))
    assert second["pretrain"].get("cached_from") and not first["finetune"].get("cached_from")
    assert first["finetune"]["config_hash"] != second["finetune"]["config_hash"]
    assert "unlabeled" in second["finetune"]["data"] and "unlabeled" not in first["finetune"]["data"]


@pytest.mark.slow
def test_a_killed_semi_supervised_stage_resumes_to_the_same_numbers(tmp_path):
    """SIGTERM in FixMatch + EMA's second epoch; the same command resumes from last.ckpt (the EMA weights and the
    unlabeled batches' position with it) and ends where the run that was never stopped ends."""
    overrides = [*DETERMINISTIC, *FEW_LABELS, *ONLY_FINETUNE, "recipe=fixmatch", "stages.finetune.ema_decay=0.9"]
    reference = tmp_path / "reference"
    run_cli("transferlab", *overrides, f"hydra.run.dir={reference}")
    run_dir = tmp_path / "run"
    marker = tmp_path / "marker"
    proc = start_as_shell_job(
        [
            str(Path(sys.executable).parent / "transferlab"),
            *overrides,
            "+callbacks.kill._target_=helpers.callbacks.MarkAndWaitAtStep",
            f"+callbacks.kill.marker={marker}",
            "+callbacks.kill.stage=finetune",
            "+callbacks.kill.step=4",  # an epoch: 3 steps (40 labelled, 16 a batch; 40 unlabeled, 1 batch): epoch 2
            f"hydra.run.dir={run_dir}",
        ]
    )
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert manifest(run_dir)["stages"]["finetune"]["status"] == "interrupted"
    last = torch.load(run_dir / "finetune" / "checkpoints" / "last.ckpt", weights_only=True)
    assert "averaging_state" in last and "current_model_state" in last  # the EMA and the training weights
    resumed = run_cli("transferlab", *overrides, f"hydra.run.dir={run_dir}")
    assert (
        "Stage finetune: resuming from" in resumed.stdout + resumed.stderr + (run_dir / "transferlab.log").read_text()
    )
    got, expected = manifest(run_dir)["stages"]["finetune"], manifest(reference)["stages"]["finetune"]
    assert got["test"] == expected["test"] and got["best_val"] == expected["best_val"]
    a = torch.load(run_dir / got["best_ckpt"], weights_only=True)["state_dict"]
    b = torch.load(reference / expected["best_ckpt"], weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)


# -- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["stages.finetune.unlabeled.ratio=0"], ["stages.finetune.unlabeled.ratio=0", "whole number >= 1"]),
        (["stages.finetune.unlabeled.ratio=-2"], ["stages.finetune.unlabeled.ratio=-2"]),
        (["stages.finetune.unlabeled.threshold=0"], ["stages.finetune.unlabeled.threshold=0", "(0, 1]"]),
        (["stages.finetune.unlabeled.threshold=1.5"], ["threshold=1.5", "(0, 1]"]),
        (["stages.finetune.unlabeled.method=fixmatc"], ["method='fixmatc'", "fixmatch"]),
        (["stages.finetune.unlabeled.method=mean_teacher"], ["ema_decay", "e.g. 0.999"]),
        (["stages.finetune.ema_decay=1.0"], ["ema_decay=1.0", "[0, 1)"]),
        (
            ["stages.finetune.unlabeled.teacher=finetune", "stages.finetune.unlabeled.method=pseudo_label"],
            ["pseudo_label needs a teacher", "source, pretrain"],
        ),
        (["stages.finetune.unlabeled.method=dann"], ["task=source", "fixmatch"]),
        (["stages.finetune.test_task=elsewhere"], ["test_task='elsewhere'", "source, target"]),
    ],
)
def test_bad_unlabeled_options_are_one_message(tmp_path, overrides, fragments):
    proc = run_cli(
        "transferlab", *TINY, *FEW_LABELS, "recipe=fixmatch", *overrides, f"hydra.run.dir={tmp_path / 'r'}", check=False
    )
    assert_user_error(proc, *fragments)
    assert not (tmp_path / "r" / "finetune").exists()


def test_unlabeled_folders_without_images_or_with_classes_are_refused(tmp_path):
    empty, labelled = tmp_path / "empty", tmp_path / "labelled"
    empty.mkdir()
    (labelled / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(labelled / "cat" / "a.png")
    for folder, fragment in [
        (empty, "holds no images"),
        (labelled, "class-like folders (cat)"),
        (tmp_path / "missing", "does not exist"),
    ]:
        proc = run_cli(
            "transferlab",
            *TINY,
            *FEW_LABELS,
            "recipe=fixmatch",
            f"data.target.unlabeled={folder}",
            f"hydra.run.dir={tmp_path / 'r'}",
            check=False,
        )
        assert_user_error(proc, f"data.target.unlabeled={folder}", fragment)


def test_rest_with_every_label_kept_is_refused(tmp_path):
    proc = run_cli("transferlab", *TINY, "recipe=fixmatch", f"hydra.run.dir={tmp_path / 'r'}", check=False)
    assert_user_error(proc, "data.target.unlabeled=rest", "samples_per_class=100", "data.target.unlabeled=<dir>")
    assert not (tmp_path / "r" / "source").exists()  # said before any stage trains


def test_domain_adaptation_between_different_classes_is_refused(tmp_path):
    """The built-in pair's source has other classes than its target: adapting one to the other is refused before
    any stage trains."""
    sizes = [o for o in TINY if not o.startswith("stages.")]  # the dann recipe's stages are source and adapt
    proc = run_cli("transferlab", *sizes, "recipe=dann", f"hydra.run.dir={tmp_path / 'r'}", check=False)
    assert_user_error(proc, "Stage 'source'", "needs the same classes", "6 and 10", "data=cifar10_shifted")
    assert not (tmp_path / "r" / "source").exists()
