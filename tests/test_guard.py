"""Issue 8 (signals, one writer per folder, checkpoints verified before use): real signals to the real CLI, two
real processes on one run folder, real corrupted files."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import REPO, SIZES, TINY

from transferlab.core.errors import UserError
from transferlab.train.checkpoint_files import verify_checkpoint

TESTS = Path(__file__).resolve().parent
SOURCE_ONLY = [*TINY, "~stages.pretrain", "~stages.finetune", "~stages.scratch", "objective=source/test/acc"]
# The same stage with every default as shipped (progress bar, precision=auto, CSV + TensorBoard, stage cache on)
SOURCE_ONLY_DEFAULTS = [*SIZES, "~stages.pretrain", "~stages.finetune", "~stages.scratch", "objective=source/test/acc"]
SCRATCH_ONLY = [*TINY, "~stages.pretrain", "~stages.finetune", "stages.scratch.epochs=1", "objective=scratch/test/acc"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")])}
ENV.pop("HYDRA_FULL_ERROR", None)


def start_and_wait(
    run_dir: Path, step: int = 20, extra: list[str] = (), base: list[str] = SOURCE_ONLY
) -> subprocess.Popen:
    """Start the CLI (source stage only) and return once it waits at global step `step` of the source stage (14
    steps an epoch: step 20 is in epoch 1, after epoch 0's last.ckpt)."""
    marker = run_dir.parent / f"marker-{run_dir.name}-{time.time_ns()}"
    args = [
        str(Path(sys.executable).parent / "transferlab"),
        *base,
        *extra,
        f"hydra.run.dir={run_dir}",
        "+callbacks.wait._target_=helpers.MarkAndWaitAtStep",
        "+callbacks.wait.stage=source",
        f"+callbacks.wait.step={step}",
        f"+callbacks.wait.marker={marker}",
    ]
    proc = subprocess.Popen(  # its own process group, as a shell job: Ctrl-C (SIGINT to the group) can be sent
        args,
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # as from an interactive shell: pytest started in the background by a script inherits SIGINT ignored
        # (POSIX), and a run started with SIGINT ignored rightly keeps ignoring it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, f"the run ended before step {step}: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline
        time.sleep(0.05)
    return proc


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / args[0]
    return subprocess.run(
        [str(script), *args[1:]], capture_output=True, text=True, cwd=REPO, env=env or ENV, timeout=600
    )


def stages(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())["stages"]


def error_line(proc: subprocess.CompletedProcess, code: int) -> str:
    """The one `transferlab: ...` line of a run that exited `code`, without a traceback."""
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("transferlab: ")]
    if os.environ.get("TRANSFERLAB_MESSAGES"):  # collects the real messages for docs/reliability.md
        with open(os.environ["TRANSFERLAB_MESSAGES"], "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}\t{code}\t{line}\n")
    return line


# -- signals ---------------------------------------------------------------------------------------------
def test_sigterm_and_sigint_stop_with_143_and_130_mark_the_stage_interrupted_and_a_rerun_resumes(tmp_path):
    """SIGTERM mid-stage (Lightning alone exits 0 here), then SIGINT in the resumed run, then a run that finishes."""
    run_dir = tmp_path / "run"
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        proc = start_and_wait(run_dir)
        os.kill(proc.pid, sig)
        _, stderr = proc.communicate(timeout=120)
        line = error_line(subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr), code)
        assert line == (
            f"transferlab: stopped by {sig.name}: stage 'source' is marked interrupted in {run_dir}/"
            f"manifest.json. Re-run the same command into that folder (hydra.run.dir={run_dir}) to resume."
        )
        source = stages(run_dir)["source"]
        assert source["status"] == "interrupted" and source["reason"] == f"Interrupted: stopped by {sig.name}"
        assert source["last_ckpt"] == "source/checkpoints/last.ckpt"
        assert torch.load(run_dir / source["last_ckpt"], weights_only=True)["epoch"] == 0
        assert not (run_dir / ".transferlab.owner.json").exists()
    done = cli("transferlab", *SOURCE_ONLY, f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    last = run_dir / "source" / "checkpoints" / "last.ckpt"
    assert f"Stage source: resuming from {last}" in done.stdout + done.stderr
    source = stages(run_dir)["source"]
    assert source["status"] == "done" and source["epochs"] == 2 and source["test"]["acc"] > 0


def test_with_the_defaults_a_stopped_run_resumes_and_its_stage_reaches_the_cache_once_done(tmp_path):
    """The same stop and resume as a user runs it (progress bar on, stage cache on): SIGTERM in epoch 1, then a
    re-run that resumes from last.ckpt; the interrupted stage was not published, the finished one is."""
    run_dir, cache = tmp_path / "run", tmp_path / "outputs" / "cache" / "stages"
    proc = start_and_wait(run_dir, base=SOURCE_ONLY_DEFAULTS)
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert "stage 'source' is marked interrupted" in error_line(
        subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr), 143
    )
    assert not list(cache.glob("source-*/entry.json"))  # a partly trained stage is never published
    env = {**ENV, "TRANSFERLAB_OUTPUT_ROOT": str(tmp_path / "outputs")}
    done = cli("transferlab", *SOURCE_ONLY_DEFAULTS, f"hydra.run.dir={run_dir}", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout + done.stderr and "source 1/1 · epoch 2/2" in done.stdout
    source = stages(run_dir)["source"]
    assert source["status"] == "done" and source["epochs"] == 2 and source["attempts"] == [1, 2]
    assert len(list(cache.glob("source-*/entry.json"))) == 1


# -- one writer per run folder -----------------------------------------------------------------------------
def test_second_run_into_a_folder_in_use_is_refused_and_a_killed_holder_does_not_block(tmp_path):
    run_dir = tmp_path / "run"
    holder = start_and_wait(run_dir)
    try:
        started = time.time()
        config = (run_dir / ".hydra" / "config.yaml").read_text()
        second = cli("transferlab", *SOURCE_ONLY, "stages.source.optimizer.lr=0.05", f"hydra.run.dir={run_dir}")
        line = error_line(second, 2)
        assert f"{run_dir} is in use by another transferlab run (host {socket.gethostname()}, PID {holder.pid}," in line
        assert "wait for it to end (or stop it), or run into another folder (hydra.run.dir=...)" in line
        assert time.time() - started < 60 and "Stage source" not in second.stdout + second.stderr  # trained nothing
        assert holder.poll() is None and stages(run_dir)["source"]["status"] == "running"  # the holder's record
        assert stages(run_dir)["source"]["attempts"] == [1]  # the refused run began no attempt
        assert (run_dir / ".hydra" / "config.yaml").read_text() == config  # the folder shows the holder's config
    finally:
        holder.kill()  # SIGKILL: the lock it held, and its owner file, stay behind
        holder.communicate()
    assert json.loads((run_dir / ".transferlab.owner.json").read_text())["pid"] == holder.pid
    after = cli("transferlab", *SOURCE_ONLY, f"hydra.run.dir={run_dir}")
    assert after.returncode == 0, after.stderr[-3000:]
    assert "resuming from" in after.stdout + after.stderr and stages(run_dir)["source"]["status"] == "done"


def test_deleting_the_lock_file_of_a_running_run_does_not_let_a_second_one_in(tmp_path):
    """`rm .transferlab.lock` (by hand, a clean-up script) while a run holds it: a second run took a new lock file
    and trained into the same folder, both exiting 0. The owner file names the live holder: refused."""
    run_dir = tmp_path / "run"
    holder = start_and_wait(run_dir)
    try:
        (run_dir / ".transferlab.lock").unlink()
        second = cli("transferlab", *SOURCE_ONLY, f"hydra.run.dir={run_dir}")
        line = error_line(second, 2)
        assert f"is in use by another transferlab run (host {socket.gethostname()}, PID {holder.pid}," in line
        assert "whose lock file .transferlab.lock was deleted while it runs" in line
        assert holder.poll() is None and stages(run_dir)["source"]["attempts"] == [1]
        assert json.loads((run_dir / ".transferlab.owner.json").read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.communicate()
    # a PID that is alive but is not the holder (the PID reused after a reboot, another program) does not block
    owner = run_dir / ".transferlab.owner.json"
    info = json.loads(owner.read_text())
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        owner.write_text(json.dumps({**info, "pid": sleeper.pid}))
        after = cli("transferlab", *SOURCE_ONLY, f"hydra.run.dir={run_dir}")
        assert after.returncode == 0, after.stderr[-3000:]
        assert stages(run_dir)["source"]["status"] == "done"
    finally:
        sleeper.kill()
        sleeper.wait()


# -- checkpoints verified before use -------------------------------------------------------------------------
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


# -- verify_checkpoint on each kind of bad file (no CLI: the messages, fast) -------------------------------------
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


def test_signals_under_ddp_stop_every_rank_with_one_line_and_a_rerun_resumes(tmp_path):
    """A 2-process DDP run (gloo): SIGTERM to the launching process only (`kill PID`; rank 0 forwards it to rank
    1 through Lightning's launcher), then, in the resumed run, SIGINT to the whole process group (Ctrl-C in a
    terminal). Each time every rank stops, one line is printed (not one per rank), no process is left behind and
    the stage is `interrupted`; the same command then resumes and finishes under DDP."""
    run_dir, ddp = tmp_path / "run", ["trainer=ddp_cpu"]
    for sig, to_group in ((signal.SIGTERM, False), (signal.SIGINT, True)):
        proc = start_and_wait(run_dir, step=10, extra=ddp)  # each rank has half the batches: 7 steps an epoch
        children = child_pids(proc.pid)
        assert children, "DDP started no second process"
        os.killpg(proc.pid, sig) if to_group else os.kill(proc.pid, sig)
        _, stderr = proc.communicate(timeout=120)
        line = error_line(subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr), 128 + sig)
        assert line.startswith(f"transferlab: stopped by {sig.name}: stage 'source' is marked interrupted")
        deadline = time.time() + 30
        while any(Path(f"/proc/{pid}").exists() for pid in children) and time.time() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in children if Path(f"/proc/{pid}").exists()], "a DDP rank outlived the run"
        assert stages(run_dir)["source"]["status"] == "interrupted"
    done = cli("transferlab", *SOURCE_ONLY, *ddp, f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Stage source: resuming from" in done.stdout + done.stderr
    source = stages(run_dir)["source"]
    assert source["status"] == "done" and source["epochs"] == 2


def child_pids(pid: int) -> list[int]:
    """The processes `pid` started (from /proc: Linux, as the DDP launcher's children are)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found
