"""The commands that choose ranks, explain adapters, compress, combine and export them: `allocate`, `sweep`,
`analyze`, `prune`, `factorize`, `combine`, `export`.

`add_tool_flags` declares their flags on the subparsers `lorakit.cli` builds, and `lorakit.cli` lists them in its
command table; each calls one library function and prints. Heavy imports wait for the command.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lorakit.allocator import use_allocator
from lorakit.cli_output import json_line, print_table
from lorakit.errors import LorakitError

# lorakit.arithmetic's METHODS and TARGET_CHOICES, spelled out so that building the parser imports no torch
COMBINE_METHODS = ("linear", "cat", "ties", "dare")
COMBINE_TARGETS = ("same", "union", "intersection")
# lorakit.gguf's TYPES and the export formats, spelled out for the same reason
EXPORT_FORMATS = ("gguf",)
GGUF_TYPES = ("f16", "q8_0")


def cmd_allocate(args: argparse.Namespace) -> int:
    from lorakit.allocation.allocate import allocate_from_config, check_budget_args
    from lorakit.allocation.pattern_file import check_output_file, summary_rows, write_rank_pattern
    from lorakit.train.config import load_train_config

    check_budget_args(args.budget, args.like_rank)
    config = load_train_config(args.config, args.overrides)
    check_output_file(args.out, force=args.force, inputs=[args.config])  # before the model loads
    use_allocator(config.run.allocator, args.relaunch)
    allocation = allocate_from_config(config, budget=args.budget, like_rank=args.like_rank, probe=args.probe,
                                      probe_batches=args.probe_batches, max_rank=args.max_rank,
                                      scaling=args.scaling)
    flags = [f"--budget {args.budget}" if args.budget is not None else f"--like-rank {args.like_rank}",
             f"--probe {args.probe}", f"--probe-batches {args.probe_batches}",
             *([f"--max-rank {args.max_rank}"] if args.max_rank is not None else []), f"--scaling {args.scaling}",
             f"--out {args.out}"]
    command = " ".join(["lorakit", "allocate", args.config, *args.overrides, *flags])
    out = write_rank_pattern(args.out, allocation, command=command, force=args.force, inputs=[args.config])
    print_table([("module kind", "ranks")] + summary_rows(allocation.ranks))
    print(f"budget {allocation.budget:,}, used {allocation.used:,} adapter parameters (uniform-equivalent rank "
          f"{allocation.uniform_equivalent:.2f}); {args.probe} probe on {allocation.probe_batches} batches in "
          f"{allocation.probe_seconds:.1f} s; scaling {args.scaling}; written to {out}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from lorakit.sweep.plan import plan_sweep
    from lorakit.sweep.report import table_lines
    from lorakit.sweep.run import run_sweep

    plan = plan_sweep(args.config, args.overrides, out_dir=args.out)  # every point checked before any training
    use_allocator(plan.allocator(), args.relaunch)
    result = run_sweep(plan, force=args.force, record=args.record, note=args.note, progress=not args.quiet,
                       echo=lambda line: print(line, file=sys.stderr, flush=True))
    print("\n".join(table_lines(plan.metric, result.rows)))
    print(f"{len(result.trained)} trained, {len(result.skipped)} finished earlier; sweep.json, sweep.md and "
          f"pareto.png in {plan.out_dir}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from lorakit.analysis import run_analysis

    analysis, report = run_analysis(args.adapter, against=args.against, model=args.model, base=not args.no_base,
                                    out_dir=args.out, force=args.force, texts=args.texts)
    summary = analysis.summary() | {"report": str(report) if report else None}
    if args.json:
        print(json_line(summary))
    else:
        print_table([(k, f"{v:.3g}" if isinstance(v, float) else str(v)) for k, v in summary.items()
                      if v is not None])
        if report is None:
            print("(pass --out DIR for the report: analysis.json, figures and report.md)")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from lorakit.compress import prune_adapter

    report = prune_adapter(args.adapter, args.out, rank=args.rank, energy=args.energy, force=args.force,
                           principal=args.principal)
    if args.json:
        print(json_line(report.as_json()))
        return 0
    kinds: dict[str, list[Any]] = {}
    for m in report.modules:
        kinds.setdefault(m.kind, []).append(m)
    print_table([("module kind", "rank before -> after, discarded share of ‖ΔW‖²")] + [
        (kind, f"{_span([m.rank_before for m in ms])} -> {_span([m.rank_after for m in ms])}, "
               f"{max(m.discarded for m in ms):.3g} at most") for kind, ms in kinds.items()])
    print(f"{report.bytes_before:,} -> {report.bytes_after:,} bytes, {report.parameters_before:,} -> "
          f"{report.parameters_after:,} parameters; {report.discarded:.3g} of Σ‖ΔW‖² discarded; written to "
          f"{report.out}")
    return 0


def cmd_factorize(args: argparse.Namespace) -> int:
    from lorakit.compress.command import factorize_model

    report = factorize_model(args.model, args.out, targets=[p.strip() for p in args.targets.split(",")],
                             rank=args.rank, energy=args.energy, ratio=args.ratio, method=args.method,
                             calibration_texts=args.calibration_texts, rank_multiple=args.rank_multiple,
                             dense=args.dense, force=args.force, command=_factorize_command(args))
    print(f"{len(report.factorized)} of {len(report.modules)} modules factorised ({args.method}): "
          f"{report.parameters_before:,} -> {report.parameters_after:,} parameters; "
          f"{'dense checkpoint' if args.dense else 'factorised model'} written to {args.out}")
    return 0


def _factorize_command(args: argparse.Namespace) -> str:
    size = next(f"--{k} {getattr(args, k)}" for k in ("rank", "energy", "ratio") if getattr(args, k) is not None)
    calibration = [f"--calibration-texts {args.calibration_texts}"] if args.calibration_texts else []
    multiple = [f"--rank-multiple {args.rank_multiple}"] if args.rank_multiple != 1 else []
    return " ".join(["lorakit factorize --model", args.model, size, "--method", args.method, "--targets",
                     args.targets, *calibration, *multiple, "--out", args.out])


def cmd_combine(args: argparse.Namespace) -> int:
    adapters = parse_combine_adapters(args.adapters)
    from lorakit.arithmetic import combine
    from lorakit.io import WEIGHTS_NAME

    report = combine(adapters, args.out, method=args.method, rank=args.rank, density=args.density, rate=args.rate,
                     targets=args.targets, seed=args.seed, force=args.force)
    size = (report.out / WEIGHTS_NAME).stat().st_size
    if args.json:
        print(json_line(report.as_json() | {"bytes": size}))
        return 0
    kinds: dict[str, list[Any]] = {}
    for m in report.modules:
        kinds.setdefault(re.split(r"\.\d+\.", m.name)[-1], []).append(m)
    print_table([("module kind", "input ranks -> saved rank, discarded share of ‖ΔW‖²")] + [
        (kind, f"{_ranks_in(ms)} -> {_span([m.rank for m in ms])}, {max(m.discarded for m in ms):.3g} at most")
        for kind, ms in kinds.items()])
    weights = ", ".join(f"{name} {weight:g}" for name, (_, weight) in report.adapters.items())
    print(f"{report.method} of {len(report.adapters)} adapters ({weights}): {len(report.modules)} modules, "
          f"{size:,} bytes; written to {report.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.adapter_only and not args.adapter:
        raise LorakitError("--adapter-only needs --adapter DIR, the adapter to write as a llama.cpp LoRA file")
    if args.adapter_only and args.type is not None:
        raise LorakitError("--type applies to the merged model; --adapter-only writes the LoRA factors in f32")
    from lorakit.gguf import export_gguf, export_lora_gguf

    if args.adapter_only:
        lora = export_lora_gguf(args.adapter, args.out, model=args.model, force=args.force)
        if args.json:
            print(json_line(lora.as_json()))
            return 0
        folded = f"; the scaling of {len(lora.folded)} modules folded into lora_b" if lora.folded else ""
        print(f"LoRA adapter ({lora.modules} modules, alpha {lora.alpha:g}) for {lora.base}: {lora.bytes:,} bytes"
              f"{folded}; written to {lora.out} (use with: llama-cli -m BASE.gguf --lora {lora.out})")
        return 0
    report = export_gguf(args.model or (None if args.adapter else "smollm2"), args.out, adapter=args.adapter,
                         type=args.type or "f16", force=args.force)
    if args.json:
        print(json_line(report.as_json()))
        return 0
    types = ", ".join(f"{n} {k}" for k, n in report.as_json()["tensors"].items())
    merged = " with the adapter merged" if args.adapter else ""
    print(f"GGUF model{merged} ({len(report.tensor_types)} tensors: {types}): {report.bytes:,} bytes in "
          f"{report.seconds:.1f} s; written to {report.out} (run with: llama-cli -m {report.out})")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from lorakit.ui.security import UiSettings, check_bind, read_token_file

    token = read_token_file(args.token_file) if args.token_file else None
    check_bind(args.host, token)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise LorakitError(f"lorakit ui needs FastAPI and uvicorn ({e.name} is missing); install the ui extra: "
                           "pip install 'lorakit[ui]'") from None
    from lorakit.ui import serve

    settings = UiSettings(runs_dir=Path(args.runs_dir), host=args.host, port=args.port, token=token,
                          allow=[Path(p) for p in args.allow])
    print(f"lorakit ui on http://{args.host}:{args.port}/ (runs in {settings.shown(settings.runs_dir)}; "
          "Ctrl-C stops the page, not the runs)", flush=True)
    serve(settings)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    adapters = parse_serve_adapters(args.adapter)
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise LorakitError(f"lorakit serve needs FastAPI, uvicorn and prometheus-client ({e.name} is missing); "
                           "install the serve extra: pip install 'lorakit[serve]'") from None
    from lorakit.serve.app import create_app
    from lorakit.serve.command import check_serve_args, serve_settings

    settings = serve_settings(args.model, adapters, adapter_dir=args.adapter_dir, host=args.host, port=args.port,
                              api_key_file=args.api_key_file, max_batch_size=args.max_batch_size,
                              max_loaded_adapters=args.max_loaded_adapters)
    check_serve_args(settings)  # the port, the bind address: before the model loads
    app = create_app(settings)
    names = ", ".join([settings.model, *settings.adapters])
    print(f"lorakit serve on http://{args.host}:{args.port}/v1 (models: {names}); Ctrl-C stops it", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def parse_serve_adapters(items: list[str]) -> dict[str, Path]:
    """`NAME=ADAPTER_DIR` arguments as {name: directory}; raises LorakitError naming the argument."""
    adapters: dict[str, Path] = {}
    for item in items:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise LorakitError(f"--adapter {item!r} needs a name and a directory: NAME=ADAPTER_DIR, e.g. "
                               "sql=runs/sql/adapter (the name is what clients send as `model`)")
        if name in adapters:
            raise LorakitError(f"adapter name {name!r} is given twice; give each adapter its own name")
        adapters[name] = Path(path)
    return adapters


def parse_combine_adapters(items: list[str]) -> dict[str, tuple[str | Path, float]]:
    """`NAME=ADAPTER_DIR[:WEIGHT]` arguments as combine's {name: (adapter_dir, weight)}; the weight defaults to 1.0
    and is the text after the last ':'. Raises LorakitError naming the argument and the expected form."""
    form = "expected NAME=ADAPTER_DIR[:WEIGHT], e.g. sst2=runs/sst2/adapter:0.5"
    adapters: dict[str, tuple[str | Path, float]] = {}
    for item in items:
        name, eq, rest = item.partition("=")
        if not eq or not name or not rest:
            raise LorakitError(f"adapter argument {item!r} needs a name and a directory; {form}")
        path, colon, text = rest.rpartition(":") if ":" in rest else (rest, "", "1")
        if colon and not path:
            raise LorakitError(f"adapter argument {item!r} has no directory before ':'; {form}")
        try:
            weight = float(text)
        except ValueError:
            raise LorakitError(f"adapter argument {item!r}: weight {text!r} is not a number; {form} (a negative "
                               "weight subtracts, e.g. toxic=runs/toxic/adapter:-0.5)") from None
        if name in adapters:
            raise LorakitError(f"adapter name {name!r} is given twice; give each adapter its own name")
        adapters[name] = (path, weight)
    return adapters


def _ranks_in(modules: list[Any]) -> str:
    """The input ranks of a module kind: `4+8` when every module of the kind has the same, else the span of sums."""
    ranks = {tuple(m.ranks_in) for m in modules}
    if len(ranks) == 1:
        return "+".join(str(r) for r in ranks.pop())
    return f"{_span([sum(m.ranks_in) for m in modules])} in all"


def _span(values: list[int]) -> str:
    return str(min(values)) if min(values) == max(values) else f"{min(values)}-{max(values)}"


TOOL_COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], int]]] = {
    "analyze": ("what an adapter's update ΔW learned: spectra, ranks, ΔW against W, subspace similarity, tokens",
                cmd_analyze),
    "allocate": ("choose per-module ranks under a parameter budget from a probe of a training config's model and "
                 "data; writes a rank_pattern file", cmd_allocate),
    "sweep": ("train the product of listed config values (--lora.rank=1,2,4), resumably; a results table and a "
              "Pareto plot", cmd_sweep),
    "prune": ("cut a trained adapter's ranks to its top singular directions (--rank R or --energy E); writes a "
              "smaller PEFT-layout adapter", cmd_prune),
    "factorize": ("replace a model's linear layers by low-rank pairs U·Vᵀ (--rank, --energy or --ratio); writes a "
                  "model directory load_model reads, or with --dense a plain transformers checkpoint", cmd_factorize),
    "combine": ("one adapter from weighted adapters of one base (linear, cat, TIES or DARE); writes a PEFT-layout "
                "adapter", cmd_combine),
    "export": ("write a model (with an adapter merged) or an adapter alone as a GGUF file for llama.cpp and "
               "Ollama", cmd_export),
    "serve": ("an OpenAI-compatible server of a base and many adapters, each request on its own adapter in one "
              "continuously batched decode (127.0.0.1:8000 by default; the serve extra)", cmd_serve),
    "ui": ("serve a web page to start, watch, compare and try runs (127.0.0.1:7860 by default; the ui extra)",
           cmd_ui),
}


def add_tool_flags(parsers: Mapping[str, argparse.ArgumentParser]) -> None:
    """Declare the flags of the commands above on their subparsers."""
    parsers["allocate"].add_argument("config", help="a training YAML file (its model, data, lora.targets, batch size)")
    parsers["allocate"].add_argument("overrides", nargs="*", help="section.key=value overrides, as for train")
    budget = parsers["allocate"].add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget", type=int, help="adapter parameters in all (LoRA factors A and B)")
    budget.add_argument("--like-rank", type=int, metavar="R", help="the parameter count of uniform rank R on the "
                        "same target modules")
    parsers["allocate"].add_argument("--probe", choices=("gradients", "activations"), default="gradients",
                                     help="spectra of the loss gradient of each module's weight (LoRA-GA) or of its "
                                     "inputs (EVA); default: gradients (docs/allocation.md says why)")
    parsers["allocate"].add_argument("--probe-batches", type=int, default=8, help="training batches to probe")
    parsers["allocate"].add_argument("--max-rank", type=int, help="no module above this rank")
    parsers["allocate"].add_argument("--scaling", choices=("keep", "per-rank"), default="keep",
                                     help="keep: each module gets the alpha that keeps the scaling of uniform "
                                     "lora.rank (PEFT EVA's default); per-rank: lora.alpha shared, scaling alpha/r_m")
    parsers["allocate"].add_argument("--out", required=True, help="the rank-pattern YAML file to write")
    parsers["allocate"].add_argument("--force", action="store_true", help="replace an existing --out file")
    parsers["sweep"].add_argument("config", help="a training YAML file, as for train")
    parsers["sweep"].add_argument("overrides", nargs="*", help="section.key=V1,V2,... values to sweep (a list-valued "
                                  "key: [a,b],[a,b,c]); section.key=V with one value is fixed for every point")
    parsers["sweep"].add_argument("--out", help="the sweep's directory (default: <run.out_dir of the config>/sweep)")
    parsers["sweep"].add_argument("--force", action="store_true", help="replace another sweep's points and tables in "
                                  "--out (the same sweep is always continued)")
    parsers["sweep"].add_argument("--record", metavar="JSON", help="append each finished point to this results file")
    parsers["sweep"].add_argument("--note", help="a remark stored with each recorded point")
    parsers["sweep"].add_argument("--quiet", action="store_true", help="no training progress bars")
    parsers["analyze"].add_argument("adapter", help="an adapter directory (lorakit's or PEFT's)")
    parsers["analyze"].add_argument("--against", metavar="ADAPTER", help="a second adapter on the same base: adds "
                                    "the subspace similarity φ of the two (LoRA paper §7.2)")
    parsers["analyze"].add_argument("--model", help="the base model (default: the one the adapter records)")
    parsers["analyze"].add_argument("--no-base", action="store_true", help="do not load the base: the factors' "
                                    "spectra only, no ΔW against W and no token projection")
    parsers["analyze"].add_argument("--out", help="write analysis.json, PNG figures and report.md to this directory "
                                    "(new or empty); without it only the summary is printed")
    parsers["analyze"].add_argument("--force", action="store_true", help="replace an earlier analysis at --out")
    parsers["analyze"].add_argument("--texts", metavar="FILE", help="UTF-8 texts, one per line (a JSON string line "
                                    "may hold line breaks), run through the adapted causal LM: the token directions "
                                    "are oriented to what the update promotes on them, with its mean effect")
    parsers["analyze"].add_argument("--json", action="store_true", help="print the summary as one JSON object")
    prune = parsers["prune"]
    prune.add_argument("adapter", help="a trained adapter directory (lorakit's or PEFT's)")
    keep = prune.add_mutually_exclusive_group(required=True)
    keep.add_argument("--rank", type=int, help="keep the top R singular directions of every module's ΔW")
    keep.add_argument("--energy", type=float, help="keep per module the fewest directions holding this share of "
                      "‖ΔW‖_F², in (0, 1]")
    prune.add_argument("--out", required=True, help="directory for the pruned adapter (new or empty)")
    prune.add_argument("--principal", choices=("convert",), help="for a principal (PiSSA) adapter: prune its "
                       "update s·(BA - B₀A₀) on the original base and save a standard adapter")
    prune.add_argument("--force", action="store_true", help="replace an earlier pruned adapter at --out")
    prune.add_argument("--json", action="store_true", help="print the report as one JSON object")
    fac = parsers["factorize"]
    fac.add_argument("--model", required=True, help="a bundled name, model directory or hub id")
    size = fac.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="the same rank R for every chosen layer (R <= min(fan_in, fan_out))")
    size.add_argument("--energy", type=float, help="per layer the fewest directions holding this share, in (0, 1]")
    size.add_argument("--ratio", type=float, help="keep this share of the chosen layers' parameters, in (0, 1]")
    fac.add_argument("--method", choices=("svd", "activation"), default="svd", help="svd: truncate W; activation: "
                     "truncate W weighted by its inputs on --calibration-texts (SVD-LLM)")
    fac.add_argument("--targets", default="all-linear", help="comma-separated presets or patterns, as for LoRA "
                     "targets (default: all-linear, every linear layer but the output head)")
    fac.add_argument("--calibration-texts", metavar="FILE", help="UTF-8 texts, one per line, for --method activation")
    fac.add_argument("--rank-multiple", type=int, default=1, metavar="M", help="--ratio and --energy ranks are "
                     "multiples of M (16 runs the thin products faster on AVX-512 CPUs; default 1)")
    fac.add_argument("--out", required=True, help="directory to write (new or empty)")
    fac.add_argument("--dense", action="store_true", help="write U·Vᵀ multiplied out: a plain transformers checkpoint")
    fac.add_argument("--force", action="store_true", help="replace an earlier factorised model at --out")
    com = parsers["combine"]
    com.add_argument("adapters", nargs="+", metavar="NAME=ADAPTER_DIR[:WEIGHT]", help="an adapter, its name in the "
                     "combination and its weight (default 1; negative subtracts: toxic=runs/toxic/adapter:-0.5)")
    com.add_argument("--out", required=True, help="directory for the combined adapter (new or empty)")
    com.add_argument("--method", choices=COMBINE_METHODS, default="linear", help="linear: weighted sum cut to --rank "
                     "(default: exact); cat: exact, ranks add; ties: TIES-Merging; dare: DARE then sum")
    com.add_argument("--rank", type=int, help="the saved rank of every module (not for cat; default: the sum of the "
                     "input ranks)")
    com.add_argument("--density", type=float, help="ties: the share of each update's entries kept, in (0, 1]")
    com.add_argument("--rate", type=float, help="dare: the drop probability, in [0, 1)")
    com.add_argument("--seed", type=int, default=0, help="dare: the seed of the drops (default 0)")
    com.add_argument("--targets", choices=COMBINE_TARGETS, default="same", help="adapters of different modules: union "
                     "(a missing module adds 0) or intersection (only the modules all adapt); default same: refuse")
    com.add_argument("--force", action="store_true", help="replace an earlier combined adapter at --out")
    com.add_argument("--json", action="store_true", help="print the report as one JSON object")
    exp = parsers["export"]
    exp.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="the file format (gguf: llama.cpp, "
                     "Ollama)")
    exp.add_argument("--model", help="a bundled name, model directory or hub id (default: the base the adapter "
                     "records, else smollm2)")
    exp.add_argument("--adapter", help="an adapter directory: merged into the model, or with --adapter-only written "
                     "alone")
    exp.add_argument("--adapter-only", "--lora", action="store_true", help="write the adapter alone as a llama.cpp "
                     "LoRA file (llama-cli --lora, Ollama ADAPTER) instead of a merged model")
    exp.add_argument("--out", required=True, help="the .gguf file to write")
    exp.add_argument("--type", choices=GGUF_TYPES, help="weights of the merged model: f16 (default) "
                     "or q8_0 (8-bit blocks of 32, about half the size)")
    exp.add_argument("--force", action="store_true", help="replace an earlier GGUF file at --out")
    exp.add_argument("--json", action="store_true", help="print the report as one JSON object")
    srv = parsers["serve"]
    srv.add_argument("--model", help="the base: a bundled name, model directory or hub id (default: the base the "
                     "first adapter records)")
    srv.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="an adapter to serve under "
                     "NAME (clients send it as `model`); repeatable")
    srv.add_argument("--adapter-dir", metavar="DIR", help="the directory /v1/load_lora_adapter may load adapters "
                     "from at runtime (default: no runtime loading)")
    srv.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine "
                     "only; any other needs --api-key-file)")
    srv.add_argument("--port", type=int, default=8000, help="the port (default 8000)")
    srv.add_argument("--api-key-file", metavar="FILE", help="a file holding the key every request but /health must "
                     "send as 'Authorization: Bearer KEY'")
    srv.add_argument("--max-batch-size", type=int, default=32, help="rows decoded together (default 32)")
    srv.add_argument("--max-loaded-adapters", type=int, default=16, help="adapters held in memory; loading one more "
                     "evicts the least recently used (default 16)")
    ui = parsers["ui"]
    ui.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine "
                    "only; any other needs --token-file)")
    ui.add_argument("--port", type=int, default=7860, help="the port (default 7860)")
    ui.add_argument("--runs-dir", default="runs", help="where runs are written and listed (default runs)")
    ui.add_argument("--token-file", metavar="FILE", help="a file holding a secret every request must carry (open the "
                    "page as http://HOST:PORT/?token=SECRET)")
    ui.add_argument("--allow", action="append", default=[], metavar="DIR", help="a further directory data and model "
                    "paths may name (besides the working directory and --runs-dir); repeatable")
