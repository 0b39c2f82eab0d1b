"""Readers for the task-specific file formats: CoNLL columns (NER), SQuAD JSON (extractive QA) and line-aligned
parallel text (translation). Each returns plain records, as `read_records` does for JSON and CSV.

    records = read_conll("conll2003/test.txt")               # [{"tokens": ["EU", ...], "tags": ["B-ORG", ...]}]
    records = read_squad("squad/dev-v1.1.json", articles=slice(38, 48))
    records = read_parallel("multi30k/test.de", "multi30k/test.en")  # instruction records, German -> English

`read_records` reaches these through its `conll`, `squad` and `parallel` formats. They live here, not in
`data.py`, to keep that module about the generic formats and batching. Every reader takes `encoding` and decodes
through `read_text`, so a file in another encoding is one error naming the byte, never a traceback.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

DOCSTART = "-DOCSTART-"
# Language names for the instruction of `parallel`-format data, by the file suffix (ISO 639-1); Multi30k's four.
LANGUAGES = {"cs": "Czech", "de": "German", "en": "English", "fr": "French"}


def read_conll(path: str | Path, *, tag_column: int = -1, encoding: str = "utf-8") -> list[dict[str, Any]]:
    """Read a CoNLL-style file: one token per line, whitespace-separated columns, the token in column 0.

    tag_column: the column holding the tag (an index into the columns; -1 is the last, as in CoNLL-2003's
        `token POS chunk NER`).
    encoding: the file's text encoding (see `read_text`).
    Blank (or whitespace-only) lines end a sentence; `-DOCSTART-` lines are skipped and end a sentence too.
    Returns one record per sentence: {"tokens": [...], "tags": [...]}.

    Raises LorakitError for a missing or undecodable file, `tag_column` 0 (the token column), a line with fewer
    columns than `tag_column` needs, or a token line with another number of columns than the file's first (a
    missing tag would otherwise shift the tag column onto another one), naming the file and line.
    """
    return conll_with_lines(path, tag_column=tag_column, encoding=encoding)[0]


def conll_with_lines(path: str | Path, *, tag_column: int = -1, encoding: str = "utf-8"
                     ) -> tuple[list[dict[str, Any]], list[int]]:
    """`read_conll`, and the line of each sentence's first token (for errors that name a line)."""
    if isinstance(tag_column, bool) or not isinstance(tag_column, int) or tag_column == 0:
        raise LorakitError(f"tag_column must be a non-zero int (column 0 holds the token), got {tag_column!r}")
    needed = tag_column + 1 if tag_column > 0 else max(2, -tag_column)
    file = existing_file(path)
    records: list[dict[str, Any]] = []
    starts: list[int] = []
    tokens: list[str] = []
    tags: list[str] = []
    width: tuple[int, int] | None = None  # (columns, line) of the first token line
    for lineno, line in enumerate(split_lines(read_text(file, encoding)), start=1):
        columns = line.split()
        if not columns or columns[0] == DOCSTART:
            if tokens:
                records.append({"tokens": tokens, "tags": tags})
            tokens, tags = [], []
            continue
        if len(columns) < needed:
            raise LorakitError(f"{file} line {lineno}: {len(columns)} column(s) ({line.strip()!r}), but "
                               f"tag_column {tag_column} needs at least {needed}; fix the line (a missing tag?) "
                               f"or tag_column")
        if width is None:
            width = (len(columns), lineno)
        elif len(columns) != width[0]:
            raise LorakitError(f"{file} line {lineno}: {len(columns)} columns ({line.strip()!r}), but line "
                               f"{width[1]} has {width[0]}; every token line needs the same columns (a missing or "
                               f"split tag?): fix the line")
        if not tokens:
            starts.append(lineno)
        tokens.append(columns[0])
        tags.append(columns[tag_column])
    if tokens:  # the last sentence may have no blank line after it (CoNLL-2003's files end without a newline)
        records.append({"tokens": tokens, "tags": tags})
    return records, starts


