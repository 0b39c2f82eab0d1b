"""Bad data files through `lorakit train`: each is exit code 2 and one error line naming the file, the byte or
line (or record) and the fix; no traceback, and the data files and the run's files unchanged."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import expect_cli_error, write_config

LATIN1 = "sentence\tlabel\na fine film\t1\nun caf\xe9 tr\xe8s bon\t1\na dull film\t0\n"
CONLL = "EU B-ORG\nrejects O\n\nGerman B-MISC\ncall O\n"
SQUAD = {"data": [{"title": "t", "paragraphs": [{"context": "un caf\xe9", "qas": [
    {"id": "q", "question": "quoi?", "answers": [{"text": "caf\xe9", "answer_start": 3}]}]}]}]}


def data_file(name: str, content: str | bytes, encoding: str = "utf-8", **sections: dict
              ) -> Callable[[Path, Path, Path, Path], tuple[list[str], str]]:
    """A case whose training file is `name` holding `content` (written in `encoding`), with config `sections`."""
    def setup(tmp: Path, model: Path, train: Path, dev: Path) -> tuple[list[str], str]:
        path = tmp / "data" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode(encoding))
        evaluation = dev if sections.get("data", {}).get("task", "classification") == "classification" else path
        config = write_config(tmp / "c.yaml", model, path, evaluation, tmp / "run", **sections)
        return [str(config)], str(path)
    return setup


NER = {"data": {"task": "ner", "format": "conll", "columns": {}}}
NER_JSONL = {"data": {"task": "ner", "columns": {}}}
QA = {"data": {"task": "qa", "format": "squad", "columns": {}}}


def _ner_json(tags: list[str]) -> str:
    return (json.dumps({"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]}) + "\n"
            + json.dumps({"tokens": ["German", "call"], "tags": tags}) + "\n")


CASES = [
    pytest.param(data_file("train.tsv", LATIN1, "latin-1"),
                 r"train\.tsv: byte 0xe9 at byte offset 35 \(line 3\) is not valid utf-8; .*--data\.encoding=latin-1",
                 id="latin1-tsv"),
    pytest.param(data_file("train.csv", LATIN1.replace("\t", ","), "latin-1"),
                 r"train\.csv: byte 0xe9 at byte offset 35 \(line 3\).*--data\.encoding=latin-1", id="latin1-csv"),
    pytest.param(data_file("train.jsonl", '{"sentence": "un caf\xe9", "label": 1}\n', "latin-1"),
                 r"train\.jsonl: byte 0xe9 at byte offset 20 \(line 1\).*--data\.encoding=latin-1",
                 id="latin1-jsonl"),
    pytest.param(data_file("train.conll", CONLL.replace("German", "Fran\xe7ais"), "latin-1", **NER),
                 r"train\.conll: byte 0xe7 at byte offset 24 \(line 4\).*--data\.encoding=latin-1",
                 id="latin1-conll"),
    pytest.param(data_file("train.json", json.dumps(SQUAD, ensure_ascii=False), "latin-1", **QA),
                 r"train\.json: byte 0xe9 at byte offset \d+ \(line 1\).*--data\.encoding=latin-1", id="latin1-squad"),
    pytest.param(data_file("train.tsv", LATIN1, "utf-16"),
                 r"train\.tsv: byte 0xff at byte offset 0 \(line 1\).*--data\.encoding=utf-16", id="utf16-tsv"),
    pytest.param(data_file("train.tsv", LATIN1.replace("\xe9", "e").replace("\xe8", "e"), "utf-16-le"),
                 r"train\.tsv: NUL byte at byte offset 1 \(line 1\).*--data\.encoding=utf-16", id="utf16-no-bom-tsv"),
    pytest.param(data_file("train.tsv", LATIN1, "utf-16", data={"encoding": "latin-1"}),
                 r"NUL byte at byte offset 3 .*read as latin-1.*--data\.encoding=utf-16", id="utf16-read-as-latin1"),
    pytest.param(data_file("train.tsv", "sentence\tlabel\na fine film\t1\n\na dull film\t\n"),
                 r"train\.tsv line 4: empty label in column 'label'", id="empty-label-tsv"),
    pytest.param(data_file("train.csv", "sentence,label\na fine film,1\na dull film,  \n"),
                 r"train\.csv line 3: empty label in column 'label'", id="blank-label-csv"),
    pytest.param(data_file("train.jsonl", '{"sentence": "fine", "label": 1}\n{"sentence": "dull", "label": ""}\n'),
                 r"train\.jsonl line 2: empty label", id="empty-label-jsonl"),
    pytest.param(data_file("train.jsonl", '{"sentence": "fine", "label": 1}\n{"sentence": "dull", "label": null}\n'),
                 r"train\.jsonl line 2: no label", id="null-label-jsonl"),
    pytest.param(data_file("train.tsv", "s\tQuality\na fine film\t1\na dull film\t\n",
                           data={"columns": {"text": "s", "label": "Quality"}}),
                 r"line 3: empty label in column 'Quality' \(data\.columns label\)", id="empty-label-mapped-column"),
    pytest.param(data_file("train.conll", CONLL + "\nBerlin\n", **NER),
                 r"train\.conll line 7: 1 column\(s\) \('Berlin'\).*a missing tag", id="conll-missing-tag"),
    pytest.param(data_file("train.conll", "EU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nGerman JJ B-NP\n", **NER),
                 r"train\.conll line 4: 3 columns .*but line 1 has 4", id="conll-shifted-tag"),
    pytest.param(data_file("train.jsonl", _ner_json(["B-MISC", " "]), **NER_JSONL),
                 r"train\.jsonl line 2: empty tag for word 1", id="empty-tag-jsonl"),
    pytest.param(data_file("train.tsv", "sentence\tlabel\na fine film\t1\tx\n"),
                 r"train\.tsv line 2: 3 fields, but the header has 2", id="extra-field"),
    pytest.param(data_file("train.jsonl", '{"sentence": "fine", "label": 1}\n{"sentence": \n'),
                 r"train\.jsonl line 2: malformed JSON", id="malformed-jsonl"),
    pytest.param(lambda tmp, model, train, dev: ([str(write_config(tmp / "c.yaml", model, tmp / "none.tsv", dev,
                                                                   tmp / "run"))], str(dev)),
                 r"data file .*none\.tsv not found", id="missing-data-file"),
    pytest.param(lambda tmp, model, train, dev: ([str(write_config(tmp / "c.yaml", model, tmp, dev, tmp / "run",
                                                                   data={"format": "tsv"}))], str(dev)),
                 r"is a directory, not a tsv file; give the file inside it", id="directory-as-tsv"),
    pytest.param(lambda tmp, model, train, dev: ([str(write_config(tmp / "c.yaml", model, tmp, tmp, tmp / "run",
                                                                   **NER))], str(dev)),
                 r"is a directory, not a conll file", id="directory-as-conll"),
]


@pytest.mark.parametrize("setup, message", CASES)
def test_bad_data_is_one_error_line(setup, message: str, tmp_path, tiny_classifier_dir, sentiment_tsv,
                                    capsys) -> None:
    argv, data = setup(tmp_path, tiny_classifier_dir, *sentiment_tsv)
    expect_cli_error(["train", *argv, "--quiet"], capsys, matches=message, watch=[tmp_path, Path(data)])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without read permission")
def test_unreadable_data_file_is_one_error_line(tmp_path, tiny_classifier_dir, sentiment_tsv, capsys) -> None:
    train, dev = sentiment_tsv
    train.chmod(0o200)
    try:
        config = write_config(tmp_path / "c.yaml", tiny_classifier_dir, train, dev, tmp_path / "run")
        expect_cli_error(["train", str(config), "--quiet"], capsys, matches=r"cannot read data file .*train\.tsv",
                         watch=[tmp_path / "c.yaml"])
    finally:
        train.chmod(0o600)


def test_encoding_flag_reads_the_latin1_file(tmp_path, tiny_classifier_dir, sentiment_tsv) -> None:
    """The fix the error suggests works: the same file trains past reading with --data.encoding=latin-1."""
    from lorakit.train.config import load_train_config
    from lorakit.train.data import read_records

    argv, path = data_file("train.tsv", LATIN1, "latin-1")(tmp_path, tiny_classifier_dir, *sentiment_tsv)
    config = load_train_config(argv[0], ["--data.encoding=latin-1"])
    assert read_records(config.data.train, encoding=config.data.encoding)[1]["sentence"] == "un café très bon"
