"""`manifest.json`: written whole or not at all (a write cut short leaves the previous one); edited by hand or cut
short, a re-run says which field is wrong, once, before anything runs (it was a traceback from the first step that
trusted the field: a null checkpoint, a string of attempts)."""

import json
import shutil

import pytest
from helpers.cli import run_cli
from helpers.config import TINY

from transferlab.core.errors import UserError
from transferlab.run.manifest import Manifest

ONLY_SOURCE = [*TINY, "~stages.pretrain", "~stages.finetune", "~stages.scratch", "objective=source/test/acc"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("manifest") / "run"
    run_cli("transferlab", *ONLY_SOURCE, f"hydra.run.dir={run_dir}")
    return run_dir


EDITS = {
    "best_ckpt: null": (lambda s: s.update(best_ckpt=None), "is done but names no best checkpoint or test metrics"),
    'attempts: "1"': (lambda s: s.update(attempts="1"), "has attempts='1', which a stage record cannot hold"),
    "test: null": (lambda s: s.update(test=None), "has test=None, which a stage record cannot hold"),
    'epochs: "2"': (lambda s: s.update(epochs="2"), "has epochs='2', which a stage record cannot hold"),
    "test acc a string": (lambda s: s["test"].update(acc="0.5"), "has test={"),
    "status unknown": (lambda s: s.update(status="finished"), "is not a stage record (status one of running, done"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_hand_edited_stage_record_is_named(finished, tmp_path, edit):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    path = run_dir / "manifest.json"
    data = json.loads(path.read_text())
    change, message = EDITS[edit]
    change(data["stages"]["source"])
    path.write_text(json.dumps(data))
    with pytest.raises(UserError) as err:
        Manifest.load(run_dir)
    assert f"{path} is not a transferlab manifest (stage 'source' " in str(err.value) and message in str(err.value)


def test_a_re_run_into_a_folder_with_a_cut_short_manifest_changes_nothing(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    path = run_dir / "manifest.json"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = path.read_bytes()
    proc = run_cli("transferlab", *ONLY_SOURCE, f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{path} is not a transferlab manifest" in proc.stderr and "the folder is left as it was" in proc.stderr
    assert path.read_bytes() == before


def test_manifest_write_cut_short_leaves_the_old_manifest(tmp_path, monkeypatch):
    """The manifest is written to a temporary file and renamed: a crash before the rename (here the rename
    itself fails) leaves the previous manifest whole."""
    from transferlab.core import fileio

    path = tmp_path / "manifest.json"
    fileio.write_json_atomic(path, {"stages": {"source": {"status": "done"}}})

    def crash(*args):
        raise OSError("killed")

    monkeypatch.setattr(fileio.os, "replace", crash)
    with pytest.raises(OSError):
        fileio.write_json_atomic(path, {"stages": {"source": {"status": "done"}, "pretrain": {"status": "done"}}})
    assert json.loads(path.read_text()) == {"stages": {"source": {"status": "done"}}}
