"""`transferlab-rank data=... candidates=[...]`: which source model to start from (`analysis.ranking`)."""

import hydra
from omegaconf import DictConfig

from transferlab import CONF_DIR
from transferlab.analysis.ranking import rank
from transferlab.commands.common import hydra_task, script


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="rank")
@hydra_task
def main(cfg: DictConfig) -> dict:
    return rank(cfg)


def console_script() -> None:
    script(main)


if __name__ == "__main__":
    console_script()
