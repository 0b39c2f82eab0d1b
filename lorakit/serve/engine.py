"""Continuous batching with a KV cache, each row of the batch decoding with its own adapter.

One thread owns the model. Between two decoding steps it admits waiting requests (up to `max_batch_size` rows),
prefills them together as one left-padded batch with their own cache, and merges that cache into the running one
by left-padding the shorter of the two along the sequence axis:

    running cache (B, heads, L, dim) + newcomers' cache (N, heads, L', dim) -> (B + N, heads, max(L, L'), dim)

with a 2-D attention mask (B + N, max(L, L')) marking the padding. Every step then feeds one token per row, with
its own position (the count of its real tokens), through `per_row_adapters` with one adapter name per row. A
finished, cancelled or timed-out row leaves at once (`batch_select_indices`), and columns that are padding for
every remaining row are cropped from the left, so the padding never outgrows the longest live row.

Left padding with the mask and per-row positions is what `model.generate` does for a padded batch, so greedy
outputs equal `lorakit.generation.generate` for the same prompt and adapter (up to float rounding).

The engine reports each row's progress through `Request.emit`, a callback run on the engine thread: the HTTP layer
hands it to its event loop and never blocks the engine.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from lorakit.bank import AdapterBank, Factors, per_row_adapters
from lorakit.errors import LorakitError

log = logging.getLogger(__name__)


class Overloaded(LorakitError):
    """The queue is full; the client should retry later."""


@dataclass
class Event:
    """What a row produced since the last event: `text` (new text), and when it ended `finish_reason`
    ('stop', 'length', 'cancelled', 'timeout', or 'error' with `error`)."""

    text: str
    tokens: int
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Request:
    """One completion: prompt token ids, the adapter (None: the base), sampling and where to report progress."""

    prompt_ids: list[int]
    adapter: str | None
    emit: Callable[[Event], None]
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    timeout_s: float = 600.0
    ignore_eos: bool = False  # vLLM's extension: decode max_tokens tokens whatever comes (for load tests)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class _Row:
    request: Request
    generated: list[int] = field(default_factory=list)
    sent: str = ""  # text already emitted
    generator: torch.Generator | None = None


# The adapters the engine may use: name -> factors; the engine rebuilds its bank when `version` changes.
@dataclass
class AdapterSet:
    factors: dict[str, Factors] = field(default_factory=dict)
    version: int = 0


class Engine:
    """The decoding thread. `submit` queues a request (raises `Overloaded` when `max_queue` wait already);
    `start`/`stop` run and end the thread. `model` must carry lorakit LoRA modules at every module an adapter
    adapts (see `lorakit.serve.adapters.prepare_model`)."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, adapters: AdapterSet, *,
                 max_batch_size: int = 32, max_queue: int = 256, on_step: Callable[[int, int], None] | None = None):
        if max_batch_size < 1:
            raise LorakitError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model, self.tokenizer, self.adapters = model.eval(), tokenizer, adapters
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.on_step = on_step  # (batch size, queue depth) after each step, for metrics
        self.device = next(model.parameters()).device
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos: set[int] = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos, default=0))
        self.lock = threading.Lock()
        self.waiting: collections.deque[Request] = collections.deque()
        self.wake = threading.Event()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.bank: AdapterBank | None = None
        self.bank_version = -1
        self.single_adapter = False  # benchmark mode: a batch holds rows of one adapter only
        self._reset_batch()

    # ------------------------------------------------------------------------------------------ public

    def submit(self, request: Request) -> None:
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise Overloaded(f"{len(self.waiting)} requests are waiting (the queue holds {self.max_queue}); "
                                 "retry later")
            self.waiting.append(request)
        self.wake.set()

    def queue_depth(self) -> int:
        return len(self.waiting)

    def batch_size(self) -> int:
        return len(self.rows)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def in_use(self) -> set[str]:
        """Adapters of rows running or waiting (an adapter in use is not evicted from memory)."""
        names = {r.request.adapter for r in self.rows} | {r.adapter for r in list(self.waiting)}
        return {n for n in names if n is not None}

    # ------------------------------------------------------------------------------------------ the loop

    def _reset_batch(self) -> None:
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.mask: Tensor | None = None  # (B, L): 1 for real tokens, 0 for padding

    def _loop(self) -> None:
        while not self.stopping:
            if not self.rows and not self.waiting:
                self.wake.wait(timeout=0.5)
                self.wake.clear()
                continue
            try:
                self._step()
            except Exception as e:  # a bug must not kill the server: fail the rows, keep serving
                log.exception("engine step failed")
                for row in self.rows:
                    row.request.emit(Event("", 0, "error", f"internal error in the engine: {e}"))
                self._reset_batch()
            if self.on_step is not None:
                self.on_step(len(self.rows), len(self.waiting))

    @torch.no_grad()
    def _step(self) -> None:
        self._refresh_bank()
        self._drop(lambda row: self._expired(row))
        newcomers = self._admit()
        if newcomers:
            self._prefill(newcomers)  # their first token; the running rows wait one prefill, not a whole batch
        if self.rows:
            self._decode()

    def _admit(self) -> list[_Row]:
        out: list[_Row] = []
        with self.lock:
            while self.waiting and len(self.rows) + len(out) < self.max_batch_size:
                request = self.waiting[0]
                if self.single_adapter:
                    current = {r.request.adapter for r in self.rows + out}
                    if current and request.adapter not in current:
                        break
                self.waiting.popleft()
                if request.cancelled.is_set():
                    continue
                if request.adapter is not None and request.adapter not in self.adapters.factors:
                    request.emit(Event("", 0, "error", f"adapter {request.adapter!r} is no longer loaded"))
                    continue
                generator = None
                if request.seed is not None:
                    generator = torch.Generator(device=self.device).manual_seed(request.seed)
                out.append(_Row(request, generator=generator))
        return out

    def _refresh_bank(self) -> None:
        if self.bank_version == self.adapters.version:
            return
        factors = dict(self.adapters.factors)
        for row in self.rows:  # rows of an unloaded adapter end here
            if row.request.adapter is not None and row.request.adapter not in factors:
                row.request.emit(Event("", len(row.generated), "error",
                                       f"adapter {row.request.adapter!r} was unloaded"))
        self._drop(lambda row: "gone" if row.request.adapter is not None and row.request.adapter not in factors
                   else None)
        self.bank = AdapterBank.from_adapters(self.model, factors) if factors else None
        self.bank_version = self.adapters.version

    def _forward(self, rows: list[_Row], ids: Tensor, mask: Tensor, positions: Tensor,
                 cache: DynamicCache) -> Tensor:
        names = [r.request.adapter for r in rows]
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "cache": cache,
                  "use_cache": True, "logits_to_keep": 1}
        if self.bank is None:
            out = self.model(**inputs)
        else:
            with per_row_adapters(self.model, self.bank, names):
                out = self.model(**inputs)
        return out.logits[:, -1, :].float()  # (N, vocab)

    def _prefill(self, rows: list[_Row]) -> None:
        longest = max(len(r.request.prompt_ids) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            prompt = row.request.prompt_ids
            ids[i, longest - len(prompt):] = torch.tensor(prompt)
            mask[i, longest - len(prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(rows, ids, mask, positions, cache)
        self._merge(rows, cache, mask)
        self._advance(rows, logits, first=len(self.rows) - len(rows))

    def _decode(self) -> None:
        assert self.cache is not None and self.mask is not None
        ids = torch.tensor([[r.generated[-1]] for r in self.rows], device=self.device)
        positions = self.mask.sum(-1, keepdim=True)  # (B, 1): each row's count of real tokens so far
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        logits = self._forward(self.rows, ids, self.mask, positions, self.cache)
        self._advance(self.rows, logits, first=0)

    def _merge(self, rows: list[_Row], cache: DynamicCache, mask: Tensor) -> None:
        """Append the newcomers' rows (their cache and mask) to the running batch, left-padding the shorter."""
        if self.cache is None or self.mask is None:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            return
        length = max(self.mask.shape[1], mask.shape[1])
        olds: list[Any] = list(self.cache.layers)
        news: list[Any] = list(cache.layers)
        for old, new in zip(olds, news, strict=True):
            old.keys = torch.cat([_left_pad(old.keys, length), _left_pad(new.keys, length)])
            old.values = torch.cat([_left_pad(old.values, length), _left_pad(new.values, length)])
        self.mask = torch.cat([_left_pad(self.mask, length, dim=1), _left_pad(mask, length, dim=1)])
        self.rows += rows

    def _advance(self, rows: list[_Row], logits: Tensor, first: int) -> None:
        """Choose each row's next token, report new text and drop the rows that finished."""
        for i, row in enumerate(rows):
            token = self._sample(row, logits[i])
            row.generated.append(token)
        finished: dict[int, str] = {}
        for i, row in enumerate(self.rows[first:first + len(rows)], first):
            reason = self._report(row)
            if reason is not None:
                finished[i] = reason
        if finished:
            self._drop(lambda row: None, indices=set(finished))

    def _sample(self, row: _Row, logits: Tensor) -> int:
        request = row.request
        if request.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / request.temperature, dim=-1)
        if request.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < request.top_p  # the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _report(self, row: _Row) -> str | None:
        """Emit the row's new text; returns the finish reason when the row is done."""
        request = row.request
        done_eos = row.generated[-1] in self.eos and not request.ignore_eos
        ids = row.generated[:-1] if done_eos else row.generated
        text = str(self.tokenizer.decode(ids, skip_special_tokens=True))
        reason = "stop" if done_eos else "length" if len(row.generated) >= request.max_tokens else None
        cut = min((text.find(s) for s in request.stop if s and s in text), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        if reason is None:
            # hold back a partial character and anything that may be the start of a stop string
            hold = max((len(s) - 1 for s in request.stop), default=0)
            text = text.rstrip("\ufffd")
            text = text[:max(len(row.sent), len(text) - hold)]
        new = text[len(row.sent):] if text.startswith(row.sent) else ""
        row.sent += new
        if new or reason is not None:
            request.emit(Event(new, len(row.generated), reason))
        return reason

    def _expired(self, row: _Row) -> str | None:
        request = row.request
        if request.cancelled.is_set():
            return "cancelled"
        if time.monotonic() - request.submitted > request.timeout_s:
            request.emit(Event("", len(row.generated), "timeout",
                               f"the request ran past its timeout of {request.timeout_s:g} s"))
            return "timeout"
        return None

    def _drop(self, why: Callable[[_Row], str | None], indices: set[int] | None = None) -> None:
        """Remove finished rows (those in `indices`, or those `why` names a reason for) from the batch."""
        if not self.rows:
            return
        gone = indices if indices is not None else {i for i, r in enumerate(self.rows) if why(r) is not None}
        if not gone:
            return
        keep = [i for i in range(len(self.rows)) if i not in gone]
        if not keep:
            self._reset_batch()
            return
        assert self.cache is not None and self.mask is not None
        self.rows = [self.rows[i] for i in keep]
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        pad = int((self.mask.cumsum(1) == 0).sum(1).min())  # columns that are padding for every row left
        if pad:
            layers: list[Any] = list(self.cache.layers)
            for layer in layers:
                layer.keys = layer.keys[:, :, pad:]
                layer.values = layer.values[:, :, pad:]
            self.mask = self.mask[:, pad:]


def _left_pad(t: Tensor, length: int, dim: int = 2) -> Tensor:
    """`t` with zeros before its entries along `dim` up to `length` (keys (B, heads, L, dim) or masks (B, L))."""
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape: list[Any] = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
