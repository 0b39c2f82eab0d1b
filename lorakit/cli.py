"""The command line: a table of subcommands, each parsing its flags and calling one library function.

Known errors (bad input, argparse's included) print one line, `error: ...`, and exit with code 2; an unexpected
exception prints one line and exits with code 1 (its traceback with -v). Heavy imports wait for the command.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from lorakit.errors import LorakitError


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="smollm2, minilm, a local model directory or a hub id (default: the base "
                        "the adapter was trained on, else smollm2)")
    parser.add_argument("--adapter", help="an adapter directory to apply (lorakit's or PEFT's)")


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--stop", action="append", default=[], help="a string that ends the answer (repeatable)")
    parser.add_argument("--seed", type=int)


def _sampling(args: argparse.Namespace) -> Any:
    from lorakit.generation import SamplingConfig

    return SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.repetition_penalty,
                          args.stop, args.seed)


def cmd_train(args: argparse.Namespace) -> int:
    from lorakit.distributed import World
    from lorakit.train.config import load_train_config
    from lorakit.train.results import check_results_file, record_result, train_record
    from lorakit.train.run import train_from_config

    config = load_train_config(args.config, args.overrides)
    if args.record:
        check_results_file(args.record)  # before hours of training, not after
    summary = train_from_config(config, resume=args.resume, force=args.force, progress=not args.quiet)
    if not World.from_env().is_main:  # under torchrun, rank 0 reports for the job
        return 0
    _print_table(summary.table())
    if args.record:
        command = " ".join(["lorakit", "train", args.config, *args.overrides, *(["--resume"] if args.resume else [])])
        record_result(train_record(summary.as_json(), config.data.train, command, args.note), args.record)
    print(_json(summary.as_json()))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lorakit.train.config import load_train_config
    from lorakit.train.evaluate import evaluate_from_config
    from lorakit.train.results import check_results_file, record_result

    config = load_train_config(args.config, args.overrides)
    if args.record:
        check_results_file(args.record)
    evaluation = evaluate_from_config(config, adapter=args.adapter, num_beams=args.num_beams)
    if args.record:
        command = " ".join(["lorakit", "eval", args.config, *args.overrides,
                            *(["--adapter", args.adapter] if args.adapter else [])])
        record_result(evaluation.record(command, args.note), args.record)
    print(_json(evaluation.metrics))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from lorakit.export import merge_adapter

    out = merge_adapter(args.adapter, args.out, model=args.model, dtype=args.dtype, force=args.force)
    print(f"merged model written to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from lorakit.generation import check_can_generate, check_prompts, generate
    from lorakit.inference import load_for_inference

    sampling = _sampling(args)
    prompts = args.prompt if args.prompt is not None else [line.rstrip("\n") for line in sys.stdin if line.strip()]
    check_prompts(prompts, raw=args.raw)
    loaded = load_for_inference(args.model, args.adapter)
    check_can_generate(loaded.model, loaded.base)
    for answer in generate(loaded.model, loaded.tokenizer, prompts, sampling, chat=not args.raw):
        print(answer)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from lorakit.generation import chat_prompt, check_can_generate, generate
    from lorakit.inference import load_for_inference

    sampling = _sampling(args)
    loaded = load_for_inference(args.model, args.adapter)
    check_can_generate(loaded.model, loaded.base)
    history: list[dict[str, str]] = []
    print("chat: an empty line or Ctrl-D ends the session", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        history.append({"role": "user", "content": line.strip()})
        prompt = chat_prompt(loaded.tokenizer, history)
        answer = generate(loaded.model, loaded.tokenizer, [prompt], sampling, chat=False)[0]
        history.append({"role": "assistant", "content": answer})
        print(answer, flush=True)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from lorakit.io import inspect_adapter

    info = inspect_adapter(args.adapter)
    if args.json:
        print(_json(info))
    else:
        _print_table([(k, str(v)) for k, v in info.items()])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lorakit.demo import run_demo

    result = run_demo(out_dir=Path(args.out), force=args.force, progress=not args.quiet, echo=print)
    print(_json(result))
    return 0


def cmd_allocate(args: argparse.Namespace) -> int:
    from lorakit.allocation.allocate import allocate_from_config, check_budget_args
    from lorakit.allocation.pattern_file import check_output_file, summary_rows, write_rank_pattern
    from lorakit.train.config import load_train_config

    check_budget_args(args.budget, args.like_rank)
    config = load_train_config(args.config, args.overrides)
    check_output_file(args.out, force=args.force, inputs=[args.config])  # before the model loads
    allocation = allocate_from_config(config, budget=args.budget, like_rank=args.like_rank, probe=args.probe,
                                      probe_batches=args.probe_batches, max_rank=args.max_rank,
                                      scaling=args.scaling)
    flags = [f"--budget {args.budget}" if args.budget is not None else f"--like-rank {args.like_rank}",
             f"--probe {args.probe}", f"--probe-batches {args.probe_batches}",
             *([f"--max-rank {args.max_rank}"] if args.max_rank is not None else []), f"--scaling {args.scaling}",
             f"--out {args.out}"]
    command = " ".join(["lorakit", "allocate", args.config, *args.overrides, *flags])
    out = write_rank_pattern(args.out, allocation, command=command, force=args.force, inputs=[args.config])
    _print_table([("module kind", "ranks")] + summary_rows(allocation.ranks))
    print(f"budget {allocation.budget:,}, used {allocation.used:,} adapter parameters (uniform-equivalent rank "
          f"{allocation.uniform_equivalent:.2f}); {args.probe} probe on {allocation.probe_batches} batches in "
          f"{allocation.probe_seconds:.1f} s; scaling {args.scaling}; written to {out}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from lorakit.sweep.plan import plan_sweep
    from lorakit.sweep.report import table_lines
    from lorakit.sweep.run import run_sweep

    plan = plan_sweep(args.config, args.overrides, out_dir=args.out)  # every point checked before any training
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
        print(_json(summary))
    else:
        _print_table([(k, f"{v:.3g}" if isinstance(v, float) else str(v)) for k, v in summary.items()
                      if v is not None])
        if report is None:
            print("(pass --out DIR for the report: analysis.json, figures and report.md)")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from lorakit.compress import prune_adapter

    report = prune_adapter(args.adapter, args.out, rank=args.rank, energy=args.energy, force=args.force,
                           principal=args.principal)
    if args.json:
        print(_json(report.as_json()))
        return 0
    kinds: dict[str, list[Any]] = {}
    for m in report.modules:
        kinds.setdefault(m.kind, []).append(m)
    _print_table([("module kind", "rank before -> after, discarded share of ‖ΔW‖²")] + [
        (kind, f"{_span([m.rank_before for m in ms])} -> {_span([m.rank_after for m in ms])}, "
               f"{max(m.discarded for m in ms):.3g} at most") for kind, ms in kinds.items()])
    print(f"{report.bytes_before:,} -> {report.bytes_after:,} bytes, {report.parameters_before:,} -> "
          f"{report.parameters_after:,} parameters; {report.discarded:.3g} of Σ‖ΔW‖² discarded; written to "
          f"{report.out}")
    return 0


def _span(values: list[int]) -> str:
    return str(min(values)) if min(values) == max(values) else f"{min(values)}-{max(values)}"


def _json(value: Any) -> str:
    """Strict JSON (a NaN or infinity becomes null: `NaN` is not JSON and breaks every reader of the line)."""
    from lorakit.train.evaluate import finite_metrics

    return json.dumps(finite_metrics(value) if isinstance(value, dict) else value, allow_nan=False)


def _quiet_transformers() -> None:
    """transformers reports every newly initialised head and loading bar on stderr; keep the CLI's output ours."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _print_table(rows: list[tuple[str, str]]) -> None:
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], int]]] = {
    "train": ("fine-tune an adapter from a YAML config (flags --section.key=value override it)", cmd_train),
    "eval": ("score a base model or an adapter on a config's evaluation data", cmd_eval),
    "merge": ("write a merged model directory that plain transformers loads", cmd_merge),
    "generate": ("complete prompts with a model, with or without an adapter", cmd_generate),
    "chat": ("chat with a model on standard input, with or without an adapter", cmd_chat),
    "inspect": ("describe an adapter directory: base, targets, ranks, sizes", cmd_inspect),
    "demo": ("the main job: LoRA on the bundled SmolLM2, base vs adapted accuracy, merge check", cmd_demo),
    "analyze": ("what an adapter's update ΔW learned: spectra, ranks, ΔW against W, subspace similarity, tokens",
                cmd_analyze),
    "allocate": ("choose per-module ranks under a parameter budget from a probe of a training config's model and "
                 "data; writes a rank_pattern file", cmd_allocate),
    "sweep": ("train the product of listed config values (--lora.rank=1,2,4), resumably; a results table and a "
              "Pareto plot", cmd_sweep),
    "prune": ("cut a trained adapter's ranks to its top singular directions (--rank R or --energy E); writes a "
              "smaller PEFT-layout adapter", cmd_prune),
}