def read_squad(path: str | Path, *, articles: slice | None = None, encoding: str = "utf-8"
               ) -> list[dict[str, Any]]:
    """Read a SQuAD v1.1 JSON file (data -> paragraphs -> qas) into one record per question.

    articles: the articles to keep, by position in the file (`slice(0, 38)`: the first 38); default: all. A split
        by article keeps every context on one side, e.g. SQuAD dev's articles 0-37 to train, 38-47 to evaluate.
    Records: {"id", "title", "question", "context", "answers": {"text": [...], "answer_start": [...]}}, the layout
    of Hugging Face's `squad` dataset.

    encoding: the file's text encoding (see `read_text`).

    Raises LorakitError for a missing, undecodable or malformed file, a selection with no articles, or an answer
    whose text is not at its `answer_start` in the context (naming the question id).
    """
    file = existing_file(path)
    try:
        data = json.loads(read_text(file, encoding))
    except json.JSONDecodeError as e:
        raise LorakitError(f"{file} line {e.lineno}: malformed JSON ({e.msg}); fix the file") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise LorakitError(f"{file} is not SQuAD JSON: expected an object with a 'data' list of articles")
    numbers = range(len(data["data"]))[articles] if articles is not None else range(len(data["data"]))
    if not numbers:
        raise LorakitError(f"no articles selected from {file} (it has {len(data['data'])}; articles={articles})")
    records: list[dict[str, Any]] = []
    number = numbers[0]
    try:
        for number in numbers:
            article = data["data"][number]
            for paragraph in article["paragraphs"]:
                context = paragraph["context"]
                for qa in paragraph["qas"]:
                    answers = {"text": [a["text"] for a in qa["answers"]],
                               "answer_start": [a["answer_start"] for a in qa["answers"]]}
                    check_answers(qa["id"], context, answers, file)
                    records.append({"id": qa["id"], "title": article.get("title", ""), "question": qa["question"],
                                    "context": context, "answers": answers})
    except (KeyError, TypeError) as e:
        raise LorakitError(f"{file} article {number}: missing or malformed {e}; expected SQuAD v1.1 JSON "
                           f"(data -> paragraphs -> context, qas -> id, question, answers)") from None
    return records


def check_answers(qid: str, context: str, answers: dict[str, Any], source: str | Path) -> None:
    """Raise LorakitError unless every answer text sits in `context` at its `answer_start` (character offset)."""
    texts, starts = answers.get("text"), answers.get("answer_start")
    if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts) or not texts:
        raise LorakitError(f"{source}: question {qid!r} needs answers with equal, non-empty 'text' and "
                           f"'answer_start' lists, got {answers!r}")
    for text, start in zip(texts, starts, strict=True):
        found = context[start:start + len(text)] if isinstance(start, int) and start >= 0 else None
        if not text or found != text:
            raise LorakitError(f"{source}: question {qid!r}: answer {text!r} is not at answer_start {start!r} in "
                               f"its context (found {found!r}); fix the answer or its offset")


def read_parallel(src_path: str | Path, tgt_path: str | Path, *, source_lang: str = "German",
                  target_lang: str = "English", encoding: str = "utf-8") -> list[dict[str, Any]]:
    """Read line-aligned parallel text (line i of one file translates line i of the other) as instruction records:
    {"instruction": "Translate from German to English:\\n<source line>", "input": "", "output": <target line>}.
    encoding: both files' text encoding (see `read_text`).

    Raises LorakitError for a missing or undecodable file, files with different line counts, or an empty line
    (naming the file and line).
    """
    sides = []
    for path in (src_path, tgt_path):
        file = existing_file(path)
        lines = split_lines(read_text(file, encoding))
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                raise LorakitError(f"{file} line {lineno}: empty line; parallel files hold one sentence per line")
        sides.append(lines)
    source, target = sides
    if len(source) != len(target):
        raise LorakitError(f"{src_path} has {len(source)} lines but {tgt_path} has {len(target)}; parallel files "
                           f"must be line-aligned")
    prefix = f"Translate from {source_lang} to {target_lang}:\n"
    return [{"instruction": prefix + s.strip(), "input": "", "output": t.strip()}
            for s, t in zip(source, target, strict=True)]


