"""Tiny random-config models (milliseconds to build) and the one tolerance table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"  # the real data sets, beside the checkout

# Tolerances, (rtol, atol). One row per dtype for a result against the same computation in that dtype, and a named
# row, with its reason, where a comparison needs other numbers. Every comparison in the suite takes its numbers from
# here. A row used with `relative_error` (one norm-wise figure per tensor) reads rtol only. The last rows are the
# bounds a claim is made of (how far a sketch may fall short, how much an adapter must change), not roundoff.
TOLERANCES: dict[torch.dtype | str, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-6, 1e-6),
    torch.bfloat16: (2e-2, 2e-2),
    # The same inputs through the same operations: bit for bit.
    "exact": (0.0, 0.0),
    # A float64 formula summed in another order (a fused kernel against autograd's composition): ~1e-15 apart.
    "float64 reordered": (1e-12, 1e-12),
    # An fp32 result by another route (merged W + s·BA against the adapter path, W - s·BA + s·BA after a principal
    # init, batched or chunked sums): a few fp32 ulps per operation, added up over the layers.
    "fp32 reordered": (1e-5, 1e-5),
    # The same fp32 products by another GEMM library (lorakit's oneDNN products against PEFT's through torch's oneMKL,
    # lorakit.gemm): sums in other orders, added up over the layers; SmolLM2's 30 layers' logits are 4e-6 apart.
    "fp32 other GEMM kernel": (1e-5, 1e-5),
    # An fp32 layer against its float64 formula on O(1) values: the absolute roundoff of sums of dozens of products.
    "fp32 vs float64 formula": (1e-6, 1e-5),
    # UᵀU of fp32 orthonormal columns against the identity: sums of a few hundred fp32 products.
    "fp32 orthonormal": (0.0, 1e-5),
    # An fp32 SVD's rank-r part against float64's: near a small gap singular vectors move by ~ eps / gap.
    "fp32 SVD vs float64 SVD": (1e-4, 1e-5),
    # A randomized SVD (3 power iterations) of rank r plus 1e-4 noise against the exact SVD.
    "randomized SVD vs exact": (1e-3, 1e-4),
    # One randomized SVD against another with a different sketch, of a matrix with a clear gap after rank r.
    "randomized SVD, other sketch": (1e-4, 1e-5),
    # A sketch of `rank` columns and a few power iterations leaves at most 2% more residual than the exact SVD.
    "randomized SVD residual vs exact": (2e-2, 0.0),
    # A mean over tokens or micro-batches in fp32, summed in another order (accumulated gradients, a chunked loss).
    "fp32 summed in another order": (1e-5, 1e-6),
    # An fp32 model against an ONNX graph of the same weights run by onnxruntime (other kernels, other summation
    # orders, another bicubic resize) over 12 layers: DINOv2-small's outputs (up to ~10) are 9e-6 apart at most.
    "fp32 vs onnxruntime": (1e-5, 5e-5),
    # Whisper tiny.en converted to transformers against the CTranslate2 runtime, both fp32 from the same fp16 weights
    # (other GEMM and GELU kernels, other summation orders): on four clips, encoder outputs (up to ~13) 7e-5 apart
    # and decoder logits (up to ~34) 9e-5 apart at most.
    "fp32 vs CTranslate2": (1e-4, 2e-4),
    # A float64 score computed by a library (sacrebleu) against the same formula written out: 1e-9 on values ~50.
    "float64 library vs formula": (0.0, 1e-9),
    # The least relative change an adapter must make to an output, or a comparison against the base is vacuous.
    "adapter changes output": (1e-3, 0.0),
    # The std of 64,000 N(0, s²) draws has a relative standard error of 1/sqrt(2n) = 0.3%: 2% is seven of them.
    "sample std": (2e-2, 0.0),
    # The largest of 800 U(-b, b) draws falls below 0.9·b with probability 0.9^800 (about 1e-37).
    "uniform max below bound": (1e-1, 0.0),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, row: torch.dtype | str | None = None) -> None:
    """torch.testing.assert_close with the (rtol, atol) of TOLERANCES[row] (default: the row of expected's dtype)."""
    rtol, atol = TOLERANCES[expected.dtype if row is None else row]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def approx(expected: float, row: torch.dtype | str = torch.float64) -> object:
    """pytest.approx with the (rtol, atol) of TOLERANCES[row]; by default float64's, the precision of a Python float."""
    rtol, atol = TOLERANCES[row]
    return pytest.approx(expected, rel=rtol, abs=atol)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))


def tiny_llama(seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def tiny_bert(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def token_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- training fixtures: a tiny local model on disk

POSITIVE = ["a fine film", "great acting", "wonderful and moving", "a joy to watch", "superb story", "loved it"]
NEGATIVE = ["a dull film", "bad acting", "boring and slow", "a waste of time", "awful story", "hated it"]


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from lorakit.models import load_model

    return load_model("minilm")[1]


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory, minilm_tokenizer):
    """A tiny BERT (random weights, MiniLM's tokenizer) saved as a local model directory."""
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    from transformers import BertModel

    BertModel(config).save_pretrained(path)
    minilm_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def sentiment_tsv(tmp_path):
    """Train and dev TSV files of a toy sentiment task, SST-2's layout (sentence<TAB>label)."""
    rows = [(s, 1) for s in POSITIVE] * 4 + [(s, 0) for s in NEGATIVE] * 4
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    dev = tmp_path / "dev.tsv"
    dev.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows[::4]))
    return train, dev


def write_config(path, model_dir, train, dev, out_dir, **sections):
    """A small classification config as YAML; `sections` override keys, e.g. optim={"max_steps": 4}."""
    import yaml

    config = {
        "model": {"name": str(model_dir)},
        "data": {"task": "classification", "train": str(train), "eval": str(dev),
                 "columns": {"text": "sentence", "label": "label"}, "max_length": 16},
        "lora": {"rank": 4, "alpha": 8, "targets": ["query", "value"], "dropout": 0.1},
        "optim": {"lr": 1e-2, "batch_size": 8, "max_steps": 6, "warmup_steps": 1},
        "run": {"out_dir": str(out_dir), "log_every": 1, "seed": 3},
    }
    for section, values in sections.items():
        config[section].update(values)
    path.write_text(yaml.safe_dump(config))
    return path


# ---------------------------------------------------------------- the bad-input harness (tests/bad_input/)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (or `root` itself when it is a file) by relative path, with its bytes."""
    root = Path(root)
    if root.is_file():
        return {"": root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def expect_cli_error(argv: list[str], capsys, *, matches: str, watch: list[Path] = ()) -> str:
    """Run `lorakit ARGV` in this process and check the promise made for bad input: exit code 2, exactly one
    line on stderr, starting `error: ` and matching the regular expression `matches`, no traceback, and every file
    that existed under the `watch` paths byte-identical afterwards. Returns the error line."""
    import re

    from lorakit.cli import main

    before = {w: snapshot(w) for w in watch}
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own exit, if any escaped
        code = e.code
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert code == 2, f"exit code {code}, stderr: {err}"
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}: {err}"
    assert lines[0].startswith("error: "), lines[0]
    assert re.search(matches, lines[0]), f"{lines[0]!r} does not match {matches!r}"
    for path, files in before.items():
        after = snapshot(path)
        assert {k: after.get(k) for k in files} == files, f"files under {path} changed or vanished"
    return lines[0]
