"""Bad `distill` sections through `lorakit train`: each is exit code 2 and one error line naming the problem and the
fix; nothing is written (no run directory, no cache, every existing file unchanged)."""

from __future__ import annotations

import pytest
import torch
from conftest import expect_cli_error, write_config
from distill.distill_models import save_causal_dir, save_classifier_dir, word_tokenizer  # tests/distill/

from lorakit.distill import data_fingerprint, load_teacher, write_cache

CONFIG_CASES = [
    pytest.param(["--distill.teacher=minilm", "--distill.alpha=1.5"],
                 r"flag --distill\.alpha=1\.5: distill\.alpha must be in \[0, 1\], got 1\.5", id="alpha-above-1"),
    pytest.param(["--distill.teacher=minilm", "--distill.alpha=-0.1"],
                 r"distill\.alpha must be in \[0, 1\], got -0\.1", id="alpha-negative"),
    pytest.param(["--distill.teacher=minilm", "--distill.temperature=0"],
                 r"distill\.temperature must be > 0, got 0", id="temperature-zero"),
    pytest.param(["--distill.teacher=minilm", "--distill.temperature=-2"],
                 r"distill\.temperature must be > 0, got -2", id="temperature-negative"),
    pytest.param(["--distill.teacher_adapter=runs/x/adapter"],
                 r"distill\.teacher_adapter is applied on distill\.teacher, which is not set", id="adapter-no-teacher"),
    pytest.param(["--distill.teacher=minilm", "--data.task=ner"],
                 r"distillation supports data\.task classification, instruction, translation, got data\.task='ner'",
                 id="unsupported-task"),
    pytest.param(["--distill.teacher=runs/no-such-run/model"],
                 r"distill: teacher 'runs/no-such-run/model' does not exist", id="teacher-missing"),
    pytest.param(["--distill.teacher=minilm", "--distill.teacher_adapter=runs/no-such-run/adapter"],
                 r"distill: teacher adapter 'runs/no-such-run/adapter' does not exist", id="teacher-adapter-missing"),
]


@pytest.mark.parametrize("flags, message", CONFIG_CASES)
def test_bad_distill_config_is_one_error_line(flags, message, tmp_path, tiny_classifier_dir, sentiment_tsv, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run")
    expect_cli_error(["train", str(config), *flags, "--quiet"], capsys, matches=message, watch=[tmp_path])
    assert not (tmp_path / "run").exists()


def _other_vocabulary(tmp_path, tokenizer):
    return save_classifier_dir(tmp_path / "teacher", word_tokenizer(), ["0", "1"]), []


def _other_labels(tmp_path, tokenizer):
    return save_classifier_dir(tmp_path / "teacher", tokenizer, ["neg", "pos"]), []


def _causal_teacher(tmp_path, tokenizer):
    return save_causal_dir(tmp_path / "teacher", 1, tokenizer), []


def _stale_teacher(tmp_path, tokenizer):
    teacher = save_classifier_dir(tmp_path / "teacher", tokenizer, ["0", "1"])
    cache = tmp_path / "old.safetensors"
    write_cache(cache, torch.zeros(48, 2), None, data="0" * 64, teacher="1" * 64, kind="classification",
                teacher_name="an-older-teacher")
    return teacher, ["--distill.cache=true", f"--distill.cache_path={cache}"]


def _stale_data(tmp_path, tokenizer):
    teacher = save_classifier_dir(tmp_path / "teacher", tokenizer, ["0", "1"])
    cache = tmp_path / "old.safetensors"
    write_cache(cache, torch.zeros(47, 2), None, data=data_fingerprint([{"input_ids": [1]}]),
                teacher=load_teacher(str(teacher)).fingerprint(), kind="classification")
    return teacher, ["--distill.cache=true", f"--distill.cache_path={cache}"]


TEACHER_CASES = [
    pytest.param(_other_vocabulary, r"^error: distill: teacher .* has a vocabulary of 19 tokens, the student 30,522, "
                                    r"and they differ.*must use the student's tokenizer", id="other-vocabulary"),
    pytest.param(_other_labels, r"^error: distill: teacher .* has labels \['neg', 'pos'\], the student's task "
                                r"\['0', '1'\]; the label sets must be the same", id="other-labels"),
    pytest.param(_causal_teacher, r"^error: distill: teacher .* is a causal-lm model, the student a classification "
                                  r"model", id="causal-teacher-for-classifier"),
    pytest.param(_stale_teacher, r"^error: distill: teacher-logit cache .*old\.safetensors is stale: it was built from "
                                 r"another teacher \(an-older-teacher.*delete it", id="stale-cache-teacher"),
    pytest.param(_stale_data, r"^error: distill: teacher-logit cache .*old\.safetensors is stale: it was built from "
                              r"other training data", id="stale-cache-data"),
]


@pytest.mark.parametrize("make, message", TEACHER_CASES)
def test_a_teacher_that_cannot_teach_the_student_is_one_error_line(make, message, tmp_path, tiny_classifier_dir,
                                                                    sentiment_tsv, minilm_tokenizer, capsys):
    teacher, flags = make(tmp_path, minilm_tokenizer)
    config = write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run")
    expect_cli_error(["train", str(config), f"--distill.teacher={teacher}", *flags, "--quiet"], capsys,
                     matches=message, watch=[tmp_path])
    assert not (tmp_path / "run").exists()
