"""Target selection: pattern syntax, presets, and errors that point at the right name."""

from __future__ import annotations

import pytest
from conftest import tiny_bert, tiny_gpt2, tiny_llama

from lorakit.errors import ConfigError
from lorakit.targets import matches, select_modules


@pytest.mark.parametrize(("pattern", "name", "expected"), [
    ("q_proj", "model.layers.0.self_attn.q_proj", True),
    ("q_proj", "model.layers.0.self_attn.q_proj_extra", False),
    ("self_attn.q_proj", "model.layers.0.self_attn.q_proj", True),
    ("attn.q_proj", "model.layers.0.self_attn.q_proj", False),
    ("model.layers.*.mlp.*", "model.layers.3.mlp.up_proj", True),
    ("model.layers.*.mlp.*", "model.layers.3.self_attn.q_proj", False),
    (r"re:model\.layers\.[01]\..*_proj", "model.layers.1.mlp.up_proj", True),
    (r"re:model\.layers\.[01]\..*_proj", "model.layers.2.mlp.up_proj", False),
])
def test_pattern_syntax(pattern, name, expected):
    assert matches(pattern, name) is expected


def test_llama_preset_selects_all_seven_projections_per_layer():
    selection = select_modules(tiny_llama(), ["llama"], [], [])
    assert len(selection.adapted) == 2 * 7


def test_bert_preset_selects_attention_and_ffn_but_not_pooler():
    selection = select_modules(tiny_bert(), ["bert"], [], [])
    assert len(selection.adapted) == 2 * 6
    assert not any("pooler" in t for t in selection.adapted)


def test_gpt2_preset_selects_conv1d_layers():
    assert len(select_modules(tiny_gpt2(), ["gpt2"], [], []).adapted) == 2 * 4


def test_all_linear_skips_the_output_head():
    targets = select_modules(tiny_llama(), ["all-linear"], [], []).adapted
    assert "lm_head" not in targets and len(targets) == 14


def test_exclude_removes_matches():
    targets = select_modules(tiny_llama(), ["llama"], ["model.layers.0.*"], []).adapted
    assert len(targets) == 7 and all(t.startswith("model.layers.1.") for t in targets)


def test_unknown_target_lists_near_misses_and_model_names():
    with pytest.raises(ConfigError) as err:
        select_modules(tiny_llama(), ["q_prj"], [], [])
    message = str(err.value)
    assert "'q_prj' matches no module" in message and "did you mean 'q_proj'" in message
    assert "down_proj" in message and "presets:" in message


def test_unknown_preset_like_name_suggests_the_preset():
    with pytest.raises(ConfigError, match="did you mean 'llama'"):
        select_modules(tiny_llama(), ["lama"], [], [])


def test_every_bad_pattern_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        select_modules(tiny_llama(), ["q_prj", "v_prj"], ["nothing_here"], [])
    assert len(err.value.problems) == 3


def test_pattern_matching_only_containers_is_an_error():
    with pytest.raises(ConfigError, match="cannot adapt"):
        select_modules(tiny_llama(), ["self_attn"], [], [])


def test_tied_embeddings_are_refused_not_untied():
    with pytest.raises(ConfigError, match="tied embeddings"):
        select_modules(tiny_llama(tie=True), ["embed_tokens"], [], [])
    with pytest.raises(ConfigError, match="tied embeddings"):
        select_modules(tiny_gpt2(), ["q_proj", "c_attn"][1:], [], ["lm_head"])


def test_target_inside_modules_to_save_is_an_error():
    with pytest.raises(ConfigError, match="both a LoRA target"):
        select_modules(tiny_bert(), ["bert"], [], ["bert.encoder.layer.0"])


def test_lora_targets_skip_the_factors_of_factorised_layers():
    from lorakit.compress import factorize

    model = tiny_llama()
    factorize(model, ["gate_proj", "up_proj", "down_proj"], rank=2)
    chosen = select_modules(model, ["all-linear"], [], []).adapted
    assert chosen and not any(n.endswith((".down", ".up")) for n in chosen)
    assert all("mlp" not in n for n in chosen)  # the factorised layers themselves are not linear layers
    with pytest.raises(ConfigError, match=r"'gate_proj\.up' matches only factors of factorised layers"):
        select_modules(model, ["gate_proj.up"], [], [])
