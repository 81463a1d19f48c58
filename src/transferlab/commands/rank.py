"""`transferlab-rank data=... candidates=[...]`: which source model to start from (`analysis.ranking`)."""

from transferlab.analysis.ranking import rank
from transferlab.commands.common import hydra_app, script

main = hydra_app("rank", rank)


def console_script() -> None:
    script(main)


if __name__ == "__main__":
    console_script()
