"""Checkpoints checked before use: one that a stage resumes from or starts from, one given as a stage's result
or to transferlab-eval, that is missing, damaged, not a checkpoint, would run code when unpickled, or fits
another model or class count, is one message (exit 2, no traceback) and never loaded; `verify_checkpoint`
on each kind of bad file."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from helpers.cli import ENV, assert_user_error, cli, error_line, run_cli, start_and_wait, transferlab
from helpers.config import ONLY_SCRATCH, SCRATCH_ONLY, SOURCE_ONLY, TESTS
from helpers.run_folder import manifest, stages

from transferlab.core.errors import UserError
from transferlab.train.checkpoint_files import verify_checkpoint
from transferlab.train.module import ClassifierModule

pytestmark = pytest.mark.usefixtures("helpers_on_path")  # runs in other processes: this src, helpers.callbacks


class RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __reduce__(self):
        return os.system, ('touch "$TRANSFERLAB_TEST_MARKER"',)


def change_bytes(path: Path) -> str:
    """Change 4 bytes inside the largest tensor of a torch.save zip, keeping the length; returns the member."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = (
        int.from_bytes(data[info.header_offset + o : info.header_offset + o + 2], "little") for o in (26, 28)
    )
    at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    data[at : at + 4] = bytes(b ^ 0xFF for b in data[at : at + 4])
    size = path.stat().st_size
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size
    return info.filename


def save_module_checkpoint(path: Path, model: dict, num_classes: int) -> Path:
    module = ClassifierModule(model=model, num_classes=num_classes, optimizer={"name": "sgd", "lr": 0.1})
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


# -- a checkpoint to start a stage from ----------------------------------------------------------------------
def test_checkpoint_for_another_class_count(after_source, tmp_path):
    run_dir, source_intact = after_source
    ckpt = save_module_checkpoint(tmp_path / "three_classes.ckpt", {"name": "convnet"}, 3)
    proc = transferlab(run_dir, "stages.scratch.init_ckpt=" + str(ckpt), "stages.scratch.init_head=keep", *ONLY_SCRATCH)
    assert_user_error(
        proc,
        f"{ckpt} has a head for another class count (head.weight (3, 128) vs (10, 128)",
        "set this stage's init_head=new",
    )
    stages = source_intact()
    assert stages["scratch"]["status"] == "failed" and not (run_dir / "scratch" / "checkpoints").exists()


def test_checkpoint_of_another_architecture(after_source, tmp_path):
    run_dir, source_intact = after_source
    ckpt = save_module_checkpoint(tmp_path / "resnet18.ckpt", {"name": "resnet18"}, 10)
    proc = transferlab(run_dir, "stages.scratch.init_ckpt=" + str(ckpt), *ONLY_SCRATCH)
    assert_user_error(
        proc,
        f"{ckpt} does not fit this model",
        "saved for model {'name': 'resnet18'",
        "use a checkpoint of the same architecture or change model=",
    )
    assert source_intact()["scratch"]["status"] == "failed"


def test_checkpoint_path_that_does_not_exist(after_source, tmp_path):
    run_dir, source_intact = after_source
    missing = tmp_path / "nowhere" / "best.ckpt"
    proc = transferlab(run_dir, f"stages.scratch.init_ckpt={missing}", *ONLY_SCRATCH)
    assert_user_error(proc, f"stages.scratch.init_ckpt={missing} does not exist. Give the path of a .ckpt")
    assert "scratch" not in source_intact()
    proc = run_cli("transferlab-eval", f"ckpt={missing}", f"hydra.run.dir={tmp_path / 'eval'}", check=False)
    assert_user_error(proc, f"Checkpoint {missing} does not exist")
    folder = run_dir / "source" / "checkpoints"  # a folder where a file belongs: said so, not "does not exist"
    proc = transferlab(tmp_path / "given", f"stages.source.result_ckpt={folder}", "objective=pretrain/test/acc")
    assert_user_error(proc, f"stages.source.result_ckpt={folder} is a folder, not a file: give the path")


def test_checkpoint_that_would_run_code_is_refused(after_source, tmp_path, monkeypatch):
    run_dir, source_intact = after_source
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": RunsCode()}, evil)
    proof = tmp_path / "proof"  # the file does run code when loaded without weights_only
    subprocess.run(
        [sys.executable, "-c", f"import torch; torch.load({str(evil)!r}, weights_only=False)"],
        env={**os.environ, "TRANSFERLAB_TEST_MARKER": str(proof)},
        check=True,
        cwd=TESTS,
    )
    assert proof.exists()

    marker = tmp_path / "marker"
    monkeypatch.setenv("TRANSFERLAB_TEST_MARKER", str(marker))
    proc = transferlab(run_dir, f"stages.scratch.init_ckpt={evil}", *ONLY_SCRATCH)
    assert_user_error(proc, f"Refused to load {evil}", "loading it would run code from the file", "posix.system")
    assert source_intact()["scratch"]["status"] == "failed"
    proc = run_cli("transferlab-eval", f"ckpt={evil}", f"hydra.run.dir={tmp_path / 'eval'}", check=False)
    assert_user_error(proc, f"Refused to load {evil}")
    assert not marker.exists()


