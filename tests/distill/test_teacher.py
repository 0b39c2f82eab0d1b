"""lorakit.distill.teacher: loading a teacher (a model directory, an adapter, a base + adapter) frozen, and the
checks that refuse a teacher that cannot teach the student."""

from __future__ import annotations

import pytest
from conftest import write_config
from distill_models import save_causal_dir, save_classifier_dir, tiny_causal, word_tokenizer

from lorakit.distill import check_teacher, check_teacher_source, load_teacher
from lorakit.errors import LorakitError
from lorakit.models import load_model
from lorakit.train.config import load_train_config
from lorakit.train.run import train_from_config


def test_a_model_directory_loads_frozen_in_eval_mode_with_its_labels(tmp_path, minilm_tokenizer):
    teacher = load_teacher(str(save_classifier_dir(tmp_path / "t", minilm_tokenizer, ["neg", "pos"])))
    assert teacher.kind == "classification" and teacher.labels == ["neg", "pos"]
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_an_adapter_alone_and_its_base_plus_the_adapter_are_the_same_teacher(tmp_path, tiny_classifier_dir,
                                                                            sentiment_tsv):
    config = write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run",
                          optim={"max_steps": 2})
    adapter = train_from_config(load_train_config(config)).adapter_dir
    alone = load_teacher(adapter)
    on_base = load_teacher(str(tiny_classifier_dir), adapter=adapter)
    assert alone.kind == on_base.kind == "classification" and alone.labels == on_base.labels == ["0", "1"]
    assert alone.fingerprint() == on_base.fingerprint()
    assert not any(p.requires_grad for p in on_base.model.parameters())


def test_a_teacher_of_another_vocabulary_is_refused(tmp_path, minilm_tokenizer):
    teacher = load_teacher(str(save_classifier_dir(tmp_path / "t", word_tokenizer(), ["0", "1"])))
    student, _ = load_model(str(save_classifier_dir(tmp_path / "s", minilm_tokenizer, ["0", "1"])))
    with pytest.raises(LorakitError, match=r"has a vocabulary of 19 tokens, the student 30,522.*student's tokenizer"):
        check_teacher(teacher, student, minilm_tokenizer, kind="classification", labels=["0", "1"])


@pytest.mark.parametrize("teacher_labels", [["0", "1", "2"], ["1", "0"], ["neg", "pos"]])
def test_a_teacher_of_another_label_set_or_order_is_refused(teacher_labels, tmp_path):
    tokenizer = word_tokenizer()
    teacher = load_teacher(str(save_classifier_dir(tmp_path / "t", tokenizer, teacher_labels)))
    student, _ = load_model(str(save_classifier_dir(tmp_path / "s", tokenizer, ["0", "1"])))
    with pytest.raises(LorakitError, match=r"has labels \[.*\], the student's task \['0', '1'\]; the label sets must "
                                           r"be the same, in the same order"):
        check_teacher(teacher, student, tokenizer, kind="classification", labels=["0", "1"])


def test_a_causal_teacher_of_another_head_size_or_kind_is_refused(tmp_path):
    tokenizer = word_tokenizer()
    teacher = load_teacher(str(save_causal_dir(tmp_path / "t", seed=1, tokenizer=tokenizer)))
    check_teacher(teacher, tiny_causal(len(tokenizer), 0), tokenizer, kind="causal-lm")  # fits
    with pytest.raises(LorakitError, match=r"predicts 19 tokens, the student 32"):
        check_teacher(teacher, tiny_causal(32, 0), tokenizer, kind="causal-lm")
    with pytest.raises(LorakitError, match=r"is a causal-lm model, the student a classification model"):
        check_teacher(teacher, tiny_causal(19, 0), tokenizer, kind="classification", labels=["0", "1"])


def test_a_teacher_or_adapter_that_does_not_exist_is_refused_before_loading(tmp_path):
    with pytest.raises(LorakitError, match=r"teacher '.*nowhere' does not exist"):
        check_teacher_source(str(tmp_path / "nowhere"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(LorakitError, match=r"is a file, not a directory"):
        check_teacher_source(str(tmp_path / "file"))
    with pytest.raises(LorakitError, match=r"teacher adapter '.*gone' does not exist"):
        check_teacher_source("minilm", str(tmp_path / "gone"))
