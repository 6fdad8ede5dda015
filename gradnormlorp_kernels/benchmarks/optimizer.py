"""Optimizer step on the linear weights of LLaMA-1B-shaped layers: ours against GaLore, bitsandbytes, torch.

Every method gets its own copy of the same random bf16 weights and a fresh random gradient before
every step (GaLore's 8-bit variant replaces `p.grad` with the projected gradient). The first step
(which creates the states) and WARMUP_STEPS more (ours captures its CUDA graphs there) are reported on
their own; then one whole refresh window of `update_proj_gap` steps is timed step by step: GaLore refreshes at its step `gap`, ours refreshes each
matrix once somewhere in any window of `gap` steps (staggered). So the window's mean is the amortised
step, its maximum the slowest step, its median the ordinary step.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .. import GradNormLoRPAdamW, _dispatch
from . import _timing
from .results import make_row

BENCHMARK = "optimizer"
LR = 1e-3
SCALE = 0.25


@dataclass(frozen=True)
class OptimizerSizes:
    hidden: int
    mlp: int
    layers: int
    ranks: tuple[int, ...]
    gap: int


SIZES = {
    "full": OptimizerSizes(hidden=2048, mlp=5461, layers=4, ranks=(128, 512), gap=200),
    "cpu": OptimizerSizes(hidden=128, mlp=341, layers=1, ranks=(16, 32), gap=5),
    "tiny": OptimizerSizes(hidden=64, mlp=171, layers=1, ranks=(8,), gap=3),
}
# Seconds the whole optimizer benchmark may take on each size. GaLore's exact SVD refreshes dominate
# (seconds each at full size, rank-independent); a method predicted to overrun is skipped and says so.
BUDGET_S = {"full": 240.0, "cpu": 30.0, "tiny": 30.0}
# Steps between the first and the timed window: a training loop that frees its gradients each step
# (zero_grad(set_to_none=True)) gets them back at two alternating addresses, and each needs its graph.
WARMUP_STEPS = 2


def ours_name(rank: int) -> str:
    return f"GradNormLoRPAdamW 8-bit r={rank}"


def galore8_name(rank: int) -> str:
    return f"GaLoreAdamW8bit r={rank}"


def galore_name(rank: int) -> str:
    return f"GaLoreAdamW r={rank}"


BNB_ADAMW8 = "bitsandbytes AdamW8bit"
TORCH_ADAMW = "torch AdamW fused"


def weight_shapes(size: OptimizerSizes) -> list[tuple[int, int]]:
    """q, k, v, o, gate, up, down of each layer, as (out, in)."""
    h, m = size.hidden, size.mlp
    return ([(h, h)] * 4 + [(m, h), (m, h), (h, m)]) * size.layers


def _galore_group(params: list, rank: int, gap: int) -> list[dict]:
    return [{"params": params, "rank": rank, "update_proj_gap": gap, "scale": SCALE, "proj_type": "std"}]


def _galore8(params, rank, gap, device):
    if device.type != "cuda":
        raise RuntimeError("GaLoreAdamW8bit needs a CUDA GPU (its step calls torch.cuda.synchronize)")
    from galore_torch import GaLoreAdamW8bit

    return GaLoreAdamW8bit(_galore_group(params, rank, gap), lr=LR, weight_decay=0.0)


def _galore(params, rank, gap, device):
    from galore_torch import GaLoreAdamW

    return GaLoreAdamW(_galore_group(params, rank, gap), lr=LR, weight_decay=0.0, no_deprecation_warning=True)


def _ours(params, rank, gap, device):
    groups = [{"params": params, "project": True}]
    return GradNormLoRPAdamW(groups, lr=LR, rank=rank, update_proj_gap=gap, scale=SCALE, state_bits=8)


def _bnb(params, rank, gap, device):
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit(params, lr=LR, weight_decay=0.0)


def _torch_fused(params, rank, gap, device):
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=True)


def methods(size: OptimizerSizes) -> dict[str, tuple[Callable, int]]:
    """name -> (factory(params, rank, gap, device), rank), most important first: a run that hits its
    time budget drops the ones at the end."""
    first, rest = size.ranks[0], size.ranks[1:]
    found: dict[str, tuple[Callable, int]] = {
        ours_name(first): (_ours, first),
        galore8_name(first): (_galore8, first),
        TORCH_ADAMW: (_torch_fused, 0),
        BNB_ADAMW8: (_bnb, 0),
    }
    for rank in rest:
        found[ours_name(rank)] = (_ours, rank)
        found[galore8_name(rank)] = (_galore8, rank)
    for rank in size.ranks:
        found[galore_name(rank)] = (_galore, rank)
    return found


def _tensors_in(value, depth: int = 0) -> list[torch.Tensor]:
    """Tensors a state entry holds, looking into containers and objects (GaLore keeps its projection
    matrix on a projector object in the state)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if depth >= 2:
        return []
    if isinstance(value, (list, tuple)):
        items = value
    elif isinstance(value, dict):
        items = value.values()
    elif hasattr(value, "__dict__"):
        items = vars(value).values()
    else:
        return []
    return [tensor for item in items for tensor in _tensors_in(item, depth + 1)]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every distinct tensor in `optimizer.state` (shared tensors, e.g. quantisation maps, once)."""
    seen: dict[tuple, int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            for tensor in _tensors_in(value):
                key = (tensor.device, tensor.data_ptr(), tensor.numel(), tensor.dtype)
                seen[key] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def _config(size: OptimizerSizes, shapes: list[tuple[int, int]]) -> str:
    total = sum(o * i for o, i in shapes)
    return (
        f"{size.layers}x LLaMA-1B-shaped layers (hidden {size.hidden}, MLP {size.mlp}), "
        f"{len(shapes)} weights, {total / 1e6:.1f}M params bf16, gap {size.gap}"
    )


def _measure(optimizer: torch.optim.Optimizer, params: list, gap: int, device: torch.device) -> dict:
    """The first step, the warm-up steps, then one refresh window of `gap` steps timed one by one, as
    result columns."""

    def step() -> None:
        optimizer.step()

    def fresh_gradients() -> None:
        # Freed first, as `zero_grad()` (set_to_none) frees them before the next backward allocates them.
        for p in params:
            p.grad = None
        for p in params:
            p.grad = torch.randn_like(p)

    fresh_gradients()
    first = _timing.time_once(step, device)
    warmup = []
    for _ in range(WARMUP_STEPS):
        fresh_gradients()
        warmup.append(_timing.time_once(step, device))
    window = []
    for _ in range(gap):
        fresh_gradients()
        window.append(_timing.time_once(step, device))
    ordered = sorted(window)
    backend = ""
    if isinstance(optimizer, GradNormLoRPAdamW):
        used = {_dispatch.select(op, device.type)[0] for op in ("adam_update", "project_back_update")}
        backend = "+".join(sorted(used))
    return dict(
        backend=backend, median_ms=statistics.median(window),
        q20_ms=_timing.quantile(ordered, _timing.LOW_QUANTILE), q80_ms=_timing.quantile(ordered, _timing.HIGH_QUANTILE),
        slowest_ms=ordered[-1], amortized_ms=statistics.fmean(window), first_step_ms=first,
        warmup_ms=max(warmup, default=None),
        state_bytes=state_bytes(optimizer),
    )


def run(
    sizes: str, device: torch.device, report: Callable[[dict], None], budget_s: float | None = None
) -> list[dict]:
    """Time every method; each finished row goes to `report` at once (so a later failure loses nothing)."""
    size = SIZES[sizes]
    budget_s = BUDGET_S[sizes] if budget_s is None else budget_s
    started = time.perf_counter()
    # Seconds the last successful run of each family took: GaLore's two variants share their SVD refreshes.
    cost: dict[str, float] = {}
    shapes = weight_shapes(size)
    name = _timing.device_name(device)
    config = _config(size, shapes)
    generator = torch.Generator(device=device).manual_seed(0)
    weights = [torch.randn(shape, device=device, dtype=torch.bfloat16, generator=generator) * 0.02 for shape in shapes]
    rows = []
    for method, (factory, rank) in methods(size).items():
        elapsed = time.perf_counter() - started
        family = "galore" if factory in (_galore, _galore8) else factory.__name__
        predicted = cost.get(family, 0.0)
        if elapsed + predicted > budget_s:
            note = f"skipped: {elapsed:.0f}s spent, about {predicted:.0f}s more would pass the {budget_s:.0f}s budget"
            row = make_row(name, BENCHMARK, config, method, note=note)
        else:
            method_started = time.perf_counter()
            try:
                params = [torch.nn.Parameter(w.clone()) for w in weights]
                row = make_row(
                    name, BENCHMARK, config, method, **_measure(factory(params, rank, size.gap, device), params,
                                                                size.gap, device),
                )
                del params
                cost[family] = time.perf_counter() - method_started
            except Exception as exc:  # one broken method must not cost the others' results
                row = make_row(name, BENCHMARK, config, method, note=f"failed: {type(exc).__name__}: {exc}"[:300])
            _timing.release_memory(device)
        rows.append(row)
        report(row)
    return rows
