"""LoRA on convolutions beyond the plain ones: a `Conv2d` subclass that pads in its own forward (EfficientNet's
`Conv2dStaticSamePadding`), and grouped and depthwise convolutions (one low-rank update per group, PEFT's layout);
merge algebra, refusals, and PEFT loading lorakit's files."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES, assert_close
from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding
from torch import nn

from lorakit import LoraConfig, inject, load_adapter, merge, save_adapter, unmerge
from lorakit.errors import ConfigError, LorakitError
from lorakit.layers import LoraConv, lora_modules
from lorakit.merge import delta_weight

REORDERED = "fp32 reordered"


def same_padding_conv(in_ch: int, out_ch: int, kernel: int, stride: int, groups: int = 1) -> nn.Conv2d:
    torch.manual_seed(0)
    return Conv2dStaticSamePadding(in_ch, out_ch, kernel, stride=stride, image_size=16, groups=groups, bias=False)


def randomize(module: LoraConv, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (module.lora_A.weight, module.lora_B.weight):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


KINDS = {  # (in, out, kernel, stride, groups, rank)
    "stem-3x3-stride2": (3, 8, 3, 2, 1, 4),
    "pointwise-1x1": (8, 12, 1, 1, 1, 4),
    "depthwise-5x5-stride2": (8, 8, 5, 2, 8, 8),
    "grouped-3x3": (8, 12, 3, 1, 4, 8),
}


@pytest.mark.parametrize("kind", KINDS)
def test_b_zero_gives_the_same_padding_conv_output_bit_for_bit(kind):
    in_ch, out_ch, kernel, stride, groups, rank = KINDS[kind]
    base = same_padding_conv(in_ch, out_ch, kernel, stride, groups)
    x = torch.randn(2, in_ch, 16, 16)
    expected = base(x)
    lora = LoraConv(base, rank, 2.0 * rank, 2.0)
    with torch.no_grad():
        lora.lora_A.weight.normal_()  # A random, B zero: the adapter path adds exactly zero
    assert torch.equal(lora(x), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_equals_the_padded_convolution_with_w_plus_delta_w(kind):
    in_ch, out_ch, kernel, stride, groups, rank = KINDS[kind]
    base = same_padding_conv(in_ch, out_ch, kernel, stride, groups)
    lora = LoraConv(base, rank, 2.0 * rank, 2.0)
    randomize(lora)
    x = torch.randn(2, in_ch, 16, 16)
    padded = base.static_padding(x)  # the reference pads as the base layer does, then convolves W + ΔW
    expected = F.conv2d(padded.double(), (lora.weight.double() + delta_weight(lora).double()), None, base.stride,
                        0, 1, groups)
    assert_close(lora(x).double(), expected, "fp32 vs float64 formula")


@pytest.mark.parametrize("kind", KINDS)
def test_delta_w_has_the_base_weight_shape_and_one_block_per_group(kind):
    in_ch, out_ch, kernel, stride, groups, rank = KINDS[kind]
    lora = LoraConv(same_padding_conv(in_ch, out_ch, kernel, stride, groups), rank, 2.0 * rank, 2.0)
    randomize(lora)
    delta = delta_weight(lora)
    assert delta.shape == lora.weight.shape == (out_ch, in_ch // groups, kernel, kernel)
    a = lora.lora_A.weight.double().flatten(1)  # (rank, in / groups * k * k)
    b = lora.lora_B.weight.double().flatten(1)  # (out, rank / groups)
    out_g, rank_g = out_ch // groups, rank // groups
    for j in range(groups):  # group j: B_j (out/g, rank/g) @ A_j (rank/g, fan_in), a float64 reference
        expected = b[j * out_g:(j + 1) * out_g] @ a[j * rank_g:(j + 1) * rank_g] * lora.scaling
        assert_close(delta[j * out_g:(j + 1) * out_g].flatten(1).double(), expected, "fp32 vs float64 formula")


class TinyCnn(nn.Module):
    """EfficientNet's kinds in miniature: a same-padded stem, a depthwise, a grouped and a pointwise convolution."""

    def __init__(self, same_padding: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        conv = (lambda i, o, k, s, g=1: Conv2dStaticSamePadding(i, o, k, stride=s, image_size=16, groups=g)) \
            if same_padding else (lambda i, o, k, s, g=1: nn.Conv2d(i, o, k, stride=s, padding=k // 2, groups=g))
        self.stem = conv(3, 8, 3, 2)
        self.depthwise = conv(8, 8, 3, 1, 8)
        self.grouped = conv(8, 8, 3, 1, 2)
        self.pointwise = conv(8, 8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(F.relu(self.grouped(F.relu(self.depthwise(F.relu(self.stem(x)))))))


def adapted(same_padding: bool = True, **config) -> nn.Module:
    model = TinyCnn(same_padding)
    inject(model, LoraConfig(rank=8, alpha=16, targets=["stem", "depthwise", "grouped", "pointwise"], **config))
    for i, (_, module) in enumerate(lora_modules(model)):
        randomize(module, seed=i)
    return model


def test_merged_model_equals_unmerged_and_unmerge_restores_the_weights():
    model = adapted().eval()
    x = torch.randn(2, 3, 16, 16)
    weights = {n: m.weight.detach().clone() for n, m in lora_modules(model)}
    unmerged = model(x)
    merge(model)
    assert_close(model(x), unmerged, REORDERED)
    unmerge(model)
    for name, module in lora_modules(model):
        assert_close(module.weight, weights[name], REORDERED)


def test_a_rank_that_is_not_a_multiple_of_groups_is_refused_naming_why():
    with pytest.raises(ConfigError, match=r"rank 4 for 'depthwise': a grouped convolution \(groups=8\) gets one "
                                          r"low-rank update per group, so rank must be a multiple of 8.*depthwise "
                                          r"convolution .*exclude it from the targets"):
        inject(TinyCnn(), LoraConfig(rank=4, alpha=8, targets=["depthwise"]))


def test_rank_pattern_can_give_a_depthwise_conv_rank_groups():
    model = TinyCnn()
    inject(model, LoraConfig(rank=4, alpha=8, targets=["stem", "depthwise"], rank_pattern={"depthwise": 8}))
    assert dict(lora_modules(model))["depthwise"].lora_A.weight.shape == (8, 1, 3, 3)


def test_principal_init_on_a_grouped_conv_is_refused():
    with pytest.raises(ConfigError, match=r"init 'principal' takes one SVD of the whole weight; 'grouped' is a "
                                          r"grouped convolution"):
        inject(TinyCnn(), LoraConfig(rank=8, alpha=8, targets=["grouped"], init="principal"))


def test_lorakit_file_of_grouped_and_padded_convs_loads_back_bit_exact(tmp_path):
    model = adapted().eval()
    x = torch.randn(2, 3, 16, 16)
    save_adapter(model, tmp_path / "a")
    fresh = TinyCnn().eval()
    load_adapter(fresh, tmp_path / "a")
    assert torch.equal(fresh(x), model(x))


def test_peft_loads_lorakit_grouped_conv_adapter_with_the_same_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    model = adapted(same_padding=False).eval()  # PEFT cannot build its layers around Conv2dStaticSamePadding
    x = torch.randn(2, 3, 16, 16)
    save_adapter(model, tmp_path / "a")
    with pytest.warns(UserWarning, match="groups > 1"):
        loaded = peft.PeftModel.from_pretrained(TinyCnn(same_padding=False), tmp_path / "a").eval()
    rtol, atol = TOLERANCES[REORDERED]
    assert torch.allclose(loaded(x), model(x), rtol=rtol, atol=atol)
    changed = TinyCnn(same_padding=False).eval()(x)
    assert not torch.allclose(changed, model(x), rtol=rtol, atol=atol)  # the adapter is not a no-op


def test_a_peft_adapter_whose_a_crosses_groups_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    with pytest.warns(UserWarning, match="groups > 1"):
        model = peft.get_peft_model(TinyCnn(same_padding=False),
                                    peft.LoraConfig(r=8, lora_alpha=16, target_modules=["grouped"],
                                                    init_lora_weights=False))
    model.save_pretrained(tmp_path / "p")
    with pytest.raises(LorakitError, match=r"grouped.lora_A.weight: this A reads input channels outside its own "
                                           r"group \(groups=2\)"):
        load_adapter(TinyCnn(same_padding=False), tmp_path / "p")


def test_copies_of_an_adapted_padding_conv_keep_their_own_weights():
    model = adapted().eval()
    twin = copy.deepcopy(model)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        dict(lora_modules(twin))["stem"].weight.add_(1.0)
    assert not torch.equal(twin(x), model(x))
    assert dict(lora_modules(twin))["stem"].__dict__["_own_forward"].weight is dict(lora_modules(twin))["stem"].weight


def test_peft_layout_of_a_grouped_a_comes_back_exactly_whatever_its_values():
    """Only entries outside the diagonal blocks make an A cross groups; values spanning many magnitudes (whose
    sums depend on the summation order) come back unchanged."""
    from lorakit.layers import grouped_a_from_peft, grouped_a_to_peft

    module = LoraConv(nn.Conv2d(16, 32, 3, groups=8), rank=16, alpha=16, scaling=1.0)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(module.lora_A.weight.shape, generator=gen) * 10.0 ** torch.randint(-6, 6, (16, 1, 1, 1),
                                                                                       generator=gen)
    assert torch.equal(grouped_a_from_peft(module, grouped_a_to_peft(module, a), "k"), a)
    crossing = grouped_a_to_peft(module, a)
    crossing[0, -1, 0, 0] = 1e-30
    with pytest.raises(LorakitError, match="outside its own group"):
        grouped_a_from_peft(module, crossing, "k")
