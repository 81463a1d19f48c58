"""The losses a stage adds on the target's unlabeled images (`stages.<name>.unlabeled.method`), each the published
method's formula:

- `fixmatch` (Sohn et al. 2020): the prediction on the weak view, where its confidence reaches `threshold`, is the
  hard label of the strong view (cross-entropy; the others masked out);
- `mean_teacher` (Tarvainen & Valpola 2017): the squared distance between the student's class probabilities on
  the strong view and those of the EMA of its own weights (`ema_decay`) on the weak view;
- `pseudo_label` (Lee 2013, with a fixed teacher): a previous stage's model labels the plain images; the confident
  labels train the weak view (cross-entropy);
- `dann` (Ganin et al. 2016): a domain discriminator on the backbone's features behind a gradient reversal layer,
  whose coefficient grows from 0 to 1 over training (2 / (1 + exp(-10 p)) - 1): the backbone learns features the
  discriminator cannot tell apart between the labelled (source) and unlabeled (target) images;
- `mcc` (Jin et al. 2020, Minimum Class Confusion): the class confusion of the target predictions at temperature
  `temperature`, weighted by their certainty, is minimised; it is class-aware and needs no extra network.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("none", "fixmatch", "mean_teacher", "pseudo_label", "dann", "mcc")
VIEWS = {  # the views of the unlabeled batch each method trains on (data/views.py)
    "fixmatch": ("weak", "strong"),
    "mean_teacher": ("weak", "strong"),
    "pseudo_label": ("plain", "weak"),
    "dann": ("weak",),
    "mcc": ("weak",),
}
USES_THRESHOLD = ("fixmatch", "pseudo_label")
ADAPTATION = ("dann", "mcc")  # domain adaptation: the labelled and unlabeled images share their classes


def confident_cross_entropy(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FixMatch's and pseudo-labelling's loss: cross-entropy of the student on the teacher's hard labels, counted
    only where the teacher's top probability is >= threshold (mean over the whole batch, as in FixMatch). Returns
    the loss and the mask (1 = kept)."""
    confidence, labels = teacher_logits.detach().softmax(1).max(1)
    mask = (confidence >= threshold).float()
    return (F.cross_entropy(student_logits, labels, reduction="none") * mask).mean(), mask


def consistency(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean teacher's consistency: squared distance of the class probabilities, summed over classes."""
    return ((student_logits.softmax(1) - teacher_logits.detach().softmax(1)) ** 2).sum(1).mean()


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coeff: float):
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.coeff * grad, None


def reverse_gradient(x: torch.Tensor, coeff: float) -> torch.Tensor:
    """The identity forward; backward, the gradient times -coeff."""
    return _ReverseGradient.apply(x, coeff)


def dann_coefficient(progress: float) -> float:
    """DANN's schedule of the reversal coefficient over training progress p in [0, 1]: 2 / (1 + exp(-10 p)) - 1."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


class DomainDiscriminator(nn.Sequential):
    """Features -> the logit of 'labelled (source) image'; two hidden layers (Transfer-Learning-Library's shape)."""

    def __init__(self, features: int, hidden: int = 256):
        super().__init__(
            nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )


def dann(
    discriminator: nn.Module, labelled: torch.Tensor, unlabeled: torch.Tensor, coeff: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The domain classification loss through the gradient reversal, and the discriminator's accuracy."""
    features = reverse_gradient(torch.cat([labelled, unlabeled]), coeff)
    logits = discriminator(features).squeeze(1)
    domain = torch.cat([torch.ones(len(labelled)), torch.zeros(len(unlabeled))]).to(logits)
    accuracy = ((logits > 0).float() == domain).float().mean()
    return F.binary_cross_entropy_with_logits(logits, domain), accuracy


def mcc(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Minimum Class Confusion: the off-diagonal mass of the certainty-weighted class confusion matrix, per class
    (the formula of Transfer-Learning-Library's MinimumClassConfusionLoss)."""
    batch, classes = logits.shape
    probs = (logits / temperature).softmax(1)
    entropy = -(probs * probs.clamp_min(1e-5).log()).sum(1).detach()
    weight = 1 + torch.exp(-entropy)
    weight = (batch * weight / weight.sum()).unsqueeze(1)
    confusion = (probs * weight).t() @ probs
    confusion = confusion / confusion.sum(1)
    return (confusion.sum() - confusion.trace()) / classes


class FrozenTeacher:
    """A fixed model that labels the unlabeled images (pseudo_label): never trained, outside the module's state
    dict, and shared, not copied, by the EMA's copy of the module."""

    def __init__(self, model: nn.Module):
        self.model = model.eval().requires_grad_(False)

    def __deepcopy__(self, memo):
        return self

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.to(x.device)(x)
