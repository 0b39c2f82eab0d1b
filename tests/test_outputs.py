"""Output directories: new or empty ones are claimed and marked; anything else is refused, changing nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import snapshot

from lorakit.outputs import MARK_NAME, OutputExistsError, claim_output_dir, output_kind


def test_a_new_directory_is_created_and_marked_with_its_kind(tmp_path: Path) -> None:
    assert claim_output_dir(tmp_path / "a" / "b", kind="merged model") is False
    assert output_kind(tmp_path / "a" / "b") == "merged model"


def test_an_empty_directory_is_claimed(tmp_path: Path) -> None:
    assert claim_output_dir(tmp_path, kind="demo") is False
    assert (tmp_path / MARK_NAME).is_file()


def test_a_directory_of_other_files_is_refused_even_with_force(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("years of work")
    before = snapshot(tmp_path)
    with pytest.raises(OutputExistsError, match=r"files lorakit did not write \(thesis.tex\)"):
        claim_output_dir(tmp_path, kind="merged model", force=True)
    assert snapshot(tmp_path) == before


def test_an_earlier_output_of_the_same_kind_needs_force(tmp_path: Path) -> None:
    claim_output_dir(tmp_path, kind="train run")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(OutputExistsError, match="earlier lorakit train run; pass --force"):
        claim_output_dir(tmp_path, kind="train run")
    assert claim_output_dir(tmp_path, kind="train run", force=True) is True


def test_an_output_of_another_kind_is_not_replaced(tmp_path: Path) -> None:
    claim_output_dir(tmp_path, kind="train run")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(OutputExistsError, match="already holds an earlier lorakit train run; choose"):
        claim_output_dir(tmp_path, kind="merged model", force=True)


@pytest.mark.parametrize("relation", ["same", "inside", "contains"])
def test_an_output_overlapping_an_input_is_refused(tmp_path: Path, relation: str) -> None:
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    out = {"same": adapter, "inside": adapter / "merged", "contains": tmp_path / "run"}[relation]
    with pytest.raises(OutputExistsError, match="overlaps the input"):
        claim_output_dir(out, kind="merged model", inputs=[adapter])
    assert not (adapter / "merged").exists() and not (adapter / MARK_NAME).exists()


def test_a_model_name_that_is_not_a_path_is_no_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert claim_output_dir(tmp_path / "smollm2-merged", kind="merged model", inputs=["smollm2"]) is False
