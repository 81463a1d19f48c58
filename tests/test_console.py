"""The console of a real run: a header line per stage, bars named after their stage, Lightning's banner once per
run, one line per skipped stage, the results and the run folder at the end; verbose=true shows everything."""

import pytest
from helpers.cli import run_cli
from helpers.config import TINY

TWO_STAGES = [
    *[o for o in TINY if o != "trainer.enable_progress_bar=false"],
    "~stages.finetune",
    "~stages.scratch",
    "objective=pretrain/test/acc",
    "stages.source.epochs=1",
    "stages.pretrain.epochs=1",
]


@pytest.fixture(scope="module")
def console_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("console") / "run"
    return run_dir, run_cli("transferlab", *TWO_STAGES, f"hydra.run.dir={run_dir}")


def test_each_stage_has_one_header_line_and_a_named_bar(console_run):
    run_dir, proc = console_run
    lines = proc.stdout.splitlines()
    assert (
        "stage 1/2 source · source BuiltinDataModule 6 classes · 216 train / 24 val · random init · 1 epoch · "
        "sgd lr 0.01"
    ) in lines
    assert (
        "stage 2/2 pretrain · target BuiltinDataModule 10 classes · 80 train / 20 val · init source best.ckpt "
        "(new head) · 1 epoch · sgd lr 0.01"
    ) in lines
    assert "source 1/2 · epoch 1/1" in proc.stdout and "pretrain 2/2 · test" in proc.stdout
    assert "Epoch 1/1" not in proc.stdout and "v_num" not in proc.stdout
    assert f"Results ({run_dir})" in proc.stdout and "| pretrain | target | source |" in proc.stdout


def test_lightning_banner_at_most_once_and_no_log_prefixes(console_run):
    _, proc = console_run
    out = proc.stdout + proc.stderr
    assert out.count("GPU available") == 1 and out.count("TPU available") == 1
    assert "💡 Tip" not in out and "Restoring states from the checkpoint" not in out
    assert "[lightning.pytorch" not in out and "][INFO]" not in out
    assert "srun" not in out  # Lightning's hint to prepend srun (srun is installed here): transferlab submits itself


def test_a_finished_stage_is_one_line_on_rerun(console_run):
    run_dir, _ = console_run
    proc = run_cli("transferlab", *TWO_STAGES, f"hydra.run.dir={run_dir}")
    lines = proc.stdout.splitlines()
    assert "Stage source: done in an earlier run, skipped" in lines
    assert "Stage pretrain: done in an earlier run, skipped" in lines
    assert "GPU available" not in proc.stdout and "stage 1/2" not in proc.stdout  # nothing trains, no Trainer


def test_verbose_shows_every_lightning_line(console_run, tmp_path):
    run_dir, quiet = console_run
    proc = run_cli("transferlab", *TWO_STAGES, "verbose=true", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.stdout.count("GPU available") == 2 and proc.stdout.count("Restoring states from the checkpoint") == 2
    assert "[lightning.pytorch.utilities.rank_zero][INFO]" in proc.stdout
    # the run's log file keeps every line whatever the console shows
    assert (run_dir / "transferlab.log").read_text().count("GPU available") == 2


@pytest.mark.parametrize("verbose", ["false", "true"])
def test_an_error_is_printed_once_and_kept_in_the_log_file(tmp_path, verbose):
    """The message was printed twice: the log's `error: ...` line, then `transferlab: error: ...`."""
    missing = tmp_path / "no-cifar"
    run_dir = tmp_path / "run"
    proc = run_cli(
        "transferlab",
        *[o for o in TWO_STAGES if not o.startswith("data.target.")],
        "data/target=cifar10",
        f"data.target.root={missing}",
        f"verbose={verbose}",
        f"hydra.run.dir={run_dir}",
        check=False,
    )
    assert proc.returncode == 2
    message = f"CIFAR-10 not found at {missing}"
    assert (proc.stdout + proc.stderr).count(message) == 1, proc.stdout + proc.stderr
    assert f"transferlab: error: {message}" in proc.stderr and "Traceback" not in proc.stderr
    assert message in (run_dir / "transferlab.log").read_text()  # the run's log file keeps it


def test_lightnings_stepping_batches_line_stays_off_the_console(tmp_path):
    """A per-step schedule makes Lightning estimate the stepping batches, and say so on every stage."""
    run_dir = tmp_path / "run"
    per_step = ["stages.source.scheduler.name=cosine", "stages.source.scheduler.interval=step"]
    proc = run_cli("transferlab", *TWO_STAGES, *per_step, f"hydra.run.dir={run_dir}")
    assert "estimate number of stepping batches" not in proc.stdout + proc.stderr
    assert "estimate number of stepping batches" in (run_dir / "transferlab.log").read_text()


def test_the_bar_redraws_by_time_not_by_step():
    import time

    from transferlab.core.console import StageProgressBar

    bar = StageProgressBar("source 1/4", refresh_per_second=2)
    assert bar._due(1, 100)  # the first step draws
    assert not any(bar._due(n, 100) for n in range(2, 99))  # the steps within the next 0.5 s don't
    assert bar._due(100, 100)  # the last step of a loop always does
    time.sleep(0.55)
    assert bar._due(5, 100)


def test_stopping_the_bar_does_not_wait_out_a_redraw_interval(monkeypatch):
    """Stopping the bar joins Lightning's refresh thread, which sleeps between looks for a redraw: at 2 looks a
    second each fit and each test ended with up to 0.5 s of waiting (0.48-0.50 s here on the old code)."""
    import time

    import lightning as L
    import torch
    from lightning.pytorch.callbacks.progress.rich_progress import CustomProgress
    from torch.utils.data import DataLoader, TensorDataset

    from transferlab.core.console import StageProgressBar

    waits, stop = [], CustomProgress.stop

    def timed_stop(progress):
        start = time.perf_counter()
        stop(progress)
        waits.append(time.perf_counter() - start)

    monkeypatch.setattr(CustomProgress, "stop", timed_stop)

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 2)

        def training_step(self, batch, _):
            return self.layer(batch[0]).sum()

        def test_step(self, batch, _):
            self.layer(batch[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = lambda: DataLoader(TensorDataset(torch.randn(32, 4)), batch_size=8)
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[StageProgressBar("source 1/1")],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    model = Tiny()
    trainer.fit(model, data())
    trainer.test(model, data(), verbose=False)
    assert len(waits) == 2 and max(waits) < 0.25, waits
