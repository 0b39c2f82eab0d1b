"""The command line: every bad input is one line on stderr and exit code 2; commands run end to end."""

from __future__ import annotations

import json

import pytest
from conftest import assert_close, write_config

from lorakit.cli import main


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _config(tmp_path, model_dir, train, dev, **sections):
    return str(write_config(tmp_path / "c.yaml", model_dir, train, dev, tmp_path / "run", **sections))


def test_missing_data_file(tmp_path, tiny_classifier_dir, sentiment_tsv, capsys):
    config = _config(tmp_path, tiny_classifier_dir, tmp_path / "nope.tsv", sentiment_tsv[1])
    assert main(["train", config, "--quiet"]) == 2
    assert "nope.tsv not found" in _error_line(capsys)


def test_unknown_column(tmp_path, tiny_classifier_dir, sentiment_tsv, capsys):
    config = _config(tmp_path, tiny_classifier_dir, *sentiment_tsv, data={"columns": {"text": "sentense"}})
    assert main(["train", config, "--quiet"]) == 2
    line = _error_line(capsys)
    assert "sentense" in line and "sentence" in line


def test_label_outside_the_label_set(tmp_path, tiny_classifier_dir, sentiment_tsv, capsys):
    train, dev = sentiment_tsv
    dev.write_text(dev.read_text() + "a strange film\t7\n")
    assert main(["train", _config(tmp_path, tiny_classifier_dir, train, dev), "--quiet"]) == 2
    line = _error_line(capsys)
    assert "'7'" in line and "label" in line


def test_empty_dataset(tmp_path, tiny_classifier_dir, sentiment_tsv, capsys):
    train, dev = sentiment_tsv
    train.write_text("sentence\tlabel\n")
    assert main(["train", _config(tmp_path, tiny_classifier_dir, train, dev), "--quiet"]) == 2
    assert "has no records" in _error_line(capsys)


def test_unknown_config_key(tmp_path, tiny_classifier_dir, sentiment_tsv, capsys):
    config = _config(tmp_path, tiny_classifier_dir, *sentiment_tsv, optim={"learning_rate": 0.1})
    assert main(["train", config, "--quiet"]) == 2
    assert "unknown key optim.learning_rate" in _error_line(capsys)


def test_yaml_type_error(tmp_path, tiny_classifier_dir, sentiment_tsv, capsys):
    config = _config(tmp_path, tiny_classifier_dir, *sentiment_tsv, optim={"batch_size": "sixteen"})
    assert main(["train", config, "--quiet"]) == 2
    assert "optim.batch_size must be an int, got 'sixteen'" in _error_line(capsys)


def test_invalid_yaml_names_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: [unclosed\n")
    assert main(["train", str(bad)]) == 2
    assert "is not valid YAML at line" in _error_line(capsys)


def test_every_config_problem_is_reported_at_once(tmp_path, tiny_classifier_dir, sentiment_tsv, capsys):
    config = _config(tmp_path, tiny_classifier_dir, *sentiment_tsv)
    assert main(["train", config, "--optim.lr=abc", "--lora.rank=0", "--run.sed=1"]) == 2
    line = _error_line(capsys)
    assert "optim.lr must be a number" in line and "rank must be a positive int" in line and "run.sed" in line


def test_inspect_of_a_missing_adapter(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "none")]) == 2
    assert "does not exist" in _error_line(capsys)


def test_train_inspect_eval_and_merge_end_to_end(tmp_path, tiny_classifier_dir, sentiment_tsv, capsys):
    config = _config(tmp_path, tiny_classifier_dir, *sentiment_tsv, optim={"max_steps": 4})
    assert main(["train", config, "--quiet", "--run.eval_every=2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["steps"] == 4 and summary["metric"] == "accuracy"
    adapter = summary["adapter_dir"]
    assert main(["inspect", adapter, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["targets"] == 4 and info["rank"] == 4 and info["modules_to_save"] == ["classifier"]
    assert main(["eval", config, "--adapter", adapter]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(summary["value"], abs=0)
    assert main(["merge", "--model", str(tiny_classifier_dir), "--adapter", adapter, "--out",
                 str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()


def test_existing_run_directory_needs_resume(tmp_path, tiny_classifier_dir, sentiment_tsv, capsys):
    config = _config(tmp_path, tiny_classifier_dir, *sentiment_tsv, optim={"max_steps": 1})
    assert main(["train", config, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", config, "--quiet"]) == 2
    assert "pass --resume" in _error_line(capsys)


def test_force_starts_a_run_over_replacing_only_the_files_a_run_writes(tmp_path, tiny_classifier_dir, sentiment_tsv,
                                                                      capsys):
    config = _config(tmp_path, tiny_classifier_dir, *sentiment_tsv, optim={"max_steps": 2},
                     run={"save_every": 1, "keep_last": 5})
    assert main(["train", config, "--quiet"]) == 0
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step-00000002").is_dir()
    (run / "my-notes.txt").write_text("kept")
    assert main(["train", config, "--quiet", "--force", "--optim.max_steps=1"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001"]
    steps = [json.loads(line).get("step", 0) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps and max(steps) == 1  # the old run's lines (step 2) are gone with it
    assert (run / "my-notes.txt").read_text() == "kept"


def test_help_works_for_every_command(capsys):
    from lorakit.cli import COMMANDS

    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: lorakit " + name in capsys.readouterr().out


def test_merged_directory_loads_in_plain_transformers_with_the_adapted_outputs(tmp_path, tiny_classifier_dir,
                                                                             sentiment_tsv, capsys):
    import torch
    from transformers import AutoModelForSequenceClassification

    from lorakit.inference import load_for_inference

    config = _config(tmp_path, tiny_classifier_dir, *sentiment_tsv, optim={"max_steps": 3})
    assert main(["train", config, "--quiet"]) == 0
    adapter = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["adapter_dir"]
    assert main(["merge", "--model", str(tiny_classifier_dir), "--adapter", adapter, "--out",
                 str(tmp_path / "merged")]) == 0
    loaded = load_for_inference(str(tiny_classifier_dir), adapter)
    adapted, tokenizer = loaded.model, loaded.tokenizer
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    batch = tokenizer(["a fine film", "bad acting"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert_close(plain(**batch).logits, adapted(**batch).logits, "fp32 reordered")


@pytest.mark.integration
def test_generate_and_chat_on_the_bundled_model(monkeypatch, capsys):
    import io

    assert main(["generate", "--model", "smollm2", "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "12"]) == 0
    assert "Paris" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n\n"))
    assert main(["chat", "--model", "smollm2", "--max-new-tokens", "12"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_generate_rejects_bad_sampling_values(capsys):
    assert main(["generate", "--prompt", "hi", "--top-p", "0"]) == 2
    assert "top_p must be in (0, 1]" in _error_line(capsys)
