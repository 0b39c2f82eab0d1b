"""lorakit.train.config_doc: the listing of every config key, and docs/config.md generated from it."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import REPO_ROOT

from lorakit.cli import main
from lorakit.train.config_doc import config_help, config_markdown, key_docs
from lorakit.train.sections import SECTION_TYPES


@pytest.mark.parametrize("section", list(SECTION_TYPES))
def test_every_key_has_its_own_docstring_entry(section):
    _, docs = key_docs(SECTION_TYPES[section])
    fields = [f.name for f in dataclasses.fields(SECTION_TYPES[section])]
    assert [name for name in fields if not docs.get(name)] == []
    assert set(docs) <= set(fields), set(docs) - set(fields)  # no entry for a key that does not exist


def test_help_lists_type_default_allowed_values_and_meaning():
    text = config_help()
    assert '  optim.lr (a number; default 0.0002; > 0)\n      the peak learning rate.' in text
    assert '  data.train_limit (an int or null; default null; >= 1)' in text
    assert '  run.method (a string; default "lora"; one of lora, head-only, full, factors)' in text
    assert '  lora.targets (a list of strings; default ["all-linear"])' in text
    keys = [line.split()[0] for line in text.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    expected = [f"{s}.{f.name}" for s, cls in SECTION_TYPES.items() for f in dataclasses.fields(cls)]
    assert keys == expected


def test_key_docs_reads_shared_and_continued_entries():
    class Example:
        """Summary line.

        a, b: shared
            continued.
        c / d: other.
        not an entry because the line above ended nothing
        """

    summary, docs = key_docs(Example)
    assert summary == "Summary line."
    assert docs == {"a": "shared continued.", "b": "shared continued.",
                    "c": "other. not an entry because the line above ended nothing",
                    "d": "other. not an entry because the line above ended nothing"}


def test_docs_config_md_is_current():
    page = (REPO_ROOT / "docs" / "config.md").read_text()
    assert page == config_markdown(), ("docs/config.md is stale; regenerate it with: python -c \"from "
                                       "lorakit.train.config_doc import config_markdown as m; print(m(), end='')\" "
                                       "> docs/config.md")


def test_cli_help_config_prints_the_listing_without_a_config(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help-config"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == config_help()
