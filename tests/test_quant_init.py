"""lorakit.quant_init: QLoRA, QPiSSA and LoftQ initialisations on a quantized base, and their errors."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, tiny_llama

from lorakit import LoraConfig, LorakitError, inject, load_adapter, quant, save_adapter
from lorakit.layers import lora_modules
from lorakit.quant_init import init_matrix, quantize_with_init, reconstruction_error

bnb = pytest.importorskip("bitsandbytes")

CONFIG = LoraConfig(rank=4, alpha=4, targets=["q_proj", "v_proj", "down_proj"])


def _weight() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(64, 6, generator=gen) @ torch.randn(6, 128, generator=gen)  # a strong rank-6 part
    return low * 0.05 + torch.randn(64, 128, generator=gen) * 0.02


def _bnb_nf4(matrix: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' own NF4 round trip (block 64, double quantization), outside lorakit."""
    packed, state = bnb.functional.quantize_4bit(matrix.contiguous(), blocksize=64, compress_statistics=True,
                                                 quant_type="nf4")
    return bnb.functional.dequantize_4bit(packed, state).double()


def test_qpissa_error_equals_a_direct_computation():
    w = _weight()
    a, b, q, _ = init_matrix(w, 4, 1.0, "nf4", "qpissa")
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    top = (u[:, :4] * s[:4]) @ vh[:4]  # (64, 128): the rank-4 part in float64
    direct = torch.linalg.norm(w.double() - (_bnb_nf4((w.double() - top).float()) + top)).item()
    assert reconstruction_error(w, q, a, b, 1.0) == pytest.approx(direct, rel=1e-3)


def test_qlora_error_equals_bitsandbytes_round_trip():
    w = _weight()
    a, b, q, _ = init_matrix(w, 4, 1.0, "nf4", "qlora")
    assert reconstruction_error(w, q, a, b, 1.0) == pytest.approx(torch.linalg.norm(w.double() - _bnb_nf4(w)).item(),
                                                                  rel=1e-6)


def test_loftq_error_falls_below_qpissa_and_qlora():
    w = _weight()
    errors = {}
    for method in ("qlora", "qpissa", "loftq"):
        a, b, q, _ = init_matrix(w, 4, 1.0, "nf4", method, iters=5)
        errors[method] = reconstruction_error(w, q, a, b, 1.0)
    assert errors["loftq"] < errors["qpissa"] < errors["qlora"]


def test_report_sums_per_matrix_errors_and_quantizes_every_block_linear():
    model = tiny_llama()
    inject(model, CONFIG)
    report = quantize_with_init(model, "nf4", "loftq", iters=2)
    assert len(report.matrices) == 6
    assert report.error == pytest.approx(sum(m.error for m in report.matrices))
    assert 0 < report.cut < 1
    quantized = {n for n, p in model.named_parameters() if quant.is_quantized(p)}
    assert len(quantized) == 2 * 7 and not any("lora_" in n for n in quantized)  # 7 linears per block


def test_principal_adapter_reloads_to_the_same_quantized_residual(tmp_path, token_ids):
    model = tiny_llama()
    inject(model, CONFIG)
    quantize_with_init(model, "nf4", "qpissa")
    expected = model(token_ids).logits
    save_adapter(model, tmp_path / "a")
    again = tiny_llama()
    load_adapter(again, tmp_path / "a")
    quant.quantize_model(again, "nf4")
    for (_, m1), (_, m2) in zip(lora_modules(model), lora_modules(again), strict=True):
        assert torch.equal(m1.weight.data, m2.weight.data)
    assert_close(again(token_ids).logits, expected, "exact")


def test_unknown_method_and_quantized_model_are_refused():
    model = tiny_llama()
    inject(model, CONFIG)
    with pytest.raises(LorakitError, match="unknown quantized init 'gptq'"):
        quantize_with_init(model, "nf4", "gptq")
    quantize_with_init(model, "nf4", "qlora")
    with pytest.raises(LorakitError, match="needs a dense, unmerged adapted model"):
        quantize_with_init(model, "nf4", "qpissa")


def test_training_with_loftq_init_saves_a_principal_adapter_on_nf4(tmp_path, tiny_classifier_dir, sentiment_tsv):
    from conftest import write_config

    from lorakit.cli import main
    from lorakit.io import inspect_adapter

    config = write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run",
                          optim={"max_steps": 2})
    argv = ["train", str(config), "--model.quantize=nf4", "--model.quantize_init=loftq", "--model.loftq_iters=2"]
    assert main([*argv, "--quiet"]) == 0
    info = inspect_adapter(tmp_path / "run" / "adapter")
    assert info["quantization"] == "nf4" and info["init"] == "principal"


@pytest.mark.parametrize("method", ["qpissa", "loftq"])
@pytest.mark.parametrize("shape", [(7, 9), (5, 63), (64, 1)], ids=["odd-both", "odd-width", "one-column"])
def test_randomized_principal_init_handles_shapes_off_the_kernel_s_path(method, shape):
    """Odd widths and single columns leave bitsandbytes' CPU NF4 kernel for its generic decoder: the init still
    runs with the randomized SVD, and its reported error equals a direct computation."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    rank = min(shape)
    a, b, q, _ = init_matrix(w, rank, 2.0, "nf4", method, svd_iters=2,
                                        generator=torch.Generator().manual_seed(1))
    direct = torch.linalg.norm(w.double() - (quant.dequantize(q, torch.float64) + 2.0 * b.double() @ a.double()))
    assert reconstruction_error(w, q, a, b, 2.0) == pytest.approx(direct.item(), rel=1e-12)
    assert direct < torch.linalg.norm(w.double() - quant.dequantize(quant.quantize_weight(w, "nf4"), torch.float64))
