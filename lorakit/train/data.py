"""Reading datasets into plain records, renaming their columns, and ordering and padding batches.

    records = read_records("data/sst2/dev.tsv")                  # [{"sentence": "...", "label": "1"}, ...]
    records = map_columns(records, {"text": "sentence"}, "data/sst2/dev.tsv")
    for batch in batch_indices(lengths, 32, seed=0, epoch=epoch, rank=world.rank, world_size=world.size): ...

A record is one `dict` per example, exactly as the file holds it: CSV and TSV values stay strings, and tasks
convert them. Hugging Face `datasets` is optional and imported only by `_datasets()`.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lorakit.errors import LorakitError, did_you_mean
from lorakit.train.readers import (
    conll_with_lines,
    existing_file,
    read_parallel_spec,
    read_squad,
    read_text,
    split_lines,
)

FORMATS: dict[str, str] = {
    "json": "a JSON list of objects (a file of one object per line is read as JSON Lines)",
    "jsonl": "JSON Lines: one object per line",
    "csv": "comma-separated values with a header row",
    "tsv": "tab-separated values with a header row, no quoting",
    "hf": "a Hugging Face dataset directory saved with `save_to_disk`, or `hf:NAME[:CONFIG]` from the hub",
    "conll": "CoNLL columns, one token per line, the tag last, blank lines between sentences (`read_conll`)",
    "squad": "SQuAD v1.1 JSON, one record per question (`read_squad`)",
    "parallel": "line-aligned text files named PREFIX.{SRC,TGT}, as translation instructions (`read_parallel`)",
}
_SUFFIXES: dict[str, str] = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv",
                             ".conll": "conll"}
_HUB_PREFIX = "hf:"
# The record field that holds the label, for the tasks that learn a label set from the data.
LABEL_FIELDS = {"classification": "label", "ner": "tags"}
# Length grouping sorts examples inside windows of this many batches: wide enough that a batch holds similar
# lengths, narrow enough that the order stays random across the epoch (the "megabatch" of fairseq/HF Trainer).
GROUP_WINDOW_BATCHES = 50


def read_records(path: str | Path, *, format: str | None = None, split: str = "train",
                 columns: Sequence[str] | None = None, encoding: str = "utf-8") -> list[dict[str, Any]]:
    """Read a dataset into a list of records (one dict per example).

    path: a local `.json`, `.jsonl`, `.csv`, `.tsv` or `.conll` file, a directory saved with `datasets`'
        `save_to_disk`, `hf:NAME` / `hf:NAME:CONFIG` for a dataset on the Hugging Face hub (needs the network),
        or, with format `parallel`, two line-aligned files as `PREFIX.{SRC,TGT}`.
    format: one of `FORMATS`, overriding the one inferred from the suffix.
    split: the split to take from a hub dataset or a saved `DatasetDict`.
    columns: column names for a CSV/TSV file without a header row (default: the first row is the header).
    encoding: the text encoding of a local file (`utf-8` also drops a byte-order mark); e.g. `latin-1`, `utf-16`.

    Raises LorakitError for a missing file, a directory given as a file, an unknown format, bytes that are not
    valid in `encoding` (naming the byte offset and the encoding to try), a malformed line (naming it), a row
    with the wrong number of fields, or a dataset with no records.
    """
    return _read_with_lines(path, format, split, columns, encoding)[0]


def _read_with_lines(path: str | Path, format: str | None, split: str, columns: Sequence[str] | None,
                     encoding: str) -> tuple[list[dict[str, Any]], list[int] | None]:
    """`read_records`, and each record's line in the file where lines mean something (CSV, TSV, JSON Lines,
    CoNLL: a sentence's first token), else None."""
    if format is not None and format not in FORMATS:
        raise LorakitError(f"unknown data format {format!r} for {path}{did_you_mean(format, FORMATS)}; "
                           f"use one of: {', '.join(FORMATS)}")
    text = str(path)
    lines: list[int] | None = None
    if text.startswith(_HUB_PREFIX):
        records = _read_hub(text[len(_HUB_PREFIX):], split)
    elif format == "parallel":
        records = read_parallel_spec(text, encoding=encoding)
    else:
        file = Path(path).expanduser()
        if not file.exists():
            existing_file(file)  # raises the one "not found" message
        records, lines = _read_local(file, format or _infer_format(file), split, columns, encoding)
    if not records:
        raise LorakitError(f"{path} has no records; check the file (and the split {split!r} for a dataset)")
    return records, lines


def _infer_format(file: Path) -> str:
    if file.is_dir():
        return "hf"
    fmt = _SUFFIXES.get(file.suffix.lower())
    if fmt is None:
        raise LorakitError(f"cannot tell the format of {file} from its suffix {file.suffix!r}; pass format= "
                           f"one of: {', '.join(FORMATS)}")
    return fmt


