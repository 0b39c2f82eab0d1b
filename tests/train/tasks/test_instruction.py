"""lorakit.train.tasks.instruction and .conversation: Alpaca, OpenAI messages and ShareGPT records, the loss on
assistant turns only, and a short training run on chat data."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import REPO_ROOT, approx, assert_close
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from lorakit import models
from lorakit.errors import LorakitError
from lorakit.train.config import load_train_config
from lorakit.train.data import read_records
from lorakit.train.run import load_data, prepare, train_from_config
from lorakit.train.tasks.conversation import detect_layout
from lorakit.train.tasks.instruction import IGNORE, InstructionTuning

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
ALPACA = [{"instruction": "Name a colour.", "input": "", "output": "Blue is a colour."},
          {"instruction": "Add the numbers.", "input": "2 and 3", "output": "Five."}]
# One conversation with a system turn and two exchanges, as (role, text): the source of both layouts below.
TURNS = [("system", "Answer briefly."), ("user", "Name a colour."), ("assistant", "Blue."),
         ("user", "Another one?"), ("assistant", "Green, like grass.")]
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}
EXAMPLE = REPO_ROOT / "recipes" / "data" / "chat-example.jsonl"


def messages_record(turns: list[tuple[str, str]]) -> dict[str, Any]:
    return {"messages": [{"role": role, "content": text} for role, text in turns]}


def sharegpt_record(turns: list[tuple[str, str]]) -> dict[str, Any]:
    return {"conversations": [{"from": SHAREGPT_ROLE[role], "value": text} for role, text in turns]}


def load_minilm() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(models._bundled_dir("minilm", None))


@pytest.fixture(scope="module")
def chat_tokenizer() -> PreTrainedTokenizerBase:
    """The MiniLM tokenizer with four turn markers and a minimal chat template."""
    tok = load_minilm()
    tok.add_tokens(["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def plain_tokenizer() -> PreTrainedTokenizerBase:
    """The MiniLM tokenizer (no chat template) with [CLS] as BOS and [SEP] as EOS, for the plain layout."""
    tok = load_minilm()
    tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"
    return tok


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(models.smollm2_dir()))


def tiny_causal_lm(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    return LlamaForCausalLM(config).eval()


def response_ids(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def expected_from_pieces(tok: PreTrainedTokenizerBase, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """(ids, labels) built piece by piece: each text tokenized alone, labels IGNORE unless the piece is learned."""
    ids: list[int] = []
    labels: list[int] = []
    for text, learned in pieces:
        piece = response_ids(tok, text)
        ids += piece
        labels += piece if learned else [IGNORE] * len(piece)
    return ids, labels


def supervised_runs(feature: dict[str, Any]) -> list[list[int]]:
    """The runs of consecutive supervised positions' token ids, in order."""
    runs: list[list[int]] = []
    previous = IGNORE
    for token, label in zip(feature["input_ids"], feature["labels"], strict=True):
        if label != IGNORE:
            assert label == token
            if previous == IGNORE:
                runs.append([])
            runs[-1].append(token)
        previous = label
    return runs


# --- Alpaca records ----------------------------------------------------------------------------------------------

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


def test_instruction_without_chat_template_uses_the_plain_layout(plain_tokenizer: PreTrainedTokenizerBase) -> None:
    task = InstructionTuning(plain_tokenizer)
    assert not task.uses_chat_template
    feature = task.encode(ALPACA[:1])[0]
    bos, eos = plain_tokenizer.bos_token_id, plain_tokenizer.eos_token_id
    prompt = [bos, *response_ids(plain_tokenizer, "### Instruction:\nName a colour.\n\n### Response:\n")]
    assert feature["labels"] == [IGNORE] * len(prompt) + response_ids(plain_tokenizer, "Blue is a colour.") + [eos]
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
        with pytest.raises(LorakitError, match="record 0 turn 1: the chat template's prompt does not tokenize as a "
                                               "prefix.*user turn begins 'Name a colour.'"):
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
    assert_close(loss, torch.stack(losses).sum() / count, "fp32 summed in another order")
    metrics = task.evaluate(model, features, batch_size=1)
    assert metrics["loss"] == approx(loss.item(), "fp32 summed in another order")
    assert metrics["perplexity"] == approx(math.exp(loss.item()), "fp32 summed in another order")


def test_instruction_loss_has_gradients(chat_tokenizer: PreTrainedTokenizerBase) -> None:
    task = InstructionTuning(chat_tokenizer)
    model = tiny_causal_lm(len(chat_tokenizer)).train()
    task.loss(model, task.collate(task.encode(ALPACA))).backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.integration
