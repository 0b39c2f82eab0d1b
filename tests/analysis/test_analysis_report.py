"""`write_report` and the figures: the files it writes and links, the numbers in analysis.json, and the output
directory rules (nothing written when refused; an earlier analysis replaced only with force, stale figures gone)."""

from __future__ import annotations

import copy
import json
import re

import pytest
from conftest import snapshot
from tiny_adapters import adapter, tiny_causal_lm_dir

from lorakit.analysis import analyze_adapter, write_report
from lorakit.analysis.plots import PLOTS
from lorakit.analysis.report import render_markdown
from lorakit.outputs import MARK_NAME, OutputExistsError

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def analyses(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyses")
    base = tiny_causal_lm_dir(root / "base")
    first, second = adapter(root / "a", str(base)), adapter(root / "b", str(base), seed=3)
    return {"full": analyze_adapter(first), "pair": analyze_adapter(first, against=second, base=False)}


def test_the_report_links_every_figure_it_writes_and_the_json(tmp_path, analyses):
    report = write_report(analyses["full"], tmp_path / "out")
    files = {p.name for p in report.parent.iterdir()}
    assert files == {"report.md", "analysis.json", MARK_NAME, "ranks.png", "spectra.png", "amplification.png"}
    text = report.read_text()
    links = set(re.findall(r"\]\(([^)]+)\)", text))
    assert links == files - {"report.md", MARK_NAME}
    for name in files - {"report.md", "analysis.json", MARK_NAME}:
        assert (tmp_path / "out" / name).read_bytes().startswith(PNG)
    assert "§7.3" in text and "strongest token is at the + end" in text


def test_the_json_file_holds_the_analysis_numbers(tmp_path, analyses):
    write_report(analyses["full"], tmp_path / "out")
    data = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert data == json.loads(json.dumps(analyses["full"].as_json()))
    assert data["summary"]["modules"] == len(data["modules"]) == 14


def test_a_pair_adds_the_similarity_figures_and_section(tmp_path, analyses):
    report = write_report(analyses["pair"], tmp_path / "out")
    names = {p.name for p in report.parent.glob("*.png")}
    assert names == {"ranks.png", "spectra.png", "similarity.png", "similarity_grid.png"}
    assert "Subspace similarity" in report.read_text()


def test_force_replaces_an_earlier_analysis_and_removes_its_stale_figures(tmp_path, analyses):
    write_report(analyses["pair"], tmp_path / "out")
    with pytest.raises(OutputExistsError, match="earlier lorakit analysis; pass --force"):
        write_report(analyses["full"], tmp_path / "out")
    write_report(analyses["full"], tmp_path / "out", force=True)
    assert not (tmp_path / "out" / "similarity.png").exists()
    assert (tmp_path / "out" / "amplification.png").exists()


def test_a_directory_of_other_files_is_refused_and_left_as_it_was(tmp_path, analyses):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path / "out")
    with pytest.raises(OutputExistsError, match="files lorakit did not write"):
        write_report(analyses["full"], tmp_path / "out", force=True)
    assert snapshot(tmp_path / "out") == before


def test_the_output_may_not_lie_inside_the_adapter(analyses):
    adapter_dir = analyses["full"].adapter
    with pytest.raises(OutputExistsError, match="overlaps the input"):
        write_report(analyses["full"], f"{adapter_dir}/analysis")


def test_figures_without_their_numbers_are_not_drawn(analyses):
    pair = analyses["pair"]  # no base: no amplification
    assert PLOTS["amplification.png"](pair) is None
    assert PLOTS["similarity.png"](analyses["full"]) is None


def test_token_cells_escape_table_characters(analyses):
    analysis = copy.deepcopy(analyses["full"])
    assert analysis.tokens
    analysis.tokens[0].plus[0] = "a|b`c\n"
    text = render_markdown(analysis, [])
    assert "`a\\|b'c\\n`" in text
