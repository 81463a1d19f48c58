"""The real config composed as the CLI composes it, the tiny sizes every test runs at, and the override lists that
pick stages."""

from pathlib import Path

from hydra import compose, initialize_config_dir

import transferlab.commands.common  # noqa: F401  (registers the config's resolvers, as every console script does)
from transferlab import CONF_DIR

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"  # on PYTHONPATH, subprocesses import the test callbacks as helpers.callbacks.<Class>

# The built-in tasks at a size that trains in seconds; every stage 2 epochs (scratch: 4). Sizes only: every
# feature as a user gets it (progress bar, precision=auto, CSV + TensorBoard, lr monitor, stage cache on).
SIZES = [
    "data.source.source_classes=6",
    "data.source.train_per_class=40",
    "data.source.test_per_class=10",
    "data.target.train_per_class=10",
    "data.target.test_per_class=10",
    "data.batch_size=16",
    "stages.source.epochs=2",
    "stages.pretrain.epochs=2",
    "stages.finetune.epochs=2",
]
# What most tests turn off for speed and independence; for each feature, a test in the feature's own file runs it
# with SIZES alone, as shipped.
QUIET = [
    "trainer.enable_progress_bar=false",
    "logger=csv",
    "~callbacks.lr_monitor",
    "cache=false",  # every test trains what it runs; tests/test_stage_cache.py turns the stage cache on
]
TINY = [*SIZES, "data.source.eval_batch_size=64", *QUIET]

# Stage selections to add to TINY (or SIZES): the source stage alone, the scratch stage alone.
ONLY_SOURCE = ["~stages.pretrain", "~stages.finetune", "~stages.scratch", "objective=source/test/acc"]
ONLY_SCRATCH = ["~stages.pretrain", "~stages.finetune", "stages.scratch.epochs=2", "objective=scratch/test/acc"]
DETERMINISTIC = [*TINY, "trainer.deterministic=true"]
CACHED_SOURCE = [*ONLY_SOURCE, "cache=true"]
# Complete override lists: TINY with the source stage alone (the same stage with every default as shipped: progress
# bar, precision=auto, CSV + TensorBoard, stage cache on), TINY with a one-epoch scratch stage alone.
SOURCE_ONLY = [*TINY, "~stages.pretrain", "~stages.finetune", "~stages.scratch", "objective=source/test/acc"]
SOURCE_ONLY_DEFAULTS = [*SIZES, "~stages.pretrain", "~stages.finetune", "~stages.scratch", "objective=source/test/acc"]
SCRATCH_ONLY = [*TINY, "~stages.pretrain", "~stages.finetune", "stages.scratch.epochs=1", "objective=scratch/test/acc"]
# Every stage one epoch: TINY's, and the defaults' (SIZES)
ONE_EPOCH = [o for o in TINY if ".epochs=" not in o] + ["trainer.max_epochs_per_stage=1"]
ONE_EPOCH_DEFAULTS = [o for o in SIZES if ".epochs=" not in o] + ["trainer.max_epochs_per_stage=1"]

# The keys of a stage, in the order of the default stage (conf/stage/default.yaml)
STAGE_KEYS = (
    "task, init, init_ckpt, init_head, model_weights, trainable, unfreeze_every, backbone_lr_mult, layer_decay, "
    "decay_norm_bias, label_smoothing, l2sp, bss, ema_decay, unlabeled, test_task, result_ckpt, epochs, seed, "
    "optimizer, scheduler"
)


def compose_config(run_dir: Path, overrides: list[str] = (), config_name: str = "config"):
    """The real Hydra config, as the CLI composes it, with `run_dir` as the run folder (and the stage cache
    next to it)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            config_name=config_name,
            overrides=[*overrides, f"paths.run_dir={run_dir}", f"paths.output_root={Path(run_dir).parent}"],
        )