def test_smollm2_chat_template_masks_the_prompt(smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    tok = smollm2_tokenizer
    task = InstructionTuning(tok)
    feature = task.encode(ALPACA[1:])[0]
    start = len(task.prompt_ids(ALPACA[1]))
    assert feature["labels"][:start] == [IGNORE] * start
    assert tok.decode(feature["input_ids"][start:]) == "Five.<|im_end|>\n"
    assert tok.decode(feature["input_ids"][:start]).endswith("2 and 3<|im_end|>\n<|im_start|>assistant\n")


# --- conversations: messages and ShareGPT -------------------------------------------------------------------------

def test_labels_are_ignore_exactly_outside_assistant_turns(chat_tokenizer: PreTrainedTokenizerBase) -> None:
    feature = InstructionTuning(chat_tokenizer).encode([messages_record(TURNS)])[0]
    expected = expected_from_pieces(chat_tokenizer, [
        ("<|system|>Answer briefly.<|end|><|user|>Name a colour.<|end|><|assistant|>", False),
        ("Blue.<|end|>", True),
        ("<|user|>Another one?<|end|><|assistant|>", False),
        ("Green, like grass.<|end|>", True)])
    assert (feature["input_ids"], feature["labels"]) == expected


@pytest.mark.integration
def test_smollm2_labels_are_ignore_exactly_outside_assistant_turns(
        smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    tok = smollm2_tokenizer
    conversations = [messages_record(TURNS), messages_record(TURNS[1:])]  # the second gets the template's system
    for record, feature in zip(conversations, InstructionTuning(tok).encode(conversations), strict=True):
        assert tok.decode(feature["input_ids"]) == tok.apply_chat_template(record["messages"], tokenize=False)
        assert [tok.decode(run) for run in supervised_runs(feature)] == [
            "Blue.<|im_end|>\n", "Green, like grass.<|im_end|>\n"]
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(feature["input_ids"])


def test_plain_layout_learns_each_reply_and_its_eos(plain_tokenizer: PreTrainedTokenizerBase) -> None:
    feature = InstructionTuning(plain_tokenizer).encode([messages_record(TURNS)])[0]
    ids, labels = expected_from_pieces(plain_tokenizer, [
        ("Answer briefly.\n\n### Instruction:\nName a colour.\n\n### Response:\n", False), ("Blue.", True),
        ("[SEP]", True), ("### Instruction:\nAnother one?\n\n### Response:\n", False),
        ("Green, like grass.", True), ("[SEP]", True)])
    assert feature["input_ids"] == [plain_tokenizer.bos_token_id, *ids]
    assert feature["labels"] == [IGNORE, *labels]


@pytest.mark.parametrize("tokenizer_name", ["chat_tokenizer", "plain_tokenizer"])
def test_system_prompt_is_in_the_input_but_never_in_the_loss(tokenizer_name: str,
                                                             request: pytest.FixtureRequest) -> None:
    tok: PreTrainedTokenizerBase = request.getfixturevalue(tokenizer_name)
    system = response_ids(tok, "Pirate voice only")  # no token of it is in any reply
    feature = InstructionTuning(tok).encode([messages_record([("system", "Pirate voice only"), *TURNS[1:]])])[0]
    ids, labels = feature["input_ids"], feature["labels"]
    at = next(i for i in range(len(ids)) if ids[i:i + len(system)] == system)
    assert labels[at:at + len(system)] == [IGNORE] * len(system)
    assert all(token not in system for token, label in zip(ids, labels, strict=True) if label != IGNORE)


def test_task_system_goes_first_only_where_a_conversation_has_none(chat_tokenizer: PreTrainedTokenizerBase) -> None:
    task = InstructionTuning(chat_tokenizer, system="Be kind.")
    own, bare = task.encode([messages_record(TURNS), messages_record(TURNS[1:])])
    assert own == InstructionTuning(chat_tokenizer).encode([messages_record(TURNS)])[0]
    assert chat_tokenizer.decode(bare["input_ids"]).startswith("<|system|> be kind. <|end|> <|user|> name")


@pytest.mark.parametrize("tokenizer_name", ["chat_tokenizer", "plain_tokenizer"])
def test_sharegpt_and_messages_give_identical_features(tokenizer_name: str, request: pytest.FixtureRequest) -> None:
    task = InstructionTuning(request.getfixturevalue(tokenizer_name))
    both = [TURNS, TURNS[1:3]]
    messages = task.encode([messages_record(turns) for turns in both])
    assert messages == task.encode([sharegpt_record(turns) for turns in both])
    assert all(label != IGNORE for label in messages[1]["labels"][-2:])


def test_alpaca_and_its_single_turn_conversation_give_identical_features(
        chat_tokenizer: PreTrainedTokenizerBase) -> None:
    task = InstructionTuning(chat_tokenizer)
    turns = [("user", "Add the numbers.\n\n2 and 3"), ("assistant", "Five.")]
    assert task.encode(ALPACA[1:]) == task.encode([messages_record(turns)])


def test_prompt_ids_of_a_conversation_end_where_the_last_reply_starts(
        chat_tokenizer: PreTrainedTokenizerBase) -> None:
    task = InstructionTuning(chat_tokenizer)
    prompt = task.prompt_ids(messages_record(TURNS))
    assert chat_tokenizer.decode(prompt).endswith("another one? <|end|> <|assistant|>")
    assert prompt == chat_tokenizer.apply_chat_template([{"role": r, "content": t} for r, t in TURNS[:4]],
                                                        add_generation_prompt=True, tokenize=True,
                                                        return_dict=False)


def test_columns_mapping_renames_a_messages_column(tmp_path: Path, chat_tokenizer: PreTrainedTokenizerBase) -> None:
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"dialog": messages_record(TURNS)["messages"]}) + "\n")
    config = load_train_config(_write(tmp_path, {"data": {"task": "instruction", "train": str(data),
                                                          "columns": {"messages": "dialog"}}}))
    task = InstructionTuning(chat_tokenizer)
    train, _ = load_data(config, task)
    assert task.encode(train) == task.encode([messages_record(TURNS)])


