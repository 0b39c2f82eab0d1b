"""Factorised models on disk: save -> load_model is bit-exact with the recorded ranks; export_dense gives a plain
transformers checkpoint with the factorised model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_close, tiny_bert, tiny_gpt2, tiny_llama
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BertForSequenceClassification

from lorakit.compress import LowRankLinear, factorize
from lorakit.compress.saved import FACTORIZATION_NAME, export_dense, save_factorized
from lorakit.errors import LorakitError
from lorakit.models import load_model
from lorakit.outputs import OutputExistsError

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
BUILDERS = {"llama": (tiny_llama, ["llama"], AutoModelForCausalLM),
            "bert": (tiny_bert, ["bert"], AutoModelForSequenceClassification)}


def _factorised(kind: str):
    build, targets, _ = BUILDERS[kind]
    model = build()
    report = factorize(model, targets, ratio=0.5)
    return model, report


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_save_then_load_model_gives_identical_logits_and_recorded_ranks(kind, tmp_path, minilm_tokenizer):
    model, report = _factorised(kind)
    save_factorized(model, minilm_tokenizer, tmp_path / "f", report)
    loaded, tokenizer = load_model(str(tmp_path / "f"))
    assert_close(_logits(loaded), _logits(model), row="exact")
    modules = dict(loaded.named_modules())
    ranks = {m.name: m.rank for m in report.modules if m.rank is not None}
    assert ranks and {n: modules[n].rank for n in ranks} == ranks
    assert all(isinstance(modules[n], LowRankLinear) for n in ranks)
    assert json.loads((tmp_path / "f" / FACTORIZATION_NAME).read_text())["modules"].keys() == ranks.keys()
    assert tokenizer.vocab_size == minilm_tokenizer.vocab_size


def test_load_model_keeps_tied_embeddings_of_a_factorised_model(tmp_path):
    model = tiny_llama(tie=True)
    report = factorize(model, ["llama"], rank=4)
    save_factorized(model, None, tmp_path / "f", report)
    from lorakit.factorized import load_factorized

    loaded = load_factorized(tmp_path / "f", AutoModelForCausalLM, model.config, torch.float32)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert_close(_logits(loaded), _logits(model), row="exact")


def test_load_model_refuses_weights_that_do_not_fit_the_record(tmp_path, minilm_tokenizer):
    model, report = _factorised("llama")
    save_factorized(model, minilm_tokenizer, tmp_path / "f", report)
    record = json.loads((tmp_path / "f" / FACTORIZATION_NAME).read_text())
    record["modules"].popitem()
    (tmp_path / "f" / FACTORIZATION_NAME).write_text(json.dumps(record))
    with pytest.raises(LorakitError, match="do not fit its factorization record.*unexpected .*down.weight"):
        load_model(str(tmp_path / "f"))


def test_save_refuses_a_foreign_directory_and_writes_nothing(tmp_path):
    model, report = _factorised("llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine\n")
    with pytest.raises(OutputExistsError):
        save_factorized(model, None, tmp_path / "out", report)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_export_dense_loads_in_plain_transformers_with_the_factorised_logits(kind, tmp_path, minilm_tokenizer):
    model, report = _factorised(kind)
    save_factorized(model, minilm_tokenizer, tmp_path / "f", report)
    export_dense(tmp_path / "f", tmp_path / "dense")
    dense = BUILDERS[kind][2].from_pretrained(tmp_path / "dense").eval()
    assert not any(isinstance(m, LowRankLinear) for m in dense.modules())
    assert not (tmp_path / "dense" / FACTORIZATION_NAME).exists()
    assert_close(_logits(dense), _logits(model), row="fp32 reordered")
    if kind == "bert":
        assert isinstance(dense, BertForSequenceClassification)


def test_export_dense_restores_gpt2_conv1d_layers_and_leaves_the_model_unchanged(tmp_path):
    model = tiny_gpt2()
    factorize(model, ["gpt2"], rank=8)
    export_dense(model, tmp_path / "dense")
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert type(dense.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert_close(_logits(dense), _logits(model), row="fp32 reordered")


def test_export_dense_refuses_a_model_without_factorised_layers(tmp_path):
    with pytest.raises(LorakitError, match="no factorised"):
        export_dense(tiny_llama(), tmp_path / "dense")
    assert not (tmp_path / "dense").exists()


def _cli(argv) -> int:
    from lorakit.cli import main

    return main([str(a) for a in argv])


def test_cli_factorize_writes_a_model_load_model_reads_with_the_printed_parameters(tmp_path, tiny_classifier_dir,
                                                                                   capsys):
    (tmp_path / "texts.txt").write_text("a small dog\nthe cat sat on the mat\n")
    assert _cli(["factorize", "--model", tiny_classifier_dir, "--ratio", "0.5", "--method", "activation",
                 "--calibration-texts", tmp_path / "texts.txt", "--out", tmp_path / "f"]) == 0
    printed = capsys.readouterr().out
    loaded, _ = load_model(str(tmp_path / "f"))
    after = sum(p.numel() for m in loaded.modules() if isinstance(m, LowRankLinear) for p in m.parameters())
    assert after > 0 and f"-> {after:,} parameters" in printed
    record = json.loads((tmp_path / "f" / FACTORIZATION_NAME).read_text())
    assert record["method"] == "activation" and "--ratio 0.5" in record["command"]


def test_cli_factorize_dense_writes_a_plain_checkpoint_with_the_factorised_outputs(tmp_path, tiny_classifier_dir):
    from transformers import AutoModel

    assert _cli(["factorize", "--model", tiny_classifier_dir, "--rank", "4", "--out", tmp_path / "f"]) == 0
    assert _cli(["factorize", "--model", tiny_classifier_dir, "--rank", "4", "--dense", "--out", tmp_path / "d"]) == 0
    factorised, _ = load_model(str(tmp_path / "f"))
    dense = AutoModel.from_pretrained(tmp_path / "d").eval()
    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(dense(input_ids=ids).last_hidden_state, factorised(input_ids=ids).last_hidden_state,
                     row="fp32 reordered")


def test_a_factorised_model_saved_with_a_head_loads_as_the_bare_model(tmp_path):
    model, report = _factorised("bert")
    save_factorized(model, None, tmp_path / "f", report)
    from transformers import AutoModel

    from lorakit.factorized import load_factorized

    bare = load_factorized(tmp_path / "f", AutoModel, model.config, torch.float32).eval()
    assert type(bare).__name__ == "BertModel"
    assert isinstance(bare.encoder.layer[0].attention.self.query, LowRankLinear)
    with torch.no_grad():
        assert torch.equal(bare(input_ids=IDS).last_hidden_state, model.bert(input_ids=IDS).last_hidden_state)
