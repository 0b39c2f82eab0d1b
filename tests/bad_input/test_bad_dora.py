"""Bad input around DoRA: a layer kind DoRA does not adapt, a non-boolean `lora.dora`, and the commands whose
arithmetic assumes ΔW = s·B A (combine, prune, analyze) given a DoRA adapter. Each is exit code 2 and one error
line naming the problem and the fix; nothing is written and every file that was there is unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
from arithmetic.arithmetic_helpers import make_adapter
from conftest import expect_cli_error, write_config

DORA_ADAPTER = r"is a DoRA adapter: its update .* is not the low-rank s·B A, so {} does not apply to it; merge it"

COMMANDS = [
    pytest.param(["combine", "a=plain", "b=dora", "--out", "out"], DORA_ADAPTER.format("adding its ΔW to others'"),
                 id="combine-dora"),
    pytest.param(["prune", "dora", "--rank", "2", "--out", "out"],
                 DORA_ADAPTER.format("cutting ΔW to its top singular directions"), id="prune-dora"),
    pytest.param(["analyze", "dora", "--no-base"], DORA_ADAPTER.format(r"the analysis of ΔW = s·B A"),
                 id="analyze-dora"),
]


@pytest.mark.parametrize("argv, matches", COMMANDS)
def test_dora_adapter_refused_where_delta_is_assumed_low_rank(argv: list[str], matches: str, tmp_path: Path,
                                                              capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_adapter(tmp_path / "plain", seed=1)
    make_adapter(tmp_path / "dora", seed=2, dora=True)
    expect_cli_error(argv, capsys, matches=matches, watch=[tmp_path])
    assert not (tmp_path / "out").exists()


CONFIGS = [
    pytest.param(["--lora.dora=true", "--lora.targets=[word_embeddings,query]"],
                 r"dora applies to linear and convolution layers; 'bert\.embeddings\.word_embeddings' is an "
                 r"Embedding \(exclude it from the targets or set dora false\)", id="dora-on-embedding"),
    pytest.param(["--lora.dora=maybe"], r"lora\.dora must be (true or false|a bool)", id="dora-not-a-bool"),
]


@pytest.mark.parametrize("flags, matches", CONFIGS)
def test_bad_dora_config_is_one_error_line(flags: list[str], matches: str, tmp_path: Path, tiny_classifier_dir,
                                           sentiment_tsv, capsys) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run")
    expect_cli_error(["train", str(config), *flags, "--quiet"], capsys, matches=matches, watch=[tmp_path])
