"""lorakit.train.tasks.qa and the SQuAD reader: windows over long contexts, span extraction, the SQuAD metric."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import SHARED_DATA, approx
from torch import nn
from transformers import BertConfig, BertForQuestionAnswering, PreTrainedTokenizerBase

from lorakit.errors import ConfigError, LorakitError
from lorakit.train.config import load_train_config
from lorakit.train.data import read_records
from lorakit.train.evaluate import evaluate_from_config
from lorakit.train.readers import read_squad
from lorakit.train.run import train_from_config
from lorakit.train.tasks import task_from_state
from lorakit.train.tasks.qa import ExtractiveQA, best_span, normalize_answer, squad_f1, squad_scores

SQUAD_DEV = SHARED_DATA / "squad" / "dev-v1.1.json"
FILLER = " ".join(["The river runs north through green hills and old farms."] * 4)
CONTEXT = FILLER + " The capital is Reykjavik harbour, by the sea."
ANSWER = "Reykjavik harbour"


def record(qid: str, answer: str = ANSWER, question: str = "What is the capital?") -> dict[str, Any]:
    return {"id": qid, "question": question, "context": CONTEXT,
            "answers": {"text": [answer], "answer_start": [CONTEXT.index(answer)]}}


def squad_json(articles: list[list[str]]) -> dict[str, Any]:
    """A SQuAD file: one article per list, one paragraph, one question per answer text (all in CONTEXT)."""
    return {"version": "1.1", "data": [
        {"title": f"A{a}", "paragraphs": [{"context": CONTEXT, "qas": [
            {"id": f"a{a}q{q}", "question": "Where?", "answers": [{"text": t, "answer_start": CONTEXT.index(t)}]}
            for q, t in enumerate(texts)]}]}
        for a, texts in enumerate(articles)]}


class SpanByToken(nn.Module):
    """A fake QA model: start logit 10 on token `start`, end logit 10 on token `end`, 0 elsewhere."""

    def __init__(self, start: int, end: int):
        super().__init__()
        self.start, self.end = start, end
        self.unused = nn.Parameter(torch.zeros(1))  # evaluate reads the device from the parameters

    def forward(self, input_ids: torch.Tensor, **_: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(start_logits=10.0 * (input_ids == self.start).float(),  # (B, T)
                               end_logits=10.0 * (input_ids == self.end).float())


@pytest.fixture(scope="module")
def windows(minilm_tokenizer: PreTrainedTokenizerBase) -> tuple[ExtractiveQA, list[dict[str, Any]]]:
    task = ExtractiveQA(minilm_tokenizer, max_length=40, stride=10)
    return task, task.encode([record("q1")])


# --- reading SQuAD ------------------------------------------------------------------------------------------------

def test_read_squad_gives_one_record_per_question_and_slices_by_article(tmp_path: Path) -> None:
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(squad_json([["Reykjavik"], ["green hills", "old farms"], ["the sea"]])))
    records = read_squad(path)
    assert [r["id"] for r in records] == ["a0q0", "a1q0", "a1q1", "a2q0"]
    assert records[1] == {"id": "a1q0", "title": "A1", "question": "Where?", "context": CONTEXT,
                          "answers": {"text": ["green hills"], "answer_start": [CONTEXT.index("green hills")]}}
    assert [r["id"] for r in read_squad(path, articles=slice(1, 3))] == ["a1q0", "a1q1", "a2q0"]
    assert read_records(path, format="squad") == records
    with pytest.raises(LorakitError, match="no articles selected"):
        read_squad(path, articles=slice(5, 9))


def test_squad_answer_not_at_its_offset_names_the_question(tmp_path: Path) -> None:
    data = squad_json([["Reykjavik"], ["the sea"]])
    data["data"][1]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] += 1
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(LorakitError, match=r"squad.json: question 'a1q0': answer 'the sea' is not at answer_start "
                                           r"\d+ in its context \(found 'he sea.'\)"):
        read_squad(path)


def test_record_answer_not_in_its_context_names_the_record(minilm_tokenizer: PreTrainedTokenizerBase) -> None:
    bad = record("q7")
    bad["answers"] = {"text": ["Oslo"], "answer_start": [3]}
    with pytest.raises(LorakitError, match=r"^record 1: question 'q7': answer 'Oslo' is not at answer_start 3"):
        ExtractiveQA(minilm_tokenizer).encode([record("q1"), bad])


# --- windows and labels -------------------------------------------------------------------------------------------

def test_the_answer_is_labelled_in_the_window_that_holds_it(windows: tuple[ExtractiveQA, list[dict[str, Any]]],
                                                             minilm_tokenizer: PreTrainedTokenizerBase) -> None:
    _, features = windows
    assert len(features) >= 2 and all(len(f["input_ids"]) <= 40 for f in features)
    inside = [f for f in features if f["start_positions"] != 0]
    assert features[0]["start_positions"] == features[0]["end_positions"] == 0  # [CLS]: not in the 1st window
    assert inside and features.index(inside[0]) >= 1
    for feature in inside:
        start, end = feature["start_positions"], feature["end_positions"]
        assert minilm_tokenizer.decode(feature["input_ids"][start:end + 1]) == ANSWER.lower()
        assert CONTEXT[feature["offsets"][start][0]:feature["offsets"][end][1]] == ANSWER
    # consecutive windows share `stride` context tokens
    first, second = ([o for o in f["offsets"] if o is not None] for f in features[:2])
    assert first[-10:] == second[:10]


def test_evaluate_extracts_the_answer_from_the_second_window(windows: tuple[ExtractiveQA, list[dict[str, Any]]],
                                                             minilm_tokenizer: PreTrainedTokenizerBase) -> None:
    task = windows[0]
    features = task.encode([record("q1"), record("q2", answer="green hills")])
    reykjavik = minilm_tokenizer("Reykjavik", add_special_tokens=False)["input_ids"][0]
    harbour = minilm_tokenizer("harbour", add_special_tokens=False)["input_ids"][-1]
    first_window = features[0]["input_ids"]
    assert reykjavik not in first_window and harbour not in first_window
    model = SpanByToken(reykjavik, harbour)
    metrics = task.evaluate(model, features, batch_size=3)
    # q1 is answered exactly; q2 (gold "green hills") gets the same span, which shares no token with it
    assert metrics["exact_match"] == 50.0 and metrics["f1"] == 50.0


def test_best_span_keeps_context_spans_in_order_within_the_length_limit() -> None:
    offsets = [None, None, (0, 3), (4, 9), (10, 12), None]  # [CLS] question-token context x3 [SEP]
    start = [0.0, 9.0, 1.0, 5.0, 0.0, 0.0]
    end = [0.0, 0.0, 0.0, 2.0, 4.0, 9.0]
    # the best raw pair (1, 5) lies outside the context; the best valid one is tokens 3..4
    assert best_span(start, end, offsets, n_best=6, max_answer_length=30) == (9.0, 4, 12)
    assert best_span(start, end, offsets, n_best=6, max_answer_length=1) == (7.0, 4, 9)  # one token: 3..3
    # start peaks after the end peak: the pair (4, 2) would score 18 but ends before it starts
    assert best_span([0.0, 0.0, 0.0, 0.0, 9.0], [0.0, 0.0, 9.0, 0.0, 0.0], offsets[:5], 5, 30)[0] == 9.0
    assert best_span([0.0] * 2, [0.0] * 2, [None, None], 2, 30) is None


def test_loss_is_the_mean_of_start_and_end_cross_entropy(windows: tuple[ExtractiveQA, list[dict[str, Any]]],
                                                         minilm_tokenizer: PreTrainedTokenizerBase) -> None:
    task, features = windows
    batch = task.collate(features)
    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=16,
                                                num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=32)).eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch["token_type_ids"])
    expected = (F.cross_entropy(out.start_logits, batch["start_positions"])
                + F.cross_entropy(out.end_logits, batch["end_positions"])) / 2
    torch.testing.assert_close(task.loss(model, batch), expected)
    assert task.head_modules(model) == ["qa_outputs"]
    assert task_from_state(minilm_tokenizer, task.state()).state() == task.state()


# --- the SQuAD metric ---------------------------------------------------------------------------------------------

def test_normalize_answer_follows_the_official_script() -> None:
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple a day, the end") == "apple day end"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words


def test_squad_scores_match_hand_computed_values() -> None:
    # "in Paris, France" vs "Paris": 1 shared token, P 1/3, R 1 -> F1 0.5; vs "Paris France": P 2/3, R 1 -> 0.8
    assert squad_f1("in Paris, France", "Paris") == approx(0.5)
    predictions = ["the Eiffel Tower", "in Paris, France", "Rome"]
    references = [["Eiffel Tower"], ["Paris", "Paris France"], ["Milan"]]
    scores = squad_scores(predictions, references)
    assert scores["exact_match"] == approx(100 / 3)
    assert scores["f1"] == approx(100 * (1 + 0.8 + 0) / 3)
    with pytest.raises(LorakitError, match="example 0 has no reference answers"):
        squad_scores(["x"], [[]])


# --- from a config ------------------------------------------------------------------------------------------------

def test_squad_config_splits_by_article_trains_and_reloads(tmp_path: Path, tiny_classifier_dir: Path) -> None:
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(squad_json([["Reykjavik harbour", "green hills"], ["old farms"], ["the sea"]])))
    config_path = tmp_path / "qa.yaml"
    config_path.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_classifier_dir)},
        "data": {"task": "qa", "format": "squad", "train": str(path), "train_articles": [0, 2],
                 "eval": str(path), "eval_articles": [2, 3], "max_length": 48},
        "lora": {"rank": 4, "alpha": 8, "targets": ["query", "value"]},
        "optim": {"lr": 1e-2, "batch_size": 4, "max_steps": 2},
        "run": {"out_dir": str(tmp_path / "run"), "log_every": 1, "device": "cpu"},
    }))
    config = load_train_config(config_path)
    summary = train_from_config(config)
    assert summary.metric == "f1" and summary.value is not None
    metrics = evaluate_from_config(config, adapter=summary.adapter_dir).metrics
    assert metrics["f1"] == approx(summary.value, "exact") and "exact_match" in metrics


def test_articles_need_the_squad_format_and_a_range() -> None:
    with pytest.raises(ConfigError, match=r"data.train_articles needs data.format=squad.*data.eval_articles must "
                                          r"be \[start, stop\]"):
        load_train_config(None, ["data.task=qa", "data.train=x.json", "data.train_articles=[0, 2]",
                                 "data.eval=x.json", "data.eval_articles=[3, 1]"])


# --- real data ----------------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_real_squad_dev_splits_into_the_documented_articles(minilm_tokenizer: PreTrainedTokenizerBase) -> None:
    if not SQUAD_DEV.is_file():
        pytest.skip(f"{SQUAD_DEV} is absent")
    records = read_squad(SQUAD_DEV)
    assert len(records) == 10570 and len({r["title"] for r in records}) == 48
    train, dev = read_squad(SQUAD_DEV, articles=slice(0, 38)), read_squad(SQUAD_DEV, articles=slice(38, 48))
    assert (len(train), len(dev)) == (8582, 1988)
    assert not {r["context"] for r in train} & {r["context"] for r in dev}
    features = ExtractiveQA(minilm_tokenizer).encode(dev)
    assert len(features) >= len(dev) and max(len(f["input_ids"]) for f in features) <= 384
    # every question has a window labelled with its answer, and the labelled tokens cover exactly the first answer
    # text (bar answers that start or end inside a word: 2 of 1,990 windows with MiniLM's WordPiece)
    labelled = [f for f in features if f["start_positions"] != 0]
    assert len({f["example"] for f in labelled}) == len(dev)
    exact = sum(f["context"][f["offsets"][f["start_positions"]][0]:f["offsets"][f["end_positions"]][1]]
                == f["answers"][0] for f in labelled)
    assert exact >= 0.99 * len(labelled)
