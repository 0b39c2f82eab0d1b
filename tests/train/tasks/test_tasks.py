"""lorakit.train.tasks: sequence classification, instruction tuning, and the task registry."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerBase,
)

from lorakit import models
from lorakit.errors import LorakitError
from lorakit.train.tasks import TASKS, make_task, task_from_state, task_options
from lorakit.train.tasks.classification import SequenceClassification, macro_f1
from lorakit.train.tasks.instruction import IGNORE, InstructionTuning

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SENTIMENT = [{"text": "a charming film", "label": "pos"}, {"text": "dull and long", "label": "neg"},
             {"text": "great fun", "label": "pos"}]
ALPACA = [{"instruction": "Name a colour.", "input": "", "output": "Blue is a colour."},
          {"instruction": "Add the numbers.", "input": "2 and 3", "output": "Five."}]


def load_minilm() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(models._bundled_dir("minilm", None))


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return load_minilm()


@pytest.fixture(scope="module")
def chat_tokenizer() -> PreTrainedTokenizerBase:
    """The MiniLM tokenizer with four turn markers and a minimal chat template."""
    tok = load_minilm()
    tok.add_tokens(["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_classifier(vocab_size: int, num_labels: int) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def tiny_causal_lm(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    return LlamaForCausalLM(config).eval()


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
    assert metrics["accuracy"] == pytest.approx(sum(p == t for p, t in zip(predictions, [1, 0, 1], strict=True)) / 3)
    assert metrics["macro_f1"] == pytest.approx(macro_f1(predictions, [1, 0, 1]))
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, batch["labels"]).item(), rel=1e-5)


def test_macro_f1_matches_hand_computed_values() -> None:
    # class 0: TP 1, FP 1, FN 1 -> 0.5; class 1: TP 1, FP 0, FN 1 -> 2/3; class 2: TP 0, FP 1, FN 0 -> 0
    assert macro_f1([0, 0, 1, 2], [0, 1, 1, 0]) == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)
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


# --- instruction tuning ------------------------------------------------------------------------------------------

def response_ids(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_instruction_labels_mask_exactly_the_prompt(chat_tokenizer: PreTrainedTokenizerBase) -> None:
    task = InstructionTuning(chat_tokenizer)
    features = task.encode(ALPACA)
    end = chat_tokenizer.convert_tokens_to_ids("<|end|>")
    for record, feature in zip(ALPACA, features, strict=True):
        prompt = task.prompt_ids(record)
        ids, labels = feature["input_ids"], feature["labels"]
        assert ids[:len(prompt)] == prompt
        assert labels[:len(prompt)] == [IGNORE] * len(prompt)
        assert labels[len(prompt):] == ids[len(prompt):] == response_ids(chat_tokenizer, record["output"]) + [end]
    assert chat_tokenizer.decode(features[1]["input_ids"][:len(task.prompt_ids(ALPACA[1]))]) == (
        "<|user|> add the numbers. 2 and 3 <|end|> <|assistant|>")  # input joined after a blank line


def test_instruction_system_message_goes_first(chat_tokenizer: PreTrainedTokenizerBase) -> None:
    task = InstructionTuning(chat_tokenizer, system="Be brief.")
    assert chat_tokenizer.convert_ids_to_tokens(task.prompt_ids(ALPACA[0]))[:3] == ["<|system|>", "be", "brief"]


def test_instruction_without_chat_template_uses_the_plain_layout(tokenizer: PreTrainedTokenizerBase) -> None:
    task = InstructionTuning(tokenizer)
    assert not task.uses_chat_template
    feature = task.encode(ALPACA[:1])[0]
    prompt = response_ids(tokenizer, "### Instruction:\nName a colour.\n\n### Response:\n")
    assert feature["labels"] == [IGNORE] * len(prompt) + response_ids(tokenizer, "Blue is a colour.")
    assert feature["input_ids"][:len(prompt)] == prompt == task.prompt_ids(ALPACA[0])


def test_truncation_keeps_response_tokens_and_skips_prompts_that_fill_max_length(
        chat_tokenizer: PreTrainedTokenizerBase, caplog: pytest.LogCaptureFixture) -> None:
    prompt_length = len(InstructionTuning(chat_tokenizer).prompt_ids(ALPACA[0]))
    task = InstructionTuning(chat_tokenizer, max_length=prompt_length + 1)
    long_prompt = {"instruction": "word " * 50, "input": "", "output": "ok"}
    with caplog.at_level(logging.WARNING):
        features = task.encode([ALPACA[0], long_prompt])
    assert len(features) == 1 and len(features[0]["input_ids"]) == prompt_length + 1
    assert features[0]["labels"][-1] != IGNORE
    assert "skipped 1 of 2 records" in caplog.text and "record 1" in caplog.text
    with pytest.raises(LorakitError, match="every record's prompt is"):
        task.encode([long_prompt])


def test_template_whose_prompt_is_not_a_prefix_is_an_error(chat_tokenizer: PreTrainedTokenizerBase) -> None:
    task = InstructionTuning(chat_tokenizer)
    original = chat_tokenizer.chat_template
    chat_tokenizer.chat_template = original.replace("<|assistant|>{% endif %}", "<|system|>{% endif %}")
    try:
        with pytest.raises(LorakitError, match="record 0: the chat template's prompt does not tokenize as a prefix"):
            task.encode(ALPACA[:1])
    finally:
        chat_tokenizer.chat_template = original


def test_instruction_record_missing_output_names_the_record(chat_tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(LorakitError, match=r"record 1 has no 'output' field \(it has: instruction, response\)"):
        InstructionTuning(chat_tokenizer).encode([ALPACA[0], {"instruction": "x", "response": "y"}])


def test_instruction_loss_is_the_mean_over_all_response_tokens(chat_tokenizer: PreTrainedTokenizerBase) -> None:
    task = InstructionTuning(chat_tokenizer)
    features = task.encode(ALPACA)
    model = tiny_causal_lm(len(chat_tokenizer))
    batch = task.collate(features)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
    with torch.no_grad():
        loss = task.loss(model, batch)
        losses, count = [], 0
        for feature in features:  # one example at a time, no padding, summed then divided once
            ids, labels = torch.tensor([feature["input_ids"]]), torch.tensor(feature["labels"])
            logits = model(input_ids=ids).logits[0, :-1]
            keep = labels[1:] != IGNORE
            losses.append(F.cross_entropy(logits[keep], labels[1:][keep], reduction="sum"))
            count += int(keep.sum())
    torch.testing.assert_close(loss, torch.stack(losses).sum() / count, rtol=1e-5, atol=1e-6)
    metrics = task.evaluate(model, features, batch_size=1)
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_instruction_loss_has_gradients(chat_tokenizer: PreTrainedTokenizerBase) -> None:
    task = InstructionTuning(chat_tokenizer)
    model = tiny_causal_lm(len(chat_tokenizer)).train()
    task.loss(model, task.collate(task.encode(ALPACA))).backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.integration
def test_smollm2_chat_template_masks_the_prompt() -> None:
    tok = AutoTokenizer.from_pretrained(str(models.smollm2_dir()))
    task = InstructionTuning(tok)
    feature = task.encode(ALPACA[1:])[0]
    start = len(task.prompt_ids(ALPACA[1]))
    assert feature["labels"][:start] == [IGNORE] * start
    assert tok.decode(feature["input_ids"][start:]) == "Five.<|im_end|>\n"
    assert tok.decode(feature["input_ids"][:start]).endswith("2 and 3<|im_end|>\n<|im_start|>assistant\n")


# --- registry ----------------------------------------------------------------------------------------------------

def test_make_task_builds_each_registered_task(chat_tokenizer: PreTrainedTokenizerBase) -> None:
    assert set(TASKS) == {"classification", "instruction", "ner", "qa"}
    task = make_task("classification", chat_tokenizer, text="sentence", labels=["0", "1"])
    assert (task.name, task.metric, task.greater_is_better) == ("classification", "accuracy", True)
    task = make_task("instruction", chat_tokenizer, max_length=64)
    assert (task.name, task.metric, task.greater_is_better) == ("instruction", "loss", False)
    assert task.head_modules(torch.nn.Linear(1, 1)) == []
    assert "system" in task_options("instruction")


def test_unknown_task_suggests_a_known_one(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(LorakitError, match=r"unknown task 'clasification' \(did you mean 'classification'\?\); "
                                           r"known tasks: classification, instruction"):
        make_task("clasification", tokenizer)


def test_unknown_task_option_lists_the_options(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(LorakitError, match=r"unknown option 'max_len' for task 'instruction' \(did you mean "
                                           r"'max_length'\?\); it takes: instruction, input, output"):
        make_task("instruction", tokenizer, max_len=64)
