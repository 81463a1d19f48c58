"""Long end-to-end runs (marked slow; CI runs them): the default pipeline as a user runs it."""

import json

import pytest
from conftest import run_cli


@pytest.mark.slow
def test_default_pipeline_shows_a_clear_transfer_gain(tmp_path):
    """`transferlab` with no overrides (the mission's recipe on the built-in data): transfer must help."""
    proc = run_cli("transferlab", f"hydra.run.dir={tmp_path}", "trainer.enable_progress_bar=false")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["source/test/acc"] > 0.9  # the source task is learnt
    assert results["gain/acc"] > 0.2, results  # finetune beats scratch by more than 20 points
    assert "Transfer gain" in proc.stdout