def _read_local(file: Path, fmt: str, split: str, columns: Sequence[str] | None, encoding: str
                ) -> tuple[list[dict[str, Any]], list[int] | None]:
    if fmt == "hf":
        return _read_saved(file, split), None
    if file.is_dir():
        raise LorakitError(f"{file} is a directory, not a {fmt} file; give the file inside it")
    if fmt == "conll":
        return conll_with_lines(file, encoding=encoding)
    if fmt == "squad":
        return read_squad(file, encoding=encoding), None
    text = read_text(file, encoding)
    if fmt == "json":
        return _parse_json(text, file)
    if fmt == "jsonl":
        return _parse_jsonl(text, file)
    f = io.StringIO(text, newline="")  # as open(newline=""): quoted fields may hold line breaks
    if fmt == "csv":
        return _parse_table(csv.reader(f), file, columns)
    return _parse_table(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), file, columns)


def _parse_json(text: str, file: Path) -> tuple[list[dict[str, Any]], list[int] | None]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return _parse_jsonl(text, file)  # `.json` files holding JSON Lines are common (HF exports)
        raise LorakitError(f"{file} line {e.lineno}: malformed JSON ({e.msg}); fix the file") from None
    if not isinstance(data, list):
        keys = f" with keys {', '.join(map(str, list(data)[:8]))}" if isinstance(data, dict) else ""
        raise LorakitError(f"{file} holds a JSON {type(data).__name__}{keys}, expected a list of objects; "
                           f"convert it to a list (or to JSON Lines)")
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise LorakitError(f"{file} item {i}: expected a JSON object, got {type(record).__name__}")
    return data, None


