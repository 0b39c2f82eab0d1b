"""The main job end to end on the real SmolLM2: its accuracy targets and merged answers (about 3 minutes on 2 idle
cores: opt-in with -m slow). How long it takes is a benchmark figure, not asserted here."""

from __future__ import annotations

import pytest

from lorakit.demo import run_demo


@pytest.mark.slow
@pytest.mark.integration
def test_demo_meets_its_targets(tmp_path):
    result = run_demo(tmp_path)
    assert result["adapted_accuracy"] >= 0.8
    assert result["adapted_accuracy"] - result["base_accuracy"] >= 0.5
    assert result["merged_answers_identical"]
    assert 0 < result["adapter_bytes"] < result["model_bytes"] / 10
