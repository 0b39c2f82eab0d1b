"""lorakit.generation on a tiny Llama with a word-level tokenizer: greedy decoding against transformers' own
`generate`, stop strings, seeded sampling, chat-template and raw prompts, and the sampling settings' checks."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from tokenizers import Regex, Tokenizer, decoders
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Split
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from lorakit.errors import ConfigError
from lorakit.generation import SamplingConfig, chat_prompt, generate

# A character-level tokenizer over tiny_llama's 128 ids: 0-3 special (its config's bos 1 and eos 2), then printable
# ASCII, newline and 28 accented letters. A stop string then spans several tokens, as it does with real vocabularies.
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = [chr(c) for c in range(32, 127)] + ["\n"] + [chr(c) for c in range(0xC0, 0xC0 + 28)]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")
PROMPTS = ["the cat", "a", "once upon a time"]  # different lengths: the batch is left-padded
NEW = 8


def _tokenizer(template: str | None = TEMPLATE) -> PreTrainedTokenizerFast:
    backend = Tokenizer(WordLevel({t: i for i, t in enumerate(SPECIALS + CHARS)}, unk_token="<unk>"))
    backend.pre_tokenizer = Split(Regex("."), behavior="isolated")  # one token per character
    backend.decoder = decoders.Fuse()  # and back, without separators
    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])  # BOS on raw text
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = template
    return tokenizer


def _model() -> torch.nn.Module:
    return tiny_llama(seed=28)  # full-length greedy answers, different for each prompt, raw or chat


def _prompt(tokenizer: PreTrainedTokenizerFast, prompt: str, chat: bool) -> str:
    return chat_prompt(tokenizer, [{"role": "user", "content": prompt}]) if chat else prompt


def _transformers_generate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, text: str, chat: bool,
                           **settings: object) -> str:
    """transformers' own decoding of one unpadded prompt: its NEW new tokens (none of them eos), decoded."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not chat)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                             pad_token_id=tokenizer.pad_token_id, **settings)
    new = out[0, ids.shape[1]:]
    assert len(new) == NEW and tokenizer.eos_token_id not in new  # every new token takes part in the comparison
    return tokenizer.decode(new, skip_special_tokens=True).strip()


# --------------------------------------------------------------------------------------------- greedy decoding


@pytest.mark.parametrize("chat", [False, True], ids=["raw", "chat"])
def test_greedy_decoding_of_a_padded_batch_equals_transformers_generate_on_each_prompt(chat):
    model, tokenizer = _model(), _tokenizer()
    answers = generate(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=NEW), chat=chat)
    expected = [_transformers_generate(model, tokenizer, _prompt(tokenizer, p, chat), chat, do_sample=False)
                for p in PROMPTS]
    assert answers == expected
    assert len(set(answers)) == len(answers)  # distinct answers: rows out of order could not go unnoticed


def test_beam_search_equals_transformers_beam_search():
    model, tokenizer = _model(), _tokenizer()
    answers = generate(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=NEW, num_beams=3), chat=False)
    assert answers == [_transformers_generate(model, tokenizer, p, False, do_sample=False, num_beams=3)
                       for p in PROMPTS]


def test_batch_size_does_not_change_the_answers_or_their_order():
    model, tokenizer = _model(), _tokenizer()
    sampling = SamplingConfig(max_new_tokens=NEW)
    assert generate(model, tokenizer, PROMPTS, sampling, batch_size=1) == generate(model, tokenizer, PROMPTS, sampling)


def test_generate_restores_training_mode_and_padding_side():
    model, tokenizer = _model().train(), _tokenizer()
    tokenizer.padding_side = "right"
    generate(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=2))
    assert model.training and tokenizer.padding_side == "right"


# ------------------------------------------------------------------------------------------------ stop strings


def _first_new_substring(text: str, start: int, length: int = 2) -> tuple[str, int]:
    """The first substring of `text` at or after `start` that does not occur earlier, and where it is."""
    for i in range(start, len(text) - length + 1):
        piece = text[i:i + length]
        if piece.strip() == piece and text.find(piece) == i:
            return piece, i
    raise AssertionError(f"no new substring in {text!r} from {start}")


def test_stop_string_cuts_the_answer_before_it():
    model, tokenizer = _model(), _tokenizer()
    full = generate(model, tokenizer, PROMPTS[:1], SamplingConfig(max_new_tokens=NEW), chat=False)[0]
    stop, at = _first_new_substring(full, 3)  # two characters: two tokens
    answer = generate(model, tokenizer, PROMPTS[:1], SamplingConfig(max_new_tokens=NEW, stop=[stop]), chat=False)[0]
    assert answer == full[:at].strip()
    assert answer and stop not in answer


