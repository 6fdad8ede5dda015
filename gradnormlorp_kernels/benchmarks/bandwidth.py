"""Achieved bandwidth of each memory-bound op, per backend, against the device's measured copy bandwidth.

An op's bytes are its floor of memory traffic (DESIGN.md section 4): every input read once, every
output written once, a tensor updated in place read and written once each. On a GPU each op's kernels
are timed from a CUDA graph with the L2 flushed before every call (`_timing.time_kernels`), so that the
host's launch cost does not count: on a slow host `do_bench` timed Python, not the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import ops, use_backend
from .._dispatch import implementations
from . import _timing
from .results import make_row

BENCHMARK = "bandwidth"
COPY = "copy_ (device to device)"
DEVICE_BACKENDS = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


@dataclass(frozen=True)
class BandwidthSizes:
    copy_bytes: int
    out: int  # a weight of shape (out, hidden), as LLaMA-7B's MLP (11008, 4096)
    hidden: int
    tokens: int
    adapter_rank: int
    projector_rank: int
    state_shapes: tuple[tuple[int, int], ...]  # projected Adam states: one matrix's, and a large one


SIZES = {
    "full": BandwidthSizes(
        copy_bytes=1 << 30, out=11008, hidden=4096, tokens=8192, adapter_rank=16, projector_rank=128,
        state_shapes=((1024, 4096), (4096, 8192)),
    ),
    "cpu": BandwidthSizes(
        copy_bytes=16 << 20, out=1376, hidden=512, tokens=1024, adapter_rank=16, projector_rank=32,
        state_shapes=((128, 512), (512, 1024)),
    ),
    "tiny": BandwidthSizes(
        copy_bytes=1 << 20, out=96, hidden=64, tokens=64, adapter_rank=4, projector_rank=8,
        state_shapes=((32, 64),),
    ),
}


@dataclass
class Case:
    """One call of one op: `call` runs it; `read`/`written` are the tensors it must read and write
    (outputs as meta tensors of the output's shape and dtype: only their size counts)."""

    op: str
    config: str
    call: Callable[[], object]
    read: list[torch.Tensor]
    written: list[torch.Tensor]

    def bytes_moved(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.read + self.written)


def _randn(shape, device, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, device=device, dtype=dtype)


def _row_norm(size: BandwidthSizes, device) -> Case:
    weight = _randn((size.out, size.hidden), device, torch.bfloat16)
    norm = torch.empty(size.out, device="meta")
    return Case("row_norm", f"V {size.out}x{size.hidden} bf16", lambda: ops.row_norm(weight), [weight], [norm])


def _adapter_row_norm(size: BandwidthSizes, device) -> Case:
    base = _randn((size.out, size.hidden), device, torch.bfloat16)
    lora_A = _randn((size.adapter_rank, size.hidden), device, torch.bfloat16) * 0.02
    lora_B = _randn((size.out, size.adapter_rank), device, torch.bfloat16) * 0.01
    scaling = 2.0
    outputs = [torch.empty(size.out, device="meta"), torch.empty(size.out, size.adapter_rank, device="meta")]
    return Case(
        "adapter_row_norm", f"W0 {size.out}x{size.hidden} bf16, r={size.adapter_rank}",
        lambda: ops.adapter_row_norm(base, lora_A, lora_B, scaling), [base, lora_A, lora_B], outputs,
    )


def _adapter_weight(size: BandwidthSizes, device) -> Case:
    """The adapter layer's weight pass (its forward's one kernel): W0 read, W written, n and W' A^T."""
    base = _randn((size.out, size.hidden), device, torch.bfloat16)
    lora_A = _randn((size.adapter_rank, size.hidden), device, torch.bfloat16) * 0.02
    lora_B = _randn((size.out, size.adapter_rank), device, torch.bfloat16) * 0.01
    magnitude = torch.rand(size.out, device=device, dtype=torch.bfloat16) + 0.5
    scaling = 2.0
    inputs = [base, lora_A, lora_B, magnitude]
    outputs = list(ops.adapter_weight(*(t.to("meta") for t in inputs), scaling))
    return Case(
        "adapter_weight", f"W0 {size.out}x{size.hidden} bf16, r={size.adapter_rank}",
        lambda: ops.adapter_weight(base, lora_A, lora_B, magnitude, scaling), inputs, outputs,
    )


def _norm_coefficients(size: BandwidthSizes, device) -> Case:
    grad_out = _randn((size.tokens, size.hidden), device, torch.bfloat16)
    out = _randn((size.tokens, size.hidden), device, torch.bfloat16)
    magnitude = torch.rand(size.hidden, device=device, dtype=torch.bfloat16) + 0.5
    norm = torch.rand(size.hidden, device=device) + 0.5
    outputs = [torch.empty(size.hidden, device="meta") for _ in range(3)]
    return Case(
        "norm_coefficients", f"g, y {size.tokens}x{size.hidden} bf16",
        lambda: ops.norm_coefficients(grad_out, out, None, magnitude, norm, False),
        [grad_out, out, magnitude, norm], outputs,
    )


def _adam_update(shape: tuple[int, int], device) -> Case:
    blocks = -(-shape[0] * shape[1] // ops.BLOCK_SIZE)
    grad = _randn(shape, device)
    exp_avg = torch.randint(0, 256, shape, device=device, dtype=torch.uint8)
    exp_avg_sq = torch.randint(0, 256, shape, device=device, dtype=torch.uint8)
    absmax_avg = torch.rand(blocks, device=device)
    absmax_avg_sq = torch.rand(blocks, device=device)
    code_signed = ops.dynamic_map(True, device)
    code_unsigned = ops.dynamic_map(False, device)
    step = torch.full((), 10.0, device=device)
    skipped = torch.zeros((), device=device)
    states = [exp_avg, exp_avg_sq, absmax_avg, absmax_avg_sq, step, skipped]
    return Case(
        "adam_update 8-bit", f"state {shape[0]}x{shape[1]}",
        lambda: ops.adam_update(
            grad, exp_avg, exp_avg_sq, absmax_avg, absmax_avg_sq, code_signed, code_unsigned, step, skipped,
            0.9, 0.999, 1e-8,
        ),
        [grad, code_signed, code_unsigned] + states, states + [torch.empty(shape, device="meta")],
    )


def _quantize(shape: tuple[int, int], device) -> Case:
    x = _randn(shape, device)
    code = ops.dynamic_map(True, device)
    blocks = -(-shape[0] * shape[1] // ops.BLOCK_SIZE)
    outputs = [torch.empty(shape, device="meta", dtype=torch.uint8), torch.empty(blocks, device="meta")]
    return Case(
        "quantize_blockwise", f"{shape[0]}x{shape[1]} fp32", lambda: ops.quantize_blockwise(x, code), [x, code],
        outputs,
    )


def _project_back(size: BandwidthSizes, device) -> Case:
    weight = _randn((size.out, size.hidden), device, torch.bfloat16) * 0.02
    rank = size.projector_rank
    left = torch.linalg.qr(_randn((size.out, rank), device)).Q
    direction = _randn((rank, size.hidden), device)
    gate = torch.ones((), device=device)
    return Case(
        "project_back_update", f"W {size.out}x{size.hidden} bf16, left P r={rank}",
        lambda: ops.project_back_update(weight, direction, left, None, 1e-6, 0.0, gate),
        [weight, direction, left, gate], [weight, torch.empty(size.out, device="meta")],
    )


def cases(size: BandwidthSizes, device) -> list[tuple[str, Callable[[], Case]]]:
    """(op name, builder) for every measured call; inputs are made when the builder runs."""
    found = [
        ("row_norm", lambda: _row_norm(size, device)),
        ("adapter_row_norm", lambda: _adapter_row_norm(size, device)),
        ("adapter_weight", lambda: _adapter_weight(size, device)),
        ("norm_coefficients", lambda: _norm_coefficients(size, device)),
        ("project_back_update", lambda: _project_back(size, device)),
    ]
    for shape in size.state_shapes:
        found.append(("adam_update", lambda shape=shape: _adam_update(shape, device)))
        found.append(("quantize_blockwise", lambda shape=shape: _quantize(shape, device)))
    return found


def measure_copy(size: BandwidthSizes, device: torch.device, window: dict) -> tuple[float, _timing.Timing]:
    """(GB/s, timing) of copying a `copy_bytes` tensor: bytes read + bytes written over the median time."""
    source = torch.empty(size.copy_bytes // 4, device=device, dtype=torch.float32).uniform_()
    target = torch.empty_like(source)
    # do_bench, not time_kernels: a 1 GiB copy takes ~0.7 ms, so launch cost does not show, and the graphed
    # timing read it 20% slower (2.4 vs 3.0 TB/s on an H100): the faster figure keeps the percentages honest.
    timing = _timing.time_repeated(lambda: target.copy_(source), device, **window)
    return 2 * size.copy_bytes / (timing.median_ms * 1e6), timing


def method_name(op_label: str, backend: str) -> str:
    return f"{op_label} [{backend}]"


def run(sizes: str, device: torch.device, report: Callable[[dict], None]) -> list[dict]:
    """Copy bandwidth first, then every op on every backend that implements it here."""
    size = SIZES[sizes]
    name = _timing.device_name(device)
    rows = []
    copy_gbps, timing = measure_copy(size, device, _timing.windows(sizes))
    row = make_row(
        name, BENCHMARK, f"{size.copy_bytes >> 20} MiB fp32", COPY, backend="torch", median_ms=timing.median_ms,
        q20_ms=timing.low_ms, q80_ms=timing.high_ms, bytes_moved=2 * size.copy_bytes, gbps=copy_gbps,
        pct_of_copy=100.0,
    )
    rows.append(row)
    report(row)
    _timing.release_memory(device)
    for op_name, build in cases(size, device):
        available = implementations(op_name)
        for backend in DEVICE_BACKENDS[device.type]:
            if backend not in available:
                continue
            case = None
            try:
                case = build()
                note = ""
                with use_backend(backend):
                    case.call()  # compiles and warms up outside the timing
                    try:
                        timing = _timing.time_kernels(case.call, device, **_timing.windows(sizes))
                    except RuntimeError:  # not capturable: host launch time included
                        timing = _timing.time_repeated(case.call, device, **_timing.windows(sizes))
                        note = "timed by do_bench (not capturable in a CUDA graph)"
                moved = case.bytes_moved()
                gbps = moved / (timing.median_ms * 1e6)
                row = make_row(
                    name, BENCHMARK, case.config, method_name(case.op, backend), backend=backend,
                    median_ms=timing.median_ms, q20_ms=timing.low_ms, q80_ms=timing.high_ms, bytes_moved=moved,
                    gbps=gbps, pct_of_copy=100.0 * gbps / copy_gbps, note=note,
                )
            except Exception as exc:  # one broken backend must not cost the others' results
                row = make_row(
                    name, BENCHMARK, case.config if case else "", method_name(case.op if case else op_name, backend),
                    backend=backend, note=f"failed: {type(exc).__name__}: {exc}"[:300],
                )
            del case
            _timing.release_memory(device)
            rows.append(row)
            report(row)
    return rows