class _PrintConfigHelp(argparse.Action):
    """`train --help-config`: print every config key and exit, as --help does (before the config is required)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        from lorakit.train.config_doc import config_help

        print(config_help(), end="")
        parser.exit()


class UsageError(LorakitError):
    """A command line argparse cannot parse; printed as one `error:` line like every other bad input."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error raises (one line, exit 2 from `main`) instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lorakit", description="Low-rank adaptation of pretrained transformers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    parsers = {name: sub.add_parser(name, help=help_text, description=help_text)
               for name, (help_text, _) in COMMANDS.items()}
    for name in ("train", "eval"):
        parsers[name].add_argument("config", help="a YAML file with sections model, data, lora, optim, run")
        parsers[name].add_argument("overrides", nargs="*", help="section.key=value overrides")
    parsers["train"].add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parsers["train"].add_argument("--force", action="store_true",
                                  help="start over in run.out_dir, replacing an earlier run's files there")
    parsers["train"].add_argument("--help-config", action=_PrintConfigHelp, nargs=0,
                                  help="list every config key (type, default, allowed values, meaning) and exit")
    parsers["train"].add_argument("--quiet", action="store_true", help="no progress bar")
    parsers["train"].add_argument("--record", metavar="JSON", help="append the result to this results file "
                                  "(e.g. docs/results.json; the .md beside it is rewritten)")
    parsers["eval"].add_argument("--adapter", help="an adapter directory; omit to score the model itself (it needs "
                                 "the task's head: a causal LM for instruction and translation, else a saved head)")
    parsers["eval"].add_argument("--record", metavar="JSON", help="append the result to this results file")
    parsers["eval"].add_argument("--num-beams", type=int, default=1, help="beam search for generation tasks")
    for name in ("train", "eval"):
        parsers[name].add_argument("--note", help="a remark stored with the recorded result")
    for name in ("merge", "generate", "chat"):
        _add_model_flags(parsers[name])
    parsers["merge"].add_argument("--out", required=True, help="directory for the merged model (new or empty)")
    parsers["merge"].add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                                  help="dtype of the saved weights (ΔW is added in fp32 and rounded once)")
    parsers["merge"].add_argument("--force", action="store_true", help="replace an earlier merged model at --out")
    for name in ("generate", "chat"):
        _add_sampling_flags(parsers[name])
    parsers["generate"].add_argument("--prompt", action="append", help="a prompt (repeatable); else read stdin")
    parsers["generate"].add_argument("--raw", action="store_true", help="do not wrap prompts in the chat template")
    parsers["inspect"].add_argument("adapter", help="an adapter directory")
    parsers["inspect"].add_argument("--json", action="store_true", help="print one JSON object")
    parsers["demo"].add_argument("--out", default="runs/demo", help="where the adapter and merged model go")
    parsers["demo"].add_argument("--quiet", action="store_true", help="no progress bar")
    parsers["demo"].add_argument("--force", action="store_true", help="replace an earlier demo's files at --out")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input prints one `error:` line and returns 2, an unexpected failure one line and 1
    (with the traceback under -v)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    try:
        args = _parse(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(message)s")
        if not args.verbose:
            _quiet_transformers()
        return COMMANDS[args.command][1](args)
    except LorakitError as e:
        _error(str(e))
        return 2
    except OSError as e:  # unreadable input, full disk, permissions: name the file, no traceback
        _error(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: one line, the traceback under -v
        if verbose:
            raise
        _error(f"unexpected {type(e).__name__}: {e} (this is a bug in lorakit; rerun with -v for the traceback)")
        return 1


def _parse(argv: list[str]) -> argparse.Namespace:
    # Unknown `--section.key=value` flags of train/eval/allocate/sweep are overrides, not argparse options.
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        takes_overrides = args.command in ("train", "eval", "allocate", "sweep")
        if not takes_overrides or any(not x.startswith("--") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    if args.command == "merge" and not args.adapter:
        raise UsageError("merge needs --adapter DIR, the adapter to merge (see lorakit merge --help)")
    return args


def _error(message: str) -> None:
    print("error: " + " ".join(message.split()), file=sys.stderr)  # one line, whatever the message holds


if __name__ == "__main__":
    sys.exit(main())
