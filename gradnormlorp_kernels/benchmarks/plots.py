"""PNG plots drawn from the results CSV: one figure per device and benchmark."""

from __future__ import annotations

import re
from pathlib import Path

from . import bandwidth, layer, optimizer, report
from .results import number, read_rows


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _barh(axis, labels: list[str], values: list[float], xlabel: str) -> None:
    positions = range(len(labels))
    axis.barh(list(positions), values, color="tab:blue")
    axis.set_yticks(list(positions), labels)
    axis.invert_yaxis()
    axis.set_xlabel(xlabel)
    for position, value in zip(positions, values):
        axis.annotate(report._fmt(value), (value, position), xytext=(3, 0), textcoords="offset points", va="center",
                      fontsize=8)


def _layer_figure(plt, rows: list[dict], title: str):
    timed = [row for row in rows if number(row, "median_ms") is not None]
    memory = [row for row in timed if number(row, "peak_extra_bytes") is not None]
    panels = 2 if memory else 1
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 0.5 * len(timed) + 1.8), squeeze=False)
    _barh(axes[0][0], [r["method"] for r in timed], [number(r, "median_ms") for r in timed],
          "forward + backward, median ms")
    if memory:
        _barh(axes[0][1], [r["method"] for r in memory],
              [number(r, "peak_extra_bytes") / report.MIB for r in memory], "peak extra memory, MiB")
    figure.suptitle(title, fontsize=10)
    return figure


def _optimizer_figure(plt, rows: list[dict], title: str):
    timed = [row for row in rows if number(row, "median_ms") is not None]
    series = (("median_ms", "median step"), ("amortized_ms", "amortised step"), ("slowest_ms", "slowest step"))
    figure, axis = plt.subplots(figsize=(9, 0.6 * len(timed) + 1.8))
    height = 0.8 / len(series)
    for index, (column, label) in enumerate(series):
        axis.barh([i + index * height for i in range(len(timed))], [number(r, column) for r in timed],
                  height=height, label=label)
    axis.set_yticks([i + height for i in range(len(timed))], [r["method"] for r in timed])
    axis.invert_yaxis()
    axis.set_xscale("log")
    axis.set_xlabel("ms (log scale)")
    axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    return figure


def _bandwidth_figure(plt, rows: list[dict], title: str):
    timed = [row for row in rows if number(row, "pct_of_copy") is not None and row["method"] != bandwidth.COPY]
    copy_rows = [row for row in rows if row["method"] == bandwidth.COPY]
    figure, axis = plt.subplots(figsize=(9, 0.4 * len(timed) + 1.8))
    _barh(axis, [f"{r['method']} {r['config']}" for r in timed], [number(r, "pct_of_copy") for r in timed],
          "% of measured copy bandwidth")
    axis.axvline(report.BANDWIDTH_MIN_PCT, color="tab:red", linestyle="--", label="target")
    axis.legend(fontsize=8)
    copy_gbps = number(copy_rows[0], "gbps") if copy_rows else None
    figure.suptitle(title + (f" (copy: {report._fmt(copy_gbps)} GB/s)" if copy_gbps else ""), fontsize=10)
    return figure


FIGURES = {
    layer.BENCHMARK: _layer_figure,
    optimizer.BENCHMARK: _optimizer_figure,
    bandwidth.BENCHMARK: _bandwidth_figure,
}


def make_plots(csv_path: str | Path, out_dir: str | Path) -> list[Path]:
    """One PNG per (device, benchmark, config) in the CSV (bandwidth: per device), named
    `<benchmark>-<device>.png`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = read_rows(csv_path)
    written = []
    for device in dict.fromkeys(row["device"] for row in rows):
        for benchmark, draw in FIGURES.items():
            bench_rows = [r for r in rows if r["device"] == device and r["benchmark"] == benchmark]
            groups: dict[str, list[dict]] = {}
            for row in bench_rows:
                groups.setdefault("" if benchmark == bandwidth.BENCHMARK else row["config"], []).append(row)
            for config, config_rows in groups.items():
                if not any(number(r, "median_ms") is not None for r in config_rows):
                    continue
                title = f"{benchmark} — {device}" + (f"\n{config}" if config else "")
                figure = draw(plt, config_rows, title)
                figure.tight_layout()
                # The config joins the name only where a device has several configs of one benchmark.
                parts = (benchmark, _slug(device), _slug(config) if len(groups) > 1 else "")
                name = "-".join(part for part in parts if part)
                path = out_dir / f"{name}.png"
                figure.savefig(path, dpi=110)
                plt.close(figure)
                written.append(path)
    return written
