"""Which blocks of the model train in a stage, and from which epoch: freezing and gradual unfreezing.

A model is a list of named blocks, input to output (`models.BLOCKS`, then `head`). `trainable` names the blocks
that train: `all`, `head` (linear probing) or a list (surgical fine-tuning, Lee et al. 2022). The other blocks get
no gradients, stay in eval mode (BatchNorm statistics fixed) and are not in the optimizer. With
`unfreeze_every: N` only the top trainable block trains at first, and one more is unfrozen every N epochs, from
the head down (gradual unfreezing, as Lightning's `BaseFinetuning`; docs/architecture.md says why not it).
"""

import logging

import lightning as L
from torch import nn

from transferlab.core.errors import UserError
from transferlab.models import BLOCKS

log = logging.getLogger(__name__)


def block_names(model_name: str) -> list[str]:
    """The blocks of `model.name`, input to output, the head last."""
    return [*BLOCKS[model_name], "head"]


def model_blocks(backbone: nn.Module, head: nn.Module, model_name: str) -> dict[str, list[nn.Module]]:
    """Block name -> the modules that make it up; every parameter of the model lies in exactly one block."""
    blocks = {name: [backbone.get_submodule(sub) for sub in subs] for name, subs in BLOCKS[model_name].items()}
    blocks["head"] = [head]
    covered = [id(p) for modules in blocks.values() for m in modules for p in m.parameters()]
    every = {id(p) for p in [*backbone.parameters(), *head.parameters()]}
    if len(covered) != len(set(covered)) or set(covered) != every:
        raise RuntimeError(f"models.BLOCKS[{model_name!r}] does not split the model's parameters into disjoint blocks")
    return blocks


def resolve_trainable(trainable, model_name: str, key: str = "trainable") -> list[str]:
    """`all` | `head` | a block name | a list of block names -> the trainable blocks, input to output."""
    names = block_names(model_name)
    if trainable == "all":
        return names
    wanted = [trainable] if isinstance(trainable, str) else list(trainable or [])
    unknown = [w for w in wanted if w not in names]
    if unknown or not wanted:
        problem = f"names no block of {model_name} ({', '.join(map(str, unknown))})" if unknown else "trains nothing"
        raise UserError(
            f"{key}={trainable!r} {problem}: use all, head, or a list of the blocks "
            f"[{', '.join(names)}] (e.g. {key}=[{names[-2]},head])."
        )
    return [n for n in names if n in wanted]


class BlockFreezing(L.Callback):
    """Keeps the blocks that do not train (yet) unchanged: eval mode each epoch, and no gradient reaches the
    optimizer step. Blocks that never train also have `requires_grad=False` (set by the module); blocks waiting to
    be unfrozen keep it True, so that DDP, which registers the parameters that need gradients once when it wraps
    the model, all-reduces them once they train."""

    def __init__(self, blocks: dict[str, list[nn.Module]], trainable: list[str], unfreeze_every: int = 0):
        self.blocks, self.trainable, self.unfreeze_every = blocks, trainable, unfreeze_every

    def training(self, epoch: int) -> list[str]:
        """The blocks that train in `epoch`."""
        if not self.unfreeze_every:
            return self.trainable
        return self.trainable[-(1 + epoch // self.unfreeze_every) :]

    def frozen(self, epoch: int) -> list[str]:
        training = self.training(epoch)
        return [name for name in self.blocks if name not in training]

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.unfreeze_every and epoch % self.unfreeze_every == 0 and epoch > 0:
            log.info("Epoch %d: training blocks %s", epoch, ", ".join(self.training(epoch)))
        for name in self.frozen(epoch):
            for module in self.blocks[name]:
                module.eval()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        for name in self.frozen(trainer.current_epoch):
            for module in self.blocks[name]:
                for param in module.parameters():
                    param.grad = None  # the optimizer skips it: no update, no weight decay, no momentum
