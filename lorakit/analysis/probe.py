"""What real inputs feed the readout modules: each module's mean input x̄ and how strongly the inputs drive ΔW's
input directions, over the real tokens of a list of texts run through the adapted model.

    texts = read_texts("prompts.txt")                                     # one text per line
    probe = probe_inputs(model, tokenizer, texts, {name: svd.v})          # v (in, K): ΔW's input directions
    probe.modules[name].mean, probe.modules[name].mean_abs_projection

Each text is tokenised alone (with the tokenizer's special tokens, unless it already starts with one: a prompt
rendered with a chat template carries its own), cut to `max_tokens`, and the texts run through the model's body
(no LM head) in right-padded batches with their attention mask. Forward hooks on the named modules add up their
inputs x over the positions the mask marks real, so padding counts for nothing and memory holds sums, never
activations. Right padding keeps every real token's position and causal context as they are when it runs alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lorakit.errors import LorakitError

MAX_TEXTS = 256  # texts read from a file beyond these are not used
MAX_TOKENS = 256  # each text is cut to this many tokens


@dataclass
class InputStats:
    """The inputs x (in,) one module saw: their mean x̄ and, for each column v_k of the projection it was given,
    the mean of |v_kᵀx| (the mean of v_kᵀx itself is v_kᵀx̄). float64."""

    mean: Tensor  # (in,)
    mean_abs_projection: Tensor  # (K,)


@dataclass
class InputProbe:
    """The statistics of every probed module over `tokens` real tokens of `texts` texts (`truncated` of them cut
    to `max_tokens`)."""

    texts: int
    tokens: int
    truncated: int
    modules: dict[str, InputStats]


def read_texts(path: str | Path) -> list[str]:
    """The texts in the UTF-8 file `path`, one per line, blank lines skipped. A line that is a JSON string
    (`"Translate:\\nEin Hund."`) is decoded, so a text with line breaks (a prompt rendered with a chat template)
    fits on one line.

    Raises LorakitError for a missing or unreadable file, bytes that are not UTF-8, and a file with no text.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "does not exist"
        raise LorakitError(f"texts file {str(file)!r} {what}; give a UTF-8 text file with one text per line")
    try:
        data = file.read_bytes()
    except OSError as e:
        raise LorakitError(f"cannot read texts file {str(file)!r}: {e.strerror or e}; check its permissions") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise LorakitError(f"texts file {str(file)!r} is not UTF-8 (byte 0x{data[e.start]:02x} on line {line}); "
                           "save it as UTF-8") from None
    texts = [_decode_line(line) for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise LorakitError(f"texts file {str(file)!r} holds no text (only blank lines); give one text per line")
    return texts


def probe_inputs(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str],
                 projections: dict[str, Tensor], *, batch_size: int = 8, max_tokens: int = MAX_TOKENS
                 ) -> InputProbe:
    """Run `texts` through `model` (see the module docstring) and return, for every module named in
    `projections` (name -> V (in, K)), the mean of its inputs and the mean of |Vᵀx| over the real tokens.

    Raises LorakitError when the texts tokenise to no token at all.
    """
    modules = dict(model.named_modules())
    ids, truncated = _tokenise(tokenizer, texts, max_tokens)
    if not ids:
        raise LorakitError(f"none of the {len(texts)} texts has a token once tokenised; give texts with words in")
    dtype = torch.float64
    sums = {n: torch.zeros(v.shape[0], dtype=dtype) for n, v in projections.items()}
    abs_sums = {n: torch.zeros(v.shape[1], dtype=dtype) for n, v in projections.items()}
    mask_now: list[Tensor] = []  # the current batch's attention mask, as bool (B, T), read by the hooks

    def hook(name: str) -> Any:
        v = projections[name].to(dtype)

        def add(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            x = args[0] if args else next(iter(kwargs.values()))  # (B, T, in)
            real = x[mask_now[0]].to(dtype).cpu()  # (n, in): padding dropped
            sums[name] += real.sum(0)
            abs_sums[name] += (real @ v).abs().sum(0)  # (K,)
        return add

    device = next(model.parameters()).device
    body = getattr(model, "base_model", model)  # the residual stream only: no (B, T, vocab) logits
    handles = [modules[n].register_forward_hook(hook(n), with_kwargs=True) for n in projections]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
            for start in range(0, len(order), batch_size):
                batch = [ids[i] for i in order[start:start + batch_size]]
                input_ids, mask = _right_padded(batch, _pad_id(tokenizer))
                mask_now[:] = [mask.bool().to(device)]
                body(input_ids=input_ids.to(device), attention_mask=mask.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    count = sum(len(i) for i in ids)
    stats = {n: InputStats(sums[n] / count, abs_sums[n] / count) for n in projections}
    return InputProbe(len(ids), count, truncated, stats)


def _tokenise(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_tokens: int) -> tuple[list[list[int]], int]:
    """Each text's token ids, cut to `max_tokens` (texts with no token dropped), and how many were cut."""
    specials = tuple(t for t in tokenizer.all_special_tokens if t)
    out, truncated = [], 0
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=not text.startswith(specials))["input_ids"])
        truncated += len(ids) > max_tokens
        if ids:
            out.append(ids[:max_tokens])
    return out, truncated


def _right_padded(batch: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """input_ids and attention_mask (B, T), real tokens first in each row."""
    length = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        mask[row, :len(ids)] = 1
    return input_ids, mask


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if isinstance(t, int)), 0)


def _decode_line(line: str) -> str:
    if len(line) >= 2 and line.startswith('"') and line.endswith('"'):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            return line  # a text that merely starts and ends with a quote
        return value if isinstance(value, str) else line
    return line