def _parse_jsonl(text: str, file: Path) -> tuple[list[dict[str, Any]], list[int]]:
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    for lineno, line in enumerate(split_lines(text), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LorakitError(f"{file} line {lineno}: malformed JSON ({e.msg}); fix or delete that line") from None
        if not isinstance(record, dict):
            raise LorakitError(f"{file} line {lineno}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
        lines.append(lineno)
    return records, lines


def _parse_table(rows: Any, file: Path, columns: Sequence[str] | None
                 ) -> tuple[list[dict[str, Any]], list[int]]:
    """Rows from a csv.reader -> records and their lines; the header is the first non-empty row unless `columns`
    is given."""
    header: list[str] | None = list(columns) if columns is not None else None
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    try:
        for row in rows:
            if not row:
                continue  # a blank line
            if header is None:
                header = [name.strip() for name in row]
                continue
            if len(row) != len(header):
                raise LorakitError(f"{file} line {rows.line_num}: {len(row)} fields, but the header has "
                                   f"{len(header)} ({', '.join(header)}); fix the row or the delimiter")
            records.append(dict(zip(header, row, strict=True)))
            lines.append(rows.line_num)
    except csv.Error as e:
        raise LorakitError(f"{file} line {rows.line_num}: malformed row ({e}); fix the file") from None
    return records, lines


def _datasets() -> Any:
    """The optional `datasets` package, imported here and nowhere else."""
    try:
        import datasets
    except ImportError:
        raise LorakitError("reading Hugging Face datasets needs the `datasets` package: pip install datasets "
                           "(or convert the data to JSON Lines)") from None
    return datasets


def _read_saved(directory: Path, split: str) -> list[dict[str, Any]]:
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(directory))
    except FileNotFoundError:
        raise LorakitError(f"{directory} is not a dataset saved with `save_to_disk` (no dataset_info.json or "
                           f"dataset_dict.json); give a data file instead") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise LorakitError(f"{directory} has no split {split!r}{did_you_mean(split, loaded)}; "
                               f"it has: {', '.join(loaded)}")
        loaded = loaded[split]
    return [dict(row) for row in loaded]


def _read_hub(spec: str, split: str) -> list[dict[str, Any]]:
    datasets = _datasets()
    name, _, config = spec.partition(":")
    try:
        loaded = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # network, missing dataset, bad split: all reported the same way
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LorakitError(f"cannot load hub dataset {name!r} (split {split!r}): {first_line}") from None
    return [dict(row) for row in loaded]


def map_columns(records: list[dict[str, Any]], mapping: dict[str, str], source: str) -> list[dict[str, Any]]:
    """Rename columns: `mapping` is task field -> column in the data (e.g. `{"text": "sentence"}`).

    Returns new records with each mapped column under its field name; other columns are kept. `source` names the
    data in errors. Raises LorakitError for a column that no record has, listing the columns there are.
    """
    available: dict[str, None] = {}  # ordered set: columns in the order they first appear
    for record in records:
        available.update(dict.fromkeys(record))
    for field, column in mapping.items():
        if column not in available:
            raise LorakitError(f"no column {column!r} (for {field!r}) in {source}"
                               f"{did_you_mean(column, map(str, available))}; it has: "
                               f"{', '.join(map(str, available))}")
    renames = {column: field for field, column in mapping.items() if column != field}
    if not renames:
        return records
    out = []
    for record in records:
        new = {key: value for key, value in record.items() if key not in renames}
        new.update({renames[key]: value for key, value in record.items() if key in renames})
        out.append(new)
    return out


def check_labels(records: list[dict[str, Any]], task: str, source: str, *, columns: dict[str, str] | None = None,
                 format: str | None = None, encoding: str = "utf-8") -> None:
    """Raise LorakitError for the first record whose label (classification) or one of whose tags (NER) is
    missing, null or blank, naming the file and line (or item) and the column; other tasks pass.

    `records` are `read_records(source, format=format, encoding=encoding)` after `map_columns(..., columns)`, in
    file order: the line is found by reading the file again, which happens only for a bad record.
    """
    field = LABEL_FIELDS.get(task)
    if field is None:
        return
    for i, record in enumerate(records):
        problem = _blank_label(record.get(field))
        if problem is None:
            continue
        column = (columns or {}).get(field, field)
        named = f"column {column!r}" + (f" (data.columns {field})" if column != field else "")
        raise LorakitError(f"{source} {_where(source, i, format, encoding)}: {problem} in {named}; every example "
                           f"needs one: fill it in or delete the example")


def _blank_label(value: Any) -> str | None:
    if value is None:
        return "no label"
    if isinstance(value, str):
        return "empty label" if not value.strip() else None
    if isinstance(value, list):
        blank = [k for k, tag in enumerate(value) if tag is None or (isinstance(tag, str) and not tag.strip())]
        return f"empty tag for word {blank[0]}" if blank else None
    return None


def _where(source: str, index: int, format: str | None, encoding: str) -> str:
    """`line N` of record `index` in `source` where lines mean something, else `item N` / `record N`."""
    lines = None
    if not str(source).startswith(_HUB_PREFIX) and format != "parallel" and not Path(source).is_dir():
        try:
            _, lines = _read_with_lines(source, format, "train", None, encoding)
        except LorakitError:
            pass
    if lines is not None and index < len(lines):
        return f"line {lines[index]}"
    return f"item {index}" if str(source).endswith(".json") else f"record {index}"


def batch_indices(lengths: list[int], batch_size: int, *, seed: int, epoch: int, group_by_length: bool = True,
                  shuffle: bool = True, rank: int = 0, world_size: int = 1, drop_last: bool = False
                  ) -> list[list[int]]:
    """This rank's batches (lists of example indices) for one epoch, the same on every call with (seed, epoch).

    Shuffle the examples; with `group_by_length`, sort them by length (longest first) inside windows of
    `GROUP_WINDOW_BATCHES` batches so that each batch needs little padding, cut the windows into batches and
    shuffle the batch order. Rank r takes batches r, r + world_size, ...; every rank gets the same number of
    batches: a short final batch is dropped with `drop_last`, and batches are repeated from the start of the
    epoch (as torch's DistributedSampler does) when their count does not divide by `world_size`.

    Pure: uses its own `random.Random`, never the global RNG. Raises LorakitError for bad arguments, or when
    `drop_last` leaves no batch for this rank.
    """
    _check_batching(batch_size, rank, world_size)
    rng = random.Random(f"{seed}:{epoch}")  # a str seed is hashed with SHA-512: stable across processes
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        window = batch_size * GROUP_WINDOW_BATCHES
        order = [i for start in range(0, len(order), window)
                 for i in sorted(order[start:start + window], key=lambda i: -lengths[i])]  # stable: ties random
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()  # windows hold whole batches, so only the very last batch can be short
    if shuffle and group_by_length:
        rng.shuffle(batches)
    if drop_last:
        batches = batches[:len(batches) - len(batches) % world_size]
    elif batches and len(batches) % world_size:
        extra = world_size - len(batches) % world_size
        batches += [batches[i % len(batches)] for i in range(extra)]
    if lengths and not batches:
        raise LorakitError(f"{len(lengths)} examples give no full batch of {batch_size} for each of "
                           f"{world_size} process(es) with drop_last; lower the batch size or turn off drop_last")
    return batches[rank::world_size]


def _check_batching(batch_size: int, rank: int, world_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise LorakitError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise LorakitError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise LorakitError(f"rank must be an int in [0, {world_size}), got {rank!r}")


def pad(sequences: list[list[int]], value: int, *, side: str = "right") -> Tensor:
    """Stack token lists into one (N, T) int64 tensor, T the longest length, filling with `value` on `side`."""
    if side not in ("right", "left"):
        raise LorakitError(f"padding side must be 'right' or 'left', got {side!r}")
    width = max((len(seq) for seq in sequences), default=0)
    out = torch.full((len(sequences), width), value, dtype=torch.long)  # (N, T)
    for row, seq in enumerate(sequences):
        if seq:
            if side == "right":
                out[row, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            else:
                out[row, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
    return out


def move_batch(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """The batch with every tensor on `device` (non-blocking from pinned memory)."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """`items` cut into consecutive slices of `size` (the last may be shorter), for evaluation batches."""
    if size < 1:
        raise LorakitError(f"batch size must be a positive int, got {size!r}")
    return [items[start:start + size] for start in range(0, len(items), size)]
