"""lorakit.train.tasks.translation: parallel text as instructions, BLEU/chrF, and generation-based evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SHARED_DATA, approx
from torch import nn
from transformers import PreTrainedTokenizerBase

from lorakit.errors import ConfigError, LorakitError
from lorakit.generation import SamplingConfig
from lorakit.train.data import read_records
from lorakit.train.tasks.instruction import InstructionTuning
from lorakit.train.tasks.translation import evaluate_generation, read_parallel, translation_scores

MULTI30K = SHARED_DATA / "multi30k"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_pair(tmp_path: Path, source: str, target: str, stem: str = "train") -> tuple[Path, Path]:
    (tmp_path / f"{stem}.de").write_text(source)
    (tmp_path / f"{stem}.en").write_text(target)
    return tmp_path / f"{stem}.de", tmp_path / f"{stem}.en"


class Parrot(nn.Module):
    """A fake causal LM whose `generate` appends a fixed reply and records what it was called with."""

    def __init__(self, reply: list[int]):
        super().__init__()
        self.reply = reply
        self.calls: list[dict[str, Any]] = []
        self.unused = nn.Parameter(torch.zeros(1))

    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.calls.append({"input_ids": input_ids, **kwargs})
        reply = torch.tensor(self.reply).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, reply], dim=1)  # (B, T + len(reply))


# --- reading parallel text ----------------------------------------------------------------------------------------

def test_read_parallel_makes_translation_instructions(tmp_path: Path) -> None:
    source, target = write_pair(tmp_path, "Ein Hund rennt.\nZwei Katzen.\n", "A dog runs.\nTwo cats.")
    assert read_parallel(source, target) == [
        {"instruction": "Translate from German to English:\nEin Hund rennt.", "input": "", "output": "A dog runs."},
        {"instruction": "Translate from German to English:\nZwei Katzen.", "input": "", "output": "Two cats."},
    ]
    reverse = read_parallel(target, source, source_lang="English", target_lang="German")
    assert reverse[1]["instruction"] == "Translate from English to German:\nTwo cats."
    assert read_records(f"{tmp_path}/train.{{de,en}}", format="parallel") == read_parallel(source, target)


def test_parallel_files_of_different_lengths_or_with_empty_lines_are_errors(tmp_path: Path) -> None:
    source, target = write_pair(tmp_path, "Eins.\nZwei.\n", "One.\n")
    with pytest.raises(LorakitError, match=r"train.de has 2 lines but .*train.en has 1; parallel files must be "
                                           r"line-aligned"):
        read_parallel(source, target)
    source, target = write_pair(tmp_path, "Eins.\n\nDrei.\n", "One.\nTwo.\nThree.\n")
    with pytest.raises(LorakitError, match=r"train.de line 2: empty line"):
        read_parallel(source, target)
    with pytest.raises(LorakitError, match=r"must name its two files as PREFIX.\{SRC,TGT\}"):
        read_records(f"{tmp_path}/train.de", format="parallel")


# --- BLEU and chrF ------------------------------------------------------------------------------------------------

def test_bleu_matches_a_hand_computed_value() -> None:
    # 6 tokens each, so no brevity penalty; clipped n-gram matches: 1-grams 5/6, 2-grams 3/5, 3-grams 2/4,
    # 4-grams 1/3 -> BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = (1/12) ** (1/4)
    scores = translation_scores(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert scores["bleu"] == approx(100 * (1 / 12) ** 0.25, "float64 library vs formula")
    assert translation_scores(["a dog runs ."], ["a dog runs ."]) == approx({"bleu": 100.0, "chrf": 100.0})


def test_chrf_matches_a_hand_computed_value() -> None:
    # character n-grams of "abcd" vs "abce": precision = recall = 3/4, 2/3, 1/2, 0 for n = 1..4 (no 5- or
    # 6-grams exist, so those orders do not count); averaged: 23/48; F-beta (beta 2) of equal P and R is that value
    assert translation_scores(["abcd"], ["abce"])["chrf"] == approx(100 * 23 / 48)


def test_empty_reference_names_the_record() -> None:
    with pytest.raises(LorakitError, match=r"^record 1: empty reference ' '"):
        translation_scores(["a", "b"], ["a", " "])
    with pytest.raises(LorakitError, match="2 hypotheses for 1 references"):
        translation_scores(["a", "b"], ["a"])


# --- generation-based evaluation -----------------------------------------------------------------------------------

def test_evaluate_generation_prompts_as_training_does_and_passes_num_beams(
        minilm_tokenizer: PreTrainedTokenizerBase) -> None:
    records = [{"instruction": "Translate from German to English:\nEin Hund.", "input": "", "output": "a dog ."},
               {"instruction": "Translate from German to English:\nZwei.", "input": "", "output": "a cat ."}]
    model = Parrot(minilm_tokenizer("a dog .", add_special_tokens=False)["input_ids"])
    scores = evaluate_generation(model, minilm_tokenizer, records, SamplingConfig(num_beams=3, max_new_tokens=8),
                                 translation_scores)
    assert scores == translation_scores(["a dog .", "a dog ."], ["a dog .", "a cat ."])
    (call,) = model.calls
    assert call["num_beams"] == 3 and call["do_sample"] is False
    # no chat template: the plain layout InstructionTuning trains on (left-padded in the batch)
    prompt = call["input_ids"][1][call["attention_mask"][1].bool()].tolist()
    assert prompt == minilm_tokenizer("### Instruction:\nTranslate from German to English:\nZwei.\n\n"
                                      "### Response:\n")["input_ids"]


def test_evaluate_generation_uses_the_chat_template_like_training(minilm_tokenizer: PreTrainedTokenizerBase) -> None:
    tok = minilm_tokenizer.__class__.from_pretrained(minilm_tokenizer.name_or_path)
    tok.add_tokens(["<|user|>", "<|assistant|>", "<|end|>"], special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    record = {"instruction": "Translate from German to English:\nEin Hund.", "input": "", "output": "a dog ."}
    model = Parrot(tok("a dog .", add_special_tokens=False)["input_ids"])
    evaluate_generation(model, tok, [record], SamplingConfig(), translation_scores)
    assert model.calls[0]["input_ids"][0].tolist() == InstructionTuning(tok).prompt_ids(record)


def test_num_beams_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="num_beams must be an int >= 1, got 0"):
        SamplingConfig(num_beams=0)


# --- real data ----------------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_real_multi30k_test_set_reads_as_1000_instructions() -> None:
    if not (MULTI30K / "test.de").is_file():
        pytest.skip(f"{MULTI30K} is absent")
    records = read_records(f"{MULTI30K}/test.{{de,en}}", format="parallel")
    assert len(records) == 1000
    assert records[0]["instruction"].startswith("Translate from German to English:\nEin Mann")
    references = [r["output"] for r in records]
    assert translation_scores(references, references) == approx({"bleu": 100.0, "chrf": 100.0})
    shifted = translation_scores(references[1:] + references[:1], references)
    assert shifted["bleu"] < 10 and shifted["chrf"] < 40
