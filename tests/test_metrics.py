"""EvalMetrics (the logits of an epoch, metrics computed once) gives the values of the per-step torchmetrics
updates it replaced."""

import pytest
import torch
from torch.nn import functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score

from transferlab.metrics import EvalMetrics


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
