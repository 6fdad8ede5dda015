"""The compiled `cpu` backend against the reference ops, on 2 threads (pytest-benchmark).

    python -m pytest bench/bench_cpu_backend.py --benchmark-only      # the pytest-benchmark table
    python bench/bench_cpu_backend.py                                 # the same, then ratios per group

Sizes are a realistic projected matrix: a 4096 x 4096 weight (float32 and bfloat16), rank 128, left
projection, 8-bit block-wise Adam states warmed up by one step. The "Adam step" is the optimizer's work
for one matrix after the gradient is projected: `adam_update` (dequantise, update, requantise the states;
the direction) followed by `project_back_update` (P N, decoupled decay and the update applied to the
weight in place, new row norms). Row norms are timed on the same weight, and adapter-mode row norms
(||W0 + s B A||_row and W0 A^T) at rank 16.
"""

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

# Run from a checkout without installing: the package sits next to this folder.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gradnormlorp_kernels import _dispatch, _extension, ops

THREADS = 2
SIZE = 4096
RANK = 128
ADAPTER_RANK = 16
BACKENDS = ("cpu", "reference")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

pytestmark = pytest.mark.skipif(_extension.load() is None, reason=f"no cpu backend: {_extension.load_error()}")


@pytest.fixture(autouse=True)
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(previous)


def projected_problem(dtype: torch.dtype) -> dict:
    """A weight, its left projector, a projected gradient and 8-bit states after one step."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(SIZE, SIZE, generator=generator).to(dtype)
    left, _ = torch.linalg.qr(torch.randn(SIZE, RANK, generator=generator))
    blocks = ops.quant8.num_blocks(RANK * SIZE)
    problem = {
        "weight": weight,
        "left": left.contiguous(),
        "grad": torch.randn(RANK, SIZE, generator=generator) * 1e-2,
        "exp_avg": torch.zeros(RANK, SIZE, dtype=torch.uint8),
        "exp_avg_sq": torch.zeros(RANK, SIZE, dtype=torch.uint8),
        "absmax_avg": torch.zeros(blocks),
        "absmax_avg_sq": torch.zeros(blocks),
        "code_signed": ops.dynamic_map(True),
        "code_unsigned": ops.dynamic_map(False),
        "step": torch.zeros(()),
        "skipped": torch.zeros(()),
        "gate": torch.ones(()),
    }
    adam_step(problem)
    return problem


def adam_step(p: dict) -> torch.Tensor:
    direction = ops.adam_update(
        p["grad"], p["exp_avg"], p["exp_avg_sq"], p["absmax_avg"], p["absmax_avg_sq"], p["code_signed"],
        p["code_unsigned"], p["step"], p["skipped"], 0.9, 0.999, 1e-8,
    )
    return ops.project_back_update(p["weight"], direction, p["left"], None, 1e-4 * 0.25, 1e-5, p["gate"])


def run_with(backend: str, fn, *args):
    with _dispatch.use_backend(backend):
        return fn(*args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_step(benchmark, backend, dtype):
    benchmark.group = f"adam step (8-bit) + project back, {SIZE}x{SIZE} {dtype}, rank {RANK}"
    problem = projected_problem(DTYPES[dtype])
    norms = benchmark(run_with, backend, adam_step, problem)
    assert norms.shape == (SIZE,)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_row_norm(benchmark, backend, dtype):
    benchmark.group = f"row norms, {SIZE}x{SIZE} {dtype}"
    weight = torch.randn(SIZE, SIZE).to(DTYPES[dtype])
    norms = benchmark(run_with, backend, ops.row_norm, weight)
    assert norms.shape == (SIZE,)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_row_norm(benchmark, backend, dtype):
    benchmark.group = f"adapter row norms + W0 A^T, {SIZE}x{SIZE} {dtype}, rank {ADAPTER_RANK}"
    base = torch.randn(SIZE, SIZE).to(DTYPES[dtype])
    lora_A = torch.randn(ADAPTER_RANK, SIZE) / SIZE**0.5
    lora_B = torch.randn(SIZE, ADAPTER_RANK) * 1e-2
    norms, _ = benchmark(run_with, backend, ops.adapter_row_norm, base, lora_A, lora_B, 2.0)
    assert norms.shape == (SIZE,)


def main() -> int:
    """Run this file under pytest-benchmark and print, per group, the reference's median over the cpu backend's."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "benchmark.json")
        code = subprocess.call(
            [sys.executable, "-m", "pytest", "-q", os.path.abspath(__file__), "--benchmark-only",
             "--benchmark-group-by=group", "--benchmark-columns=min,median,max,rounds", f"--benchmark-json={report}",
             *sys.argv[1:]]
        )
        if code != 0 or not os.path.exists(report):
            return code or 1
        with open(report) as f:
            results = json.load(f)
    medians: dict[str, dict[str, float]] = {}
    for bench in results["benchmarks"]:
        medians.setdefault(bench["group"], {})[bench["params"]["backend"]] = bench["stats"]["median"]
    print(f"\n{results['machine_info'].get('cpu', {}).get('brand_raw', 'CPU')}, torch {torch.__version__}, "
          f"{THREADS} threads: median ms, reference / cpu")
    for group, by_backend in medians.items():
        cpu, ref = by_backend.get("cpu"), by_backend.get("reference")
        if cpu and ref:
            print(f"  {group}: cpu {cpu * 1e3:.2f}  reference {ref * 1e3:.2f}  speed-up {ref / cpu:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
