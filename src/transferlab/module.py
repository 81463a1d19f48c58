"""ClassifierModule: backbone + linear head, cross-entropy, torchmetrics, optimizer built from config."""

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from transferlab.errors import UserError
from transferlab.metrics import EvalMetrics
from transferlab.models import build_backbone

OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}


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
        self.val_metrics = EvalMetrics(num_classes)  # loss, acc, top-5, F1, AUROC: computed once per epoch
        self.test_metrics = EvalMetrics(num_classes)

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

    def _eval_step(self, batch, metrics: EvalMetrics) -> None:
        x, y = batch
        metrics.update(self(x), y)  # logged once, at the epoch's end (synced across ranks by torchmetrics)

    def _eval_epoch_end(self, metrics: EvalMetrics, stage: str) -> None:
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.compute().items()})
        metrics.reset()

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end(self.val_metrics, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end(self.test_metrics, "test")

    def configure_optimizers(self):
        opt_cfg = dict(self.hparams.optimizer)
        name = opt_cfg.pop("name", "sgd")
        if name not in OPTIMIZERS:
            raise UserError(f"Unknown optimizer.name={name!r}; available: {', '.join(OPTIMIZERS)}.")
        if opt_cfg.get("lr", 0) <= 0:
            raise UserError(f"optimizer.lr must be positive, got {opt_cfg.get('lr')}.")
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
    raise UserError(f"Unknown scheduler.name={name!r}; available: none, cosine, step.")
