"""ClassifierModule: backbone + linear head, cross-entropy, torchmetrics, optimizer built from config."""

import lightning as L
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score

from transferlab.errors import UserError
from transferlab.models import build_backbone

OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
SCHEDULERS = ("none", "cosine", "step")  # see build_scheduler


class ClassifierModule(L.LightningModule):
    """One stage's model. Hyperparameters are plain containers so checkpoints load with weights_only=True.

    `train="head"` freezes the backbone (linear probing, the first half of LP-FT): it gets no gradients,
    stays in eval mode, and the optimizer only sees the head.
    """

    def __init__(self, model: dict, num_classes: int, optimizer: dict, scheduler: dict | None = None,
                 train: str = "all"):
        super().__init__()
        if train not in ("all", "head"):
            raise UserError(f"train={train!r} is not valid: use 'all' (whole model) or 'head' (frozen backbone).")
        self.save_hyperparameters()
        self.backbone, features = build_backbone(**model)
        self.head = nn.Linear(features, num_classes)
        if train == "head":
            self.backbone.requires_grad_(False)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        metrics = MetricCollection({
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "acc_top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
            "auroc": MulticlassAUROC(num_classes, average="macro"),
        })
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def on_train_epoch_start(self) -> None:
        if self.hparams.train == "head":
            self.backbone.eval()  # keep BatchNorm statistics of a frozen backbone fixed

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.train_acc(logits.detach(), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch, metrics: MetricCollection, stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        metrics.update(logits.float().softmax(dim=-1), y)
        self.log_dict(metrics)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_metrics, "test")

    def configure_optimizers(self):
        opt_cfg = dict(self.hparams.optimizer)
        name = opt_cfg.pop("name", "sgd")  # name and lr are checked by transferlab.validation before training
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = OPTIMIZERS[name](params, **opt_cfg)
        max_epochs = self._trainer.max_epochs if self._trainer else 1
        scheduler = build_scheduler(optimizer, dict(self.hparams.scheduler or {}), max_epochs)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def build_scheduler(optimizer, cfg: dict, max_epochs: int):
    """none | cosine (to zero over the stage's epochs) | step (step_size, gamma); stepped once per epoch."""
    name = cfg.pop("name", "none")
    if name == "none":
        return None
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, max_epochs), **cfg)
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, **cfg)
    raise UserError(f"Unknown scheduler.name={name!r}; available: {', '.join(SCHEDULERS)}.")
