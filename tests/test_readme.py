"""Every command line the README shows, run as written: the placeholders (`/datasets/cifar10`, `<run>`, ...) point
at data and runs made here in the real file layouts, and only sizes are added (tiny data, one epoch per stage,
fewer trials), never a feature switched off. A command that needs hardware this machine lacks (a GPU) is run to
its refusal, then in the CPU form the README names beside it. The fresh-machine commands are the CI's own
(`.ci/run`) and tests/test_pipeline.py's (test_default_pipeline_shows_a_clear_transfer_gain)."""

import re
import shlex
from pathlib import Path

import pytest
import timm
import torch
from helpers.cli import run_cli
from helpers.config import REPO, SIZES
from helpers.datasets import write_cifar10, write_cifar100, write_folder, write_imagenet
from safetensors.torch import save_file

README = REPO / "README.md"
BUILTIN_SOURCE = [o for o in SIZES if o.startswith("data.source.")]
BUILTIN_TARGET = ["data.target.test_per_class=10"]  # its 24 training images a class, as the README's values need
SMALLER = {"hydra.sweeper.n_trials": "2"}  # values of the README's commands made smaller (a size, not a feature)
# The low-data study is 60 jobs (4 label counts x 5 recipes x 3 seeds): the same sweep over fewer values
NARROWER = {"experiment=lowdata_study": ["data.target.samples_per_class=10,25", "recipe=mission,lp_ft", "seed=0,1"]}
# A command that runs only on a cluster with GPUs: where the same command runs on the CPU test cluster
ELSEWHERE = {
    "hydra/launcher=slurm": (
        "tests/test_slurm.py",
        "test_two_node_job_runs_ddp_across_the_simulated_nodes",  # trainer=ddp_cpu, 1 device x 2 nodes
    )
}


def readme_commands() -> list[str]:
    """The `transferlab*` command lines of the README's code blocks (continuation lines joined), in order."""
    commands = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if re.match(r"transferlab(-eval|-report|-rank)?( |$)", line):
                commands.append(line)
    return commands


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    """What the README's placeholders stand for: small datasets in their real layouts, two finished runs and a
    finished sweep (with every default, like the README's own runs)."""
    root = tmp_path_factory.mktemp("readme")
    cifar10 = write_cifar10(root / "cifar10", n_train=2500, n_test=200)  # 225 train images a class after val
    imagenet = write_imagenet(root / "imagenet", per_class=10)
    cifar100 = write_cifar100(root / "cifar100", n_train=2000, n_test=200)  # 20 a class: 18 train, 2 val
    images = write_folder(root / "my_images", per_class=10)
    outputs = root / "outputs"
    env = {"TRANSFERLAB_OUTPUT_ROOT": str(outputs)}
    for name, seed in (("A", 0), ("B", 1)):
        run_cli("transferlab", *SIZES, f"seed={seed}", f"hydra.run.dir={outputs / 'runs' / name}", env=env)
    weights = root / "models" / "resnet18.safetensors"  # timm's resnet18 as its hub file holds it (classifier too)
    weights.parent.mkdir()
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()}, weights)
    sweep = outputs / "multirun" / "sweep"
    run_cli("transferlab", "-m", *SIZES, "seed=0,1", "~stages.scratch", f"hydra.sweep.dir={sweep}", env=env)
    return {
        "/datasets/cifar10": str(cifar10),
        "<cifar10 dir>": str(cifar10),
        "/datasets/imagenet": str(imagenet),
        "/datasets/cifar100": str(cifar100),
        "~/my_images": str(images),
        "outputs/runs/<run>": str(outputs / "runs" / "A"),
        "outputs/runs/A": str(outputs / "runs" / "A"),
        "outputs/runs/B": str(outputs / "runs" / "B"),
        "outputs/multirun/<date_time>": str(sweep),
        "outputs": str(outputs),
        "/models/resnet18.safetensors": str(weights),
    }


def builtin_sizes(args: list[str]) -> list[str]:
    """The tiny sizes of the tasks that use the built-in data in this command."""
    groups = dict(a.split("=", 1) for a in args if a.startswith(("data=", "data/", "experiment=")))
    pair = groups.get("data", "cifar10_split" if groups.get("experiment") == "lowdata_study" else "builtin")
    source = groups.get("data/source", "builtin" if pair in ("builtin", "builtin_cifar10") else None)
    target = groups.get("data/target", "builtin" if pair == "builtin" else None)
    return [*(BUILTIN_SOURCE if source == "builtin" else []), *(BUILTIN_TARGET if target == "builtin" else [])]


def as_run(command: str, places: dict[str, str], out: Path) -> list[str]:
    """The README's command with its placeholders filled in and the sizes added."""
    pattern = "|".join(re.escape(p) for p in sorted(places, key=len, reverse=True))
    args = shlex.split(re.sub(pattern, lambda m: places[m.group()], command))  # one pass: no path replaced twice
    args = [f"{a.split('=')[0]}={SMALLER[a.split('=')[0]]}" if a.split("=")[0] in SMALLER else a for a in args]
    script, rest = args[0], args[1:]
    if script == "transferlab-report":
        return args
    rest += [o for key, extra in NARROWER.items() if key in rest for o in extra]
    rest += builtin_sizes(rest)
    if script == "transferlab":
        rest += [
            "trainer.max_epochs_per_stage=1",
            *(f"trainer.limit_{loop}_batches=4" for loop in ("train", "val", "test")),
        ]
        if any(a.startswith("data.source.root=") for a in rest) and "data=imagenet_cifar10" in rest:
            rest += ["data.source.val_fraction=0.2"]  # 10 images a class: the default 2 % holds out none
    rest += [f"hydra.sweep.dir={out}" if "-m" in rest else f"hydra.run.dir={out}"]
    return [script, *rest]


def needs_gpu(args: list[str]) -> bool:
    return any(a in ("trainer=ddp", "trainer=gpu") for a in args) and torch.cuda.device_count() == 0


COMMANDS = readme_commands()


def test_the_readme_shows_commands_this_test_runs():
    assert len(COMMANDS) >= 15 and COMMANDS[0] == "transferlab", COMMANDS


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_a_readme_command_runs_as_written(command, places, tmp_path):
    elsewhere = next((where for key, where in ELSEWHERE.items() if key in command), None)
    if elsewhere:  # run on the CPU test cluster by the test named here: it must exist
        path, name = elsewhere
        assert f"def {name}(" in (REPO / path).read_text(), f"{command}: {path}::{name} is gone"
        return
    args = as_run(command, places, tmp_path / "out")
    env = {"TRANSFERLAB_OUTPUT_ROOT": places["outputs"]}
    if needs_gpu(args):  # refused with one message, before anything is written
        proc = run_cli(*args, check=False, env=env)
        assert proc.returncode == 2 and "this machine has no visible GPU" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and not (tmp_path / "out" / "manifest.json").exists()
        cpu = {"trainer=ddp": "trainer=ddp_cpu", "trainer=gpu": "trainer=cpu", "trainer.devices=4": "trainer.devices=2"}
        args = [cpu.get(a, a) for a in args]  # the CPU form the README names: trainer=ddp_cpu (gloo)
    proc = run_cli(*args, check=False, env=env)
    assert proc.returncode == 0, f"{shlex.join(args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-3000:]
    if args[0] == "transferlab" and "-m" not in args:
        assert "Results (" in proc.stdout and (tmp_path / "out" / "results.json").is_file()
