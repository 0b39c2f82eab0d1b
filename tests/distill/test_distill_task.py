"""lorakit.distill.task and .cache: the KD task on tiny models (a BERT classifier, a Llama causal LM) against the
whole-logits computation, the teacher-logit cache against the teacher run on the fly, and stale caches refused."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from distill_models import tiny_causal, word_tokenizer
from transformers import BertConfig, BertForSequenceClassification

from lorakit.distill import DistillTask, Teacher, data_fingerprint, read_cache, write_cache
from lorakit.errors import LorakitError
from lorakit.lm_loss import IGNORE
from lorakit.train.tasks import InstructionTuning, SequenceClassification

RECORDS = [{"text": "good film", "label": "1"}, {"text": "bad film", "label": "0"},
           {"text": "great good film", "label": "1"}, {"text": "dull", "label": "0"}, {"text": "a b c", "label": "1"}]
CONVERSATIONS = [{"instruction": "say yes", "output": "yes yes"}, {"instruction": "say hello world", "output": "hello"},
                 {"instruction": "a", "output": "b c a b"}]


def _bert(seed: int, vocab: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32,
                                                    max_position_embeddings=64, num_labels=2)).eval()


def _classification(alpha: float = 0.5):
    tokenizer = word_tokenizer()
    task = SequenceClassification(tokenizer, labels=["0", "1"], max_length=16)
    teacher = Teacher(_bert(1, len(tokenizer)), tokenizer, "teacher", "classification", ["0", "1"])
    distilled = DistillTask(task, teacher, kind="classification", alpha=alpha, temperature=2.0)
    return _bert(0, len(tokenizer)).train(), task, distilled, distilled.index(task.encode(RECORDS))


def _causal(alpha: float = 0.5, chunk_size: int = 3):
    tokenizer = word_tokenizer()
    task = InstructionTuning(tokenizer, max_length=32)
    teacher = Teacher(tiny_causal(len(tokenizer), 1), tokenizer, "teacher", "causal-lm", None)
    distilled = DistillTask(task, teacher, kind="causal-lm", alpha=alpha, temperature=2.0, chunk_size=chunk_size)
    return tiny_causal(len(tokenizer), 0), task, distilled, distilled.index(task.encode(CONVERSATIONS))


def _whole_logits_kd(student, teacher, batch, alpha, t):
    """The mean KD loss over supervised rows from the two models' whole (B, T, V) logits, written out."""
    supervised = batch["labels"][:, 1:] != IGNORE
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][supervised]
    with torch.no_grad():
        q = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][supervised]
    targets = batch["labels"][:, 1:][supervised]
    log_p = s - torch.log(torch.exp(s).sum(-1, keepdim=True))
    ce = -log_p[torch.arange(len(targets)), targets]
    p_s = torch.exp(s / t) / torch.exp(s / t).sum(-1, keepdim=True)
    p_t = torch.exp(q / t) / torch.exp(q / t).sum(-1, keepdim=True)
    kl = (p_t * (torch.log(p_t) - torch.log(p_s))).sum(-1)
    return (alpha * ce + (1 - alpha) * t * t * kl).mean()


def test_causal_kd_in_chunks_equals_the_whole_logits_loss_and_its_gradients():
    student, _, distilled, features = _causal(alpha=0.3, chunk_size=3)
    batch = distilled.collate(features)
    params = [p for p in student.parameters()]
    got = distilled.loss(student, batch)
    grads = torch.autograd.grad(got, params)
    expected = _whole_logits_kd(student, distilled.teacher.model, batch, 0.3, 2.0)
    expected_grads = torch.autograd.grad(expected, params)
    assert_close(got, expected, "fp32 reordered")
    for a, b in zip(grads, expected_grads, strict=True):
        assert_close(a, b, "fp32 reordered")


def test_alpha_one_is_the_student_tasks_own_loss():
    student, task, distilled, features = _classification(alpha=1.0)
    student.eval()  # no dropout: the two forward passes see the same network
    batch = distilled.collate(features)
    assert torch.equal(distilled.loss(student, batch), task.loss(student, {k: v for k, v in batch.items()
                                                                           if k != "example_index"}))
    student, task, distilled, features = _causal(alpha=1.0)
    batch = distilled.collate(features)
    plain = task.loss(student, task.collate([{k: v for k, v in f.items() if k != "example_index"} for f in features]))
    assert_close(distilled.loss(student, batch), plain, "fp32 reordered")


def test_the_teacher_stays_frozen_and_gets_no_gradient():
    student, _, distilled, features = _causal()
    distilled.loss(student, distilled.collate(features)).backward()
    assert all(p.grad is None for p in distilled.teacher.model.parameters())
    assert any(p.grad is not None for p in student.parameters())


@pytest.mark.parametrize("setup", [_classification, _causal])
def test_cached_logits_give_the_on_the_fly_loss(setup, tmp_path):
    student, _, distilled, features = setup()
    student.eval()
    batch = distilled.collate([features[2], features[0], features[1]])  # another order than the cache's
    on_the_fly = distilled.loss(student, batch)
    built = distilled.build_cache(features, batch_size=2)
    keys = {"data": data_fingerprint(features), "teacher": distilled.teacher.fingerprint(), "kind": distilled.kind}
    write_cache(tmp_path / "c.safetensors", built.logits, built.offsets, **keys)
    distilled.use_cache(read_cache(tmp_path / "c.safetensors", **keys))
    assert_close(distilled.loss(student, batch), on_the_fly, "fp32 reordered")


def test_a_cache_of_other_data_or_another_teacher_is_refused(tmp_path):
    _, _, distilled, features = _classification()
    path = tmp_path / "c.safetensors"
    keys = {"data": data_fingerprint(features), "teacher": distilled.teacher.fingerprint(), "kind": "classification"}
    write_cache(path, torch.zeros(len(features), 2), None, teacher_name="old-teacher", **keys)
    with pytest.raises(LorakitError, match=r"stale: it was built from other training data"):
        read_cache(path, **{**keys, "data": data_fingerprint(features[1:])})
    with pytest.raises(LorakitError, match=r"stale: it was built from another teacher \(old-teacher"):
        read_cache(path, **{**keys, "teacher": Teacher(_bert(5, 19), word_tokenizer(), "t", None, None).fingerprint()})
    with pytest.raises(LorakitError, match=r"holds classification logits, this run needs causal-lm"):
        read_cache(path, **{**keys, "kind": "causal-lm"})
    path.write_bytes(b"not a cache")
    with pytest.raises(LorakitError, match="not a readable teacher-logit cache"):
        read_cache(path, **keys)


def test_the_teacher_fingerprint_follows_the_weights_not_the_object():
    tokenizer = word_tokenizer()
    same = [Teacher(_bert(1, 19), tokenizer, str(i), None, None).fingerprint() for i in range(2)]
    assert same[0] == same[1]
    assert Teacher(_bert(2, 19), tokenizer, "x", None, None).fingerprint() != same[0]


def test_a_causal_cache_above_the_size_limit_is_refused_before_the_teacher_runs():
    _, _, distilled, features = _causal()
    with pytest.raises(LorakitError, match=r"would take .* above distill.cache_max_gb.*distill.cache=false"):
        distilled.build_cache(features, max_bytes=100)
