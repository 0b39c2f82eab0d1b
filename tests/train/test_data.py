"""lorakit.train.data: readers and their errors, column mapping, batch order, padding."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA

from lorakit.errors import LorakitError
from lorakit.train.data import batch_indices, check_labels, chunks, map_columns, pad, read_records
from lorakit.train.readers import read_conll, read_squad

SHARED_DATA = SHARED_DATA
ROWS = [{"text": "good film", "label": 1}, {"text": "bad, dull film", "label": 0}]


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


# --- readers -----------------------------------------------------------------------------------------------------

def test_read_json_list(tmp_path: Path) -> None:
    assert read_records(write(tmp_path / "d.json", json.dumps(ROWS))) == ROWS


def test_read_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    text = json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n"
    assert read_records(write(tmp_path / "d.jsonl", text)) == ROWS


def test_json_suffix_holding_json_lines_is_read_as_jsonl(tmp_path: Path) -> None:
    text = "\n".join(json.dumps(r) for r in ROWS)
    assert read_records(write(tmp_path / "d.json", text)) == ROWS


def test_read_csv_with_quoted_comma(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", 'text,label\ngood film,1\n"bad, dull film",0\n')
    assert read_records(path) == [{"text": "good film", "label": "1"}, {"text": "bad, dull film", "label": "0"}]


def test_read_tsv_strips_bom_and_keeps_quotes(tmp_path: Path) -> None:
    path = write(tmp_path / "d.tsv", 'Quality\t#1 String\n1\t" quoted " start\n', encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_records(path) == [{"Quality": "1", "#1 String": '" quoted " start'}]


def test_format_argument_overrides_suffix(tmp_path: Path) -> None:
    path = write(tmp_path / "d.txt", "a\tb\n1\t2\n")
    assert read_records(path, format="tsv") == [{"a": "1", "b": "2"}]


def test_headerless_table_takes_column_names(tmp_path: Path) -> None:
    path = write(tmp_path / "d.tsv", "nice\tWorld\nplain\tSports\n")
    assert read_records(path, columns=["text", "label"])[1] == {"text": "plain", "label": "Sports"}


# --- reader errors -----------------------------------------------------------------------------------------------

def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(LorakitError, match="nope.jsonl not found"):
        read_records(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("name, fmt, message", [
    ("d.txt", None, "cannot tell the format of .*d.txt.*'.txt'.*json, jsonl, csv, tsv"),
    ("d.json", "parquet", "unknown data format 'parquet'.*use one of: json, jsonl"),
])
def test_unknown_format_lists_the_known_ones(tmp_path: Path, name: str, fmt: str | None, message: str) -> None:
    with pytest.raises(LorakitError, match=message):
        read_records(write(tmp_path / name, "[]"), format=fmt)


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", '{"a": 1}\n{"a": 2}\n{"a": 3,,}\n')
    with pytest.raises(LorakitError, match=r"d.jsonl line 3: malformed JSON"):
        read_records(path)


def test_malformed_json_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(LorakitError, match=r"d.json line 2: malformed JSON"):
        read_records(write(tmp_path / "d.json", '[{"a": 1},\n {"a" 2}]'))


def test_json_object_instead_of_list_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(LorakitError, match="JSON dict with keys data, version, expected a list"):
        read_records(write(tmp_path / "d.json", '{"data": [], "version": "1.1"}'))


def test_jsonl_line_that_is_not_an_object_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(LorakitError, match="line 2: expected a JSON object, got list"):
        read_records(write(tmp_path / "d.jsonl", '{"a": 1}\n[1, 2]\n'))


@pytest.mark.parametrize("name, text", [("d.json", "[]"), ("d.jsonl", "\n\n"), ("d.csv", "text,label\n")])
def test_empty_dataset_is_an_error(tmp_path: Path, name: str, text: str) -> None:
    with pytest.raises(LorakitError, match=f"{name} has no records"):
        read_records(write(tmp_path / name, text))


def test_row_with_wrong_field_count_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "d.tsv", "text\tlabel\ngood\t1\nbad\t0\textra\n")
    with pytest.raises(LorakitError, match=r"d.tsv line 3: 3 fields, but the header has 2"):
        read_records(path)


def test_saved_dataset_without_datasets_package_names_the_install(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(LorakitError, match="pip install datasets"):
        read_records(tmp_path)
    with pytest.raises(LorakitError, match="pip install datasets"):
        read_records("hf:stanfordnlp/sst2", split="validation")


# --- column mapping ----------------------------------------------------------------------------------------------

def test_map_columns_renames_and_keeps_other_columns() -> None:
    records = [{"sentence": "good", "label": "1"}]
    assert map_columns(records, {"text": "sentence"}, "d.tsv") == [{"label": "1", "text": "good"}]
    assert records == [{"sentence": "good", "label": "1"}]  # the input is not modified


def test_map_columns_unknown_column_names_the_available_ones() -> None:
    with pytest.raises(LorakitError, match=r"no column 'sentense' \(for 'text'\) in dev.tsv \(did you mean "
                                           r"'sentence'\?\); it has: sentence, label"):
        map_columns([{"sentence": "good", "label": "1"}], {"text": "sentense"}, "dev.tsv")


# --- batch order -------------------------------------------------------------------------------------------------

_rng = random.Random(0)
LENGTHS = [_rng.randint(1, 200) for _ in range(1003)]


def flat(batches: list[list[int]]) -> list[int]:
    return [i for batch in batches for i in batch]


def test_batch_indices_is_deterministic_per_seed_and_epoch() -> None:
    first = batch_indices(LENGTHS, 16, seed=3, epoch=1)
    assert first == batch_indices(LENGTHS, 16, seed=3, epoch=1)
    assert first != batch_indices(LENGTHS, 16, seed=3, epoch=2)
    assert first != batch_indices(LENGTHS, 16, seed=4, epoch=1)
    assert batch_indices(LENGTHS, 16, seed=1, epoch=0) != batch_indices(LENGTHS, 16, seed=0, epoch=1)


def test_batch_indices_leaves_global_rngs_alone() -> None:
    python_state, torch_state = random.getstate(), torch.get_rng_state()
    batch_indices(LENGTHS, 16, seed=0, epoch=0)
    assert random.getstate() == python_state and torch.equal(torch.get_rng_state(), torch_state)


@pytest.mark.parametrize("group, shuffle", [(True, True), (False, True), (True, False), (False, False)])
def test_batch_indices_covers_every_index_exactly_once(group: bool, shuffle: bool) -> None:
    batches = batch_indices(LENGTHS, 16, seed=0, epoch=0, group_by_length=group, shuffle=shuffle)
    assert sorted(flat(batches)) == list(range(len(LENGTHS)))
    assert all(len(b) == 16 for b in batches[:-1] if not shuffle)


def test_ranks_take_disjoint_equal_shares() -> None:
    shards = [batch_indices(LENGTHS[:960], 16, seed=0, epoch=0, rank=r, world_size=4) for r in range(4)]
    assert [len(s) for s in shards] == [15] * 4
    assert sorted(flat([b for s in shards for b in s])) == list(range(960))


def test_uneven_batches_are_repeated_so_ranks_get_equal_counts() -> None:
    shards = [batch_indices(LENGTHS, 16, seed=0, epoch=0, rank=r, world_size=3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1  # 63 batches -> 21 each
    assert set(flat([b for s in shards for b in s])) == set(range(len(LENGTHS)))


def test_drop_last_keeps_only_full_batches_in_equal_counts() -> None:
    shards = [batch_indices(LENGTHS, 16, seed=0, epoch=0, rank=r, world_size=4, drop_last=True) for r in range(4)]
    assert [len(s) for s in shards] == [15] * 4  # 62 full batches -> 60
    indices = flat([b for s in shards for b in s])
    assert all(len(b) == 16 for s in shards for b in s) and len(set(indices)) == len(indices)


def padding(batches: list[list[int]]) -> int:
    return sum(max(LENGTHS[i] for i in b) * len(b) - sum(LENGTHS[i] for i in b) for b in batches)


def test_grouping_by_length_reduces_padding() -> None:
    grouped = padding(batch_indices(LENGTHS, 16, seed=0, epoch=0, group_by_length=True))
    plain = padding(batch_indices(LENGTHS, 16, seed=0, epoch=0, group_by_length=False))
    assert grouped < plain / 5


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size must be a positive int, got 0"),
    ({"rank": 2, "world_size": 2}, r"rank must be an int in \[0, 2\), got 2"),
    ({"world_size": 0}, "world_size must be a positive int"),
    ({"batch_size": 2000, "drop_last": True}, "no full batch of 2000"),
])
def test_batch_indices_rejects_bad_arguments(kwargs: dict[str, int], message: str) -> None:
    options: dict = {"batch_size": 16, **kwargs}
    with pytest.raises(LorakitError, match=message):
        batch_indices(LENGTHS, options.pop("batch_size"), seed=0, epoch=0, **options)


# --- padding -----------------------------------------------------------------------------------------------------

def test_pad_right_and_left() -> None:
    assert pad([[1, 2, 3], [4]], 0).tolist() == [[1, 2, 3], [4, 0, 0]]
    assert pad([[1, 2, 3], [4]], -1, side="left").tolist() == [[1, 2, 3], [-1, -1, 4]]
    assert pad([[1], []], 7).dtype == torch.long


def test_pad_rejects_an_unknown_side() -> None:
    with pytest.raises(LorakitError, match="padding side must be 'right' or 'left', got 'middle'"):
        pad([[1]], 0, side="middle")


def test_chunks_keeps_order_and_remainder() -> None:
    assert chunks(list(range(5)), 2) == [[0, 1], [2, 3], [4]]


# --- real data ---------------------------------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("relative, rows, columns", [
    ("sst2/dev.tsv", 872, ["sentence", "label"]),
    ("mrpc/dev.tsv", 408, ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]),
])
def test_real_glue_dev_files_have_their_documented_rows(relative: str, rows: int, columns: list[str]) -> None:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} is absent")
    records = read_records(path)
    assert len(records) == rows
    assert list(records[0]) == columns  # the MRPC header's BOM is gone
    label = "label" if "label" in columns else "Quality"
    assert {r[label] for r in records} == {"0", "1"}


# --- encodings ---------------------------------------------------------------------------------------------------

LATIN1_TSV = "text\tlabel\ngood\t1\nun caf\xe9 tr\xe8s bon\t1\n"  # the first non-ASCII byte: offset 24, line 3


@pytest.mark.parametrize("encoding", ["latin-1", "cp1252", "utf-16", "utf-16-le", "utf-8", "utf-8-sig"])
def test_tsv_in_each_encoding_reads_the_same_records(tmp_path: Path, encoding: str) -> None:
    path = write(tmp_path / "d.tsv", LATIN1_TSV, encoding=encoding)
    assert read_records(path, encoding=encoding) == [{"text": "good", "label": "1"},
                                                     {"text": "un café très bon", "label": "1"}]


def test_default_encoding_drops_a_utf8_bom_and_counts_offsets_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "d.tsv"
    path.write_bytes(b"\xef\xbb\xbf" + LATIN1_TSV.encode("latin-1"))
    with pytest.raises(LorakitError, match=r"byte 0xe9 at byte offset 27 \(line 3\) is not valid utf-8"):
        read_records(path)


@pytest.mark.parametrize("name, text", [
    ("d.tsv", LATIN1_TSV),
    ("d.csv", LATIN1_TSV.replace("\t", ",")),
    ("d.jsonl", '{"text": "good"}\n{"text": "un caf\xe9"}\n'),
    ("d.json", '[{"text": "good"},\n {"text": "un caf\xe9"}]'),
    ("d.conll", "good O\n\nun O\ncaf\xe9 O\n"),
])
def test_latin1_file_read_as_utf8_names_offset_line_and_latin1(tmp_path: Path, name: str, text: str) -> None:
    path = write(tmp_path / name, text, encoding="latin-1")
    offset = path.read_bytes().index(b"\xe9")
    line = path.read_bytes()[:offset].count(b"\n") + 1
    with pytest.raises(LorakitError, match=rf"{name}: byte 0xe9 at byte offset {offset} \(line {line}\) is not valid "
                                           rf"utf-8; .*--data.encoding=latin-1"):
        read_records(path)


def test_utf16_file_read_as_utf8_suggests_utf16(tmp_path: Path) -> None:
    path = write(tmp_path / "d.tsv", LATIN1_TSV, encoding="utf-16")  # starts with the byte-order mark FF FE
    with pytest.raises(LorakitError, match=r"byte 0xff at byte offset 0 \(line 1\).*--data.encoding=utf-16"):
        read_records(path)


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_utf16_without_bom_is_caught_by_its_nul_bytes(tmp_path: Path, encoding: str) -> None:
    path = write(tmp_path / "d.tsv", "text\tlabel\ngood\t1\n", encoding="utf-16-le")  # ASCII: valid UTF-8 bytes
    with pytest.raises(LorakitError, match=r"NUL byte at byte offset 1 \(line 1\).*--data.encoding=utf-16"):
        read_records(path, encoding=encoding)


def test_unknown_encoding_is_named(tmp_path: Path) -> None:
    with pytest.raises(LorakitError, match="unknown encoding 'utf-9'"):
        read_records(write(tmp_path / "d.tsv", "a\n1\n"), encoding="utf-9")


def test_every_reader_takes_the_encoding(tmp_path: Path) -> None:
    conll = write(tmp_path / "d.conll", "caf\xe9 B-LOC\n", encoding="latin-1")
    assert read_conll(conll, encoding="latin-1") == [{"tokens": ["café"], "tags": ["B-LOC"]}]
    squad = {"data": [{"title": "t", "paragraphs": [{"context": "un café", "qas": [
        {"id": "q", "question": "quoi?", "answers": [{"text": "café", "answer_start": 3}]}]}]}]}
    path = write(tmp_path / "s.json", json.dumps(squad, ensure_ascii=False), encoding="latin-1")
    assert read_squad(path, encoding="latin-1")[0]["answers"]["text"] == ["café"]
    write(tmp_path / "p.de", "caf\xe9\n", encoding="latin-1")
    write(tmp_path / "p.en", "coffee\n", encoding="latin-1")
    records = read_records(f"{tmp_path}/p.{{de,en}}", format="parallel", encoding="latin-1")
    assert records[0]["instruction"].endswith("café") and records[0]["output"] == "coffee"


def test_jsonl_string_holding_a_unicode_line_separator_stays_one_record(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes('{"text": "a\u2028b"}\r\n{"text": "c\x85"}\n'.encode())
    assert read_records(path) == [{"text": "a\u2028b"}, {"text": "c\x85"}]


# --- labels, directories, CoNLL columns --------------------------------------------------------------------------

@pytest.mark.parametrize("name, text, where", [
    ("d.tsv", "text\tlabel\ngood\t1\n\nbad\t\n", "line 4"),
    ("d.csv", "text,label\ngood,1\nbad,  \n", "line 3"),
    ("d.jsonl", '{"text": "good", "label": 1}\n\n{"text": "bad", "label": ""}\n', "line 3"),
    ("d.jsonl", '{"text": "good", "label": 1}\n{"text": "bad", "label": null}\n', "line 2"),
    ("d.json", '[{"text": "good", "label": 1}, {"text": "bad", "label": " "}]', "item 1"),
])
def test_blank_label_names_file_and_line(tmp_path: Path, name: str, text: str, where: str) -> None:
    path = write(tmp_path / name, text)
    records = read_records(path)
    with pytest.raises(LorakitError, match=rf"{name} {where}: (empty|no) label in column 'label'"):
        check_labels(records, "classification", str(path))


def test_blank_label_names_the_mapped_column(tmp_path: Path) -> None:
    path = write(tmp_path / "d.tsv", "s\tQuality\ngood\t1\nbad\t\n")
    records = map_columns(read_records(path), {"label": "Quality"}, str(path))
    with pytest.raises(LorakitError, match=r"line 3: empty label in column 'Quality' \(data.columns label\)"):
        check_labels(records, "classification", str(path), columns={"label": "Quality"})


def test_blank_tag_names_the_line_of_the_sentence(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["b", "c"], "tags": ["O", ""]}\n')
    with pytest.raises(LorakitError, match=r"d.jsonl line 2: empty tag for word 1"):
        check_labels(read_records(path), "ner", str(path))


def test_check_labels_passes_good_records_and_other_tasks(tmp_path: Path) -> None:
    check_labels([{"label": "0"}, {"label": 1}], "classification", "x.tsv")
    check_labels([{"output": ""}], "instruction", "x.jsonl")  # an empty output is no label: instruction has none
    with pytest.raises(LorakitError, match="empty label"):  # the same check does fire on a blank label
        check_labels([{"label": "0"}, {"label": " "}], "classification", "x.tsv")


def test_conll_line_without_its_tag_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "d.conll", "EU B-ORG\nrejects O\n\nGerman\n")
    with pytest.raises(LorakitError, match=r"d.conll line 4: 1 column\(s\) \('German'\).*a missing tag"):
        read_conll(path)


def test_conll_line_with_fewer_columns_than_the_file_is_not_read_as_another_tag(tmp_path: Path) -> None:
    path = write(tmp_path / "d.conll", "EU NNP B-NP B-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP\n")
    with pytest.raises(LorakitError, match=r"d.conll line 3: 3 columns .*but line 1 has 4"):
        read_conll(path)


@pytest.mark.parametrize("fmt", ["conll", "squad", "tsv"])
def test_directory_given_as_a_file_is_named(tmp_path: Path, fmt: str) -> None:
    with pytest.raises(LorakitError, match=rf"{tmp_path} is a directory"):
        read_records(tmp_path, format=fmt)


def test_directory_given_to_a_reader_is_not_called_missing(tmp_path: Path) -> None:
    with pytest.raises(LorakitError, match=r"is a directory; give a file inside it"):
        read_conll(tmp_path)
