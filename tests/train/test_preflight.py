"""lorakit.train.preflight: run.out_dir and data.max_length are checked before any model loads or data is
encoded."""

from __future__ import annotations

import os
import types

import pytest
from transformers import BertConfig, GPT2Config, LlamaConfig, RobertaConfig

from lorakit.errors import LorakitError
from lorakit.train.preflight import check_max_length, check_output_dir


def test_new_and_existing_output_dirs_pass_and_nothing_is_left_behind(tmp_path):
    check_output_dir(tmp_path / "runs" / "a")
    check_output_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_output_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(LorakitError, match=r"run.out_dir .*out is a file, not a directory"):
        check_output_dir(tmp_path / "out")


def test_output_dir_under_a_file_names_the_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(LorakitError, match=rf"cannot be created: {tmp_path}/f is a file"):
        check_output_dir(tmp_path / "f" / "runs" / "a")


def test_output_dir_where_no_file_can_be_created_is_not_writable():
    with pytest.raises(LorakitError, match=r"run.out_dir /proc/lorakit-check/out is not writable \(/proc: "):
        check_output_dir("/proc/lorakit-check/out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_parent_is_not_writable(tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        with pytest.raises(LorakitError, match="is not writable"):
            check_output_dir(tmp_path / "ro" / "run")
    finally:
        (tmp_path / "ro").chmod(0o700)


@pytest.mark.parametrize("config, limit", [
    (BertConfig(max_position_embeddings=64), 64),
    (GPT2Config(n_positions=32), 32),
    (RobertaConfig(max_position_embeddings=514), 512),  # positions start after the padding index
    (LlamaConfig(max_position_embeddings=128), 128),
])
def test_max_length_up_to_the_model_positions_passes_and_above_is_named(config, limit):
    check_max_length(limit, config, "m")
    with pytest.raises(LorakitError, match=rf"data.max_length={limit + 1} is more than the {limit} positions of m "
                                           rf"\(max_position_embeddings\); set --data.max_length={limit} or less"):
        check_max_length(limit + 1, config, "m")


def test_config_without_positions_is_not_checked():
    check_max_length(10**6, object())  # nothing to compare with: no error
    with pytest.raises(LorakitError, match="max_position_embeddings"):  # while a config with positions is checked
        check_max_length(10**6, types.SimpleNamespace(max_position_embeddings=512, model_type="bert"))
