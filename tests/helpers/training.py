"""A real Lightning Trainer on a few random CIFAR-sized images: the fits of the fine-tuning method and metric tests."""

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


def loader(n: int = 48, batch: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g))
    return DataLoader(data, batch_size=batch)


def fit(module: L.LightningModule, epochs: int = 2, callbacks=(), n: int = 48) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(module, train_dataloaders=loader(n))
    return trainer
