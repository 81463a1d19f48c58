"""ClassifierModule: backbone + linear head, cross-entropy, torchmetrics, and the stage's fine-tuning methods."""

from typing import cast

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

from transferlab.models import build_backbone
from transferlab.train import regularizers
from transferlab.train import unlabeled as semi
from transferlab.train.callbacks import EMAWeights
from transferlab.train.finetuning import BlockFreezing, model_blocks, resolve_trainable
from transferlab.train.methods import DEFAULTS
from transferlab.train.metrics import EvalMetrics, TrainMetrics, metric_key
from transferlab.train.optim import OPTIMIZERS, build_optimizer, build_scheduler, param_groups

__all__ = ["OPTIMIZERS", "ClassifierModule"]


class ClassifierModule(L.LightningModule):
    """One stage's model. Hyperparameters are plain containers so checkpoints load with weights_only=True.

    The fine-tuning options (`transferlab.train.methods.DEFAULTS`, all off by default): `trainable` blocks (the others
    are frozen: no gradients, eval mode, not in the optimizer; `head` is linear probing) and `unfreeze_every`
    (transferlab.train.finetuning); `backbone_lr_mult`, `layer_decay`, `decay_norm_bias` (param groups,
    transferlab.train.optim); `label_smoothing`; `l2sp` and `bss` (transferlab.train.regularizers); `ema_decay`
    (an EMA of the weights, train.callbacks.EMAWeights: validated, tested and saved as the stage's result);
    `unlabeled` (a loss on unlabeled images, transferlab.train.unlabeled: the batches are then
    {"labeled": (x, y), "unlabeled": {view: x}}).
    """

    def __init__(
        self,
        model: dict,
        num_classes: int,
        optimizer: dict,
        scheduler: dict | None = None,
        trainable=DEFAULTS["trainable"],
        unfreeze_every: int = 0,
        backbone_lr_mult: float = 1.0,
        layer_decay: float = 1.0,
        decay_norm_bias: bool = True,
        label_smoothing: float = 0.0,
        l2sp: dict | None = None,
        bss: dict | None = None,
        ema_decay: float = 0.0,
        unlabeled: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.backbone, features = build_backbone(**model)
        self.head = nn.Linear(features, num_classes)
        self.blocks = model_blocks(self.backbone, self.head, model)
        self.trainable = resolve_trainable(trainable, model)
        for name, block in self.blocks.items():
            if name not in self.trainable:
                for param in block.params:
                    param.requires_grad_(False)
        self.l2sp = {**DEFAULTS["l2sp"], **(l2sp or {})}
        self.bss = {**DEFAULTS["bss"], **(bss or {})}
        self.unlabeled = {**DEFAULTS["unlabeled"], **(unlabeled or {})}
        if self.unlabeled["method"] == "dann":  # not a block: trained at the head's lr, left out of later stages
            self.domain_head = semi.DomainDiscriminator(features)
        self.teacher: semi.FrozenTeacher | None = None  # pseudo_label's: set by the stage
        self.w0: dict[str, torch.Tensor] | None = None  # L2-SP's starting point, taken when training starts
        self.train_metrics = TrainMetrics()  # loss and acc: summed per step, logged once per epoch
        self.train_terms = nn.ModuleDict({name: MeanMetric() for name in self.loss_terms()})  # and the added terms
        self.val_metrics = EvalMetrics(num_classes)  # loss, acc, top-5, F1, AUROC: computed once per epoch
        self.test_metrics = EvalMetrics(num_classes)

    @classmethod
    def from_hparams(cls, hparams: dict) -> "ClassifierModule":
        """The module a checkpoint's hyperparameters describe (`train`, the name before `trainable`, accepted)."""
        hparams = dict(hparams)
        if "train" in hparams:
            hparams["trainable"] = hparams.pop("train")
        return cls(**hparams)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def configure_callbacks(self):
        frozen = len(self.trainable) < len(self.blocks) or self.hparams.unfreeze_every
        callbacks: list = [BlockFreezing(self.blocks, self.trainable, self.hparams.unfreeze_every)] if frozen else []
        if self.hparams.ema_decay:
            callbacks.append(EMAWeights(self.hparams.ema_decay))
        return callbacks

    def on_train_start(self) -> None:
        if self.l2sp["alpha"]:  # a resumed stage has its w0 from the checkpoint already
            w0 = self.w0 or regularizers.starting_point(self.backbone)
            self.w0 = {name: w.to(self.device) for name, w in w0.items()}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["precision"] = str(self.trainer.precision)  # transferlab-eval tests under it: the same numbers
        if self.w0 is not None:
            checkpoint["l2sp_w0"] = self.w0

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "l2sp_w0" in checkpoint:
            self.w0 = checkpoint["l2sp_w0"]

    def training_step(self, batch, batch_idx):
        views = None
        if isinstance(batch, dict):  # labelled + unlabeled images
            batch, views = batch["labeled"], batch["unlabeled"]
        x, y = batch
        features = self.backbone(x)
        logits = self.head(features)
        loss = nn.functional.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        if views is not None:
            term = self.unlabeled["weight"] * self.unlabeled_loss(features, views)
            self.log_step("unlabeled_loss", term, len(y))
            loss = loss + term
        if self.l2sp["alpha"] or self.l2sp["beta"]:
            term = regularizers.l2sp(self.backbone, self.head, self.w0 or {}, **self.l2sp)
            self.log_step("l2sp", term, len(y))
            loss = loss + term
        if self.bss["weight"]:
            term = self.bss["weight"] * regularizers.bss(features, self.bss["k"])
            self.log_step("bss", term, len(y))
            loss = loss + term
        self.train_metrics.update(loss, logits, y)
        return loss

    def unlabeled_loss(self, features: torch.Tensor, views: dict[str, torch.Tensor]) -> torch.Tensor:
        """The stage's loss on a batch of unlabeled images (its views: train.unlabeled.VIEWS)."""
        method, threshold = self.unlabeled["method"], self.unlabeled["threshold"]
        if method in ("fixmatch", "mean_teacher", "pseudo_label"):
            student = self(views["strong" if method != "pseudo_label" else "weak"])
            with torch.no_grad():
                if method == "fixmatch":
                    teacher = self(views["weak"])
                elif method == "mean_teacher":
                    teacher = self.ema_model()(views["weak"])
                else:
                    assert self.teacher is not None, "a pseudo_label stage is given its teacher before fit"
                    teacher = self.teacher(views["plain"])
            if method == "mean_teacher":
                return semi.consistency(teacher, student)
            loss, mask = semi.confident_cross_entropy(teacher, student, threshold)
            self.log_step("unlabeled_kept", mask.mean(), len(student))
            return loss
        target = self.backbone(views["weak"])
        if method == "mcc":
            return semi.mcc(self.head(target), self.unlabeled["temperature"])
        progress = self.global_step / max(1, self.trainer.estimated_stepping_batches)
        loss, accuracy = semi.dann(self.domain_head, features, target, semi.dann_coefficient(progress))
        self.log_step("domain_acc", accuracy, len(features))
        return loss

    def loss_terms(self) -> list[str]:
        """The terms this stage adds to the training loss (and their diagnostics), logged per epoch."""
        method = self.unlabeled["method"]
        return [
            *(["l2sp"] if self.l2sp["alpha"] or self.l2sp["beta"] else []),
            *(["bss"] if self.bss["weight"] else []),
            *(["unlabeled_loss"] if method != "none" else []),
            *(["unlabeled_kept"] if method in semi.USES_THRESHOLD else []),
            *(["domain_acc"] if method == "dann" else []),
        ]

    def log_step(self, name: str, value: torch.Tensor, batch_size: int) -> None:
        """A training term, averaged over the epoch and the ranks by torchmetrics, logged in on_train_epoch_end: in
        the module's hook every rank syncs at the same point (a `self.log(sync_dist=True)` value was reduced where
        rank 0's progress bar first read it, a collective rank 1 never joined: DDP hung at the epoch's end)."""
        cast(MeanMetric, self.train_terms[name]).update(value.detach(), weight=batch_size)

    def ema_model(self) -> nn.Module:
        """The EMA of this module's weights (mean teacher's teacher), kept by the EMAWeights callback."""
        callbacks = getattr(self.trainer, "callbacks")  # noqa: B009 (Trainer.callbacks is set at run time)
        return next(c for c in callbacks if isinstance(c, EMAWeights)).model

    def on_train_epoch_end(self) -> None:
        values = self.train_metrics.compute()
        self.log(metric_key("train", "loss"), values["loss"], prog_bar=True)
        self.log(metric_key("train", "acc"), values["acc"])
        self.train_metrics.reset()
        for name, term in self.train_terms.items():
            mean = cast(MeanMetric, term)
            self.log(metric_key("train", name), mean.compute())
            mean.reset()

    def _eval_step(self, batch, metrics: EvalMetrics) -> None:
        x, y = batch
        metrics.update(self(x), y)  # logged once, at the epoch's end (synced across ranks by torchmetrics)

    def _eval_epoch_end(self, metrics: EvalMetrics, stage: str) -> None:
        self.log_dict({metric_key(stage, k): v for k, v in metrics.compute().items()})
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
        hp = self.hparams
        groups = param_groups(
            self.blocks, hp.optimizer.get("lr", 0), hp.backbone_lr_mult, hp.layer_decay, hp.decay_norm_bias
        )
        if hasattr(self, "domain_head"):  # DANN's discriminator learns at the optimizer's lr
            groups.append({"name": "domain_head", "params": list(self.domain_head.parameters())})
        optimizer = build_optimizer(groups, hp.optimizer)
        scheduler = build_scheduler(optimizer, dict(hp.scheduler or {}), self._trainer)
        return {"optimizer": optimizer, "lr_scheduler": scheduler} if scheduler else optimizer
