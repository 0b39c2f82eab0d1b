"""A byte-level BPE tokenizer (GPT-2 style, as SmolLM2's) as GGUF metadata: tokens, token types, merges, special
token ids, whether BOS is added, the pre-tokenizer's name in llama.cpp, and the chat template.

llama.cpp does not run the tokenizer.json: it knows a fixed list of pre-tokenizers (the regular expressions that
cut text before BPE) by name. Only tokenizers whose pre-tokenizer is one of those below are written; any other
would be cut differently by llama.cpp than by transformers, so it is refused rather than exported wrong.
"""

from __future__ import annotations

import json
from typing import Any

import gguf
from transformers import PreTrainedTokenizerBase

from lorakit.errors import LorakitError

_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}
_DIGITS = {"type": "Digits", "individual_digits": True}


def write_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """Add the `tokenizer.ggml.*` keys and `tokenizer.chat_template` for `tokenizer` to `writer`, with exactly
    `vocab_size` tokens (the embedding's rows; ids the tokenizer lacks are written as unused `[PAD<id>]`).

    Raises LorakitError for a tokenizer that is not byte-level BPE, a pre-tokenizer llama.cpp has no name for,
    or more tokens than the model has embeddings."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LorakitError(f"GGUF export needs a fast (tokenizers) tokenizer, got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise LorakitError(f"GGUF export writes byte-level BPE tokenizers (GPT-2 style); this one is "
                           f"{model.get('type')!r}")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec.get("pre_tokenizer")))
    tokens, types = token_table(tokenizer, vocab_size)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, key, None)
        if isinstance(token_id, int):
            add(token_id)
    add_bos, add_eos = added_specials(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    writer.add_add_space_prefix(bool((spec.get("pre_tokenizer") or {}).get("add_prefix_space", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


def pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for a tokenizer.json pre-tokenizer: GPT-2's byte-level split is
    `gpt-2`; digits split one by one before it (SmolLM2's original tokenizer) is `smollm`."""
    def matches(step: dict[str, Any], want: dict[str, Any]) -> bool:
        return all(step.get(k) == v for k, v in want.items())

    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    if len(steps) == 1 and matches(steps[0], _BYTE_LEVEL):
        return "gpt-2"
    if len(steps) == 2 and matches(steps[0], _DIGITS) and matches(steps[1], _BYTE_LEVEL):
        return "smollm"
    kinds = ", ".join(str(s.get("type")) for s in steps) or "none"
    raise LorakitError(f"GGUF export cannot name this tokenizer's pre-tokenizer ({kinds}) for llama.cpp; it writes "
                       "GPT-2's byte-level split (gpt-2) and SmolLM's (smollm)")


def token_table(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id as the BPE vocabulary spells them (byte-level characters) and llama.cpp's token types:
    special added tokens CONTROL, other added tokens USER_DEFINED, the rest NORMAL, missing ids UNUSED."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise LorakitError(f"the tokenizer has token id {max(by_id)} but the model only {vocab_size} embeddings; "
                           "resize the embeddings (model.resize_token_embeddings) before exporting")
    added = {t.content: t.special for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def added_specials(tokenizer: PreTrainedTokenizerBase) -> tuple[bool, bool]:
    """(adds BOS, adds EOS): read from what the tokenizer does to a text, whatever its settings are called."""
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return (bos is not None and bool(ids) and ids[0] == bos), (eos is not None and bool(ids) and ids[-1] == eos)
