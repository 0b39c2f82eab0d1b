"""Conversations for instruction tuning: the record layouts, their checks, and where each assistant turn lies
in the tokens.

    layout = detect_layout(records, ("instruction", "output"))   # "alpaca", "messages" or "sharegpt", per file
    messages = read_messages(record, i, layout)                  # [{"role": "user", "content": ...}, ...]
    ids, spans = encode_chat(tokenizer, [messages])[0]           # spans: [start, end) of each assistant turn

The layouts, told apart by their fields:

    alpaca    {"instruction": ..., "input": ..., "output": ...}        one user turn, one assistant turn
    messages  {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}     (OpenAI)
    sharegpt  {"conversations": [{"from": "system" | "human" | "gpt", "value": ...}, ...]}

A conversation is an optional system turn, then user and assistant turns taking turns, starting with the user
and ending with the assistant. Every assistant turn is supervised, not only the last.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from lorakit.errors import LorakitError

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": text}
Span = tuple[int, int]  # [start, end) token positions of one assistant turn

PLAIN_PROMPT = "### Instruction:\n{user}\n\n### Response:\n"
# Per chat layout: the record field, the keys of a turn, and each role as written in the data -> our role.
_CHAT_LAYOUTS: dict[str, tuple[str, str, str, dict[str, str]]] = {
    "messages": ("messages", "role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
    "sharegpt": ("conversations", "from", "value", {"system": "system", "human": "user", "gpt": "assistant"}),
}
LAYOUTS = ("alpaca", *_CHAT_LAYOUTS)


def record_name(i: int, source: str | None) -> str:
    """`record 3`, or `data/chat.jsonl record 3` when the file is known."""
    return f"{source} record {i}" if source else f"record {i}"


def detect_layout(records: Sequence[dict[str, Any]], alpaca_fields: Sequence[str], source: str | None = None
                  ) -> str:
    """The one layout of `records` (a file's records): `messages` for a `messages` field, `sharegpt` for a
    `conversations` field, else `alpaca` (marked by any of `alpaca_fields`, e.g. instruction and output).

    Raises LorakitError naming the record (and `source`, the file) for a record holding fields of two layouts, or
    one whose layout differs from an earlier record's.
    """
    layout, first = None, 0
    for i, record in enumerate(records):
        found = {name: field for name, field in _layout_fields(record, alpaca_fields).items() if field}
        if len(found) > 1:
            fields = " and ".join(f"{field!r} ({name} layout)" for name, field in found.items())
            raise LorakitError(f"{record_name(i, source)} mixes layouts: it has {fields}; give each record the "
                               f"fields of one layout")
        if not found:
            continue
        (name,) = found
        if layout is None:
            layout, first = name, i
        elif name != layout:
            raise LorakitError(f"{record_name(i, source)} is in the {name} layout but record {first} is in the "
                               f"{layout} layout; a file holds one layout, split it in two")
    return layout or "alpaca"


def _layout_fields(record: dict[str, Any], alpaca_fields: Sequence[str]) -> dict[str, str | None]:
    """Per layout, the first of its marker fields that `record` has (None: none)."""
    markers = {"alpaca": list(alpaca_fields), **{name: [spec[0]] for name, spec in _CHAT_LAYOUTS.items()}}
    return {name: next((f for f in fields if f in record), None) for name, fields in markers.items()}


def read_messages(record: dict[str, Any], i: int, layout: str, source: str | None = None) -> list[Message]:
    """The conversation of a `messages` or `sharegpt` record as messages with roles system, user and assistant.

    Raises LorakitError naming the record (and `source`) for a missing or empty conversation, a turn without the
    layout's keys (a `conversations` turn written role/content is a hint to map the column to `messages`), an
    unknown role, content that is not text, no assistant turn, or roles out of order.
    """
    field, role_key, content_key, roles = _CHAT_LAYOUTS[layout]
    name = record_name(i, source)
    turns = record.get(field)
    if turns is None:
        raise LorakitError(f"{name} has no {field!r} field (it has: {', '.join(map(str, record))}); every record "
                           f"of a {layout}-layout file needs one")
    if not isinstance(turns, list):
        raise LorakitError(f"{name}: {field!r} must be a list of turns, got {type(turns).__name__}")
    if not turns:
        raise LorakitError(f"{name}: the conversation is empty; drop the record or give it turns")
    messages: list[Message] = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise LorakitError(f"{name} turn {t}: expected an object with {role_key!r} and {content_key!r}, got "
                               f"{_describe(turn)}{_other_layout_hint(turn, layout)}")
        role, content = turn[role_key], turn[content_key]
        if role not in roles:
            raise LorakitError(f"{name} turn {t}: unknown role {role!r}; the {layout} layout's {role_key!r} is one "
                               f"of: {', '.join(roles)}")
        if not isinstance(content, str):
            raise LorakitError(f"{name} turn {t}: {content_key!r} must be text, got {type(content).__name__}")
        messages.append({"role": roles[role], "content": content})
    check_order(messages, name, {ours: theirs for theirs, ours in roles.items()})
    return messages


def _describe(turn: object) -> str:
    if isinstance(turn, dict):
        return f"keys {', '.join(map(str, turn)) or '(none)'}"
    return type(turn).__name__


def _other_layout_hint(turn: object, layout: str) -> str:
    for other, (field, role_key, content_key, _) in _CHAT_LAYOUTS.items():
        if other != layout and isinstance(turn, dict) and role_key in turn and content_key in turn:
            return (f" ({role_key}/{content_key} turns are the {other} layout: map the column to {field!r} with "
                    f"data.columns)")
    return ""


def check_order(messages: list[Message], name: str, spelling: dict[str, str] | None = None) -> None:
    """Raise LorakitError (naming `name`, the record) unless `messages` is an optional system turn, then user and
    assistant turns taking turns from the user's, ending with the assistant's. `spelling`: our role -> the role as
    the data writes it, for the message."""
    say = spelling or {}
    if not any(m["role"] == "assistant" for m in messages):
        raise LorakitError(f"{name} has no {say.get('assistant', 'assistant')} turn, so nothing to learn from; "
                           f"drop the record or add the reply")
    expected = "user"
    for t, message in enumerate(messages):
        role = message["role"]
        if t == 0 and role == "system":
            continue
        if role != expected:
            raise LorakitError(f"{name} turn {t}: a {say.get(role, role)} turn where a {say.get(expected, expected)} "
                               f"turn belongs; a conversation is an optional system turn first, then user and "
                               f"assistant turns taking turns, starting with the user and ending with the assistant")
        expected = "assistant" if role == "user" else "user"
    if expected == "assistant":
        raise LorakitError(f"{name} ends with a {say.get('user', 'user')} turn that has no reply; drop that turn")


def encode_chat(tokenizer: PreTrainedTokenizerBase, conversations: list[list[Message]]
                ) -> list[tuple[list[int], list[Span]]]:
    """Each conversation rendered with the tokenizer's chat template and tokenized: (ids, assistant spans).

    Assistant turn j starts where the turns before it end once rendered with the generation prompt (so the
    assistant header the template writes is input) and ends where the conversation through turn j ends (so the
    end-of-turn marker after the reply is learned): the template's own markers fall where it puts them. Every
    rendered prefix must tokenize as a prefix of the whole conversation.

    Raises LorakitError naming the record (its number in `conversations` and how its first user turn begins)
    when the template fails or breaks that prefix property.
    """
    texts: list[str] = []
    for c, messages in enumerate(conversations):
        texts.append(render(tokenizer, messages, c))
        for j, message in enumerate(messages):
            if message["role"] == "assistant":
                texts.append(render(tokenizer, messages[:j], c, add_generation_prompt=True))
                if j < len(messages) - 1:  # through the last turn is the whole conversation
                    texts.append(render(tokenizer, messages[:j + 1], c))
    ids = iter(tokenize(tokenizer, texts))
    out: list[tuple[list[int], list[Span]]] = []
    for c, messages in enumerate(conversations):
        full = next(ids)
        spans: list[Span] = []
        for j, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = next(ids)
            through = next(ids) if j < len(messages) - 1 else full
            previous_end = spans[-1][1] if spans else 0
            if not (full[:len(prompt)] == prompt and full[:len(through)] == through
                    and previous_end <= len(prompt) <= len(through)):
                raise LorakitError(
                    f"record {c} turn {j}: the chat template's prompt does not tokenize as a prefix of the "
                    f"whole conversation {_opening(messages)}, so the assistant's reply cannot be located (a "
                    f"template that renders earlier turns differently once later turns follow, or a reply that "
                    f"starts with whitespace, can cause this); strip the replies' whitespace or use a template "
                    f"that renders each turn the same whatever follows")
            spans.append((len(prompt), len(through)))
        out.append((full, spans))
    return out


def _opening(messages: list[Message]) -> str:
    """How the conversation's first user turn begins, to find a record that shuffling has renumbered."""
    user = next(m["content"] for m in messages if m["role"] == "user")
    return f"(the one whose user turn begins {user[:40]!r})"


def encode_plain(tokenizer: PreTrainedTokenizerBase, conversations: list[list[Message]]
                 ) -> list[tuple[list[int], list[Span]]]:
    """Each conversation in the plain layout, for tokenizers without a chat template: (ids, assistant spans).

    BOS (when the tokenizer has one), the system text and a blank line, then per exchange `### Instruction:` /
    `### Response:` around the user's text and the reply followed by EOS. Each piece is tokenized alone and the
    ids joined, so the spans are exact by construction; a span is the reply and its EOS.
    """
    pieces: list[str] = []
    for messages in conversations:
        head = messages[0]["content"] + "\n\n" if messages[0]["role"] == "system" else ""
        for message in messages:
            if message["role"] == "user":
                pieces.append(head + PLAIN_PROMPT.format(user=message["content"]))
                head = ""
            elif message["role"] == "assistant":
                pieces.append(message["content"])
    piece_ids = iter(tokenize(tokenizer, pieces))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out: list[tuple[list[int], list[Span]]] = []
    for messages in conversations:
        ids = [bos] if isinstance(bos, int) else []
        spans: list[Span] = []
        for message in messages:
            if message["role"] == "user":
                ids += next(piece_ids)
            elif message["role"] == "assistant":
                start = len(ids)
                ids += next(piece_ids) + ([eos] if isinstance(eos, int) else [])
                spans.append((start, len(ids)))
        out.append((ids, spans))
    return out


def render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], i: int, *,
           add_generation_prompt: bool = False) -> str:
    """`messages` as text through the tokenizer's chat template; raises LorakitError naming record `i` if the
    template fails (jinja raises for templates that refuse a role, e.g. no system turn)."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:
        raise LorakitError(f"record {i}: the tokenizer's chat template failed: {e}") from None
    if not isinstance(text, str):
        raise AssertionError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}")
    return text


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text with no special tokens added (chat templates write their own BOS)."""
    if not texts:
        return []
    return [list(seq) for seq in tokenizer(texts, add_special_tokens=False)["input_ids"]]
