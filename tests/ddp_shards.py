"""Run by test_data_formats.py: 2 epochs of DDP (gloo, 2 CPU processes) over generated Imagenet32 files;
each rank writes the training samples it saw, per epoch, to <out>/rank<r>.json.

usage: python ddp_shards.py IMAGENET32_ROOT OUT_DIR
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch

from transferlab.data import DownsampledImageNetDataModule


class Recorder(L.LightningModule):
    """Records the uint8 content of every training image it gets (augmentation off: it is the stored image)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[bytes]] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        dm = self.trainer.datamodule
        mean, std = torch.tensor(dm.mean).view(1, 3, 1, 1), torch.tensor(dm.std).view(1, 3, 1, 1)
        raw = ((x * std + mean) * 255).round().to(torch.uint8)
        self.seen.setdefault(self.current_epoch, []).extend(bytes(r.numpy().tobytes()) for r in raw)
        return (x.mean() * self.w).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_train_end(self):
        images = self.trainer.datamodule.splits["train"][0]  # Rows of the shared memory map
        index = {images.base[int(i)].numpy().tobytes(): int(i) for i in images.idx}
        out = {epoch: [index[b] for b in seen] for epoch, seen in self.seen.items()}
        Path(sys.argv[2], f"rank{self.global_rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    dm = DownsampledImageNetDataModule(
        root=sys.argv[1], cache_dir=str(Path(sys.argv[2]) / "cache"), val_fraction=0.1, batch_size=8, augment=False
    )
    trainer = L.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(Recorder(), datamodule=dm)
