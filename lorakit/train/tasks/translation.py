"""Translation as instruction tuning, scored by generating and comparing with references (BLEU, chrF).

    train = read_parallel("multi30k/train.de", "multi30k/train.en")   # instruction records, German -> English
    task = InstructionTuning(tokenizer)                                # trains as any instruction data
    scores = evaluate_generation(model, tokenizer, test_records, SamplingConfig(num_beams=4), translation_scores)

Training needs nothing beyond `InstructionTuning` (its metric is the loss on the reference tokens); the quality of
translations is measured afterwards by decoding (greedy, or beam search with `num_beams`) and scoring the output
with `sacrebleu`, whose default BLEU (13a tokenisation) and chrF are the WMT standard (Post 2018).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import sacrebleu
from torch import nn
from transformers import PreTrainedTokenizerBase

from lorakit.errors import LorakitError
from lorakit.generation import SamplingConfig, generate
from lorakit.train.readers import read_parallel
from lorakit.train.tasks.instruction import InstructionTuning

log = logging.getLogger(__name__)

__all__ = ["evaluate_generation", "read_parallel", "translation_scores"]

MetricFn = Callable[[list[str], list[str]], dict[str, float]]


def translation_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (0-100, sacrebleu's defaults) of `hypotheses` against one reference each.

    Raises LorakitError for lists of different lengths or an empty (or whitespace-only) reference, naming its
    index; an empty hypothesis is allowed (it scores nothing).
    """
    if len(hypotheses) != len(references):
        raise LorakitError(f"{len(hypotheses)} hypotheses for {len(references)} references; they must pair up")
    for i, reference in enumerate(references):
        if not isinstance(reference, str) or not reference.strip():
            raise LorakitError(f"record {i}: empty reference {reference!r}; every record needs a translation")
    if not references:
        raise LorakitError("no references to score against")
    return {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
            "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score}


def evaluate_generation(model: nn.Module, tokenizer: PreTrainedTokenizerBase, records: list[dict[str, Any]],
                        sampling: SamplingConfig, metric_fn: MetricFn, *, batch_size: int = 16
                        ) -> dict[str, float]:
    """Generate an answer for each instruction record and score the answers against the records' outputs.

    records: {"instruction", "input" (optional), "output"} as `read_parallel` writes them; the prompt is the one
        `InstructionTuning` trains on (the model's chat template, when its tokenizer has one).
    sampling: decoding controls; temperature 0 is greedy, `num_beams` > 1 beam search.
    metric_fn: (hypotheses, references) -> scores, e.g. `translation_scores`.
    Returns metric_fn's scores. Raises LorakitError for a record without an output (naming it).
    """
    task = InstructionTuning(tokenizer)
    prompts, references = [], []
    chat = True
    for i, record in enumerate(records):
        prompt, chat = task.generation_prompt(record, i)
        prompts.append(prompt)
        output = record.get("output")
        if not isinstance(output, str):
            raise LorakitError(f"record {i} has no 'output' text to score against (it has: "
                               f"{', '.join(map(str, record))})")
        references.append(output)
    hypotheses = generate(model, tokenizer, prompts, sampling, chat=chat, batch_size=batch_size)
    if hypotheses:
        log.info("first of %d generations: %r (reference %r)", len(hypotheses), hypotheses[0], references[0])
    return metric_fn(hypotheses, references)
