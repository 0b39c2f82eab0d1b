"""Distillation through `lorakit.train` on tiny models: a student learns from a teacher under each training method,
for classification and for a causal LM, with the teacher on the fly or cached, and a refused run leaves nothing."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import write_config
from distill_models import save_causal_dir, save_classifier_dir, word_tokenizer
from safetensors import safe_open

from lorakit.distill import CACHE_NAME
from lorakit.errors import LorakitError
from lorakit.train.config import load_train_config
from lorakit.train.run import train_from_config

METHODS = {"lora": [], "full": [], "factors": ["--compress.ratio=0.5"]}


def _losses(summary_dir) -> list[float]:
    lines = (summary_dir / "metrics.jsonl").read_text().splitlines()
    return [entry["loss"] for entry in map(json.loads, lines) if "loss" in entry]


@pytest.mark.parametrize("method", list(METHODS))
def test_a_classifier_learns_from_its_teacher_and_the_loss_decreases(method, tmp_path, tiny_classifier_dir,
                                                                      sentiment_tsv, minilm_tokenizer):
    teacher = save_classifier_dir(tmp_path / "teacher", minilm_tokenizer, ["0", "1"])
    config = write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run",
                          optim={"max_steps": 12, "lr": 1e-2 if method == "lora" else 2e-3},
                          run={"method": method, "out_dir": str(tmp_path / "run"), "log_every": 1, "seed": 3})
    flags = [f"--distill.teacher={teacher}", "--distill.alpha=0.5", "--distill.temperature=2", *METHODS[method]]
    summary = train_from_config(load_train_config(config, flags))
    losses = _losses(tmp_path / "run")
    assert summary.method == f"{method}+distill"
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    saved = json.loads((tmp_path / "run" / ("adapter" if method == "lora" else "model") / "task.json").read_text())
    assert saved["task"] == "classification" and saved["labels"] == ["0", "1"]  # the student's task, not a KD task


def test_a_cached_run_writes_the_cache_once_and_a_forced_rerun_reads_it_back(tmp_path, tiny_classifier_dir,
                                                                              sentiment_tsv, minilm_tokenizer):
    teacher = save_classifier_dir(tmp_path / "teacher", minilm_tokenizer, ["0", "1"])
    config = write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run")
    flags = [f"--distill.teacher={teacher}", "--distill.cache=true"]
    train_from_config(load_train_config(config, flags))
    cache = tmp_path / "run" / CACHE_NAME
    written = cache.stat().st_mtime_ns
    with safe_open(str(cache), framework="pt") as f:
        assert f.get_tensor("logits").shape == (48, 2)  # one row per training sentence, one logit per label
    first = _losses(tmp_path / "run")
    train_from_config(load_train_config(config, flags), force=True)
    assert cache.stat().st_mtime_ns == written
    assert _losses(tmp_path / "run") == first


def test_a_causal_lm_learns_from_its_teacher_on_response_tokens(tmp_path):
    tokenizer = word_tokenizer()
    student, teacher = save_causal_dir(tmp_path / "s", 0, tokenizer), save_causal_dir(tmp_path / "t", 1, tokenizer)
    rows = [{"instruction": "say yes", "output": "yes yes"}, {"instruction": "say no", "output": "no"},
            {"instruction": "say hello", "output": "hello world"}, {"instruction": "a b", "output": "c"}] * 4
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": str(student)}, "data": {"task": "instruction", "train": str(data), "max_length": 32},
        "lora": {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]},
        "optim": {"lr": 2e-2, "batch_size": 4, "max_steps": 12}, "run": {"out_dir": str(tmp_path / "run"),
                                                                         "log_every": 1, "seed": 0},
        "distill": {"teacher": str(teacher), "alpha": 0.2, "temperature": 1.5, "cache": True, "chunk_size": 5}}))
    train_from_config(load_train_config(config))
    losses = _losses(tmp_path / "run")
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    with safe_open(str(tmp_path / "run" / CACHE_NAME), framework="pt") as f:
        assert f.get_tensor("logits").shape[1] == len(tokenizer)  # one row of the vocabulary per response token


def test_a_refused_teacher_leaves_no_run_directory(tmp_path, tiny_classifier_dir, sentiment_tsv, minilm_tokenizer):
    teacher = save_classifier_dir(tmp_path / "teacher", minilm_tokenizer, ["0", "1", "2"])
    config = write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run")
    with pytest.raises(LorakitError, match=r"^distill: teacher .* has labels \['0', '1', '2'\]"):
        train_from_config(load_train_config(config, [f"--distill.teacher={teacher}"]))
    assert not (tmp_path / "run").exists()