def test_template_that_renders_earlier_replies_differently_names_the_conversation(
        chat_tokenizer: PreTrainedTokenizerBase) -> None:
    task = InstructionTuning(chat_tokenizer)
    original = chat_tokenizer.chat_template
    # Like templates that drop the reasoning of earlier replies: a reply is shortened once another turn follows.
    chat_tokenizer.chat_template = original.replace(
        "{{ m['content'] }}", "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}"
                              "{% endif %}")
    try:
        with pytest.raises(LorakitError, match="record 1 turn 2: the chat template's prompt does not tokenize as "
                                               "a prefix.*user turn begins 'Name a colour.'"):
            task.encode([messages_record(TURNS[1:3]), messages_record(TURNS)])
    finally:
        chat_tokenizer.chat_template = original


GOOD = messages_record(TURNS)
MALFORMED = {
    "mixes messages and conversations": (
        [GOOD, {**messages_record(TURNS), **sharegpt_record(TURNS)}],
        r"record 1 mixes layouts: it has 'messages' \(messages layout\) and 'conversations' \(sharegpt layout\)"),
    "mixes messages and alpaca fields": (
        [GOOD, {**messages_record(TURNS), "instruction": "x"}],
        r"record 1 mixes layouts: it has 'instruction' \(alpaca layout\) and 'messages'"),
    "a file of two layouts": (
        [GOOD, sharegpt_record(TURNS)],
        r"record 1 is in the sharegpt layout but record 0 is in the messages layout"),
    "unknown role": (
        [GOOD, messages_record([("user", "hi"), ("tool", "42")])],
        r"record 1 turn 1: unknown role 'tool'; the messages layout's 'role' is one of: system, user, assistant"),
    "unknown sharegpt role": (
        [sharegpt_record(TURNS), {"conversations": [{"from": "user", "value": "hi"}]}],
        r"record 1 turn 0: unknown role 'user'; the sharegpt layout's 'from' is one of: system, human, gpt"),
    "empty conversation": ([GOOD, {"messages": []}], r"record 1: the conversation is empty"),
    "no assistant turn": ([GOOD, messages_record(TURNS[:2])], r"record 1 has no assistant turn"),
    "assistant first": (
        [GOOD, messages_record([("assistant", "hello"), ("user", "hi"), ("assistant", "yes")])],
        r"record 1 turn 0: a assistant turn where a user turn belongs"),
    "two user turns in a row": (
        [GOOD, messages_record([("user", "hi"), ("user", "again"), ("assistant", "yes")])],
        r"record 1 turn 1: a user turn where a assistant turn belongs"),
    "system turn in the middle": (
        [GOOD, messages_record([*TURNS[1:3], ("system", "late"), *TURNS[3:]])],
        r"record 1 turn 2: a system turn where a user turn belongs"),
    "sharegpt roles out of order": (
        [sharegpt_record(TURNS), sharegpt_record([("assistant", "hello"), ("user", "hi")])],
        r"record 1 turn 0: a gpt turn where a human turn belongs"),
    "ends with a user turn": (
        [GOOD, messages_record([*TURNS, ("user", "and?")])], r"record 1 ends with a user turn that has no reply"),
    "turn without content": (
        [GOOD, {"messages": [{"role": "user"}]}],
        r"record 1 turn 0: expected an object with 'role' and 'content', got keys role"),
    "sharegpt turns written role/content": (
        [sharegpt_record(TURNS), {"conversations": messages_record(TURNS)["messages"]}],
        r"record 1 turn 0: expected an object with 'from' and 'value'.*map the column to 'messages'"),
    "content not text": (
        [GOOD, messages_record([("user", "hi"), ("assistant", None)])],  # type: ignore[list-item]
        r"record 1 turn 1: 'content' must be text, got NoneType"),
    "messages not a list": ([GOOD, {"messages": "hi"}], r"record 1: 'messages' must be a list of turns, got str"),
    "record without the file's layout": (
        [GOOD, {"text": "hi"}], r"record 1 has no 'messages' field \(it has: text\)"),
}


