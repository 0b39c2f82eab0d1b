"""Shared by the page's tests: the upload cap, a tiny recipe, a working directory for the page (the tiny classifier
and the toy sentiment data copied in, recipes/tiny.yaml), and a tiny causal LM adapter."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

UPLOAD_CAP = 4096


def tiny_recipe(max_steps: int = 6, out_dir: str = "runs/default") -> dict:
    return {
        "model": {"name": "tiny-bert"},
        "data": {"task": "classification", "train": "data/train.tsv", "eval": "data/dev.tsv",
                 "columns": {"text": "sentence", "label": "label"}, "max_length": 16},
        "lora": {"rank": 4, "alpha": 8, "targets": ["query", "value"]},
        "optim": {"lr": 1e-2, "batch_size": 8, "max_steps": max_steps, "warmup_steps": 1},
        "run": {"out_dir": out_dir, "log_every": 1, "eval_every": 0, "seed": 3},
    }


# A character-level tokenizer over the tiny Llama's 128 ids, with a chat template (as in tests/test_generation.py).
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = [chr(c) for c in range(32, 127)] + ["\n"] + [chr(c) for c in range(0xC0, 0xC0 + 28)]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")


def make_lm_adapter(root, runs_dir, name: str = "lm"):
    """A tiny Llama with a character tokenizer saved at root/tiny-llama, and an adapter on it with random
    (nonzero) B factors published as runs_dir/name/adapter: a run whose answers differ from the base's."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Split
    from tokenizers.processors import TemplateProcessing
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lorakit.config import LoraConfig
    from lorakit.inject import inject
    from lorakit.io import save_adapter

    backend = Tokenizer(WordLevel({t: i for i, t in enumerate(SPECIALS + CHARS)}, unk_token="<unk>"))
    backend.pre_tokenizer = Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = TEMPLATE
    torch.manual_seed(28)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    base = root / "tiny-llama"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    inject(model, LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "o_proj", "down_proj"], seed=0))
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_b" in param_name.lower():
                param.normal_(0.0, 1.0)
    (runs_dir / name).mkdir(parents=True, exist_ok=True)
    return save_adapter(model, runs_dir / name / "adapter", base_model=str(base))


POSITIVE = ["a fine film", "great acting", "wonderful and moving", "a joy to watch", "superb story", "loved it"]
NEGATIVE = ["a dull film", "bad acting", "boring and slow", "a waste of time", "awful story", "hated it"]


def make_workdir(root: Path, tiny_classifier_dir: Path) -> Path:
    """A working directory for the page at `root`: tiny-bert/ (the tiny classifier), data/train.tsv and
    data/dev.tsv (the toy sentiment task of tests/conftest.py), recipes/tiny.yaml training on them."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tiny_classifier_dir, root / "tiny-bert")
    (root / "data").mkdir()
    rows = [(s, 1) for s in POSITIVE] * 4 + [(s, 0) for s in NEGATIVE] * 4
    (root / "data" / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    (root / "data" / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows[::4]))
    (root / "recipes").mkdir()
    (root / "recipes" / "tiny.yaml").write_text(yaml.safe_dump(tiny_recipe()))
    return root


def page_settings(root: Path):
    """The page's settings for working directory `root`, with the small upload cap of the tests."""
    from lorakit.ui.security import UiSettings

    return UiSettings(root=root, runs_dir=Path("runs"), max_upload_bytes=UPLOAD_CAP)