# -- a last.ckpt to resume from ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """A run whose source stage was killed in epoch 1: its last.ckpt (epoch 0) is what a re-run resumes from."""
    run_dir = tmp_path_factory.mktemp("interrupted") / "run"
    proc = start_and_wait(run_dir)
    proc.kill()
    proc.communicate()
    return run_dir


def resume_with(interrupted: Path, tmp_path: Path, spoil, env: dict | None = None):
    run_dir = tmp_path / "run"
    shutil.copytree(interrupted, run_dir)
    last = run_dir / "source" / "checkpoints" / "last.ckpt"
    spoil(last)
    return run_dir, last, cli("transferlab", *SOURCE_ONLY, f"hydra.run.dir={run_dir}", env=env)


def test_last_checkpoint_with_a_few_bytes_changed_is_not_resumed(interrupted, tmp_path):
    changed = []
    run_dir, last, proc = resume_with(interrupted, tmp_path, lambda p: changed.append(change_bytes(p)))
    line = error_line(proc, 2)
    assert (
        f"Cannot resume from {last}: the file is corrupt: its part {changed[0]} does not match the CRC-32 "
        "checksum written with it"
    ) in line and "Delete it (the stage then starts over) or restore" in line
    assert stages(run_dir)["source"]["status"] == "failed"


