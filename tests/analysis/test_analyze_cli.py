"""`lorakit analyze` end to end: the summary it prints, --json, the report with --out, and a BERT classifier's
adapter (its head from the adapter, no token projection)."""

from __future__ import annotations

import json
import re

import torch
from tiny_adapters import adapter, tiny_causal_lm_dir

from lorakit import LoraConfig, inject, save_adapter
from lorakit.cli import main
from lorakit.models import load_model


def test_analyze_prints_the_summary_and_writes_no_files_without_out(tmp_path, capsys):
    path = adapter(tmp_path / "a", str(tiny_causal_lm_dir(tmp_path / "base")))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["analyze", str(path)]) == 0
    out = capsys.readouterr().out
    assert re_line("modules", "14", out) and re_line("mean_stable_rank", None, out)
    assert "median_amplification" in out and "pass --out DIR" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_analyze_with_out_and_json_prints_one_object_naming_the_report(tmp_path, capsys):
    base = tiny_causal_lm_dir(tmp_path / "base")
    first, second = adapter(tmp_path / "a", str(base)), adapter(tmp_path / "b", str(base), seed=2, rank=2)
    assert main(["analyze", str(first), "--against", str(second), "--out", str(tmp_path / "r"), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["report"] == str(tmp_path / "r" / "report.md") and summary["compared_modules"] == 14
    assert (tmp_path / "r" / "similarity_grid.png").is_file() and (tmp_path / "r" / "amplification.png").is_file()
    assert main(["analyze", str(first), "--out", str(tmp_path / "r"), "--force", "--no-base"]) == 0
    assert not (tmp_path / "r" / "amplification.png").exists()


def test_a_bert_classifier_adapter_loads_its_head_and_skips_the_token_projection(tmp_path, tiny_classifier_dir,
                                                                                   capsys):
    model, _ = load_model(str(tiny_classifier_dir), head="sequence-classification", num_labels=2)
    inject(model, LoraConfig(rank=2, targets=["query", "value"], seed=0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    save_adapter(model, tmp_path / "a")
    assert main(["analyze", str(tmp_path / "a"), "--out", str(tmp_path / "r")]) == 0
    report = (tmp_path / "r" / "report.md").read_text()
    assert "BertForSequenceClassification is not a causal LM" in report
    data = json.loads((tmp_path / "r" / "analysis.json").read_text())
    assert len(data["modules"]) == 4 and all(m["amplification"]["factor"] > 0 for m in data["modules"])


def re_line(key: str, value: str | None, text: str) -> bool:
    """Whether the table in `text` has a row `key  value` (any value when None)."""
    pattern = re.escape(value) if value else r"\S+"
    return re.search(rf"^{key}\s+{pattern}$", text, re.M) is not None


def test_analyze_with_texts_reports_the_net_effect_and_the_orientation_from_the_texts(tmp_path, capsys):
    path = adapter(tmp_path / "a", str(tiny_causal_lm_dir(tmp_path / "base")))
    texts = tmp_path / "texts.txt"
    texts.write_text("w5 w9 w12\n\nw7\n\"w3\\nw40 w41\"\n", encoding="utf-8")
    assert main(["analyze", str(path), "--texts", str(texts), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert re_line("texts", "3", out) and re_line("text_tokens", "7", out)
    report = (tmp_path / "r" / "report.md").read_text()
    assert "Measured on 3 texts (7 tokens)" in report and "| module | ‖ΔW x̄‖ | raised most | lowered most |" in report
    assert report.index("raised most") < report.index("+ end (promoted)")  # the net effect first
    data = json.loads((tmp_path / "r" / "analysis.json").read_text())
    assert [e["module"] for e in data["probe"]["effects"]] == [
        f"model.layers.{i}.{m}" for i in (0, 1) for m in ("mlp.down_proj", "self_attn.o_proj")]
    assert all(t["oriented_by"] == "texts" and t["mean_projection"] > 0 for t in data["tokens"])
