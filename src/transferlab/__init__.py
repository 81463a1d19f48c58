"""transferlab: source -> pretrain -> finetune transfer-learning experiments, with a scratch baseline."""

__version__ = "0.1.0"