@pytest.mark.parametrize("records, message", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_record_is_an_error_naming_it(records: list[dict[str, Any]], message: str,
                                                chat_tokenizer: PreTrainedTokenizerBase) -> None:
    task = InstructionTuning(chat_tokenizer)
    with pytest.raises(LorakitError, match=message):
        task.encode(records)
    with pytest.raises(LorakitError, match=r"^data/chat\.jsonl " + message):
        task.check_records(records, "data/chat.jsonl")


def test_training_names_the_file_and_the_record_before_any_shuffle(tmp_path: Path) -> None:
    data = tmp_path / "chat.jsonl"
    lines = [json.dumps(GOOD)] * 5 + [json.dumps(messages_record(TURNS[:2]))]
    data.write_text("\n".join(lines) + "\n")
    config = load_train_config(_write(tmp_path, {"data": {"task": "instruction", "train": str(data),
                                                          "eval_fraction": 0.5}}))
    with pytest.raises(LorakitError, match=f"^{data} record 5 has no assistant turn"):
        load_data(config, InstructionTuning(load_minilm()))


# --- a short run --------------------------------------------------------------------------------------------------

def _write(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def tiny_chat_llama_dir(tmp_path_factory: pytest.TempPathFactory, chat_tokenizer: PreTrainedTokenizerBase) -> Path:
    """A tiny random Llama with the chat tokenizer (template and turn markers) saved as a local model."""
    path = tmp_path_factory.mktemp("tiny-chat-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(chat_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.5)  # logits wide enough for adapters to move them
    LlamaForCausalLM(config).save_pretrained(path)
    chat_tokenizer.save_pretrained(path)
    return path


def test_chat_recipe_trains_on_the_example_conversations() -> None:
    config = load_train_config(REPO_ROOT / "recipes" / "chat-smollm2.yaml")
    assert (config.data.task, REPO_ROOT / config.data.train) == ("instruction", EXAMPLE)
    records = read_records(EXAMPLE)
    assert detect_layout(records, ("instruction", "output")) == "messages"
    roles = [[turn["role"] for turn in record["messages"]] for record in records]
    assert any(r[0] == "system" for r in roles) and any(r[0] == "user" for r in roles)
    assert sum(r.count("assistant") > 1 for r in roles) >= len(records) // 2  # mostly multi-turn


def test_training_on_messages_data_runs_and_the_loss_falls(tmp_path: Path, tiny_chat_llama_dir: Path) -> None:
    out_dir = tmp_path / "run"
    config = load_train_config(_write(tmp_path, {
        "model": {"name": str(tiny_chat_llama_dir)},
        "data": {"task": "instruction", "train": str(EXAMPLE), "max_length": 128},
        "lora": {"rank": 4, "alpha": 8, "targets": ["llama"]},
        "optim": {"lr": 5e-2, "batch_size": 16, "max_steps": 8, "warmup_steps": 0, "schedule": "constant"},
        "run": {"out_dir": str(out_dir), "log_every": 1, "seed": 0, "device": "cpu"}}))
    summary = train_from_config(config)
    losses = [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert summary.steps == len(losses) == 8
    assert losses[-1] < 0.9 * losses[0], losses  # one batch of every conversation: the same data each step
    assert json.loads((Path(summary.adapter_dir) / "task.json").read_text())["task"] == "instruction"


@pytest.mark.parametrize("fused", [True, False])
def test_training_fuses_the_gated_mlps_unless_told_not_to(tmp_path: Path, tiny_chat_llama_dir: Path,
                                                          fused: bool) -> None:
    config = load_train_config(_write(tmp_path, {
        "model": {"name": str(tiny_chat_llama_dir)},
        "data": {"task": "instruction", "train": str(EXAMPLE), "max_length": 64},
        "lora": {"rank": 4, "alpha": 8, "targets": ["llama"]},
        "run": {"out_dir": str(tmp_path / "run"), "device": "cpu", "fused_swiglu": fused}}))
    model = prepare(config).model
    mlps = [m for n, m in model.named_modules() if n.endswith(".mlp")]
    assert len(mlps) == 2 and all(("forward" in vars(m)) == fused for m in mlps)
