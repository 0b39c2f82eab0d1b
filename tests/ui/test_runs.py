"""lorakit.ui.runs on run directories the page did not start: their row from config.json and metrics.jsonl, and
the sweep tables and analysis figures found under the runs directory."""

from __future__ import annotations

import json

import pytest
from ui_helpers import make_workdir, page_settings

from lorakit.ui.launcher import Launcher
from lorakit.ui.runs import run_names, run_row, sweeps, thin


@pytest.fixture
def workdir(tmp_path, tiny_classifier_dir, monkeypatch):
    monkeypatch.chdir(make_workdir(tmp_path / "work", tiny_classifier_dir))
    return tmp_path / "work"


@pytest.fixture
def settings(workdir):
    return page_settings(workdir)


def write_run(settings, name: str, task: str, rows: list[dict], **lora) -> None:
    out = settings.runs_dir / name
    (out / "adapter").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"data": {"task": task}, "model": {"name": "minilm"},
                                                 "lora": {"rank": 8, **lora}, "run": {"method": "lora"}}))
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')


def test_a_run_from_the_cli_shows_its_tasks_metric_from_its_last_evaluation(settings):
    write_run(settings, "ner", "ner", [{"step": 1, "loss": 2.0, "elapsed_s": 1.0},
                                       {"step": 2, "eval_precision": 0.1, "eval_f1": 0.5},
                                       {"step": 2, "loss": 1.0, "elapsed_s": 2.0}])
    row = run_row(settings, Launcher(settings), "ner")
    assert (row["status"], row["task"], row["rank"], row["metric"], row["value"]) == ("finished", "ner", 8, "f1", 0.5)
    assert (row["step"], row["loss"], row["seconds"]) == (2, 1.0, 2.0)  # the half-written last line is skipped


def test_the_method_column_names_dora_and_principal_runs_as_the_results_table_does(settings):
    write_run(settings, "plain", "ner", [])
    write_run(settings, "dora", "ner", [], dora=True)
    write_run(settings, "pissa", "ner", [], init="principal")
    methods = [run_row(settings, Launcher(settings), name)["method"] for name in ("plain", "dora", "pissa")]
    assert methods == ["lora", "dora", "lora-principal"]


def test_the_page_lists_run_directories_but_not_its_own_records_or_other_folders(settings):
    write_run(settings, "a", "classification", [])
    (settings.runs_dir / "notes").mkdir()
    (settings.runs_dir / ".lorakit-ui" / "b").mkdir(parents=True)
    assert run_names(settings) == ["a"]


def test_sweep_tables_and_analysis_figures_under_the_runs_directory_are_found(settings):
    sweep = settings.runs_dir / "sst2" / "sweep"
    sweep.mkdir(parents=True)
    (sweep / "sweep.md").write_text("| rank | accuracy |\n")
    (sweep / "pareto.png").write_bytes(b"png")
    found = sweeps(settings)
    assert found == [{"kind": "sweep", "dir": "runs/sst2/sweep", "text": "| rank | accuracy |\n",
                      "figures": ["runs/sst2/sweep/pareto.png"]}]


def test_a_long_curve_is_thinned_evenly_and_keeps_its_last_point():
    rows = [{"step": i} for i in range(1, 10_002)]
    kept = thin(rows, most=1000)
    assert len(kept) <= 1001 and kept[0]["step"] == 1 and kept[-1]["step"] == 10_001
    assert thin(rows[:5], most=1000) == rows[:5]
