"""The command line: a table of subcommands, each parsing its flags and calling one library function.

Known errors (bad input, argparse's included) print one line, `error: ...`, and exit with code 2; an unexpected
exception prints one line and exits with code 1 (its traceback with -v). Heavy imports wait for the command.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from lorakit.allocator import use_allocator
from lorakit.cli_output import json_line, print_table
from lorakit.cli_tools import TOOL_COMMANDS, add_tool_flags
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
    use_allocator(config.run.allocator, args.relaunch)  # may start this command again under jemalloc
    summary = train_from_config(config, resume=args.resume, force=args.force, progress=not args.quiet)
    if not World.from_env().is_main:  # under torchrun, rank 0 reports for the job
        return 0
    print_table(summary.table())
    if args.record:
        command = " ".join(["lorakit", "train", args.config, *args.overrides, *(["--resume"] if args.resume else [])])
        record_result(train_record(summary.as_json(), config.data.train, command, args.note), args.record)
    print(json_line(summary.as_json()))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lorakit.train.config import load_train_config
    from lorakit.train.evaluate import evaluate_from_config
    from lorakit.train.results import check_results_file, record_result

    config = load_train_config(args.config, args.overrides)
    if args.record:
        check_results_file(args.record)
    use_allocator(config.run.allocator, args.relaunch)
    evaluation = evaluate_from_config(config, adapter=args.adapter, num_beams=args.num_beams)
    if args.record:
        command = " ".join(["lorakit", "eval", args.config, *args.overrides,
                            *(["--adapter", args.adapter] if args.adapter else [])])
        record_result(evaluation.record(command, args.note), args.record)
    print(json_line(evaluation.metrics))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from lorakit.export import merge_adapter

    if args.merge_path is not None:
        from lorakit.quant_merge import merge_quantized_adapter

        out, error = merge_quantized_adapter(args.adapter, args.out, args.merge_path, model=args.model,
                                             dtype=args.dtype, force=args.force)
        print(error)
    else:
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
        print(json_line(info))
    else:
        print_table([(k, str(v)) for k, v in info.items()])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lorakit.demo import run_demo

    result = run_demo(out_dir=Path(args.out), force=args.force, progress=not args.quiet, echo=print)
    print(json_line(result))
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from lorakit.classify import classify_images

    for prediction in classify_images(args.images, model=args.model, adapter=args.adapter, top=args.top):
        print(json_line({"image": prediction.path, "top": [[label, round(p, 4)] for label, p in prediction.top]}))
    return 0


def cmd_speech_data(args: argparse.Namespace) -> int:
    from lorakit.speech.clips import generate_speech_commands

    manifests = generate_speech_commands(args.out, train=args.train, eval=args.eval, seed=args.seed,
                                         noise_snr_db=args.noise_snr_db, force=args.force)
    print(json_line({split: str(path) for split, path in manifests.items()}))
    return 0


def _quiet_transformers() -> None:
    """transformers reports every newly initialised head and loading bar on stderr; keep the CLI's output ours."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], int]]] = {
    "train": ("fine-tune an adapter from a YAML config (flags --section.key=value override it)", cmd_train),
    "eval": ("score a base model or an adapter on a config's evaluation data", cmd_eval),
    "merge": ("write a merged model directory that plain transformers loads", cmd_merge),
    "generate": ("complete prompts with a model, with or without an adapter", cmd_generate),
    "chat": ("chat with a model on standard input, with or without an adapter", cmd_chat),
    "inspect": ("describe an adapter directory: base, targets, ranks, sizes", cmd_inspect),
    "demo": ("the main job: LoRA on the bundled SmolLM2, base vs adapted accuracy, merge check", cmd_demo),
    "classify": ("classify image files with a vision base (efficientnet-lite0, dinov2-small) and an optional "
                 "image-classification adapter; one JSON line per image", cmd_classify),
    "speech-data": ("synthesise the spoken-command data set with espeak-ng (held-out voices unseen in training); "
                    "writes wav clips and train/eval manifests", cmd_speech_data),
    **TOOL_COMMANDS,
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
        parsers[name].add_argument("config", help="a YAML file with sections model, data, lora, optim, run "
                                   "(and compress, distill)")
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
    parsers["merge"].add_argument("--merge-path", choices=("dequantized", "requantized", "original"),
                                  help="for an adapter trained on a quantized base (required there): merge into the "
                                  "dequantized base, re-quantize, or use the original full-precision base")
    for name in ("generate", "chat"):
        _add_sampling_flags(parsers[name])
    parsers["generate"].add_argument("--prompt", action="append", help="a prompt (repeatable); else read stdin")
    parsers["generate"].add_argument("--raw", action="store_true", help="do not wrap prompts in the chat template")
    parsers["inspect"].add_argument("adapter", help="an adapter directory")
    parsers["inspect"].add_argument("--json", action="store_true", help="print one JSON object")
    parsers["demo"].add_argument("--out", default="runs/demo", help="where the adapter and merged model go")
    parsers["demo"].add_argument("--quiet", action="store_true", help="no progress bar")
    parsers["demo"].add_argument("--force", action="store_true", help="replace an earlier demo's files at --out")
    parsers["speech-data"].add_argument("--out", required=True, help="directory for the clips and manifests (new "
                                        "or empty)")
    parsers["speech-data"].add_argument("--train", type=int, default=240, help="training clips")
    parsers["speech-data"].add_argument("--eval", type=int, default=80, help="held-out clips (voices not in training)")
    parsers["speech-data"].add_argument("--seed", type=int, default=0, help="fixes every clip's text, voice, speed, "
                                        "pitch and noise")
    parsers["speech-data"].add_argument("--noise-snr-db", type=float, help="add seeded white noise at this "
                                        "signal-to-noise ratio (dB); default: none")
    parsers["speech-data"].add_argument("--force", action="store_true", help="replace an earlier data set at --out")
    parsers["classify"].add_argument("images", nargs="+", help="image files (PNG, JPEG, ...; grayscale is converted "
                                     "to RGB)")
    parsers["classify"].add_argument("--model", help="the vision base (default: the adapter's, else "
                                     "efficientnet-lite0)")
    parsers["classify"].add_argument("--adapter", help="an image-classification adapter directory (its task.json "
                                     "gives the labels and image size)")
    parsers["classify"].add_argument("--top", type=int, default=5, help="labels to print per image")
    add_tool_flags(parsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input prints one `error:` line and returns 2, an unexpected failure one line and 1
    (with the traceback under -v)."""
    from_process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    try:
        args = _parse(argv)
        # The command line that starts this command again (run.allocator: jemalloc); None when main() was called
        # with an argv of its own, as a function inside another program, which must not be replaced.
        args.relaunch = [sys.executable, "-m", "lorakit", *argv] if from_process else None
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
