"""The try view: one prompt answered by the base model and by one or two adapters, with the same sampling
settings, through `lorakit.inference.load_for_inference` and `lorakit.generation.generate`. Loaded models are
kept (the last few) so that the next prompt answers at once."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.ui.security import UiSettings, check_run_name

MAX_ADAPTERS = 2
MAX_NEW_TOKENS = 256


class ModelCache:
    """The last `size` loaded (base, adapter) pairs; generation holds a lock (one model call at a time)."""

    def __init__(self, size: int = 3):
        self.size = size
        self.loaded: OrderedDict[tuple[str, str | None], Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, base: str, adapter: Path | None) -> Any:
        from lorakit.inference import load_for_inference

        key = (base, str(adapter) if adapter else None)
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return self.loaded[key]
        loaded = load_for_inference(base, adapter)
        self.loaded[key] = loaded
        while len(self.loaded) > self.size:
            self.loaded.popitem(last=False)
        return loaded


def adapter_runs(settings: UiSettings) -> list[str]:
    """Runs with a published adapter."""
    d = settings.runs_dir
    return sorted(p.parent.name for p in d.glob("*/adapter") if p.is_dir()) if d.is_dir() else []


def answer(settings: UiSettings, cache: ModelCache, body: dict[str, Any]) -> list[dict[str, str]]:
    """[{label, text}] for the base and each chosen adapter run; raises LorakitError for bad input."""
    from lorakit.generation import SamplingConfig, check_can_generate, generate
    from lorakit.inference import recorded_base

    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise LorakitError("the prompt is empty; type a prompt")
    names = [n for n in body.get("adapters") or [] if n]
    if not names or len(names) > MAX_ADAPTERS:
        raise LorakitError(f"choose one or {MAX_ADAPTERS} adapters to answer beside the base model")
    adapters = []
    for name in names:
        if (bad := check_run_name(name)) is not None:
            raise LorakitError(bad)
        if name not in adapter_runs(settings):
            raise LorakitError(f"run {name!r} has no adapter in {settings.shown(settings.runs_dir)} (yet); choose a "
                               "finished run")
        adapters.append((name, settings.runs_dir / name / "adapter"))
    try:
        max_new = int(body.get("max_new_tokens") or 32)
        temperature = float(body.get("temperature") or 0.0)
        seed = int(body.get("seed") or 0)
    except (TypeError, ValueError):
        raise LorakitError("max new tokens and seed must be whole numbers, temperature a number") from None
    if not 0 < max_new <= MAX_NEW_TOKENS:
        raise LorakitError(f"max new tokens must be between 1 and {MAX_NEW_TOKENS}, got {max_new}")
    sampling = SamplingConfig(max_new_tokens=max_new, temperature=temperature, seed=seed)
    base = recorded_base(adapters[0][1]) or "smollm2"
    chat = bool(body.get("chat", True))
    answers = []
    with cache.lock:
        shown = settings.shown(Path(base)) if Path(base).is_absolute() else base
        for label, adapter in [(f"base ({shown})", None), *adapters]:
            loaded = cache.get(recorded_base(adapter) or base if adapter else base, adapter)
            check_can_generate(loaded.model, label)
            text = generate(loaded.model, loaded.tokenizer, [prompt], sampling, chat=chat and
                            getattr(loaded.tokenizer, "chat_template", None) is not None)[0]
            answers.append({"label": label, "text": text})
    return answers
