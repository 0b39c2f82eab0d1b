"""lorakit.train.results: the results file and the page rendered from it."""

from __future__ import annotations

import json

from lorakit.train.results import record_result, render_markdown, train_record


def _summary(value: float) -> dict:
    return {"task": "classification", "model": "minilm", "method": "lora", "metric": "accuracy", "value": value,
            "trainable_params": 10, "total_params": 1000, "steps": 5, "train_seconds": 1.0}


def test_a_recorded_config_relative_data_path_is_shown_plainly(tmp_path):
    path = tmp_path / "results.json"
    record_result(train_record(_summary(0.5), "recipes/../../shared/data/sst2/train.tsv", "lorakit train x.yaml"), path)
    record_result({**_summary(0.6), "data": "recipes/../../shared/data/sst2/dev.tsv", "command": "lorakit eval"}, path)
    entries = json.loads(path.read_text())
    assert [e["data"] for e in entries] == ["../shared/data/sst2/train.tsv", "../shared/data/sst2/dev.tsv"]
    assert entries[0]["trainable_pct"] == 1.0


def test_rows_and_their_commands_share_a_number_and_a_repeated_note_is_shown_once(tmp_path):
    path = tmp_path / "results.json"
    for rank, value in ((1, 0.7), (8, 0.8)):
        record_result(train_record(_summary(value), "train.tsv", f"lorakit train x.yaml --lora.rank={rank}",
                                   "rank sweep"), path)
    page = path.with_suffix(".md").read_text()
    assert "| 1 | classification | train.tsv | minilm | lora | accuracy | 0.7000 |" in page
    assert "| 2 | classification | train.tsv | minilm | lora | accuracy | 0.8000 |" in page
    assert "1. lora: `lorakit train x.yaml --lora.rank=1`" in page
    assert "2. lora: `lorakit train x.yaml --lora.rank=8`" in page
    assert page.count("rank sweep") == 1 and "Note (1-2): rank sweep" in page
    assert page == render_markdown(json.loads(path.read_text()))


def test_a_note_names_its_rows_as_ranges():
    entries = [{**_summary(0.5), "command": f"c{i}", "note": "a" if i in (0, 1, 2, 4) else None} for i in range(5)]
    assert "Note (1-3, 5): a" in render_markdown(entries)


def test_records_written_at_the_same_time_are_all_kept(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "results.json"

    def record(writer: int) -> None:
        for i in range(15):
            record_result({**_summary(0.5), "command": f"writer {writer} row {i}"}, path)

    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(record, range(6)))
    commands = [e["command"] for e in json.loads(path.read_text())]
    assert sorted(commands) == sorted(f"writer {w} row {i}" for w in range(6) for i in range(15))
