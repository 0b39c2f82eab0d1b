"""Bad chat data for `lorakit train` (messages and ShareGPT layouts): exit 2, one line naming the file and the
record, no file changed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import expect_cli_error
from transformers import LlamaConfig, LlamaForCausalLM

GOOD = {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]}
CASES: dict[str, tuple[dict[str, Any], str]] = {
    "unknown role": ({"messages": [{"role": "user", "content": "Hi."}, {"role": "bot", "content": "Hello."}]},
                     r"record 2 turn 1: unknown role 'bot'"),
    "mixed layouts": ({**GOOD, "conversations": []}, r"record 2 mixes layouts"),
    "two layouts in one file": ({"conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Yo."}]},
                                r"record 2 is in the sharegpt layout but record 0 is in the messages layout"),
    "empty conversation": ({"messages": []}, r"record 2: the conversation is empty"),
    "no assistant turn": ({"messages": [{"role": "user", "content": "Hi."}]}, r"record 2 has no assistant turn"),
    "roles out of order": ({"messages": [{"role": "assistant", "content": "Hi."}]},
                           r"record 2 turn 0: a assistant turn where a user turn belongs"),
}


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory: pytest.TempPathFactory, minilm_tokenizer: Any) -> Path:
    """A tiny random Llama whose tokenizer has a chat template, saved as a local model directory."""
    path = tmp_path_factory.mktemp("tiny-chat-model")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(minilm_tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(path)
    minilm_tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    try:
        minilm_tokenizer.save_pretrained(path)
    finally:
        minilm_tokenizer.chat_template = None
    return path


@pytest.mark.parametrize("record, matches", CASES.values(), ids=CASES.keys())
def test_bad_chat_record(record: dict[str, Any], matches: str, tmp_path: Path, tiny_chat_model: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (GOOD, GOOD, record)))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_chat_model)},
        "data": {"task": "instruction", "train": str(data), "eval_fraction": 0.5},
        "run": {"out_dir": str(tmp_path / "out"), "device": "cpu"}}))
    expect_cli_error(["train", config], capsys, matches=f"{data} {matches}", watch=[tmp_path])
