"""Writers of small CTranslate2 `model.bin` files for the reader's and the Whisper mapping's tests.

The layout is written out here independently of `lorakit.speech.ctranslate2_file` (from CTranslate2's
`model_spec.py` serialisation), so a reader bug that is its own mirror image cannot pass.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

TYPE_IDS = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2, np.dtype("int32"): 3,
            np.dtype("float16"): 4}


def _string(text: str) -> bytes:
    raw = text.encode("utf-8") + b"\0"
    return struct.pack("<H", len(raw)) + raw


def ct2_bytes(variables: dict[str, np.ndarray], aliases: dict[str, str] | None = None, *,
              spec: str = "TestSpec", revision: int = 1, version: int = 6) -> bytes:
    out = [struct.pack("<I", version), _string(spec), struct.pack("<I", revision),
           struct.pack("<I", len(variables))]
    for name, value in variables.items():
        value = np.asarray(value, order="C")  # (ascontiguousarray would make a scalar 1-d)
        out += [_string(name), struct.pack("<B", value.ndim), *(struct.pack("<I", d) for d in value.shape),
                struct.pack("<B", TYPE_IDS[value.dtype]), struct.pack("<I", value.nbytes), value.tobytes()]
    out.append(struct.pack("<I", len(aliases or {})))
    for alias, target in (aliases or {}).items():
        out += [_string(alias), _string(target)]
    return b"".join(out)


def tiny_whisper(seed: int = 0, vocab_size: int = 51864) -> WhisperForConditionalGeneration:
    """A random Whisper (d_model 16, 2 + 2 layers, 2 heads, 8 mels) with nonzero biases and norms; the
    English-only vocabulary size, so the special token ids (<|startoftranscript|> 50257, ...) are in range."""
    torch.manual_seed(seed)
    config = WhisperConfig(vocab_size=vocab_size, num_mel_bins=8, d_model=16, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                           decoder_ffn_dim=32, max_source_positions=12, max_target_positions=10,
                           pad_token_id=50256, bos_token_id=50257, eos_token_id=50256,
                           decoder_start_token_id=50257)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name or "embed_positions" in name:
                param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "layer_norm.weight" in name else 0.0))
    return model


def whisper_variables(model: WhisperForConditionalGeneration, dtype: np.dtype) -> dict[str, np.ndarray]:
    """The variables CTranslate2's Whisper converter writes for `model` (fused q|k|v and k|v, zero k bias)."""
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    cfg = model.config
    out: dict[str, np.ndarray] = {
        "encoder/num_heads": np.array(cfg.encoder_attention_heads, dtype=np.int16),
        "decoder/num_heads": np.array(cfg.decoder_attention_heads, dtype=np.int16),
        "decoder/activation": np.array(3, dtype=np.int8), "decoder/pre_norm": np.array(1, dtype=np.int8),
        "decoder/scale_embeddings": np.array(0, dtype=np.int8), "decoder/alibi": np.array(0, dtype=np.int8),
    }
    zeros = np.zeros(cfg.d_model, dtype=np.float32)

    def linear(ct: str, hf: str) -> None:
        out[f"{ct}/weight"], out[f"{ct}/bias"] = state[f"{hf}.weight"], state[f"{hf}.bias"]

    def norm(ct: str, hf: str) -> None:
        out[f"{ct}/gamma"], out[f"{ct}/beta"] = state[f"{hf}.weight"], state[f"{hf}.bias"]

    def fused(ct: str, hf: str, parts: str) -> None:
        out[f"{ct}/weight"] = np.concatenate([state[f"{hf}.{p}_proj.weight"] for p in parts])
        out[f"{ct}/bias"] = np.concatenate([zeros if p == "k" else state[f"{hf}.{p}_proj.bias"] for p in parts])

    for stack, layers in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        for i in range(layers):
            ct, hf = f"{stack}/layer_{i}", f"model.{stack}.layers.{i}"
            fused(f"{ct}/self_attention/linear_0", f"{hf}.self_attn", "qkv")
            linear(f"{ct}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
            norm(f"{ct}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
            if stack == "decoder":
                linear(f"{ct}/attention/linear_0", f"{hf}.encoder_attn.q_proj")
                fused(f"{ct}/attention/linear_1", f"{hf}.encoder_attn", "kv")
                linear(f"{ct}/attention/linear_2", f"{hf}.encoder_attn.out_proj")
                norm(f"{ct}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
            linear(f"{ct}/ffn/linear_0", f"{hf}.fc1")
            linear(f"{ct}/ffn/linear_1", f"{hf}.fc2")
            norm(f"{ct}/ffn/layer_norm", f"{hf}.final_layer_norm")
        out[f"{stack}/position_encodings/encodings"] = state[f"model.{stack}.embed_positions.weight"]
        norm(f"{stack}/layer_norm", f"model.{stack}.layer_norm")
    linear("encoder/conv1", "model.encoder.conv1")
    linear("encoder/conv2", "model.encoder.conv2")
    out["decoder/embeddings/weight"] = state["model.decoder.embed_tokens.weight"]
    return {k: (v.astype(dtype) if v.dtype == np.float32 else v) for k, v in out.items()}


FLOAT32 = np.dtype("float32")


def write_whisper_ct2(model: WhisperForConditionalGeneration, path: Path, dtype: np.dtype = FLOAT32,
                      **overrides: np.ndarray) -> Path:
    """`model` as a CTranslate2 WhisperSpec file, the output projection an alias of the embeddings."""
    variables = {**whisper_variables(model, dtype), **overrides}
    path.write_bytes(ct2_bytes(variables, {"decoder/projection/weight": "decoder/embeddings/weight"},
                               spec="WhisperSpec", revision=3))
    return path
