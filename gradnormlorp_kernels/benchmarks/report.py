"""RESULTS.md from the results CSV: per device, absolute times, ratios against the peers, and the targets."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Optional

from . import bandwidth, layer, optimizer
from .results import number, read_rows

BENCHMARK_ORDER = (layer.BENCHMARK, optimizer.BENCHMARK, bandwidth.BENCHMARK)
MIB = float(1 << 20)

LAYER_MAX_VS_FROZEN = 1.15
LAYER_MIN_DORA_SPEEDUP = 2.5
LAYER_MAX_MEMORY_VS_LORA = 1.1
OPT_MIN_SPEEDUP_VS_GALORE8 = 30.0
OPT_MAX_VS_FUSED_ADAMW = 1.0
OPT_MAX_SLOWEST_VS_MEDIAN = 3.0
OPT_MAX_STATE_VS_GALORE8 = 0.6
BANDWIDTH_MIN_PCT = 80.0


def _fmt(value: Optional[float], digits: int = 3) -> str:
    if value is None:
        return "–"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 1:
        return f"{value:.{max(digits - 1, 1)}f}"
    return f"{value:.{digits}g}"


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or denominator in (None, 0):
        return None
    return numerator / denominator


def _x(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}x"


def _mib(row: dict, column: str) -> str:
    value = number(row, column)
    return "–" if value is None else _fmt(value / MIB)


def _verdict(value: Optional[float], passes: Callable[[float], bool]) -> str:
    if value is None:
        return "not measured"
    return "**met**" if passes(value) else "**missed**"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    return lines


def _by_method(rows: list[dict]) -> dict[str, dict]:
    return {row["method"]: row for row in rows}


def _median_cell(row: dict) -> str:
    median = number(row, "median_ms")
    if median is None:
        return "–"
    low, high = number(row, "q20_ms"), number(row, "q80_ms")
    spread = f" ({_fmt(low)}–{_fmt(high)})" if low is not None and high is not None else ""
    return _fmt(median) + spread


def _layer_section(rows: list[dict]) -> list[str]:
    methods = _by_method(rows)
    frozen = number(methods.get(layer.FROZEN, {}), "median_ms")
    dora = number(methods.get(layer.PEFT_DORA, {}), "median_ms")
    lora_memory = number(methods.get(layer.PEFT_LORA, {}), "peak_extra_bytes")
    body = []
    for row in rows:
        median = number(row, "median_ms")
        body.append([
            row["method"], row["backend"] or "–", _median_cell(row), _x(_ratio(median, frozen)),
            _x(_ratio(dora, median)), _mib(row, "peak_extra_bytes"),
            _x(_ratio(number(row, "peak_extra_bytes"), lora_memory)), row["note"],
        ])
    lines = _table(
        ["method", "our backend", "median ms (q20–q80)", "time vs frozen Linear", "DoRA time / this",
         "peak extra MiB", "memory vs peft LoRA", "note"],
        body,
    )
    ours = methods.get(layer.OURS_ADAPTER, {})
    ours_time = number(ours, "median_ms")
    vs_frozen = _ratio(ours_time, frozen)
    speedup = _ratio(dora, ours_time)
    memory = _ratio(number(ours, "peak_extra_bytes"), lora_memory)
    lines += [
        "",
        f"Targets for {layer.OURS_ADAPTER}:",
        f"- at most {LAYER_MAX_VS_FROZEN}x the frozen nn.Linear: {_x(vs_frozen)} — "
        + _verdict(vs_frozen, lambda v: v <= LAYER_MAX_VS_FROZEN),
        f"- at least {LAYER_MIN_DORA_SPEEDUP}x faster than peft DoRA: {_x(speedup)} — "
        + _verdict(speedup, lambda v: v >= LAYER_MIN_DORA_SPEEDUP),
        f"- peak extra memory at most {LAYER_MAX_MEMORY_VS_LORA}x peft LoRA's: {_x(memory)} — "
        + _verdict(memory, lambda v: v <= LAYER_MAX_MEMORY_VS_LORA)
        + ("" if memory is not None else " (peak memory is measured on CUDA only)"),
    ]
    compiled = number(methods.get(layer.OURS_ADAPTER + layer.COMPILED, {}), "median_ms")
    if compiled is not None:
        dora_compiled = number(methods.get(layer.PEFT_DORA + layer.COMPILED, {}), "median_ms")
        lines.append(
            f"- compiled with CUDA graphs ({layer.OURS_ADAPTER + layer.COMPILED}): {_x(_ratio(compiled, frozen))} "
            f"the frozen nn.Linear (eager), {_x(_ratio(dora, compiled))} faster than peft DoRA (eager), "
            f"{_x(_ratio(dora_compiled, compiled))} faster than peft DoRA compiled the same way"
        )
    return lines


def _rank(method: str) -> Optional[int]:
    found = re.search(r"\br=(\d+)", method)
    return int(found.group(1)) if found else None


def _optimizer_section(rows: list[dict]) -> list[str]:
    methods = _by_method(rows)
    fused = number(methods.get(optimizer.TORCH_ADAMW, {}), "amortized_ms")
    body = []
    for row in rows:
        rank = _rank(row["method"])
        galore8 = methods.get(optimizer.galore8_name(rank), {}) if rank else {}
        amortized = number(row, "amortized_ms")
        body.append([
            row["method"], row["backend"] or "–", _median_cell(row), _fmt(number(row, "slowest_ms")),
            _x(_ratio(number(row, "slowest_ms"), number(row, "median_ms"))), _fmt(amortized),
            _fmt(number(row, "first_step_ms")), _fmt(number(row, "warmup_ms")), _mib(row, "state_bytes"),
            _x(_ratio(number(galore8, "amortized_ms"), amortized)) if rank else "–",
            _x(_ratio(amortized, fused)),
            _x(_ratio(number(row, "state_bytes"), number(galore8, "state_bytes"))) if rank else "–",
            row["note"],
        ])
    lines = _table(
        ["method", "our backend", "median step ms (q20–q80)", "slowest ms", "slowest / median", "amortised ms",
         "first step ms", "warm-up ms (slowest)", "state MiB", "GaLoreAdamW8bit amortised / this (same r)", "amortised vs AdamW fused",
         "state vs GaLoreAdamW8bit (same r)", "note"],
        body,
    )
    lines += ["", "The amortised step is the mean over one whole refresh window (every projected matrix refreshed "
              "once); the slowest step is that window's maximum (GaLore: its SVD refresh). The window starts after "
              f"{optimizer.WARMUP_STEPS} warm-up steps that follow the first step (ours captures its CUDA graphs "
              "there, one for each of the two gradient buffers the allocator alternates between); the slowest of "
              "them is shown apart."]
    for row in rows:
        if not row["method"].startswith("GradNormLoRPAdamW"):
            continue
        rank = _rank(row["method"])
        galore8 = methods.get(optimizer.galore8_name(rank), {})
        amortized = number(row, "amortized_ms")
        speedup = _ratio(number(galore8, "amortized_ms"), amortized)
        vs_fused = _ratio(amortized, fused)
        slowest = _ratio(number(row, "slowest_ms"), number(row, "median_ms"))
        state = _ratio(number(row, "state_bytes"), number(galore8, "state_bytes"))
        lines += [
            "",
            f"Targets for {row['method']}:",
            f"- amortised at least {OPT_MIN_SPEEDUP_VS_GALORE8:g}x faster than GaLoreAdamW8bit r={rank}: "
            f"{_x(speedup)} — " + _verdict(speedup, lambda v: v >= OPT_MIN_SPEEDUP_VS_GALORE8),
            f"- amortised no slower than torch AdamW fused: {_x(vs_fused)} — "
            + _verdict(vs_fused, lambda v: v <= OPT_MAX_VS_FUSED_ADAMW),
            f"- slowest step at most {OPT_MAX_SLOWEST_VS_MEDIAN:g}x the median: {_x(slowest)} — "
            + _verdict(slowest, lambda v: v <= OPT_MAX_SLOWEST_VS_MEDIAN),
            f"- state bytes at most {OPT_MAX_STATE_VS_GALORE8}x GaLoreAdamW8bit's: {_x(state)} — "
            + _verdict(state, lambda v: v <= OPT_MAX_STATE_VS_GALORE8),
        ]
    return lines


def _bandwidth_section(rows: list[dict]) -> list[str]:
    copy_rows = [row for row in rows if row["method"] == bandwidth.COPY]
    lines = []
    for row in copy_rows:
        lines.append(f"Measured copy bandwidth ({row['config']}): {_fmt(number(row, 'gbps'))} GB/s.")
    lines.append("")
    body = []
    best: dict[tuple[str, str], tuple[float, str]] = {}
    for row in rows:
        if row["method"] == bandwidth.COPY:
            continue
        moved = number(row, "bytes_moved")
        median = number(row, "median_ms")
        pct = number(row, "pct_of_copy")
        op_name = row["method"].rsplit(" [", 1)[0]
        body.append([
            op_name, row["config"], row["backend"], "–" if median is None else _fmt(median * 1e3),
            "–" if moved is None else f"{moved / 1e6:,.1f}", _fmt(number(row, "gbps")),
            "–" if pct is None else f"{pct:.0f}%", row["note"],
        ])
        key = (op_name, row["config"])
        if pct is not None and (key not in best or pct > best[key][0]):
            best[key] = (pct, row["backend"])
    lines += _table(
        ["op", "size", "backend", "median µs", "MB moved (floor)", "GB/s", "% of copy", "note"], body
    )
    if best:
        lines += ["", f"Target: each memory-bound op at {BANDWIDTH_MIN_PCT:.0f}% or more of the copy bandwidth "
                  "(best backend):"]
        for (op_name, config), (pct, backend) in best.items():
            lines.append(f"- {op_name} ({config}): {pct:.0f}% with {backend} — "
                         + _verdict(pct, lambda v: v >= BANDWIDTH_MIN_PCT))
    return lines


SECTIONS = {
    layer.BENCHMARK: ("Layer forward + backward", _layer_section),
    optimizer.BENCHMARK: ("Optimizer step", _optimizer_section),
    bandwidth.BENCHMARK: ("Memory-bound ops: achieved bandwidth", _bandwidth_section),
}


NOTES_FILE = "NOTES.md"


def render(rows: list[dict], csv_name: str, regenerate: str, notes: str = "") -> str:
    """The markdown; `notes` (what the numbers mean, where a target was missed and why) goes first."""
    lines = [
        "# Benchmark results",
        "",
        f"Generated from `{csv_name}` (one row per device, benchmark, configuration and method; a re-run "
        f"replaces its rows) by `{regenerate}`. Times in milliseconds unless marked; ratios are taken "
        "between rows measured in the same run on the same device. The plots next to this file are drawn "
        f"from the same CSV. Notes written by people live in `{NOTES_FILE}` next to this file and are "
        "copied in below.",
    ]
    if notes.strip():
        lines += ["", "## Notes", "", notes.strip()]
    devices = sorted({row["device"] for row in rows}, key=lambda d: (d.startswith("CPU"), d))
    for device in devices:
        device_rows = [row for row in rows if row["device"] == device]
        stamps = sorted(row["timestamp"] for row in device_rows if row["timestamp"])
        commands = sorted({row["command"] for row in device_rows if row["command"]})
        versions = sorted({row["versions"] for row in device_rows if row["versions"]})
        lines += ["", f"## {device}", ""]
        if stamps:
            lines.append(f"- measured: {stamps[0]}" + (f" to {stamps[-1]}" if stamps[-1] != stamps[0] else ""))
        lines += [f"- command: `{command}`" for command in commands]
        lines += [f"- versions: {version}" for version in versions]
        if device.startswith("CPU"):
            lines.append("- CPU rows check the benchmark pipeline at small sizes on a shared machine; the targets "
                         "are for a GPU at full size, so their verdicts here mean little.")
        for benchmark in BENCHMARK_ORDER:
            bench_rows = [row for row in device_rows if row["benchmark"] == benchmark]
            title, section = SECTIONS[benchmark]
            if not bench_rows:
                continue
            if benchmark == bandwidth.BENCHMARK:  # one table: the sizes differ from op to op
                groups = {"": bench_rows}
            else:
                groups = {}
                for row in bench_rows:
                    groups.setdefault(row["config"], []).append(row)
            for config, config_rows in groups.items():
                lines += ["", f"### {title}" + (f": {config}" if config else ""), ""]
                lines += section(config_rows)
    return "\n".join(lines) + "\n"


def target_summary(rows: list[dict], device: str) -> list[str]:
    """The target lines of `device`'s section (for the end of a run's console output)."""
    text = render([row for row in rows if row["device"] == device], "", "")
    return [
        line for line in text.splitlines() if line.startswith("Target") or (line.startswith("- ") and " — " in line)
    ]


def write_report(csv_path: str | Path, md_path: str | Path, regenerate: str) -> Path:
    md_path = Path(md_path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    notes_path = md_path.parent / NOTES_FILE
    notes = notes_path.read_text(encoding="utf-8") if notes_path.exists() else ""
    md_path.write_text(render(read_rows(csv_path), Path(csv_path).name, regenerate, notes), encoding="utf-8")
    return md_path
