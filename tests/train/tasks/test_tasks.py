"""lorakit.train.tasks: sequence classification and the task registry (instruction tuning: test_instruction.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import approx
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerBase,
)

from lorakit import models
from lorakit.errors import LorakitError
from lorakit.train.tasks import TASKS, make_task, task_from_state, task_options
from lorakit.train.tasks.classification import SequenceClassification, macro_f1

SENTIMENT = [{"text": "a charming film", "label": "pos"}, {"text": "dull and long", "label": "neg"},
             {"text": "great fun", "label": "pos"}]


def load_minilm() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(models._bundled_dir("minilm", None))


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return load_minilm()


def tiny_classifier(vocab_size: int, num_labels: int) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


# --- classification ----------------------------------------------------------------------------------------------

def test_string_labels_are_fitted_sorted_from_training_records(tokenizer: PreTrainedTokenizerBase) -> None:
    task = SequenceClassification(tokenizer)
    features = task.encode(SENTIMENT)
    assert task.labels == ["neg", "pos"]
    assert [f["label"] for f in features] == [1, 0, 1]
    assert features[0]["input_ids"] == tokenizer("a charming film")["input_ids"]


def test_int_and_string_labels_are_the_same_label(tokenizer: PreTrainedTokenizerBase) -> None:
    task = SequenceClassification(tokenizer)
    train = task.encode([{"text": "a", "label": 10}, {"text": "b", "label": 2}, {"text": "c", "label": 2}])
    assert task.labels == ["2", "10"]  # integer labels sort numerically
    assert [f["label"] for f in train] == [1, 0, 0]
    assert [f["label"] for f in task.encode([{"text": "d", "label": "10"}])] == [1]


def test_label_outside_the_set_names_the_record_and_the_set(tokenizer: PreTrainedTokenizerBase) -> None:
    task = SequenceClassification(tokenizer, labels=["neg", "pos"])
    with pytest.raises(LorakitError, match=r"record 1: label 'neutral' is not in the label set \(neg, pos\)"):
        task.encode([{"text": "ok", "label": "pos"}, {"text": "meh", "label": "neutral"}])


def test_missing_text_field_names_the_record(tokenizer: PreTrainedTokenizerBase) -> None:
    task = SequenceClassification(tokenizer, text="sentence", labels=["0", "1"])
    with pytest.raises(LorakitError, match=r"record 0 has no 'sentence' field \(it has: text, label\)"):
        task.encode([{"text": "ok", "label": 1}])


def test_sentence_pair_encodes_both_texts_with_segment_ids(tokenizer: PreTrainedTokenizerBase) -> None:
    task = SequenceClassification(tokenizer, text="s1", text_pair="s2", label="Quality")
    records = [{"s1": "he left early", "s2": "he went home", "Quality": "1"},
               {"s1": "it rained", "s2": "the sun shone all day", "Quality": "0"}]
    features = task.encode(records)
    expected = tokenizer("he left early", "he went home")
    assert features[0]["input_ids"] == expected["input_ids"]
    assert features[0]["token_type_ids"] == expected["token_type_ids"] and 1 in expected["token_type_ids"]
    batch = task.collate(features)
    width = max(len(f["input_ids"]) for f in features)
    assert batch["input_ids"].shape == batch["token_type_ids"].shape == batch["attention_mask"].shape == (2, width)
    assert batch["attention_mask"].sum(1).tolist() == [len(f["input_ids"]) for f in features]
    assert batch["labels"].tolist() == [1, 0]


def test_max_length_truncates(tokenizer: PreTrainedTokenizerBase) -> None:
    task = SequenceClassification(tokenizer, max_length=4, labels=["0", "1"])
    assert len(task.encode([{"text": "one two three four five six", "label": 0}])[0]["input_ids"]) == 4


def test_classification_loss_and_evaluate_match_a_manual_computation(tokenizer: PreTrainedTokenizerBase) -> None:
    task = SequenceClassification(tokenizer)
    features = task.encode(SENTIMENT)
    model = tiny_classifier(tokenizer.vocab_size, 2)
    batch = task.collate(features)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"]).logits
    torch.testing.assert_close(task.loss(model, batch), F.cross_entropy(logits, batch["labels"]))
    predictions = logits.argmax(-1).tolist()
    metrics = task.evaluate(model.train(), features, batch_size=2)
    assert model.training  # evaluate restores the mode it found
    assert metrics["accuracy"] == approx(sum(p == t for p, t in zip(predictions, [1, 0, 1], strict=True)) / 3)
    assert metrics["macro_f1"] == approx(macro_f1(predictions, [1, 0, 1]))
    assert metrics["loss"] == approx(F.cross_entropy(logits, batch["labels"]).item(), "fp32 summed in another order")


def test_macro_f1_matches_hand_computed_values() -> None:
    # class 0: TP 1, FP 1, FN 1 -> 0.5; class 1: TP 1, FP 0, FN 1 -> 2/3; class 2: TP 0, FP 1, FN 0 -> 0
    assert macro_f1([0, 0, 1, 2], [0, 1, 1, 0]) == approx((0.5 + 2 / 3 + 0.0) / 3)
    assert macro_f1([1, 1], [1, 1]) == 1.0


def test_head_modules_finds_bert_classifier_and_llama_score(tokenizer: PreTrainedTokenizerBase) -> None:
    task = SequenceClassification(tokenizer, labels=["a", "b", "c"])
    assert task.head_modules(tiny_classifier(64, 3)) == ["classifier"]
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=3, pad_token_id=0)
    assert task.head_modules(LlamaForSequenceClassification(config)) == ["score"]


def test_head_modules_falls_back_to_a_top_level_linear_with_num_labels_outputs(
        tokenizer: PreTrainedTokenizerBase) -> None:
    model = torch.nn.Sequential()
    model.add_module("body", torch.nn.Linear(8, 8))
    model.add_module("out", torch.nn.Linear(8, 3))
    assert SequenceClassification(tokenizer, labels=["a", "b", "c"]).head_modules(model) == ["out"]


def test_head_with_the_wrong_label_count_is_an_error(tokenizer: PreTrainedTokenizerBase) -> None:
    task = SequenceClassification(tokenizer, labels=["a", "b"])
    with pytest.raises(LorakitError, match="has 3 outputs but the task has 2 labels.*num_labels=2"):
        task.head_modules(tiny_classifier(64, 3))


def test_classification_state_round_trips(tokenizer: PreTrainedTokenizerBase) -> None:
    task = SequenceClassification(tokenizer, text="s1", text_pair="s2", max_length=64)
    task.fit_labels([{"label": "x"}, {"label": "y"}])
    rebuilt = task_from_state(tokenizer, task.state())
    assert isinstance(rebuilt, SequenceClassification) and rebuilt.state() == task.state()
    assert rebuilt.state()["labels"] == ["x", "y"]


# --- registry ----------------------------------------------------------------------------------------------------

def test_make_task_builds_each_registered_task(tokenizer: PreTrainedTokenizerBase) -> None:
    assert {"classification", "instruction", "ner", "qa", "translation", "image-classification"} <= set(TASKS)
    task = make_task("classification", tokenizer, text="sentence", labels=["0", "1"])
    assert (task.name, task.metric, task.greater_is_better) == ("classification", "accuracy", True)
    task = make_task("instruction", tokenizer, max_length=64)
    assert (task.name, task.metric, task.greater_is_better) == ("instruction", "loss", False)
    assert task.head_modules(torch.nn.Linear(1, 1)) == []
    assert "system" in task_options("instruction")
    assert type(make_task("translation", tokenizer)) is type(task)  # parallel text is instruction tuning


def test_unknown_task_suggests_a_known_one(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(LorakitError, match=r"unknown task 'clasification' \(did you mean 'classification' or "
                                           r"'image-classification'\?\); "
                                           r"known tasks: classification, instruction"):
        make_task("clasification", tokenizer)


def test_unknown_task_option_lists_the_options(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(LorakitError, match=r"unknown option 'max_len' for task 'instruction' \(did you mean "
                                           r"'max_length'\?\); it takes: instruction, input, output"):
        make_task("instruction", tokenizer, max_len=64)


@pytest.mark.parametrize("bad", ["", "  ", None])
def test_empty_or_null_label_names_the_record_instead_of_becoming_a_class(tokenizer: PreTrainedTokenizerBase,
                                                                         bad: str | None) -> None:
    records = [{"text": "a", "label": "0"}, {"text": "b", "label": "1"}, {"text": "c", "label": bad}]
    with pytest.raises(LorakitError, match=r"record 2: empty label in field 'label'"):
        SequenceClassification(tokenizer).fit_labels(records)


def test_labels_with_surrounding_spaces_are_the_same_label(tokenizer: PreTrainedTokenizerBase) -> None:
    records = [{"text": "a", "label": "1 "}, {"text": "b", "label": " 0"}, {"text": "c", "label": 1}]
    assert SequenceClassification(tokenizer).fit_labels(records) == ["0", "1"]