def read_parallel_spec(spec: str, *, encoding: str = "utf-8") -> list[dict[str, Any]]:
    """`read_parallel` for a path written `PREFIX.{SRC,TGT}` (e.g. `multi30k/train.{de,en}`: train.de -> train.en);
    the language names come from `LANGUAGES` (an unknown code is used as it is)."""
    head, brace, rest = spec.rpartition("{")
    codes = rest.removesuffix("}").split(",")
    if not brace or not rest.endswith("}") or len(codes) != 2 or not all(c.strip() for c in codes):
        raise LorakitError(f"parallel data {spec!r} must name its two files as PREFIX.{{SRC,TGT}}, e.g. "
                           f"data/train.{{de,en}} for data/train.de -> data/train.en")
    src, tgt = (c.strip() for c in codes)
    return read_parallel(head + src, head + tgt, source_lang=LANGUAGES.get(src, src),
                         target_lang=LANGUAGES.get(tgt, tgt), encoding=encoding)


def existing_file(path: str | Path) -> Path:
    """`path` as a Path; raises LorakitError when it is missing or a directory."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise LorakitError(f"data file {file} is a directory; give a file inside it (or a dataset saved with "
                           f"`save_to_disk`, which has no format)")
    if not file.is_file():
        raise LorakitError(f"data file {file} not found; check the path (relative paths start at the current "
                           f"directory, {Path.cwd()}, or in a YAML config at the YAML file's directory)")
    return file


def read_text(file: Path, encoding: str = "utf-8") -> str:
    """The text of `file` in `encoding`; `utf-8` (any spelling) also drops a byte-order mark.

    Raises LorakitError for an unknown encoding, an unreadable file, bytes that are not valid in `encoding`
    (naming the byte offset and line, and the encoding to try: utf-16 when the file has a UTF-16 byte-order mark
    or NUL bytes, else latin-1), or decoded text with NUL characters (UTF-16 read as a one-byte encoding).
    """
    codec = _codec(encoding)
    try:
        data = file.read_bytes()
    except OSError as e:
        raise LorakitError(f"cannot read data file {file}: {e.strerror or e}; check its permissions") from None
    skip = len(codecs.BOM_UTF8) if codec == "utf-8" and data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[skip:].decode(codec)  # offsets in errors count from the BOM's end: add `skip` back
    except UnicodeDecodeError as e:
        offset = e.start + skip
        raise LorakitError(f"{file}: byte 0x{data[offset]:02x} at byte offset {offset} (line {_line(data, offset)}) "
                           f"is not valid {encoding}; {_encoding_hint(data, codec)}") from None
    if "\x00" in text and not codec.startswith(("utf-16", "utf-32")):
        offset = data.find(b"\x00")
        raise LorakitError(f"{file}: NUL byte at byte offset {offset} (line {_line(data, offset)}) in text read as "
                           f"{encoding}; {_encoding_hint(data, codec)}")
    return text


def check_encoding(encoding: str) -> str | None:
    """None when Python knows `encoding`, else a message naming it and some that exist."""
    try:
        codecs.lookup(encoding)
    except (LookupError, TypeError, ValueError):
        return f"unknown encoding {encoding!r}; use one Python knows, e.g. utf-8, latin-1, cp1252, utf-16"
    return None


def split_lines(text: str) -> list[str]:
    """Lines split at \\n, \\r\\n or \\r only (str.splitlines also splits at U+0085, U+2028, ..., which latin-1
    text and JSON strings may hold), without a last empty one after a final newline."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _codec(encoding: str) -> str:
    problem = check_encoding(encoding)
    if problem is not None:
        raise LorakitError(f"data.encoding: {problem}")
    name = codecs.lookup(encoding).name
    return "utf-8" if name == "utf-8-sig" else name  # `read_text` drops a UTF-8 byte-order mark (MRPC has one)


def _line(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _encoding_hint(data: bytes, codec: str) -> str:
    """What to pass instead: utf-16 for a UTF-16 byte-order mark or NUL bytes, else latin-1 (any byte decodes)."""
    utf16 = data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\x00" in data[:4096]
    if utf16 and not codec.startswith("utf-16"):
        suggestion = "utf-16"
    elif codec != "iso8859-1":
        suggestion = "latin-1"
    else:
        suggestion = "utf-8"
    return (f"the file is probably {suggestion}: pass --data.encoding={suggestion} (data.encoding in the YAML, "
            f"encoding= in Python) or convert the file to UTF-8")
