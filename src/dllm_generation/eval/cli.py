"""Command lines of `dllm-eval` and `eval_scripts/*.py`: one shared argument set, checked before anything loads.

Every failure a user can fix (bad options, unreadable data, a model that cannot load, Ctrl-C)
ends with one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from fractions import Fraction

from .artifacts import RunFolderDamagedError
from .data import DataUnavailableError, one_line
from .folder_lock import RunFolderBusyError
from .model_calls import ModelUnavailableError
from .options import (
    DEFAULT_MODEL,
    DTYPES,
    FAST_PATHS,
    LOGLIKELIHOOD_FORWARDS,
    MMLU_MODES,
    PROTOCOLS,
    REUSE_MODES,
    REUSE_POLICIES,
    SUBSETS,
    TASKS,
    EvalOptions,
    InvalidOptionError,
)

DEFAULTS = EvalOptions(task="gsm8k")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_size(text: str) -> int | float:
    """A reuse size: "12" is a count of layers; "0.5" or "3/7" a share of them."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a layer count (12) or a share of the layers (0.5, 3/7), got {text!r}") from None


def _size_list(text: str) -> list[int | float]:
    return [parse_size(x) for x in text.split(",") if x.strip()]


DEFAULT_SIZE_TEXT = str(Fraction(DEFAULTS.size).limit_denominator(100))  # "3/7": 12 of 28 layers
SIZE_HELP = ("layers in the subset: a count (12) or a share of the model's layers (0.5, 3/7; rounded half up, "
             "at least 1); the default share is 12 of 28 layers, 6 of 14")


