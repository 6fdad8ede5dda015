"""The benchmarks' pipeline on the CPU at tiny sizes: rows with finite times, upsert, RESULTS.md, plots."""

import argparse
import math

import pytest

from gradnormlorp_kernels import benchmarks
from gradnormlorp_kernels.benchmarks import bandwidth, layer, optimizer, report
from gradnormlorp_kernels.benchmarks.results import COLUMNS, make_row, number, read_rows, upsert_rows


def _args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    benchmarks.add_arguments(parser)
    return parser.parse_args(["--out", str(tmp_path), "--sizes", "tiny", "--no-plots", *extra])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    status = benchmarks.main(_args(out))
    return status, out


def _timed(rows, benchmark):
    return {
        row["method"]: row for row in rows if row["benchmark"] == benchmark and number(row, "median_ms") is not None
    }


def test_every_benchmark_writes_rows_with_finite_times(tiny_run):
    status, out = tiny_run
    assert status == 0
    rows = read_rows(out / "results.csv")
    layer_rows = _timed(rows, layer.BENCHMARK)
    assert set(layer_rows) == {layer.FROZEN, layer.OURS_ADAPTER, layer.OURS_FULL, layer.PEFT_LORA, layer.PEFT_DORA}
    optimizer_rows = _timed(rows, optimizer.BENCHMARK)
    # GaLoreAdamW8bit needs CUDA; everything else runs on the CPU.
    rank = optimizer.SIZES["tiny"].ranks[0]
    assert {optimizer.ours_name(rank), optimizer.galore_name(rank), optimizer.TORCH_ADAMW,
            optimizer.BNB_ADAMW8} <= set(optimizer_rows)
    for row in optimizer_rows.values():
        for column in ("slowest_ms", "amortized_ms", "first_step_ms", "state_bytes"):
            assert math.isfinite(number(row, column)), (row["method"], column)
        assert number(row, "slowest_ms") >= number(row, "median_ms")
    bandwidth_rows = _timed(rows, bandwidth.BENCHMARK)
    assert bandwidth.COPY in bandwidth_rows
    measured_ops = {name.rsplit(" [", 1)[0] for name in bandwidth_rows}
    assert {"row_norm", "adapter_row_norm", "norm_coefficients", "project_back_update", "adam_update 8-bit",
            "quantize_blockwise"} <= measured_ops
    for row in bandwidth_rows.values():
        assert number(row, "gbps") > 0 and number(row, "bytes_moved") > 0
    for row in rows:
        assert row["device"] and row["command"] and row["timestamp"]
        median = number(row, "median_ms")
        assert median is None or (math.isfinite(median) and median > 0)


def test_optimizer_state_bytes_counts_galore_projector():
    import torch
    from galore_torch import GaLoreAdamW

    weight = torch.nn.Parameter(torch.randn(64, 32))
    opt = GaLoreAdamW(
        [{"params": [weight], "rank": 4, "update_proj_gap": 10, "scale": 0.25, "proj_type": "std"}],
        no_deprecation_warning=True,
    )
    weight.grad = torch.randn_like(weight)
    opt.step()
    # moments (64, 4) twice and the (4, 32) projection matrix, float32
    assert optimizer.state_bytes(opt) == (2 * 64 * 4 + 4 * 32) * 4


def test_upsert_replaces_rows_with_the_same_key(tmp_path):
    path = tmp_path / "results.csv"
    first = make_row("GPU A", "layer", "D=8", "ours", median_ms=2.0)
    other = make_row("GPU B", "layer", "D=8", "ours", median_ms=5.0)
    upsert_rows(path, [first, other])
    upsert_rows(path, [make_row("GPU A", "layer", "D=8", "ours", median_ms=1.5)])
    rows = read_rows(path)
    assert len(rows) == 2
    by_device = {row["device"]: row for row in rows}
    assert number(by_device["GPU A"], "median_ms") == 1.5
    assert number(by_device["GPU B"], "median_ms") == 5.0
    assert list(rows[0]) == list(COLUMNS)


def test_report_and_plots_from_the_csv(tiny_run, tmp_path):
    _, out = tiny_run
    status = benchmarks.main(_args(tmp_path, "--report-only", "--csv", str(out / "results.csv")))
    assert status == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## CPU" in text
    for heading in ("### Layer forward + backward", "### Optimizer step", "### Memory-bound ops"):
        assert heading in text
    assert "time vs frozen Linear" in text and "% of copy" in text and "amortised" in text
    assert "command: `" in text
    from gradnormlorp_kernels.benchmarks.plots import make_plots

    paths = make_plots(out / "results.csv", tmp_path / "plots")
    assert {p.name.split("-")[0] for p in paths} == {"layer", "optimizer", "bandwidth"}
    assert all(p.stat().st_size > 0 for p in paths)


def test_report_ratios_and_verdicts():
    rows = [
        make_row("GPU", "layer", "c", layer.FROZEN, median_ms=1.0, peak_extra_bytes=100),
        make_row("GPU", "layer", "c", layer.OURS_ADAPTER, median_ms=1.1, peak_extra_bytes=105),
        make_row("GPU", "layer", "c", layer.PEFT_LORA, median_ms=1.3, peak_extra_bytes=100),
        make_row("GPU", "layer", "c", layer.PEFT_DORA, median_ms=2.0, peak_extra_bytes=300),
    ]
    text = report.render(rows, "results.csv", "regenerate")
    assert "at most 1.15x the frozen nn.Linear: 1.10x — **met**" in text
    assert "at least 2.5x faster than peft DoRA: 1.82x — **missed**" in text
    assert "at most 1.1x peft LoRA's: 1.05x — **met**" in text