def test_the_earliest_of_several_stop_strings_wins():
    model, tokenizer = _model(), _tokenizer()
    full = generate(model, tokenizer, PROMPTS[:1], SamplingConfig(max_new_tokens=NEW), chat=False)[0]
    earlier, at = _first_new_substring(full, 2)
    later, _ = _first_new_substring(full, at + 3)
    sampling = SamplingConfig(max_new_tokens=NEW, stop=[later, earlier])
    assert generate(model, tokenizer, PROMPTS[:1], sampling, chat=False)[0] == full[:at].strip()


def test_stop_string_that_never_appears_changes_nothing():
    model, tokenizer = _model(), _tokenizer()
    full = generate(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=NEW), chat=False)
    absent = next(c + d for c in CHARS[1:] for d in CHARS[1:] if all(c + d not in a for a in full))
    assert generate(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=NEW, stop=[absent]), chat=False) == full


# ---------------------------------------------------------------------------------------------------- sampling


def test_a_seed_makes_sampling_reproducible_whatever_the_global_generator_did():
    model, tokenizer = _model(), _tokenizer()
    sampling = SamplingConfig(max_new_tokens=NEW, temperature=1.0, seed=7)
    first = generate(model, tokenizer, PROMPTS, sampling)
    torch.rand(1000)  # move the global generator on
    assert generate(model, tokenizer, PROMPTS, sampling) == first


def test_sampling_with_another_seed_gives_other_answers_than_greedy_or_the_first_seed():
    model, tokenizer = _model(), _tokenizer()
    sampled = generate(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=NEW, temperature=1.0, seed=7))
    other = generate(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=NEW, temperature=1.0, seed=8))
    greedy = generate(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=NEW))
    assert sampled != other and sampled != greedy


@pytest.mark.parametrize("settings", [{"top_k": 1}, {"top_p": 1e-3}], ids=["top_k", "top_p"])
def test_sampling_restricted_to_the_top_token_gives_the_greedy_answer(settings):
    model, tokenizer = _model(), _tokenizer()
    greedy = generate(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=NEW))
    sampling = SamplingConfig(max_new_tokens=NEW, temperature=1.0, seed=7, **settings)
    assert generate(model, tokenizer, PROMPTS, sampling) == greedy


# ------------------------------------------------------------------------------------------- chat or raw prompts


def test_chat_prompt_applies_the_template_ready_for_the_assistant():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"}]
    assert chat_prompt(_tokenizer(), messages) == "<s>user: hi\nassistant: hello\nuser: bye\nassistant: "


def test_chat_prompt_without_a_template_writes_role_lines():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert chat_prompt(_tokenizer(template=None), messages) == "system: be brief\nuser: hi\nassistant: "


@pytest.mark.parametrize("chat, expected", [
    (True, "<s>user: the cat\nassistant: "),  # the template's own BOS, not a second one from the tokenizer
    (False, "<s>the cat"),  # the text as given, after the tokenizer's BOS
], ids=["chat", "raw"])
def test_the_model_sees_the_templated_or_the_raw_prompt(chat, expected, monkeypatch):
    model, tokenizer = _model(), _tokenizer()
    seen: list[torch.Tensor] = []
    real = model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["input_ids"])
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    generate(model, tokenizer, ["the cat"], SamplingConfig(max_new_tokens=1), chat=chat)
    assert tokenizer.decode(seen[0][0]) == expected


# ------------------------------------------------------------------------------------------ sampling settings


@pytest.mark.parametrize("settings, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be > 0, got 0"),
    ({"temperature": -0.5}, "temperature must be >= 0, got -0.5"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
    ({"top_k": -1}, "top_k must be >= 0, got -1"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0, got 0.0"),
])
def test_out_of_range_sampling_setting_is_refused_naming_it(settings, message):
    with pytest.raises(ConfigError, match=message):
        SamplingConfig(**settings)


def test_every_out_of_range_setting_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        SamplingConfig(max_new_tokens=0, top_p=2.0, top_k=-3)
    assert [p.split()[0] for p in info.value.problems] == ["max_new_tokens", "top_p", "top_k"]


def test_defaults_are_greedy_and_boundary_values_are_accepted():
    assert SamplingConfig().temperature == 0
    SamplingConfig(max_new_tokens=1, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1e-3)
