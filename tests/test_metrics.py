"""EvalMetrics (the logits of an epoch, metrics computed once) and TrainMetrics (per-step sums, logged once per
epoch) give the values of the per-step torchmetrics updates and `self.log` calls they replaced."""

import lightning as L
import pytest
import torch
from helpers.training import fit
from torch.nn import functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score

from transferlab.train.metrics import EvalMetrics
from transferlab.train.module import ClassifierModule


def per_step_metrics(num_classes: int) -> MetricCollection:
    """The metrics of ClassifierModule before EvalMetrics: updated with softmax probabilities every step."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "acc_top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
            "auroc": MulticlassAUROC(num_classes, average="macro"),
        }
    )


@pytest.mark.parametrize("num_classes,dtype", [(10, torch.float32), (3, torch.float32), (40, torch.bfloat16)])
def test_epoch_metrics_equal_the_per_step_metrics(num_classes, dtype):
    gen = torch.Generator().manual_seed(num_classes)
    old, new = per_step_metrics(num_classes), EvalMetrics(num_classes)
    losses, sizes = [], []
    for size in (64, 64, 64, 17):  # a last, smaller batch as in a real epoch
        target = torch.randint(0, num_classes, (size,), generator=gen)
        logits = (torch.randn(size, num_classes, generator=gen) * 3 + F.one_hot(target, num_classes) * 2).to(dtype)
        old.update(logits.float().softmax(dim=-1), target)
        losses.append(F.cross_entropy(logits.float(), target))
        sizes.append(size)
        new.update(logits, target)
    expected, got = old.compute(), new.compute()
    for name in ("acc", "acc_top5", "f1", "auroc"):
        assert torch.equal(got[name], expected[name]), (name, got[name], expected[name])
    weighted = sum(loss * n for loss, n in zip(losses, sizes)) / sum(sizes)  # Lightning's epoch mean of val/loss
    assert torch.allclose(got["loss"], weighted, rtol=1e-6)
    new.reset()
    assert new.logits == [] and new.target == []


class PerStepLogged(ClassifierModule):
    """ClassifierModule's training step before TrainMetrics: a MulticlassAccuracy forward and two `self.log` calls
    per step, reduced by Lightning at the epoch's end."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_acc = MulticlassAccuracy(self.hparams.num_classes, average="micro", validate_args=False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.head(self.backbone(x))
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits.detach(), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def on_train_epoch_end(self) -> None:
        pass


def test_train_metrics_equal_lightnings_per_step_logging():
    """Same seed, same batches (40 images in batches of 16: a last batch of 8, so the mean must be weighted)."""
    seen = {}
    for cls in (PerStepLogged, ClassifierModule):
        L.seed_everything(0)
        module = cls(model={"name": "convnet"}, num_classes=4, optimizer={"name": "sgd", "lr": 0.05})
        fit(module, epochs=3, n=40)
        seen[cls.__name__] = {k: v for k, v in module.trainer.callback_metrics.items() if k.startswith("train/")}
    old, new = seen["PerStepLogged"], seen["ClassifierModule"]
    assert set(old) == set(new) == {"train/loss", "train/acc"}
    for key in old:
        assert float(new[key]) == pytest.approx(float(old[key]), rel=1e-6, abs=1e-7), key


def test_auroc_averages_the_classes_the_split_holds():
    """A class absent from the evaluated split (present in train) has no AUROC: torchmetrics' macro mean counted it
    as 0, and a perfect classifier reported 0.667 on a 3-class test set without class 2."""
    target = torch.tensor([0, 0, 1, 1, 0, 1])
    logits = torch.nn.functional.one_hot(target, 3).float() * 5
    metrics = EvalMetrics(num_classes=3)
    metrics.update(logits, target)
    values = metrics.compute()
    assert values["auroc"] == 1.0 and values["f1"] == 1.0 and values["acc"] == 1.0
    one_class = EvalMetrics(num_classes=3)
    one_class.update(logits[:2], target[:2])  # only class 0: no class has both positives and negatives
    assert torch.isnan(one_class.compute()["auroc"])
