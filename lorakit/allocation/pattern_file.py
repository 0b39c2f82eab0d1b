"""The file `lorakit allocate` writes: a YAML mapping of full module names to ranks, with a comment header saying
how it was made, that a training config takes as `lora.rank_pattern: PATH` (read by `lorakit.train.config`).

One line per module. Its value is a rank (`name: 29`: the scaling is lora.alpha / 29, the `per-rank` rule) or a
rank and an alpha (`name: {rank: 29, alpha: 58.0}`, the `keep` rule, which sets the alpha that keeps the scaling
of the config's uniform rank). A full dotted module name, as a pattern, matches that module only (a whole-component
suffix match; see `lorakit.targets`), so the file can be edited line by line; `lora.rank` and `lora.alpha` apply to
the modules it does not list.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

import yaml

from lorakit.allocation.allocate import Allocation
from lorakit.fileio import atomic_write_bytes
from lorakit.outputs import OutputExistsError

PROBE_TEXT = {
    "activations": "the explained variance of each module's input (EVA, Paischer et al. 2024)",
    "gradients": "the energy of the loss gradient with respect to each weight (LoRA-GA's matrix, Wang et al. 2024)",
}


def check_output_file(path: str | Path, *, force: bool = False, inputs: Sequence[str | Path] = ()) -> None:
    """Whether the rank-pattern file may be written at `path`: refused (OutputExistsError, nothing changed) when
    it is a directory, one of `inputs`, or an existing file without `force`."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise OutputExistsError(f"{path} is a directory; give the path of the YAML file to write")
    for item in inputs:
        if Path(item).expanduser().exists() and os.path.realpath(out) == os.path.realpath(Path(item).expanduser()):
            raise OutputExistsError(f"output {path} is the input {item}; a command never writes over what it reads: "
                                    "choose another file")
    if out.exists() and not force:
        raise OutputExistsError(f"{path} already exists; pass --force to replace it, or choose another file")


def scaling_text(allocation: Allocation) -> str:
    """The header's sentence on the scaling rule the file follows."""
    a = allocation
    if a.scaling == "per-rank":
        shared = f"lora.alpha ({a.lora_alpha:g})" if a.lora_alpha is not None else "lora.alpha"
        rule = "alpha / sqrt(r_m)" if a.rslora else "alpha / r_m"
        return (f"scaling: per-rank: {shared} is shared, so a module of rank r_m is scaled by {rule}; each entry "
                "is a rank.")
    rank, alpha = a.lora_rank or 1, a.lora_alpha or 0.0  # both set under `keep` (Allocation checks)
    if a.rslora:
        formula = f"{alpha:g} * sqrt(r_m / {rank})"
        size = f"{alpha:g} / sqrt({rank}) = {alpha / math.sqrt(rank):.4g}"
    else:
        formula, size = f"{alpha:g} * r_m / {rank}", f"{alpha:g} / {rank} = {alpha / rank:.4g}"
    return (f"scaling: keep: each entry is {{rank: r_m, alpha: alpha_m}} with alpha_m = lora.alpha * "
            f"{'sqrt(r_m / lora.rank)' if a.rslora else 'r_m / lora.rank'} = {formula}, so every module keeps the "
            f"scaling of uniform rank {a.lora_rank}{' with rsLoRA' if a.rslora else ''}, {size} (PEFT EVA's "
            "adjust_scaling_factors). A lora.alpha_pattern of the training config comes first.")


def rank_pattern_text(allocation: Allocation, command: str | None = None) -> str:
    """The file's text: the comment header, then one line per module: `full.module.name: rank` (`per-rank`) or
    `full.module.name: {rank: r, alpha: a}` (`keep`)."""
    a = allocation
    asked = (f"uniform rank {a.like_rank} on these {len(a.ranks)} modules" if a.like_rank is not None
             else f"uniform rank {a.budget / sum(a.costs.values()):.2f} on these {len(a.ranks)} modules")
    header = [
        "LoRA ranks per module, chosen before training by `lorakit allocate`.",
        f"method: the {a.probe} probe on {a.probe_batches} training batches, {PROBE_TEXT[a.probe]}; each rank goes "
        "to the largest share of a module's energy per adapter parameter (docs/allocation.md).",
        f"budget: {a.budget:,} adapter parameters ({asked}); used: {a.used:,}, uniform-equivalent rank "
        f"{a.uniform_equivalent:.2f}.",
        scaling_text(a),
        "Pass it to training as lora.rank_pattern: PATH (in a config, relative to it) or --lora.rank_pattern=PATH. "
        "Edit freely: a full module name matches that module only; lora.rank and lora.alpha apply to modules not "
        "listed.",
    ]
    lines = [line for text in header for line in textwrap.wrap(text, 110, subsequent_indent="  ",
                                                              break_on_hyphens=False)]
    if command:
        lines.append(f"command: {command}")  # one line, to copy whole
    alphas = a.alphas
    entries = {name: {"rank": rank, "alpha": alphas[name]} if alphas else rank for name, rank in a.ranks.items()}
    # block style, and under `keep` flow style for the entries only: one `name: {rank: r, alpha: a}` line each
    body = yaml.safe_dump(entries, sort_keys=False, default_flow_style=None if alphas else False, width=10_000)
    return "".join(f"# {line}\n" for line in lines) + body


def write_rank_pattern(path: str | Path, allocation: Allocation, *, command: str | None = None,
                       force: bool = False, inputs: Sequence[str | Path] = (), scaling: str | None = None) -> Path:
    """Write the rank-pattern file atomically (see `check_output_file` for what is refused). `scaling` (`keep` or
    `per-rank`) replaces the allocation's own rule when given, so one probe can write both files."""
    if scaling is not None:
        allocation = dataclasses.replace(allocation, scaling=scaling)  # checked by Allocation
    check_output_file(path, force=force, inputs=inputs)
    out = Path(path).expanduser()
    atomic_write_bytes(out, rank_pattern_text(allocation, command).encode(), what="rank pattern")
    return out


def module_kind(name: str) -> str:
    """A module name with its layer indices replaced by `*`: `encoder.layer.3.attention.self.query` ->
    `encoder.layer.*.attention.self.query`."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", name)


def summary_rows(ranks: dict[str, int]) -> list[tuple[str, str]]:
    """One row per module kind (layer indices as `*`), in the model's order: the mean rank and the ranks layer
    by layer."""
    kinds: dict[str, list[int]] = {}
    for name, rank in ranks.items():
        kinds.setdefault(module_kind(name), []).append(rank)
    rows = []
    for kind, values in kinds.items():
        layers = " ".join(str(v) for v in values)
        rows.append((kind, f"mean {sum(values) / len(values):5.2f}   by layer: {layers}" if len(values) > 1
                     else f"rank {values[0]}"))
    return rows

