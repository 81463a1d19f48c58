"""Which blocks of the model train in a stage, and from which epoch: freezing and gradual unfreezing.

A model is a list of named blocks, input to output (`models.block_table`, then `head`). `trainable` names the blocks
that train: `all`, `head` (linear probing) or a list (surgical fine-tuning, Lee et al. 2022). The other blocks get
no gradients, stay in eval mode (BatchNorm statistics fixed) and are not in the optimizer. With
`unfreeze_every: N` only the top trainable block trains at first, and one more is unfrozen every N epochs, from
the head down (gradual unfreezing, as Lightning's `BaseFinetuning`; docs/architecture.md says why not it).
"""

import logging
from dataclasses import dataclass, field

import lightning as L
from torch import nn

from transferlab.core.errors import UserError
from transferlab.models import block_table

log = logging.getLogger(__name__)


@dataclass
class Block:
    """A unit of freezing, unfreezing and layer-wise lr decay: its parameters, and the modules it sets to eval mode
    while it is frozen (those whose parameters all lie in it)."""

    params: list[nn.Parameter]
    modules: list[nn.Module]
    no_decay: set[int] = field(default_factory=set)  # ids of parameters the model says to keep out of weight decay


def block_names(model: dict) -> list[str]:
    """The blocks of the model, input to output, the head last."""
    return [name for name in block_table(model) if name != "head"] + ["head"]


def model_blocks(backbone: nn.Module, head: nn.Module, model: dict) -> dict[str, Block]:
    """Block name -> its Block; every parameter of the model lies in exactly one block. A block is named in the
    backbone by submodules (`models.BLOCKS`) or, for a timm model, by parameters (`models.zoo.timm_blocks`)."""
    table = {name: names for name, names in block_table(model).items() if name != "head"}
    head_names = block_table(model).get("head", ())
    inside = lambda name, names: any(name == n or name.startswith(f"{n}.") for n in names)
    params = dict(backbone.named_parameters())
    blocks = {}
    for block, names in [*table.items(), ("head", head_names)]:
        mine = [p for name, p in params.items() if inside(name, names)]
        blocks[block] = Block(mine, modules_within(backbone, {id(p) for p in mine}))
    blocks["head"].params += list(head.parameters())
    blocks["head"].modules.append(head)
    skip = {id(params[n]) for n in getattr(backbone, "no_weight_decay", lambda: ())() if n in params}
    for b in blocks.values():
        b.no_decay = {id(p) for p in b.params} & skip
    covered = [id(p) for b in blocks.values() for p in b.params]
    every = {id(p) for p in [*backbone.parameters(), *head.parameters()]}
    if len(covered) != len(set(covered)) or set(covered) != every:
        raise RuntimeError(f"the blocks of {model} do not split the model's parameters into disjoint blocks")
    return blocks


def modules_within(root: nn.Module, ids: set[int]) -> list[nn.Module]:
    """The outermost submodules of `root` that have parameters, all of them in `ids`."""
    found, todo = [], list(root.children())
    while todo:
        module = todo.pop(0)
        own = {id(p) for p in module.parameters()}
        if own and own <= ids:
            found.append(module)
        elif own & ids:
            todo[0:0] = list(module.children())
    return found


def resolve_trainable(trainable, model: dict, key: str = "trainable") -> list[str]:
    """`all` | `head` | a block name | a list of block names -> the trainable blocks, input to output."""
    names, model_name = block_names(model), model["name"]
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

    def __init__(self, blocks: dict[str, Block], trainable: list[str], unfreeze_every: int = 0):
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
            for module in self.blocks[name].modules:
                module.eval()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        for name in self.frozen(trainer.current_epoch):
            for param in self.blocks[name].params:
                param.grad = None  # the optimizer skips it: no update, no weight decay, no momentum
