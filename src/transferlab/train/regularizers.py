"""Regularisers of fine-tuning that keep what the initialising weights knew.

- L2-SP (Li et al. 2018): alpha/2 ||w - w0||^2 over the backbone, toward the weights it started from, plus
  beta/2 ||w_head||^2 (the head has no starting point worth keeping). Transfer-Learning-Library's defaults: 0.01/0.01.
- BSS, batch spectral shrinkage (Chen et al. 2019): weight x the sum of the k smallest squared singular values of
  the batch's feature matrix, which carry the source's features that do not transfer. Defaults k=1, 0.001.
"""

import torch
from torch import nn


def starting_point(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """w0 for L2-SP: a copy of the backbone's weights now (call it before the first optimizer step)."""
    return {name: p.detach().clone() for name, p in backbone.named_parameters()}


def l2sp(backbone: nn.Module, head: nn.Module, w0: dict[str, torch.Tensor], alpha: float, beta: float) -> torch.Tensor:
    """alpha/2 sum ||w - w0||^2 over the backbone's trainable weights + beta/2 sum ||w||^2 over the head's."""
    zero = next(head.parameters()).new_zeros(())
    sp = (
        sum((((p - w0[name]) ** 2).sum() for name, p in backbone.named_parameters() if p.requires_grad), zero)
        if alpha
        else zero
    )
    l2 = sum(((p**2).sum() for p in head.parameters() if p.requires_grad), zero)
    return alpha / 2 * sp + beta / 2 * l2


def bss(features: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Sum of the k smallest squared singular values of `features` (batch x dim), computed in float32."""
    singular = torch.linalg.svdvals(features.float())  # descending
    return (singular[-k:] ** 2).sum()
