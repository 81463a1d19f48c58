"""Metrics computed once per epoch: evaluation from the epoch's logits, training from per-step sums.

Per step, an eval loop only keeps the logits and labels (a `cat` state: torchmetrics gathers it across DDP
ranks); `compute` takes the softmax and runs torchmetrics' functional metrics on the whole epoch at once. The
values are those of per-step `MulticlassAccuracy`/`F1Score`/`AUROC` updates on softmax probabilities (the
counts add up exactly, and AUROC stored every probability anyway), at a fraction of the per-step cost: input
checks, four metric updates and per-step logging made validation slower than training."""

import warnings
from collections.abc import Mapping

import torch
from torch.nn import functional as F
from torchmetrics import Metric
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_auroc, multiclass_f1_score
from torchmetrics.utilities import dim_zero_cat

METRICS = ("acc", "acc_top5", "f1", "auroc")  # the test metrics of a results table and a sweep's objective


def metric_key(*parts: str) -> str:
    """How a metric is named wherever it is logged, stored or asked for: `<split>/<metric>` as Lightning logs it,
    `<stage>/<split>/<metric>` and `gain/<metric>` in results.json and `objective=`."""
    return "/".join(parts)


def split_metrics(logged: Mapping, split: str) -> dict[str, float]:
    """{metric: value} of the `<split>/<metric>` values a Trainer logged (e.g. what `Trainer.test` returns)."""
    prefix = metric_key(split, "")
    return {k.removeprefix(prefix): float(v) for k, v in logged.items() if k.startswith(prefix)}


class EvalMetrics(Metric):
    """loss, acc, acc_top5 (top-min(5, classes)), macro f1 and macro AUROC of an epoch."""

    full_state_update = False
    logits: list[torch.Tensor]  # the states (add_state): the epoch's batches
    target: list[torch.Tensor]

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.add_state("logits", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.logits.append(logits.detach())
        self.target.append(target.detach())

    def compute(self) -> dict[str, torch.Tensor]:
        logits, target = dim_zero_cat(self.logits).float(), dim_zero_cat(self.target)
        probs = logits.softmax(dim=-1)
        n = self.num_classes
        return {
            "loss": F.cross_entropy(logits, target),
            "acc": multiclass_accuracy(probs, target, n, average="micro", validate_args=False),
            "acc_top5": multiclass_accuracy(probs, target, n, top_k=min(5, n), average="micro", validate_args=False),
            "f1": multiclass_f1_score(probs, target, n, average="macro", validate_args=False),  # absent classes skipped
            "auroc": macro_auroc(probs, target, n),
        }


def macro_auroc(probs: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The mean one-vs-rest AUROC over the classes the evaluated split holds (with positives and negatives): a
    class absent from it has no AUROC, and torchmetrics' macro mean counted it as 0 (a perfect classifier scored
    0.667 on a 3-class test set that lacked one class). NaN when no class qualifies."""
    counts = torch.bincount(target, minlength=num_classes)
    present = (counts > 0) & (counts < len(target))
    if not present.any():
        return torch.tensor(float("nan"), device=probs.device)
    with warnings.catch_warnings():  # torchmetrics warns, anonymously, of each class without positives
        warnings.simplefilter("ignore", UserWarning)
        per_class = multiclass_auroc(probs, target, num_classes, average=None, validate_args=False)
    return per_class[present].mean()


class TrainMetrics(Metric):
    """The training epoch's mean loss and accuracy, from sums kept per step (three tensor adds: a per-step metric
    forward and two `self.log` calls cost ~5 % of a CPU step of the ConvNet, scripts/bench_overhead.py); summed
    across DDP ranks by torchmetrics and logged once, at the epoch's end."""

    full_state_update = False
    loss_sum: torch.Tensor  # the states (add_state)
    correct: torch.Tensor
    count: torch.Tensor

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("loss_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.loss_sum += loss.detach() * target.numel()
        self.correct += (logits.detach().argmax(dim=-1) == target).sum()
        self.count += target.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        return {"loss": self.loss_sum / self.count, "acc": self.correct / self.count}


# Both metrics' values are already the same on every rank when they are logged: no second reduction needed
warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")
