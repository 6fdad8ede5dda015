"""Command line: `gradnormlorp info | train | bench`."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time
from typing import Sequence

import torch

from . import __version__
from .corpus import DEFAULT_MAX_BYTES, CorpusError


def _version(module_name: str) -> str:
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # bitsandbytes and triton can raise more than ImportError when they fail to load
        return f"not available ({type(exc).__name__})"
    return str(getattr(module, "__version__", "unknown"))


def _device_description() -> str:
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"cuda: {', '.join(names)} (CUDA {torch.version.cuda})"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads (no CUDA GPU)"


def cmd_info(args: argparse.Namespace) -> int:
    from ._backends import backends

    status = backends()
    print(f"gradnormlorp_kernels {__version__}")
    print(f"python       {platform.python_version()} ({sys.executable})")
    for name in ("torch", "triton", "bitsandbytes"):
        print(f"{name:<12} {_version(name)}")
    print(f"device       {_device_description()}")
    print(f"preference   {status['preference']}")
    print("backends:")
    for name, entry in status["backends"].items():
        mark = "yes" if entry["available"] else "no "
        print(f"  {name:<10} {mark}  {entry['reason']}")
    for device, ops in status["ops"].items():
        print(f"ops on {device}:")
        for op, backend in sorted(ops.items()):
            print(f"  {op:<24} {backend}")
    if status.get("load_errors"):
        print("load errors:")
        for key, message in status["load_errors"].items():
            print(f"  {key}: {message}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from .train import METHODS

    size = parser.add_argument_group("sizes (defaults depend on the device: small on CPU, larger on a GPU)")
    size.add_argument("--steps", type=_positive_int, help="optimizer steps per method (CPU 200, GPU 600)")
    size.add_argument("--batch-size", type=_positive_int, help="sequences per step (CPU 16, GPU 32)")
    size.add_argument("--seq-len", type=_positive_int, help="bytes per sequence (CPU 128, GPU 512)")
    size.add_argument("--rank", type=_positive_int, help="projection and adapter rank (CPU 32, GPU 128)")
    size.add_argument("--dim", type=_positive_int, help="model width (CPU 128, GPU 512)")
    size.add_argument("--layers", type=_positive_int, help="transformer blocks (CPU 2, GPU 8)")
    size.add_argument("--heads", type=_positive_int, help="attention heads (CPU 4, GPU 8)")
    size.add_argument("--update-proj-gap", type=_positive_int,
                      help="steps between subspace refreshes (CPU 50, GPU 200)")
    size.add_argument("--eval-every", type=_positive_int, help="steps between validation evaluations (CPU 25, GPU 100)")
    size.add_argument("--eval-batches", type=_positive_int, help="validation batches per evaluation (CPU 4, GPU 16)")
    parser.add_argument(
        "--methods", default="all",
        help=f"comma-separated subset of {', '.join(METHODS)}; 'all' (default) runs every one that can run here",
    )
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model init and the data order (default 0)")
    parser.add_argument("--out", default="runs/train",
                        help="folder for results.csv, losses.csv, loss.png, config.json (default runs/train)")
    parser.add_argument(
        "--corpus",
        help="a text file or a directory of text files to train on (default: this Python's standard library source)",
    )
    parser.add_argument("--max-corpus-bytes", type=_positive_int, default=DEFAULT_MAX_BYTES,
                        help=f"read at most this many bytes of text (default {DEFAULT_MAX_BYTES})")
    parser.add_argument("--threads", type=_positive_int,
                        help="torch CPU threads (default on --device cpu: 1, since threads that wait on each other "
                        "on cores other processes keep busy ran 15x slower; on a GPU: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _select_methods(text: str, device: str, parser: argparse.ArgumentParser) -> tuple[str, ...]:
    from .train import METHODS, method_availability

    if text.strip() == "all":
        chosen = []
        for method in METHODS:
            ok, why = method_availability(method, device)
            if ok:
                chosen.append(method)
            else:
                print(f"skipping {method}: {why}")
        return tuple(chosen)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if not names or unknown:
        parser.error(f"--methods: unknown {unknown or text!r}; allowed: 'all' or a comma-separated subset of {METHODS}")
    for name in names:
        ok, why = method_availability(name, device)
        if not ok:
            parser.error(f"--methods: {name} cannot run here: {why}")
    return tuple(dict.fromkeys(names))


def cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import train

    try:
        device = train.resolve_device(args.device)
    except ValueError as exc:
        parser.error(f"--device: {exc}")
    settings = train.default_settings(device)
    for key in settings:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    dim, heads = settings["dim"], settings["heads"]
    if heads > dim or dim % heads or (dim // heads) % 2:
        parser.error(f"--dim {settings['dim']} must be divisible by --heads {settings['heads']} into an even head size")
    if settings["rank"] > settings["dim"]:
        parser.error(f"--rank {settings['rank']} must be at most --dim {settings['dim']} (the smallest weight side)")
    config = train.TrainConfig(
        **settings, methods=_select_methods(args.methods, device, parser), device=device, seed=args.seed,
        out=args.out, corpus=args.corpus, max_corpus_bytes=args.max_corpus_bytes, progress=not args.no_progress,
    )
    if not config.methods:
        parser.error("--methods: no method can run here")
    threads = args.threads if args.threads is not None else (1 if torch.device(device).type == "cpu" else None)
    if threads is not None:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        results, paths = train.run(config, log=print)
    except CorpusError as exc:
        parser.error(f"--corpus: {exc}")
    print()
    print(train.format_table(results))
    memory_kind = results[0].memory_kind
    print(f"peak memory: {'CUDA max_memory_allocated' if memory_kind.startswith('cuda') else 'process peak RSS'}"
          f" per method; optimizer state: bytes of the tensors in optimizer.state")
    if "gradnormlorp-adapter" in config.methods:
        print(f"gradnormlorp-adapter fine-tunes the AdamW base after {config.steps // 2} steps for the remaining "
              f"{config.steps - config.steps // 2} (see `gradnormlorp train --help`)")
    print(f"wrote {paths['results']}, {paths['curves']}, {paths['plot']} in {time.perf_counter() - start:.0f} s")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        benchmarks = importlib.import_module("gradnormlorp_kernels.benchmarks")
    except ModuleNotFoundError as exc:
        if exc.name not in ("gradnormlorp_kernels.benchmarks",):
            raise
        print("gradnormlorp bench: the benchmarks (gradnormlorp_kernels.benchmarks) are not installed in this "
              "version of the package", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="gradnormlorp bench", description="Benchmarks against the peers.")
    benchmarks.add_arguments(parser)
    return int(benchmarks.main(parser.parse_args(args.bench_args)) or 0)


def build_parser() -> argparse.ArgumentParser:
    from .train import __doc__ as train_doc

    parser = argparse.ArgumentParser(prog="gradnormlorp",
                                     description="GradNormLoRP kernels: info, training job, benchmarks.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{info,train,bench}")
    commands.add_parser("info", help="backends, device and versions")
    train_parser = commands.add_parser(
        "train", help="train a byte-level LLaMA with GradNormLoRP and its peers (the main job)",
        description=train_doc, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_train_arguments(train_parser)
    train_parser.set_defaults(command_parser=train_parser)
    # The benchmarks parse their own options, so importing them waits until `bench` is run.
    commands.add_parser("bench", help="benchmarks against GaLore, bitsandbytes, peft, torch (see `bench --help`)",
                        add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Every argument after `bench` (its --help included) belongs to the benchmarks' own parser.
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "info":
        return cmd_info(args)
    if args.command == "train":
        return cmd_train(args, args.command_parser)
    return cmd_bench(args)


if __name__ == "__main__":
    sys.exit(main())
