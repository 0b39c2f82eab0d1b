"""Teacher logits computed once and kept in a safetensors file, for runs of several epochs (or several runs).

    write_cache(path, logits, offsets, data=data_fingerprint(features), teacher=teacher.fingerprint(), kind=kind)
    cache = read_cache(path, data=..., teacher=..., kind=...)    # refused when built from other data or teacher
    cache.for_examples([3, 0, 7])                                 # their logits, concatenated in that order

Classification stores (N, C) logits, one row per training example. A causal LM stores one row of vocabulary-sized
logits per response token (the positions whose next token is supervised), all examples' rows concatenated, with
`offsets` (N + 1,) marking where each example's rows start. Rows are float32, the raw logits (the temperature is
applied when the loss is computed, so one cache serves every temperature). A cache is keyed by a fingerprint of
the encoded training examples and one of the teacher's weights: a cache built from other data or another teacher
is refused, never silently used. No pickle: tensors and a string header only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import Tensor

from lorakit.errors import LorakitError
from lorakit.fileio import atomic_write_bytes

FORMAT = "lorakit-teacher-logits/1"
CACHE_NAME = "teacher-logits.safetensors"  # the default file, in the run directory
INDEX_KEY = "example_index"  # the feature and batch key that tells a cached example's position


def data_fingerprint(features: list[dict[str, Any]]) -> str:
    """SHA-256 of the encoded training examples in order (their token ids, labels, ...; `INDEX_KEY` left out)."""
    digest = hashlib.sha256()
    for feature in features:
        kept = {k: v for k, v in feature.items() if k != INDEX_KEY}
        digest.update(json.dumps(kept, sort_keys=True, separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()


@dataclass
class LogitCache:
    """Cached teacher logits: `logits` (rows, C or V) float32; `offsets` (N + 1,) for a causal LM, where example i
    owns rows offsets[i]:offsets[i + 1]; None for classification (example i is row i)."""

    logits: Tensor
    offsets: Tensor | None

    @property
    def examples(self) -> int:
        return int(self.logits.shape[0]) if self.offsets is None else int(self.offsets.shape[0]) - 1

    def for_examples(self, indices: list[int]) -> Tensor:
        """The rows of the examples `indices`, in that order: (len(indices), C), or (their response tokens, V)."""
        bad = [i for i in indices if not 0 <= i < self.examples]
        if bad:
            raise LorakitError(f"example {bad[0]} is not in the teacher-logit cache of {self.examples} examples")
        if self.offsets is None:
            return self.logits[indices]
        starts, stops = self.offsets[:-1].tolist(), self.offsets[1:].tolist()
        return torch.cat([self.logits[starts[i]:stops[i]] for i in indices])


def write_cache(path: str | Path, logits: Tensor, offsets: Tensor | None, *, data: str, teacher: str, kind: str,
                teacher_name: str = "") -> None:
    """Write the cache atomically (a kill leaves the previous file or none, never half of one)."""
    tensors = {"logits": logits.detach().float().cpu().contiguous()}
    if offsets is not None:
        tensors["offsets"] = offsets.to(torch.int64).cpu().contiguous()
    metadata = {"format": FORMAT, "kind": kind, "data": data, "teacher": teacher, "teacher_name": teacher_name}
    atomic_write_bytes(path, save_safetensors(tensors, metadata=metadata), what="teacher-logit cache")


def cache_header(path: str | Path) -> dict[str, str]:
    """The header of a cache file; raises LorakitError for a file that is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata: dict[str, str] = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise LorakitError(f"{path} is not a readable teacher-logit cache ({type(e).__name__}: {e}); delete it to "
                           "rebuild it") from None
    if metadata.get("format") != FORMAT:
        raise LorakitError(f"{path} is not a lorakit teacher-logit cache (format {metadata.get('format')!r}); delete "
                           "it or set distill.cache_path to another file")
    return metadata


def read_cache(path: str | Path, *, data: str, teacher: str, kind: str) -> LogitCache:
    """Load a cache built from the same training examples (`data`), the same teacher and the same `kind`.

    Raises LorakitError naming what differs for a stale cache (other data, another teacher), and for a file that
    is damaged or not a cache; the message says to delete it (it is rebuilt) or to choose another path.
    """
    header = cache_header(path)
    fix = "delete it to rebuild it, or set distill.cache_path to another file"
    if header.get("kind") != kind:
        raise LorakitError(f"teacher-logit cache {path} holds {header.get('kind')} logits, this run needs {kind} "
                           f"logits; {fix}")
    if header.get("teacher") != teacher:
        built = header.get("teacher_name") or "another teacher"
        raise LorakitError(f"teacher-logit cache {path} is stale: it was built from another teacher ({built}, other "
                           f"weights); {fix}")
    if header.get("data") != data:
        raise LorakitError(f"teacher-logit cache {path} is stale: it was built from other training data (the encoded "
                           f"examples differ: another file, limit, max_length or tokenizer); {fix}")
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise LorakitError(f"{path} is truncated or corrupted ({type(e).__name__}: {e}); {fix}") from None
    return LogitCache(tensors["logits"], tensors.get("offsets"))