def add_shared_arguments(parser: argparse.ArgumentParser, *, grid: bool = False, mmlu: bool = False) -> None:
    """The arguments every task script and the grid share. In a grid, reuse knobs take lists."""
    parser.add_argument("--protocol", default=DEFAULTS.protocol, choices=PROTOCOLS,
                        help="fork = the layer-reuse experiment, paper = the Fast-dLLM v2 authors' settings, custom = "
                        "fork's values, every flag free; decides prompts, shots, decoding, batch size and budget "
                        "(docs/evaluation.md); a contradicting flag is an error")
    m = parser.add_argument_group("model")
    m.add_argument("--model", default=None, help=f"hub id, local checkpoint folder, or a shipped model name (demo); "
                   f"None = demo for arith, else {DEFAULT_MODEL}")
    m.add_argument("--tokenizer", default=None, help="tokenizer folder/id when the checkpoint has none; None = the checkpoint's")
    m.add_argument("--dtype", default=None, choices=DTYPES,
                   help="weights dtype; None = the protocol's (reference: bf16 on compute capability >= 8, fp16 on 7.x, "
                   "fp32 off CUDA); auto = the checkpoint's on a GPU, float32 on a CPU")
    m.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...; None = cuda if available (one GPU per process under accelerate)")
    m.add_argument("--mask-token-id", type=int, default=None, help="override the |<MASK>| id")

    r = parser.add_argument_group("layer reuse" + (" (comma-separated lists: one run per combination)" if grid else ""))
    if grid:
        r.add_argument("--k", type=_int_list, default="1,2,3", help="reuse periods")
        r.add_argument("--subset", type=_str_list, default=",".join(SUBSETS), help=f"from {', '.join(SUBSETS)}")
        r.add_argument("--size", type=_size_list, default=DEFAULT_SIZE_TEXT, help=SIZE_HELP + "; comma-separated")
        r.add_argument("--mode", type=_str_list, default=DEFAULTS.mode, help=f"from {', '.join(REUSE_MODES)}")
    else:
        r.add_argument("--k", type=int, default=DEFAULTS.k, help="recompute reused layers every k denoising steps; 1 = no reuse")
        r.add_argument("--subset", default=DEFAULTS.subset, choices=SUBSETS, help="which layers are reused")
        r.add_argument("--size", type=parse_size, default=DEFAULT_SIZE_TEXT, help=SIZE_HELP)
        r.add_argument("--mode", default=DEFAULTS.mode, choices=REUSE_MODES, help="reuse a layer's output or its residual update")
    r.add_argument("--layers", type=_int_list, default=None, help="explicit layer indices (instead of subset/size)")
    if grid:
        r.add_argument("--tolerance", type=_float_list, default=None,
                       help="also run the unmask_drift policy at each of these tolerances (k=1; shares of the "
                       "sub-block unmasked since the stored entry that still allow a recall)")
        r.add_argument("--layer-k", type=_int_list, action="append", default=None,
                       help="also run the per_layer policy with these periods, one per target layer (e.g. 2,2,3,3; "
                       "repeat the option for more schedules)")
    else:
        r.add_argument("--policy", default=DEFAULTS.policy, choices=REUSE_POLICIES,
                       help="fixed: recompute every k steps; unmask_drift: recompute once more than --tolerance of "
                       "the sub-block was unmasked since the stored entry (or it is --max-staleness steps old); "
                       "per_layer: recompute target layer j every --layer-k[j] steps")
        r.add_argument("--tolerance", type=float, default=None, help="unmask_drift: a share in [0, 1]")
        r.add_argument("--layer-k", type=_int_list, default=None,
                       help="per_layer: one period per target layer, e.g. 2,2,3,3")
    r.add_argument("--max-staleness", type=int, default=None,
                   help="unmask_drift: recompute once the stored entry is this many steps old (None = no limit)")

    d = parser.add_argument_group("decoding (None = the protocol's value)")
    d.add_argument("--block-size", type=int, default=None, help="tokens decoded per block")
    d.add_argument("--small-block-size", type=int, default=None, help="sub-block size; divides --block-size")
    d.add_argument("--threshold", type=float, default=None, help="confidence to unmask in parallel")
    d.add_argument("--block-cache", dest="use_block_cache", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse the current block's K/V between sub-blocks")
    d.add_argument("--fast-path", default=DEFAULTS.fast_path, choices=FAST_PATHS,
                   help="engine: on (the graphed engine with CUDA graphs where it applies, else the eager engine), off (the eager engine), graphs, compile (graphed, CUDA only; compile is faster and rounds bf16 differently)")
    d.add_argument("--max-new-tokens", type=int, default=None, help="generation budget per prompt; None = the protocol's (320 for arith, else 2048)")
    d.add_argument("--batch-size", type=int, default=None, help="prompts per model call (pairs per forward for loglikelihood); None = the protocol's "
                   "(fork 1; paper 32 for generative tasks, else 1; arith 8, free under every protocol)")
    d.add_argument("--loglikelihood-forward", default=None, choices=LOGLIKELIHOOD_FORWARDS,
                   help="MMLU/GPQA masked forward: reference (first continuation token masked, rest, EOS and mask "
                   "padding visible) or masked_continuation (all masked, padding hidden)")

    p = parser.add_argument_group("prompts and data")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None, help="format prompts with the tokenizer's chat template")
    p.add_argument("--num-fewshot", type=int, default=None, help="worked examples per prompt (None = the protocol's)")
    if grid or mmlu:
        p.add_argument("--mmlu-mode", default=None, choices=MMLU_MODES,
                       help="MMLU: loglikelihood (one masked forward, as upstream) or generative (layer reuse applies)")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows (quick runs)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seeds torch/random and the GPQA option shuffle")
    p.add_argument("--data-files", nargs="+", default=None,
                   help="local JSON Lines/JSON/CSV files or folders instead of the Hub (offline use)")
    p.add_argument("--fewshot-files", nargs="+", default=None, help="local few-shot rows (GSM8K train, MMLU dev)")
    p.add_argument("--dataset", default=None, help="Hub dataset id to use instead of the task default")
    p.add_argument("--dataset-config", default=None, help="Hub dataset config (e.g. gpqa_diamond)")
    p.add_argument("--split", default=None, help="Hub split to evaluate")

    o = parser.add_argument_group("output")
    o.add_argument("--output-dir", default=DEFAULTS.output_dir, help="artifacts root")
    o.add_argument("--run-name", default=None, help="folder name instead of the one derived from the config")
    o.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="run one uncounted warm-up batch per process (generation: the longest prompts at the batch size and token budget)")
    o.add_argument("--force", action="store_true", help="recompute even if results exist")
    o.add_argument("--log-level", default="INFO", help="logging level")


def build_parser(task: str, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=f"Evaluate a Fast-dLLM v2 model on {task} with block-diffusion decoding and layer reuse; "
        "writes <output-dir>/" + task + "/<config>/{summary.json,samples.jsonl}. Resumes interrupted runs.",
    )
    add_shared_arguments(parser, mmlu=task == "mmlu")
    return parser


def options_from_args(task: str, args: argparse.Namespace, **overrides) -> EvalOptions:
    fields = {name: getattr(args, name) for name in EvalOptions.__dataclass_fields__ if hasattr(args, name)}
    fields.pop("task", None)
    fields.update(overrides)
    return EvalOptions(task=task, **fields)


# Errors a user can act on: reported as one line, not a traceback.
USER_ERRORS = (DataUnavailableError, ModelUnavailableError, InvalidOptionError, RunFolderBusyError,
               RunFolderDamagedError)
INTERRUPTED = "interrupted; rerun the same command to resume"
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


