"""Runs started by SLURM (`hydra/launcher=slurm`, or any `srun`): Lightning then takes its processes from SLURM
(`SLURMEnvironment`: one task per device, ranks from SLURM_PROCID) instead of spawning them, so SLURM's tasks
per node and nodes must be `trainer.devices` and `trainer.num_nodes`. Checked before anything trains."""

import os
import re

from omegaconf import DictConfig, ListConfig

from transferlab.core.errors import UserError


def check_slurm_tasks(trainer: DictConfig, environ=os.environ) -> None:
    """Raise a UserError when the SLURM job's tasks do not match the trainer's devices and nodes."""
    if "SLURM_NTASKS" not in environ or environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return  # not under srun/sbatch, or an interactive shell (Lightning ignores SLURM there too)
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    if isinstance(devices, (list, tuple, ListConfig)):  # device indices: one process each
        devices = len(devices)
    elif isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    per_node = re.match(r"\d+", environ.get("SLURM_NTASKS_PER_NODE", "") or environ.get("SLURM_TASKS_PER_NODE", ""))
    got_nodes = environ.get("SLURM_NNODES") or environ.get("SLURM_JOB_NUM_NODES")
    problems = []
    if isinstance(devices, int) and devices > 0 and per_node and int(per_node.group()) != devices:
        problems.append(f"{per_node.group()} task(s) per node but trainer.devices={devices}")
    if isinstance(nodes, int) and got_nodes and int(got_nodes) != nodes:
        problems.append(f"{got_nodes} node(s) but trainer.num_nodes={nodes}")
    if problems:
        raise UserError(
            f"This SLURM job has {' and '.join(problems)}. Lightning runs one process per device and "
            "takes them from SLURM (srun), so they must match: with hydra/launcher=slurm, "
            "hydra.launcher.tasks_per_node and hydra.launcher.nodes follow trainer.devices and "
            "trainer.num_nodes of the base config (don't override them, and don't sweep trainer.devices "
            "or trainer.num_nodes: one sweep's jobs share one set of resources)."
        )
