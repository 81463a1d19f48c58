"""The views of an unlabeled batch that the semi-supervised and domain-adaptation methods train on, made batched on
the training device from uint8 images (no per-sample PIL transforms):

- `plain`: the image as it is (what a teacher labels);
- `weak`: random crop (4 px padding) + horizontal flip, the labelled batches' augmentation;
- `strong`: weak, then two RandAugment operations per image at random magnitudes (FixMatch's list without
  equalize: identity, autocontrast, brightness, colour, contrast, sharpness, posterize, solarize, rotate, shear x/y,
  translate x/y), then cutout of a square half the image's side, filled grey.

Every random draw comes from a per-epoch generator of the stage's (`unlabeled.UnlabeledBatches.generator`), so a
resumed stage makes the same views.
"""

import math

import torch
import torch.nn.functional as F

from transferlab.data.inputs import random_crop_flip, to_model_input

VIEWS = ("plain", "weak", "strong")
GREY = 128.0


def make_views(dm, images: torch.Tensor, views: tuple[str, ...], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """{view: normalised float batch} for each of `views`, drawn from `gen`."""
    out = {}
    for view in views:
        x = images.float()
        if view in ("weak", "strong"):
            x = random_crop_flip(x, padding=4, generator=gen)
        if view == "strong":
            x = cutout(rand_augment(x, gen), gen)
        out[view] = to_model_input(dm, x)
    return out


def _uniform(n: int, low: float, high: float, x: torch.Tensor, gen) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, device=x.device, generator=gen)


def _blend(x: torch.Tensor, base: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (base + factor.view(-1, 1, 1, 1) * (x - base)).clamp(0, 255)


def _grey(x: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True).expand_as(x)


def _autocontrast(x, m):
    low, high = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return ((x - low) * 255 / (high - low).clamp(min=1)).clamp(0, 255)


def _brightness(x, m):
    return _blend(x, torch.zeros_like(x), 0.05 + 1.9 * m)


def _colour(x, m):
    return _blend(x, _grey(x), 0.05 + 1.9 * m)


def _contrast(x, m):
    return _blend(x, _grey(x).mean((1, 2, 3), keepdim=True).expand_as(x), 0.05 + 1.9 * m)


def _sharpness(x, m):
    kernel = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], device=x.device) / 13
    smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(3, 1, 3, 3), groups=3)
    return _blend(x, smooth, 0.05 + 1.9 * m)


def _posterize(x, m):
    step = (2.0 ** (8 - (4 + (4 * m).floor()).clamp(max=8))).view(-1, 1, 1, 1)  # keep 4..8 bits
    return (x / step).floor() * step


def _solarize(x, m):
    threshold = (256 * m).view(-1, 1, 1, 1)
    return torch.where(x >= threshold, 255 - x, x)


def _affine(kind: str):
    def op(x, m):
        signed = (2 * m - 1).view(-1)  # -1..1
        theta = torch.zeros(len(x), 2, 3, device=x.device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        if kind == "rotate":
            angle = signed * math.radians(30)
            theta[:, 0, 0], theta[:, 0, 1] = angle.cos(), -angle.sin()
            theta[:, 1, 0], theta[:, 1, 1] = angle.sin(), angle.cos()
        elif kind == "shear_x":
            theta[:, 0, 1] = 0.3 * signed
        elif kind == "shear_y":
            theta[:, 1, 0] = 0.3 * signed
        elif kind == "translate_x":
            theta[:, 0, 2] = 0.6 * signed  # a third of the side (the grid spans -1..1)
        else:
            theta[:, 1, 2] = 0.6 * signed
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x - GREY, grid, align_corners=False) + GREY  # outside the image: grey

    return op


OPS = [
    lambda x, m: x,
    _autocontrast,
    _brightness,
    _colour,
    _contrast,
    _sharpness,
    _posterize,
    _solarize,
    *(_affine(k) for k in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")),
]


def rand_augment(x: torch.Tensor, gen: torch.Generator | None, n_ops: int = 2) -> torch.Tensor:
    """`n_ops` operations per image, each drawn from OPS with a magnitude uniform in [0, 1]; each operation runs
    once, batched, on the images that drew it."""
    x = x.clone()
    for _ in range(n_ops):
        choice = torch.randint(0, len(OPS), (len(x),), device=x.device, generator=gen)
        magnitude = torch.rand(len(x), device=x.device, generator=gen)
        for k, op in enumerate(OPS):
            picked = torch.nonzero(choice == k).flatten()
            if k and len(picked):
                x[picked] = op(x[picked], magnitude[picked])
    return x


def cutout(x: torch.Tensor, gen: torch.Generator | None, fraction: float = 0.5) -> torch.Tensor:
    """A square of side `fraction` x the image's, at a random centre (clipped at the borders), filled grey."""
    b, _, h, w = x.shape
    side = max(1, int(fraction * h))
    cy = torch.randint(0, h, (b, 1, 1), device=x.device, generator=gen)
    cx = torch.randint(0, w, (b, 1, 1), device=x.device, generator=gen)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((rows - cy).abs() <= side // 2) & ((cols - cx).abs() <= side // 2)
    return torch.where(inside.unsqueeze(1), torch.full_like(x, GREY), x)
