"""One stage's training: the LightningModule, fine-tuning options, freezing, optimizer, regularisers, metrics,
callbacks, checkpoint files and weights, speed settings. Imports core, data and models."""
