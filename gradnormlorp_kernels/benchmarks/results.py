"""Benchmark rows and the CSV that accumulates them.

A row is keyed by (device, benchmark, config, method): re-running a benchmark on the same device
replaces its rows and leaves every other row (other devices, other benchmarks) as it was.
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Iterable, Optional

KEY = ("device", "benchmark", "config", "method")
COLUMNS = KEY + (
    "backend",  # which implementation of our ops ran (peers: empty)
    "median_ms",
    "q20_ms",
    "q80_ms",
    "slowest_ms",  # optimizer: the slowest step of a refresh window
    "amortized_ms",  # optimizer: mean step over one refresh window
    "first_step_ms",  # optimizer: the step that creates the states
    "warmup_ms",  # optimizer: the slowest of the steps between the first and the window (graph captures)
    "peak_extra_bytes",  # layer: peak allocation during forward+backward above what was there before
    "state_bytes",  # optimizer: bytes of the tensors its state holds
    "bytes_moved",  # bandwidth: the op's floor of HBM traffic (inputs read once, outputs written once)
    "gbps",
    "pct_of_copy",
    "note",
    "timestamp",
    "command",
    "versions",
)
NUMERIC = (
    "median_ms", "q20_ms", "q80_ms", "slowest_ms", "amortized_ms", "first_step_ms", "warmup_ms",
    "peak_extra_bytes", "state_bytes", "bytes_moved", "gbps", "pct_of_copy",
)


def run_command() -> str:
    """The command line that produced the rows, as typed (interpreter and script by file name)."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if argv:
        argv[0] = os.path.basename(argv[0])
    return shlex.join(argv)


def versions() -> str:
    import torch

    parts = [f"torch {torch.__version__}"]
    if torch.version.cuda:
        parts.append(f"CUDA {torch.version.cuda}")
    for distribution in ("triton", "bitsandbytes", "peft", "galore-torch"):
        try:
            parts.append(f"{distribution} {importlib.metadata.version(distribution)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(parts)


def _cell(value) -> object:
    """Floats to 6 significant digits: the CSV is read by people too."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def make_row(device: str, benchmark: str, config: str, method: str, **values) -> dict:
    unknown = set(values) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown result columns: {sorted(unknown)}")
    row = {column: "" for column in COLUMNS}
    row.update(device=device, benchmark=benchmark, config=config, method=method)
    for column, value in values.items():
        row[column] = _cell(value)
    row["timestamp"] = row["timestamp"] or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return row


def read_rows(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return [{column: row.get(column, "") or "" for column in COLUMNS} for row in csv.DictReader(handle)]


def upsert_rows(path: str | os.PathLike, rows: Iterable[dict]) -> list[dict]:
    """Write `rows` into the CSV at `path`, replacing rows with the same key; returns the whole table."""
    path = Path(path)
    table = {tuple(row[k] for k in KEY): row for row in read_rows(path)}
    for row in rows:
        table[tuple(str(row[k]) for k in KEY)] = {column: row.get(column, "") for column in COLUMNS}
    merged = list(table.values())
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(merged)
    temporary.replace(path)  # a run killed mid-write leaves the previous table intact
    return merged


def number(row: dict, column: str) -> Optional[float]:
    """A numeric cell as a float; None when empty or not finite."""
    value = row.get(column, "")
    if value in ("", None):
        return None
    try:
        result = float(value)
    except ValueError:
        return None
    return result if math.isfinite(result) else None
