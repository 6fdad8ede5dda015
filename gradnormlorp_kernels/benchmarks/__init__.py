"""Benchmarks against the peers (DESIGN.md section 8), run side by side in one process.

`gradnormlorp bench` calls `add_arguments` and `main`; `python -m gradnormlorp_kernels.benchmarks`
does the same without the CLI. Results are upserted into a CSV keyed by (device, benchmark, config,
method), from which RESULTS.md and the PNG plots are generated.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

from . import _timing, bandwidth, layer, optimizer, plots, report
from .results import make_row, read_rows, run_command, upsert_rows, versions

BENCHMARKS = {
    layer.BENCHMARK: layer.run,
    bandwidth.BENCHMARK: bandwidth.run,
    optimizer.BENCHMARK: optimizer.run,
}
SIZE_CHOICES = ("auto", "full", "cpu", "tiny")
DEFAULT_OUT = "gradnormlorp-bench"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only", action="append", choices=tuple(BENCHMARKS), default=None,
        help="run only this benchmark (repeatable); default: all of them",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help="directory for RESULTS.md and the plots (and the CSV)")
    parser.add_argument("--csv", default=None, help="results CSV to upsert into (default: OUT/results.csv)")
    parser.add_argument(
        "--sizes", choices=SIZE_CHOICES, default="auto",
        help="problem sizes: full (the GPU targets' sizes), cpu (small, under a minute on 2 cores), tiny "
        "(tests); auto: full on a CUDA GPU, cpu otherwise",
    )
    parser.add_argument(
        "--optimizer-budget", type=float, default=None, metavar="SECONDS",
        help="time budget of the optimizer benchmark; methods predicted to overrun it are skipped and marked "
        f"(default: {optimizer.BUDGET_S['full']:g}s at full size)",
    )
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: regenerate RESULTS.md and the plots from the CSV")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def _print_row(row: dict) -> None:
    if row["benchmark"] == bandwidth.BENCHMARK and row["gbps"] != "":
        detail = (
            f"{float(row['median_ms']) * 1e3:10.1f} us {float(row['gbps']):8.1f} GB/s "
            f"{float(row['pct_of_copy']):5.0f}%"
        )
    elif row["median_ms"] != "":
        detail = f"{float(row['median_ms']):10.3f} ms median"
        if row["amortized_ms"] != "":
            detail += f" {float(row['amortized_ms']):10.3f} ms amortised {float(row['slowest_ms']):10.3f} ms slowest"
        if row["state_bytes"] != "":
            detail += f" {int(row['state_bytes']) / report.MIB:9.1f} MiB state"
        if row["peak_extra_bytes"] != "":
            detail += f" {int(row['peak_extra_bytes']) / report.MIB:9.1f} MiB peak extra"
    else:
        detail = row["note"]
    label = f"{row['method']}  {row['config']}" if row["benchmark"] == bandwidth.BENCHMARK else row["method"]
    print(f"  {label:<60} {detail}", flush=True)


def _regenerate(csv_path: Path, out_dir: Path, with_plots: bool) -> None:
    regenerate = shlex.join([
        "python", "-m", "gradnormlorp_kernels.benchmarks", "--report-only",
        "--csv", str(csv_path), "--out", str(out_dir),
    ])
    written = report.write_report(csv_path, out_dir / "RESULTS.md", regenerate)
    print(f"wrote {written}", flush=True)
    if not with_plots:
        return
    try:
        written_plots = plots.make_plots(csv_path, out_dir)
    except ImportError as exc:  # plots are optional: bench/plot.py draws them later from the same CSV
        print(f"no plots ({exc}); draw them later with bench/plot.py --csv {csv_path}", flush=True)
        return
    for path in written_plots:
        print(f"wrote {path}", flush=True)


def main(args: argparse.Namespace) -> int:
    """Run the chosen benchmarks, upsert their rows into the CSV, then write RESULTS.md and the plots.

    Returns 0 when every benchmark ran (methods that failed or were skipped are recorded in their rows),
    1 when a benchmark could not run at all.
    """
    out_dir = Path(args.out)
    csv_path = Path(args.csv) if args.csv else out_dir / "results.csv"
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        if not read_rows(csv_path):
            print(f"no results in {csv_path}")
            return 1
        _regenerate(csv_path, out_dir, not args.no_plots)
        return 0

    device = _timing.bench_device()
    sizes = args.sizes if args.sizes != "auto" else ("full" if device.type == "cuda" else "cpu")
    command, stack = run_command(), versions()
    status = 0
    print(f"device: {_timing.device_name(device)}; sizes: {sizes}; {stack}", flush=True)

    def record(row: dict) -> None:
        row.update(command=command, versions=stack)
        upsert_rows(csv_path, [row])
        _print_row(row)

    for benchmark in args.only or tuple(BENCHMARKS):
        print(f"\n{benchmark}", flush=True)
        started = time.perf_counter()
        try:
            if benchmark == optimizer.BENCHMARK:
                optimizer.run(sizes, device, record, budget_s=args.optimizer_budget)
            else:
                BENCHMARKS[benchmark](sizes, device, record)
        except Exception as exc:  # report it and go on with the next benchmark
            print(f"  {benchmark} failed: {type(exc).__name__}: {exc}", flush=True)
            status = 1
        print(f"  ({time.perf_counter() - started:.1f}s)", flush=True)
        _regenerate(csv_path, out_dir, not args.no_plots)
    print("\n" + "\n".join(report.target_summary(read_rows(csv_path), _timing.device_name(device))), flush=True)
    print(f"\nresults: {csv_path}; report: {out_dir / 'RESULTS.md'}", flush=True)
    return status


__all__ = ["add_arguments", "main", "make_row", "read_rows", "upsert_rows"]
