"""The demo's built-in task: a deterministic generator, disjoint splits, exact-match scoring (no model)."""

from __future__ import annotations

import re

import pytest
from conftest import approx

from lorakit import demo_task
from lorakit.demo_task import make_examples, score, split


def _digits(instruction: str) -> list[str]:
    match = re.search(r"numbers: ([0-9 ]+)\n", instruction)
    assert match is not None, instruction
    return match.group(1).split()


def test_make_examples_is_deterministic_for_a_seed():
    assert make_examples(50, seed=3) == make_examples(50, seed=3)


def test_make_examples_differs_between_seeds():
    assert make_examples(50, seed=3) != make_examples(50, seed=4)


def test_make_examples_pins_the_first_example_of_seed_0():
    # A change to the generator changes the demo's data; this pins it.
    assert make_examples(1, seed=0) == [{
        "instruction": "Reverse the order of these numbers: 6 0 4 8\n"
                       "Answer with the numbers only, separated by spaces.",
        "input": "",
        "output": "8 4 0 6",
    }]


def test_make_examples_is_a_prefix_of_a_longer_draw():
    assert make_examples(500, seed=1)[:100] == make_examples(100, seed=1)


def test_make_examples_never_repeats_an_instruction():
    examples = make_examples(2000, seed=0)
    assert len({e["instruction"] for e in examples}) == 2000


def test_output_is_the_instruction_digits_reversed():
    for example in make_examples(300, seed=2):
        digits = _digits(example["instruction"])
        assert demo_task.MIN_LENGTH <= len(digits) <= demo_task.MAX_LIST_LENGTH
        assert all(len(d) == 1 and d.isdigit() for d in digits)
        assert example["output"] == " ".join(reversed(digits))
        assert example["input"] == ""
        assert demo_task.ANSWER_FORMAT in example["instruction"]


def test_split_is_disjoint_by_content():
    train, held_out = split(n_train=2000, n_eval=500, seed=0)
    assert len(train) == 2000 and len(held_out) == 500
    assert not {e["instruction"] for e in train} & {e["instruction"] for e in held_out}
    assert not {tuple(_digits(e["instruction"])) for e in train} & {tuple(_digits(e["instruction"])) for e in held_out}


def test_split_held_out_does_not_depend_on_train_size():
    assert split(n_train=10, n_eval=50, seed=5)[1] == split(n_train=400, n_eval=50, seed=5)[1]


def test_split_defaults_are_the_demo_sizes():
    train, held_out = split()
    assert (len(train), len(held_out)) == (demo_task.N_TRAIN, demo_task.N_EVAL)


def test_make_examples_rejects_more_than_the_distinct_lists():
    # 3- to 5-digit lists: MAX_EXAMPLES distinct ones in all; asking for more is an error, not an endless loop.
    with pytest.raises(ValueError, match="n must be an int in"):
        make_examples(demo_task.MAX_EXAMPLES + 1, seed=0)


@pytest.mark.parametrize("n", [-1, 2.5, True, "10"])
def test_make_examples_rejects_a_bad_count(n):
    with pytest.raises(ValueError, match="n must be"):
        make_examples(n, seed=0)


def test_split_rejects_negative_sizes():
    with pytest.raises(ValueError, match="n_train"):
        split(n_train=-1, n_eval=10)
    with pytest.raises(ValueError, match="n_eval"):
        split(n_train=10, n_eval=-1)


def test_score_is_exact_match_after_stripping():
    predictions = ["3 6 2", " 9 1 7 4\n", "9 1 7 4.", "The numbers are 2, 6, 3.", "4 7 1 9"]
    references = ["3 6 2", "9 1 7 4", "9 1 7 4", "3 6 2", "9 1 7 4"]
    assert score(predictions, references) == approx(2 / 5)


def test_score_is_one_and_zero_at_the_extremes():
    assert score(["1 2 3"], ["1 2 3"]) == 1.0
    assert score(["1 2  3"], ["1 2 3"]) == 0.0  # inner whitespace counts


def test_score_rejects_mismatched_or_empty_lists():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        score(["1", "2"], ["1"])
    with pytest.raises(ValueError, match="no references"):
        score([], [])


def test_hyperparameters_describe_one_pass_over_the_training_set():
    assert demo_task.STEPS * demo_task.BATCH_SIZE == demo_task.N_TRAIN
