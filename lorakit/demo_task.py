"""The built-in task of lorakit's demo: reverse a short list of digits.

    train, held_out = split()                      # 400 training and 200 held-out records, disjoint
    train[0]  # {"instruction": "Reverse the order of these numbers: 2 6 3\\nAnswer with the numbers only,
              #   separated by spaces.", "input": "", "output": "3 6 2"}
    accuracy = score(predictions, [r["output"] for r in held_out])

Each example is a list of 3 to 5 single digits; the answer is the same digits in reverse order, separated by
single spaces. The prompt states the task and the exact answer format, so the base model has a fair chance.

Why SmolLM2-135M-Instruct fails it: it does not reverse. With greedy decoding on the 200 held-out examples it
answers mostly in prose ("Reverse the order of these numbers: 6 0 4 8" -> "The numbers are 6, 0, 4, and 8."),
and the 45 answers it gives in the asked format copy the list (39) or garble it: 0 of 200 exact. Even reading
the digits out of its prose, only 7 are right, all palindromes. A rank-8 adapter learns the reversal in a few
dozen steps, and the answers are a handful of tokens, so a run is cheap.

The records are Alpaca-style (`instruction`, empty `input`, `output`): the user turn is the instruction, the
assistant turn the output, and the loss falls on the response tokens only. With the hyperparameters below
(fp32, 2 CPU cores, ~2.1 s a step, ~105 s of training) held-out accuracy was 0.975, 1.0 and 1.0 for seeds 0, 1
and 2, against 0.0 for the base model; the merged model's greedy answers were identical to the unmerged ones.
"""

from __future__ import annotations

import random

# Hyperparameters of the demo run (LoRA: Hu et al. 2021; scaling alpha / rank, §4.1).
RANK = 8
ALPHA = 16.0
TARGETS = ["llama"]  # q, k, v, o, gate, up and down projections of every layer
LEARNING_RATE = 2e-3  # AdamW, no weight decay; linear warm-up then linear decay to zero
WARMUP_STEPS = 5
STEPS = 50
BATCH_SIZE = 8
MAX_LENGTH = 96  # tokens of prompt + answer with SmolLM2's chat template; the longest example has ~70
N_TRAIN = 400  # STEPS * BATCH_SIZE: one pass over the training set
N_EVAL = 200
SEED = 0
MAX_NEW_TOKENS = 12  # a 5-digit answer is 9 tokens plus the end-of-turn token

MIN_LENGTH, MAX_LIST_LENGTH = 3, 5
ANSWER_FORMAT = "Answer with the numbers only, separated by spaces."
# Distinct lists of 3 to 5 digits: the most distinct examples `make_examples` can return.
MAX_EXAMPLES = sum(10**k for k in range(MIN_LENGTH, MAX_LIST_LENGTH + 1))


def make_examples(n: int, seed: int) -> list[dict[str, str]]:
    """`n` distinct examples (no two share an instruction), the same for the same `seed` on any machine.

    The stream for a seed is fixed, so `make_examples(n, seed)` is a prefix of `make_examples(m, seed)` for
    every m >= n; `split` relies on this. Raises `ValueError` unless 0 <= n <= `MAX_EXAMPLES`.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_EXAMPLES:
        raise ValueError(f"n must be an int in [0, {MAX_EXAMPLES}], got {n!r}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict[str, str]] = []
    while len(out) < n:
        digits = [str(rng.randrange(10)) for _ in range(rng.randint(MIN_LENGTH, MAX_LIST_LENGTH))]
        instruction = f"Reverse the order of these numbers: {' '.join(digits)}\n{ANSWER_FORMAT}"
        if instruction in seen:
            continue
        seen.add(instruction)
        out.append({"instruction": instruction, "input": "", "output": " ".join(reversed(digits))})
    return out


def split(n_train: int = N_TRAIN, n_eval: int = N_EVAL, seed: int = SEED
          ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, held_out): the first `n_eval` examples of the seed's stream are held out, the next `n_train` train.

    The two are disjoint by content because `make_examples` never repeats an instruction, and the held-out set
    does not depend on `n_train`. Raises `ValueError` for negative sizes or more than `MAX_EXAMPLES` in all.
    """
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 0:
        raise ValueError(f"n_train must be an int >= 0, got {n_train!r}")
    if isinstance(n_eval, bool) or not isinstance(n_eval, int) or n_eval < 0:
        raise ValueError(f"n_eval must be an int >= 0, got {n_eval!r}")
    examples = make_examples(n_eval + n_train, seed)
    return examples[n_eval:], examples[:n_eval]


def score(predictions: list[str], references: list[str]) -> float:
    """Exact-match accuracy: the share of predictions equal to their reference after stripping whitespace at
    both ends. Raises `ValueError` when the lists differ in length or are empty."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references; "
                         "expected one prediction per reference")
    if not references:
        raise ValueError("no references to score; expected at least one")
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)) / len(references)
