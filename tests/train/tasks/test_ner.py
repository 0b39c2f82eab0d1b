"""lorakit.train.tasks.ner and the CoNLL reader: word -> sub-token label alignment, entity-level F1, bad input."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import SHARED_DATA
from torch import nn
from transformers import BertConfig, BertForTokenClassification, PreTrainedTokenizerBase

from lorakit.errors import LorakitError
from lorakit.train.config import load_train_config
from lorakit.train.data import read_records
from lorakit.train.evaluate import evaluate_from_config
from lorakit.train.loop import build_optimizer
from lorakit.train.metrics_log import read_metrics
from lorakit.train.readers import read_conll
from lorakit.train.run import prepare, train_from_config
from lorakit.train.sections import TrainConfig
from lorakit.train.tasks import make_task, task_from_state
from lorakit.train.tasks.ner import IGNORE, TokenClassification, entity_scores

CONLL_DIR = SHARED_DATA / "conll2003"
TAGS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
# "Johanson" and "Tsvangirai" are several WordPiece sub-tokens each in MiniLM's vocabulary.
SENTENCE = {"tokens": ["Johanson", "met", "Tsvangirai", "in", "Harare", "."],
            "tags": ["B-PER", "O", "B-PER", "O", "B-LOC", "O"]}
CONLL_TEXT = ("-DOCSTART- -X- -X- O\n\n"
              "EU NNP B-NP B-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP B-MISC\n  \t \n"
              "Peter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n\n\n"
              "-DOCSTART- -X- -X- O\n"
              "BRUSSELS NNP B-NP B-LOC")  # the last sentence has no newline after it, as in CoNLL-2003's files


class TagByToken(nn.Module):
    """A fake token classifier: the logits of each position depend on its token id only (`table`: id -> label);
    every other token is predicted as label 0."""

    def __init__(self, vocab_size: int, num_labels: int, table: dict[int, int]):
        super().__init__()
        self.scores = nn.Embedding(vocab_size, num_labels)
        with torch.no_grad():
            self.scores.weight.zero_()
            self.scores.weight[:, 0] = 0.5
            for token, label in table.items():
                self.scores.weight[token, label] = 1.0

    def forward(self, input_ids: torch.Tensor, **_: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.scores(input_ids))  # (B, T, C)


def pieces(tokenizer: PreTrainedTokenizerBase, word: str) -> list[int]:
    return tokenizer(word, add_special_tokens=False)["input_ids"]


# --- reading CoNLL files ------------------------------------------------------------------------------------------

def test_read_conll_splits_sentences_skips_docstart_and_takes_the_last_column(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text(CONLL_TEXT)
    assert read_conll(path) == [
        {"tokens": ["EU", "rejects", "German"], "tags": ["B-ORG", "O", "B-MISC"]},
        {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]},
        {"tokens": ["BRUSSELS"], "tags": ["B-LOC"]},
    ]
    assert read_conll(path, tag_column=2)[1]["tags"] == ["B-NP", "I-NP"]  # chunk tags, by index


def test_read_records_reads_the_conll_format_and_the_conll_suffix(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text(CONLL_TEXT)
    (tmp_path / "d.conll").write_text(CONLL_TEXT)
    assert read_records(tmp_path / "d.txt", format="conll") == read_records(tmp_path / "d.conll") == read_conll(
        tmp_path / "d.txt")


def test_malformed_conll_line_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_text("EU NNP B-NP B-ORG\nrejects\n")
    with pytest.raises(LorakitError, match=r"bad.txt line 2: 1 column\(s\) \('rejects'\), but tag_column -1 needs "
                                           r"at least 2"):
        read_conll(path)
    with pytest.raises(LorakitError, match=r"bad.txt line 1: 4 column\(s\).*tag_column 5 needs at least 6"):
        read_conll(path, tag_column=5)
    with pytest.raises(LorakitError, match="tag_column must be a non-zero int"):
        read_conll(path, tag_column=0)


# --- encoding: labels on each word's first sub-token ------------------------------------------------------------

def test_labels_sit_on_the_first_sub_token_of_each_word(minilm_tokenizer: PreTrainedTokenizerBase) -> None:
    task = TokenClassification(minilm_tokenizer, labels=TAGS)
    (feature,) = task.encode([SENTENCE])
    counts = [len(pieces(minilm_tokenizer, word)) for word in SENTENCE["tokens"]]
    assert counts[0] > 1 and counts[2] > 1  # the test needs words of several sub-tokens
    expected = [IGNORE]  # [CLS]
    for word_tag, count in zip(SENTENCE["tags"], counts, strict=True):
        expected += [TAGS.index(word_tag)] + [IGNORE] * (count - 1)
    expected += [IGNORE]  # [SEP]
    assert feature["labels"] == expected
    assert feature["input_ids"] == [minilm_tokenizer.cls_token_id,
                                    *(t for w in SENTENCE["tokens"] for t in pieces(minilm_tokenizer, w)),
                                    minilm_tokenizer.sep_token_id]
    assert feature["starts"] == [t for t, label in enumerate(expected) if label != IGNORE]


def test_tag_set_is_fitted_from_training_records_outside_first(minilm_tokenizer: PreTrainedTokenizerBase) -> None:
    task = TokenClassification(minilm_tokenizer)
    task.encode([SENTENCE, {"tokens": ["Paris", "Hilton"], "tags": ["B-PER", "I-PER"]}])
    assert task.labels == ["O", "B-LOC", "B-PER", "I-PER"]


def test_tag_outside_the_label_set_names_the_record(minilm_tokenizer: PreTrainedTokenizerBase) -> None:
    task = TokenClassification(minilm_tokenizer, labels=TAGS)
    with pytest.raises(LorakitError, match=r"^record 1: tag 'B-ORG' \(word 0, 'EU'\) is not in the label set "
                                           r"\(O, B-LOC, I-LOC, B-PER, I-PER\)"):
        task.encode([SENTENCE, {"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]}])


def test_tokens_and_tags_of_different_lengths_name_the_record(minilm_tokenizer: PreTrainedTokenizerBase) -> None:
    task = TokenClassification(minilm_tokenizer, labels=TAGS)
    with pytest.raises(LorakitError, match=r"^record 0: 2 tokens but 1 tags"):
        task.encode([{"tokens": ["a", "b"], "tags": ["O"]}])


# --- metric ------------------------------------------------------------------------------------------------------

def test_entity_scores_match_hand_counted_entities() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predicted = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    # gold entities: PER(0-1), LOC(3), ORG; predicted: PER(0-1) right, ORG(3) wrong, ORG right -> 2 of 3 each way
    scores = entity_scores(gold, predicted)
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["f1_PER"] == 1.0 and scores["f1_LOC"] == 0.0
    assert scores["f1_ORG"] == pytest.approx(2 / 3)  # ORG: P 1/2, R 1/1
    # a partial span is wrong entirely: B-PER alone does not match B-PER I-PER
    assert entity_scores([["B-PER", "I-PER"]], [["B-PER", "O"]])["f1"] == 0.0


def test_evaluate_scores_the_first_sub_token_of_each_word(minilm_tokenizer: PreTrainedTokenizerBase) -> None:
    task = TokenClassification(minilm_tokenizer, labels=TAGS)
    features = task.encode([SENTENCE])
    johan, *rest = pieces(minilm_tokenizer, "Johanson")
    harare = pieces(minilm_tokenizer, "Harare")[0]
    # Johanson -> B-PER on its first piece (its later pieces say I-LOC, which must be ignored); Tsvangirai -> O
    # (a missed PER); Harare -> B-LOC. Gold: PER, PER, LOC; predicted: PER, LOC -> P 1, R 2/3.
    table = {johan: TAGS.index("B-PER"), harare: TAGS.index("B-LOC"), **{t: TAGS.index("I-LOC") for t in rest}}
    model = TagByToken(minilm_tokenizer.vocab_size, len(TAGS), table)
    metrics = task.evaluate(model, features, batch_size=1)
    assert metrics["precision"] == 1.0 and metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(0.8) and metrics["f1_LOC"] == 1.0
    assert metrics["f1_PER"] == pytest.approx(2 / 3)


def test_words_cut_off_by_max_length_count_as_missed(minilm_tokenizer: PreTrainedTokenizerBase) -> None:
    task = TokenClassification(minilm_tokenizer, labels=TAGS, max_length=4)  # [CLS] + 2 pieces + [SEP]
    (feature,) = task.encode([{"tokens": ["Paris", "is", "Paris"], "tags": ["B-LOC", "O", "B-LOC"]}])
    assert feature["starts"] == [1, 2, -1]
    model = TagByToken(minilm_tokenizer.vocab_size, len(TAGS), {pieces(minilm_tokenizer, "Paris")[0]: 1})
    metrics = task.evaluate(model, [feature], batch_size=1)
    assert (metrics["precision"], metrics["recall"]) == (1.0, 0.5)


def test_loss_is_cross_entropy_over_first_sub_tokens(minilm_tokenizer: PreTrainedTokenizerBase) -> None:
    task = TokenClassification(minilm_tokenizer, labels=TAGS)
    batch = task.collate(task.encode([SENTENCE, {"tokens": ["Harare"], "tags": ["B-LOC"]}]))
    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=16,
                                                  num_hidden_layers=1, num_attention_heads=2,
                                                  intermediate_size=32, num_labels=len(TAGS))).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"]).logits
    kept = batch["labels"] != IGNORE
    assert int(kept.sum()) == 7  # six words and one
    torch.testing.assert_close(task.loss(model, batch), F.cross_entropy(logits[kept], batch["labels"][kept]))
    assert task.head_modules(model) == ["classifier"]
    with pytest.raises(LorakitError, match="has 5 outputs but the task has 3 labels"):
        TokenClassification(minilm_tokenizer, labels=["O", "B-X", "I-X"]).head_modules(model)


def test_state_rebuilds_the_same_task(minilm_tokenizer: PreTrainedTokenizerBase) -> None:
    task = make_task("ner", minilm_tokenizer, labels=TAGS, max_length=64)
    rebuilt = task_from_state(minilm_tokenizer, task.state())
    assert isinstance(rebuilt, TokenClassification) and rebuilt.state() == task.state()
    assert rebuilt.encode([SENTENCE]) == task.encode([SENTENCE])


# --- from a config ------------------------------------------------------------------------------------------------

def ner_config(tmp_path: Path, model_dir: Path, text: str = CONLL_TEXT, **optim: float) -> TrainConfig:
    """A 3-step LoRA run of the tiny model on `text` (train: 4 copies; dev: 1)."""
    (tmp_path / "train.txt").write_text((text + "\n\n") * 4)
    (tmp_path / "dev.txt").write_text(text)
    config_path = tmp_path / "ner.yaml"
    config_path.write_text(yaml.safe_dump({
        "model": {"name": str(model_dir)},
        "data": {"task": "ner", "format": "conll", "train": str(tmp_path / "train.txt"),
                 "eval": str(tmp_path / "dev.txt"), "max_length": 16},
        "lora": {"rank": 4, "alpha": 8, "targets": ["query", "value"]},
        "optim": {"lr": 1e-2, "batch_size": 4, "max_steps": 3, **optim},
        "run": {"out_dir": str(tmp_path / "run"), "log_every": 1, "device": "cpu"},
    }))
    return load_train_config(config_path)


def test_ner_config_trains_and_the_reloaded_adapter_scores_the_same(tmp_path: Path, tiny_classifier_dir: Path
                                                                     ) -> None:
    config = ner_config(tmp_path, tiny_classifier_dir)
    prepared = prepare(config)
    assert type(prepared.model).__name__ == "BertForTokenClassification"
    assert prepared.task.labels == ["O", "B-LOC", "B-MISC", "B-ORG", "B-PER", "I-PER"]
    assert prepared.model.config.num_labels == 6
    assert prepared.report.modules_to_save == ["classifier"]
    summary = train_from_config(config)
    assert summary.metric == "f1" and summary.value is not None
    evaluation = evaluate_from_config(config, adapter=summary.adapter_dir)
    assert evaluation.metrics["f1"] == pytest.approx(summary.value, abs=0)



def test_new_head_starts_at_the_tag_prior_of_the_training_data(tmp_path: Path, tiny_classifier_dir: Path) -> None:
    sparse = "EU B-ORG\nrejects O\nthe O\nplan O\n\nIt O\nrained O\n"  # 1 B-ORG in 6 words
    prepared = prepare(ner_config(tmp_path, tiny_classifier_dir, sparse))
    assert prepared.task.labels == ["O", "B-ORG"]
    share = torch.tensor([4 * 5 + 1, 4 * 1 + 1]) / (4 * 6 + 2)  # add-one smoothed, over 4 copies
    torch.testing.assert_close(prepared.model.classifier.bias.detach().softmax(-1), share)


def test_head_bias_is_the_log_share_of_each_tag_among_labelled_sub_tokens(minilm_tokenizer: PreTrainedTokenizerBase
                                                                          ) -> None:
    task = TokenClassification(minilm_tokenizer, labels=TAGS)
    features = task.encode([SENTENCE] * 3)  # per copy: 3 O, 1 B-LOC, 2 B-PER, and 0 I-LOC, I-PER
    model = BertForTokenClassification(BertConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=16,
                                                  num_hidden_layers=1, num_attention_heads=2,
                                                  intermediate_size=32, num_labels=len(TAGS)))
    with torch.no_grad():
        model.classifier.bias.zero_()
    task.init_head(model, features)
    expected = torch.tensor([10, 4, 1, 7, 1]) / 23  # add-one over 18 labelled sub-tokens and 5 tags
    torch.testing.assert_close(model.classifier.bias.detach(), expected.log())


def test_head_trains_at_optim_lr_not_at_the_lora_plus_rate_of_b(tmp_path: Path, tiny_classifier_dir: Path) -> None:
    config = ner_config(tmp_path, tiny_classifier_dir, lr=1e-3, lora_plus_ratio=8.0)
    prepared = prepare(config)
    model, task = prepared.model, prepared.task
    optimizer = build_optimizer(model, config.optim)
    head = dict(model.classifier.named_parameters())
    rates = {name: group["lr"] for group in optimizer.param_groups for name, p in head.items()
             if any(p is q for q in group["params"])}
    assert rates == {"weight": 1e-3, "bias": 1e-3}
    before = {name: p.detach().clone() for name, p in head.items()}
    task.loss(model, task.collate(prepared.train[:4])).backward()
    optimizer.step()
    for name, p in head.items():  # Adam's first step moves every coordinate with a gradient by lr
        assert p.grad is not None
        moved = (p.detach() - before[name]).abs()[p.grad.abs() > 1e-6]  # Adam's eps is 1e-8
        assert moved.numel() > 0
        torch.testing.assert_close(moved, torch.full_like(moved, 1e-3), rtol=1e-3, atol=0)


def test_evaluation_tagging_every_word_o_reports_one_predicted_class(minilm_tokenizer: PreTrainedTokenizerBase,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    task = TokenClassification(minilm_tokenizer, labels=TAGS)
    model = TagByToken(minilm_tokenizer.vocab_size, len(TAGS), {})  # label 0, "O", everywhere
    with caplog.at_level(logging.WARNING):
        metrics = task.evaluate(model, task.encode([SENTENCE]), batch_size=1)
    assert metrics["predicted_classes"] == 1.0 and metrics["f1"] == 0.0
    assert "'O' for every one of the 6 evaluated words" in caplog.text
    harare = pieces(minilm_tokenizer, "Harare")[0]
    tagged = TagByToken(minilm_tokenizer.vocab_size, len(TAGS), {harare: TAGS.index("B-LOC")})
    assert task.evaluate(tagged, task.encode([SENTENCE]), batch_size=1)["predicted_classes"] == 2.0


def test_a_run_predicting_one_tag_everywhere_says_so_in_metrics_and_summary(
        tmp_path: Path, tiny_classifier_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logits = TokenClassification._logits

    def always_o(self: TokenClassification, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = logits(self, model, batch)  # (B, T, C), still with a gradient for the adapter
        return out + torch.tensor([100.0] + [0.0] * (out.shape[-1] - 1))

    monkeypatch.setattr(TokenClassification, "_logits", always_o)
    config = ner_config(tmp_path, tiny_classifier_dir)
    summary = train_from_config(config)
    (evaluation,) = [e for e in read_metrics(config.run.out_dir) if "eval_f1" in e]
    assert evaluation["eval_predicted_classes"] == 1
    (row,) = [value for key, value in summary.table() if key == "WARNING"]
    assert "predicted one class for every example" in row and summary.as_json()["warnings"] == [row]


# --- real data ----------------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_real_conll2003_test_file_has_its_documented_sentences(minilm_tokenizer: PreTrainedTokenizerBase) -> None:
    path = CONLL_DIR / "test.txt"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    records = read_conll(path)
    assert len(records) == 3453 and sum(len(r["tokens"]) for r in records) == 46435
    task = TokenClassification(minilm_tokenizer)
    features = task.encode(records)
    assert task.labels == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    gold = [[task.labels[t] for t in f["tags"]] for f in features]
    assert entity_scores(gold, gold)["f1"] == 1.0
    assert sum(tag.startswith("B-") for r in records for tag in r["tags"]) == 1668 + 1617 + 1661 + 702


def test_empty_tag_names_the_record_and_the_word(minilm_tokenizer: PreTrainedTokenizerBase) -> None:
    records = [{"tokens": ["EU"], "tags": ["B-ORG"]}, {"tokens": ["German", "call"], "tags": ["B-MISC", " "]}]
    with pytest.raises(LorakitError, match=r"record 1: empty tag for word 1 \('call'\)"):
        TokenClassification(minilm_tokenizer).fit_labels(records)