def main(task: str, argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """One task: parse, validate, run, print a one-line result."""
    parser = build_parser(task, prog)
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    try:
        options = options_from_args(task, args).validate()
    except InvalidOptionError as err:
        _refuse(parser, err)
    from .distributed import shutdown
    from .runner import run_eval

    try:
        summary = run_eval(options)
    except USER_ERRORS as err:
        return _error(err)
    except KeyboardInterrupt:
        return _interrupted()
    finally:
        shutdown()
    if _is_main():
        print(result_line(summary, options.run_dir()))
    return 0


def grid_main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Run every k × subset (× size × mode) configuration of one task; configurations whose "
        "summary.json covers the requested rows are skipped (unless --force), interrupted ones resume, and a "
        "larger --limit extends finished ones.",
    )
    parser.add_argument("--task", required=True, choices=TASKS)
    add_shared_arguments(parser, grid=True)
    parser.add_argument("--max-runs", type=int, default=None, help="stop after running this many configurations")
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    for name, allowed in (("k", "integers >= 1"), ("subset", ", ".join(SUBSETS)), ("size", "layer counts or shares"),
                          ("mode", ", ".join(REUSE_MODES))):
        if not getattr(args, name):  # "--k ''" would run no configuration and report success
            _refuse(parser, InvalidOptionError(f"--{name} is empty (allowed: a comma-separated list of {allowed})"))
    from .grid import grid_options, run_grid

    try:
        base = options_from_args(args.task, args, k=1, subset=DEFAULTS.subset, size=DEFAULTS.size, mode=DEFAULTS.mode,
                                 tolerance=None, layer_k=None)
        cells = grid_options(base, args.k, args.subset, args.size, args.mode, tolerances=args.tolerance,
                             layer_ks=args.layer_k)
    except InvalidOptionError as err:
        _refuse(parser, err)
    from .distributed import shutdown

    try:
        outcome = run_grid(cells, max_runs=args.max_runs, say=print if _is_main() else (lambda *a, **k: None))
    except USER_ERRORS as err:
        return _error(err)
    except KeyboardInterrupt:
        return _interrupted()
    finally:
        shutdown()
    if _is_main():
        from .report import grid_table

        print(grid_table(cells))
    return 1 if outcome.failed else 0


def report_main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Build results.md and plots from artifacts/*/*/summary.json",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("root", nargs="?", default="artifacts", help="artifacts folder")
    parser.add_argument("--output", default=None, help="markdown path (default: <root>/results.md)")
    parser.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                        help="write accuracy-vs-throughput PNG plots beside the markdown")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.root):
        parser.error(f"root={args.root!r} is not a folder (expected the --output-dir of earlier runs)")
    from .report import build_report

    try:
        path = build_report(args.root, output=args.output, plots=args.plots)
    except KeyboardInterrupt:
        return _interrupted()
    print(f"wrote {path}")
    return 0


COMMANDS = {**{task: f"evaluate one task ({task})" for task in TASKS},
            "grid": "run every k × subset (× size × mode) configuration of a task",
            "report": "results.md and plots from finished runs"}


def console_main(argv: list[str] | None = None) -> int:
    """`dllm-eval <command> ...`: the console entry point over the task, grid and report commands."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="dllm-eval",
        description="Evaluate block-diffusion decoding with layer reuse. Commands: "
        + "; ".join(f"{name}: {what}" for name, what in COMMANDS.items())
        + ". `dllm-eval <command> --help` lists a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("command", choices=list(COMMANDS), help="what to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's own options")
    ns = parser.parse_args(argv)
    prog = f"dllm-eval {ns.command}"
    if ns.command == "grid":
        return grid_main(ns.args, prog=prog)
    if ns.command == "report":
        return report_main(ns.args, prog=prog)
    return main(ns.command, ns.args, prog=prog)


def _refuse(parser: argparse.ArgumentParser, err: Exception) -> None:
    """A bad option: one line naming it (argparse's exit code 2), without the long usage text."""
    parser.exit(2, f"{parser.prog}: error: {one_line(err)}\n")


def _error(err: Exception) -> int:
    print(f"error: {one_line(err)}", file=sys.stderr)
    return 1


def _interrupted() -> int:
    print(INTERRUPTED, file=sys.stderr)
    return EXIT_INTERRUPTED


def result_line(summary: dict, run_dir: str) -> str:
    tp = summary["throughput"]
    tps = tp.get("tokens_per_second")
    return (
        f"{summary['task']}/{summary['config']}: {summary['primary_metric']}={summary['accuracy']} "
        f"(n={summary['counts']['samples']}), {tps if tps is None else round(tps, 2)} tok/s, "
        f"{tp.get('tokens_per_forward')} tok/forward -> {os.path.join(run_dir, 'summary.json')}"
    )


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _setup_logging(level: str) -> None:
    if not _is_main():
        level = "WARNING"
    logging.basicConfig(level=getattr(logging, str(level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
