"""The input probe: padded batches give the sums of one text at a time over real tokens only, the statistics equal
a direct computation from every input the module saw, texts files are read as one text per line, and a text that
already starts with a special token gets no second one."""

from __future__ import annotations

import torch
from conftest import assert_close, tiny_llama
from tiny_adapters import word_tokenizer
from tokenizers import processors

from lorakit.analysis.probe import _tokenise, probe_inputs, read_texts

DOWN = "model.layers.1.mlp.down_proj"
O_PROJ = "model.layers.1.self_attn.o_proj"
TEXTS = ["w5 w9 w12", "w7", "w3 w3 w40 w41 w42 w43 w44", "w100 w2", "w60 w61 w62 w63 w64 w65"]


def _projections() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {DOWN: torch.randn(64, 3, generator=g, dtype=torch.float64),
            O_PROJ: torch.randn(32, 2, generator=g, dtype=torch.float64)}


def test_a_padded_batch_gives_the_same_statistics_as_one_text_at_a_time():
    model, tokenizer = tiny_llama(), word_tokenizer()
    alone = probe_inputs(model, tokenizer, TEXTS, _projections(), batch_size=1)
    padded = probe_inputs(model, tokenizer, TEXTS, _projections(), batch_size=8)  # one batch, 7 tokens wide
    assert alone.tokens == padded.tokens == 19 and alone.texts == padded.texts == 5
    for name in (DOWN, O_PROJ):
        batched, single = padded.modules[name], alone.modules[name]
        assert_close(batched.mean, single.mean, "fp32 reordered")
        assert_close(batched.mean_abs_projection, single.mean_abs_projection, "fp32 reordered")


def test_the_statistics_are_the_mean_input_and_mean_absolute_projection_over_every_token():
    model, tokenizer = tiny_llama(), word_tokenizer()
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(DOWN).register_forward_hook(lambda m, args, out: seen.append(args[0][0]))
    with torch.no_grad():
        for text in TEXTS:
            model(torch.tensor([tokenizer(text)["input_ids"]]))
    handle.remove()
    x = torch.cat(seen).double()  # (19, 64): every token's input, no padding anywhere
    v = _projections()[DOWN]
    probe = probe_inputs(model, tokenizer, TEXTS, _projections(), batch_size=3)
    assert_close(probe.modules[DOWN].mean, x.mean(0), "fp32 reordered")
    assert_close(probe.modules[DOWN].mean_abs_projection, (x @ v).abs().mean(0), "fp32 reordered")


def test_texts_are_cut_to_max_tokens_and_counted():
    probe = probe_inputs(tiny_llama(), word_tokenizer(), TEXTS, _projections(), max_tokens=3)
    assert probe.tokens == 3 + 1 + 3 + 2 + 3 and probe.truncated == 2


def test_a_texts_file_has_one_text_per_line_blank_lines_skipped_and_json_string_lines_decoded(tmp_path):
    file = tmp_path / "texts.txt"
    file.write_bytes('\ufeffEin Hund läuft.\r\n\n   \n"Translate:\\nZwei Männer."\n"quoted" and "not JSON"\n'
                     .encode())
    assert read_texts(file) == ["Ein Hund läuft.", "Translate:\nZwei Männer.", '"quoted" and "not JSON"']


def test_a_text_that_starts_with_a_special_token_gets_no_second_one():
    tokenizer = word_tokenizer()
    tokenizer.bos_token = "w2"
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="w2 $A", special_tokens=[("w2", 2)])
    ids, truncated = _tokenise(tokenizer, ["w5 w6", "w2 w5 w6"], max_tokens=8)
    assert ids == [[2, 5, 6], [2, 5, 6]] and truncated == 0