@pytest.mark.parametrize("forced", [False, True], ids=["default", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"])
def test_last_checkpoint_that_would_run_code_is_refused_and_never_runs(interrupted, tmp_path, forced):
    """torch.load's default is weights_only=True, unless TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (which torch's own
    error message suggests, to load old checkpoints): then Lightning's resume ran the payload."""
    proof = tmp_path / "proof"
    env = {**ENV, "TRANSFERLAB_TEST_MARKER": str(proof)} | ({"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"} if forced else {})
    spoil = lambda p: torch.save({"state_dict": {}, "payload": RunsCode()}, p)
    run_dir, last, proc = resume_with(interrupted, tmp_path, spoil, env=env)
    assert not proof.exists()
    line = error_line(proc, 2)
    assert f"Refused to load {last}" in line and "loading it would run code from the file" in line
    assert "posix.system" in line and "Delete it (the stage then starts over)" in line
    subprocess.run(
        [sys.executable, "-c", f"import torch; torch.load({str(last)!r}, weights_only=False)"],
        env=env,
        check=True,
        cwd=TESTS,
    )
    assert proof.exists()  # the file does run code when unpickled in full


def test_last_checkpoint_replaced_by_a_text_file(interrupted, tmp_path):
    run_dir, last, proc = resume_with(interrupted, tmp_path, lambda p: p.write_text("epoch: 3\n"))
    line = error_line(proc, 2)
    assert f"Cannot resume from {last}: the file is not a PyTorch checkpoint (it starts with b'epoc'" in line


def test_truncated_last_checkpoint_is_not_resumed(after_source):
    run_dir, source_intact = after_source
    last = run_dir / "pretrain" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    whole = (run_dir / "source" / "checkpoints" / "last.ckpt").read_bytes()
    last.write_bytes(whole[: len(whole) // 2])
    proc = transferlab(run_dir)
    assert_user_error(proc, f"Cannot resume from {last}: the file is truncated or corrupt", "Delete it")
    assert source_intact()["pretrain"]["status"] == "failed" and last.stat().st_size == len(whole) // 2


# -- a checkpoint given as a stage's result, or to transferlab-eval ------------------------------------------
def test_given_and_init_checkpoints_that_are_not_checkpoints(tmp_path):
    """A text, YAML or JSON file as stages.<stage>.ckpt, stages.<stage>.init_ckpt or transferlab-eval ckpt=."""
    notes, config, metrics = tmp_path / "notes.txt", tmp_path / "config.yaml", tmp_path / "metrics.json"
    notes.write_text("the best run so far\n")
    config.write_text("model:\n  name: convnet\n")
    metrics.write_text(json.dumps({"acc": 0.5}))

    run_dir = tmp_path / "given"
    line = error_line(
        cli("transferlab", *SCRATCH_ONLY, f"stages.source.result_ckpt={config}", f"hydra.run.dir={run_dir}"), 2
    )
    assert f"{config} is not a PyTorch checkpoint (it starts with b'mode'" in line and "would run code" not in line
    assert stages(run_dir)["source"]["status"] == "failed"  # not `done`: fixing the file lets the re-run go on

    run_dir = tmp_path / "init"
    line = error_line(
        cli("transferlab", *SCRATCH_ONLY, f"stages.scratch.init_ckpt={notes}", f"hydra.run.dir={run_dir}"), 2
    )
    assert f"{notes} is not a PyTorch checkpoint" in line and "Give the path of a good copy" in line
    assert stages(run_dir)["scratch"]["status"] == "failed"

    line = error_line(cli("transferlab-eval", f"ckpt={metrics}", f"hydra.run.dir={tmp_path / 'eval'}"), 2)
    assert f"{metrics} is not a PyTorch checkpoint (it starts with b'{{\"ac'" in line


def test_a_given_checkpoint_is_checked_before_its_stage_is_done(tmp_path):
    """Item 6: a bad `stages.source.result_ckpt` (here one copied half-way) fails the stage instead of being marked
    done, so replacing the file is enough to go on."""
    given, run_dir = tmp_path / "given.ckpt", tmp_path / "run"
    whole = save_module_checkpoint(tmp_path / "real.ckpt", {"name": "convnet"}, 6)
    given.write_bytes(whole.read_bytes()[:5000])
    args = [
        "~stages.finetune",
        "~stages.scratch",
        "objective=pretrain/test/acc",
        f"stages.source.result_ckpt={given}",
        "trainer.max_epochs_per_stage=1",
    ]
    assert_user_error(transferlab(run_dir, *args), f"stages.source.result_ckpt: {given} is truncated or corrupt")
    assert manifest(run_dir)["stages"]["source"]["status"] == "failed" and not (run_dir / "pretrain").exists()
    shutil.copyfile(whole, given)
    transferlab(run_dir, *args, check=True)
    stages = manifest(run_dir)["stages"]
    assert stages["source"]["status"] == "done" and stages["source"]["given_ckpt"]
    assert stages["pretrain"]["status"] == "done"


# -- verify_checkpoint on each kind of bad file (no CLI: the messages, fast) ---------------------------------
@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> Path:
    from transferlab.train.module import ClassifierModule

    module = ClassifierModule(model={"name": "convnet"}, num_classes=3, optimizer={"name": "sgd", "lr": 0.1})
    path = tmp_path_factory.mktemp("genuine") / "genuine.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def _truncated(genuine, path):
    path.write_bytes(genuine.read_bytes()[: genuine.stat().st_size // 2])


def _changed(genuine, path):
    shutil.copy(genuine, path)
    change_bytes(path)


def _plain_zip(genuine, path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")


BAD_FILES = {  # how the file is made -> what the message says
    "text": (lambda g, p: p.write_text("hello\n"), "is not a PyTorch checkpoint (it starts with b'hell'"),
    "yaml": (lambda g, p: p.write_text("a: 1\n"), "is not a PyTorch checkpoint"),
    "json": (lambda g, p: p.write_text("[1, 2]"), "is not a PyTorch checkpoint"),
    "empty": (lambda g, p: p.write_bytes(b""), "is empty (0 bytes)"),
    "truncated": (_truncated, "is truncated or corrupt (File is not a zip file)"),
    "bytes changed": (_changed, "is corrupt: its part genuine/data/"),
    "zip, not a checkpoint": (_plain_zip, "is a zip archive but not a PyTorch checkpoint (it has no data.pkl)"),
    "runs code": (lambda g, p: torch.save({"x": RunsCode()}, p), "would run code from the file"),
    "a folder": (lambda g, p: p.mkdir(), "cannot be read (Is a directory)"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
@pytest.mark.parametrize("use", ["init", "resume", "cache"])
def test_verify_checkpoint_names_each_kind_of_bad_file(genuine, tmp_path, kind, use):
    make, fragment = BAD_FILES[kind]
    path = tmp_path / "bad.ckpt"
    make(genuine, path)
    with pytest.raises(UserError) as caught:
        verify_checkpoint(path, use)
    message = str(caught.value)
    assert fragment in message and (str(path) in message) and "\n" not in message
    assert {
        "init": "Give the path of a good copy",
        "resume": "Delete it (the stage then starts over)",
        "cache": f"Delete the cache entry {tmp_path}",
    }[use] in message


def test_verify_checkpoint_passes_good_files(genuine, tmp_path):
    verify_checkpoint(genuine, "init")
    legacy = tmp_path / "legacy.pt"  # torch.save's pre-1.6 format (a pickle, no zip): readable, no CRC to check
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    verify_checkpoint(legacy, "init")


def test_unreadable_checkpoint_is_named_as_unreadable_not_corrupt(genuine):
    """A file its user may not read: "cannot be read", not "truncated or corrupt". Root reads any file, so under
    root the check runs in a forked child that has become user nobody (its Python is already loaded), in a folder
    nobody may enter: a readable copy beside the file is accepted."""
    folder = Path(tempfile.mkdtemp(prefix="transferlab-unreadable-"))  # in /tmp, which anyone may enter
    try:
        folder.chmod(0o755)
        readable, unreadable = folder / "readable.ckpt", folder / "best.ckpt"
        for path in (readable, unreadable):
            shutil.copy(genuine, path)
            path.chmod(0o644)
        unreadable.chmod(0)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: drop root, check both, report through the pipe, never return into pytest
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                verify_checkpoint(readable, "init")
                verify_checkpoint(unreadable, "init")
                os.write(write, b"accepted")
            except BaseException as err:
                os.write(write, str(err).encode())
            finally:
                os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        with os.fdopen(read) as f:
            message = f.read()
    finally:
        shutil.rmtree(folder)
    assert message.startswith(f"{unreadable} cannot be read (Permission denied)"), message
    assert "corrupt" not in message and "Give the path of a good copy" in message
