"""transferlab: source -> pretrain -> finetune transfer-learning experiments, with a scratch baseline."""

from pathlib import Path

__version__ = "0.1.0"


def _conf_dir() -> str:
    """`conf/` next to `src/` in a checkout, or `transferlab/conf` inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"transferlab's conf/ folder is missing (looked next to {here})")


CONF_DIR = _conf_dir()
