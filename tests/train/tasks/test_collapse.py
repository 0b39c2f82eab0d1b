"""lorakit.train.tasks.collapse: a new head's bias at the class prior, and predictions of one class reported."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lorakit.train.tasks.classification import SequenceClassification
from lorakit.train.tasks.collapse import init_bias_to_prior, prediction_spread, summary_warnings


class Head(nn.Module):
    """A model with DistilBERT's two-layer head: `pre_classifier` (4 -> 4) and `classifier` (4 -> 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.pre_classifier = nn.Linear(4, 4)
        self.classifier = nn.Linear(4, 3)
        with torch.no_grad():
            self.pre_classifier.bias.zero_()
            self.classifier.bias.zero_()


class Constant(nn.Module):
    """A fake sequence classifier whose logits favour label `best` for every input."""

    def __init__(self, num_labels: int, best: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_labels))
        with torch.no_grad():
            self.logits[best] = 1.0

    def forward(self, input_ids: torch.Tensor, **_: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits.expand(input_ids.shape[0], -1))  # (B, C)


def test_prior_bias_is_the_add_one_log_share_of_each_class() -> None:
    model = Head()
    assert init_bias_to_prior(model, ["pre_classifier", "classifier"], [95, 3, 0])
    expected = torch.tensor([96 / 101, 4 / 101, 1 / 101]).log()
    torch.testing.assert_close(model.classifier.bias.detach(), expected)
    assert not model.pre_classifier.bias.any()  # only the output layer
    # The untrained head now predicts the prior: softmax of the bias is the smoothed class share.
    torch.testing.assert_close(model.classifier.bias.detach().softmax(-1), expected.exp())


def test_a_head_with_a_trained_bias_keeps_it() -> None:
    model = Head()
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([0.5, -0.1, 0.2]))
    assert not init_bias_to_prior(model, ["classifier"], [10, 1, 1])
    torch.testing.assert_close(model.classifier.bias.detach(), torch.tensor([0.5, -0.1, 0.2]))


def test_a_head_without_bias_is_left_alone() -> None:
    model = nn.Module()
    model.score = nn.Linear(4, 2, bias=False)
    assert not init_bias_to_prior(model, ["score"], [10, 1])


def test_prediction_spread_counts_the_distinct_classes_predicted() -> None:
    assert prediction_spread(["O", "B-PER", "O", "I-PER"], unit="word") == {"predicted_classes": 3.0}
    assert prediction_spread([], unit="word") == {"predicted_classes": 0.0}


def test_one_class_everywhere_logs_a_warning_naming_it(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert prediction_spread([2, 2, 2], unit="example", names=["neg", "neu", "pos"]) == {"predicted_classes": 1.0}
    assert "'pos' for every one of the 3 evaluated examples" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        prediction_spread(["O", "B-LOC"], unit="word")
    assert caplog.text == ""


def test_sequence_classification_reports_a_single_predicted_label(minilm_tokenizer: PreTrainedTokenizerBase,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    task = SequenceClassification(minilm_tokenizer, labels=["neg", "pos"])
    features = task.encode([{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    with caplog.at_level(logging.WARNING):
        metrics = task.evaluate(Constant(2, best=0), features, batch_size=2)
    assert metrics["predicted_classes"] == 1.0 and metrics["accuracy"] == 0.5
    assert "'neg' for every one of the 2 evaluated examples" in caplog.text
    assert all(math.isfinite(v) for v in metrics.values())


def test_summary_warns_about_the_reported_evaluation_only() -> None:
    history = [{"step": 10, "loss": 0.3}, {"step": 10, "eval_f1": 0.4, "eval_predicted_classes": 5.0},
               {"step": 20, "eval_f1": 0.0, "eval_predicted_classes": 1.0}]
    assert summary_warnings(history, best_step=10) == []  # the published checkpoint predicts 5 classes
    (warning,) = summary_warnings(history, best_step=20)
    assert "step 20 predicted one class" in warning
    assert summary_warnings(history, best_step=None) == [warning]  # no best: the last evaluation
    assert summary_warnings([{"step": 5, "loss": 1.0}], best_step=None) == []
