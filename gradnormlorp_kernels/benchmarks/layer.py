"""Layer forward+backward: GradNormLoRPLinear against a frozen nn.Linear (the floor), peft LoRA and DoRA.

Each method gets a fresh random input that requires grad and a fixed random upstream gradient; the
timed call is `layer(x).backward(grad)` (no loss function), gradients cleared before every call.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .. import GradNormLoRPLinear, _dispatch
from . import _timing
from .results import make_row

BENCHMARK = "layer"
FROZEN = "nn.Linear (frozen)"
OURS_ADAPTER = "GradNormLoRP adapter"
OURS_FULL = "GradNormLoRP full"
PEFT_LORA = "peft LoRA"
PEFT_DORA = "peft DoRA"
# torch.compile(mode="reduce-overhead"): the whole forward and backward replayed as CUDA graphs, which is
# how a user removes the per-launch host cost. GPU only (on a CPU there is no graph to replay).
COMPILED = " (torch.compile reduce-overhead)"
COMPILE_WARMUP_CALLS = 3
# A trained adapter rather than LoRA's B = 0 init, so that no term is trivially zero.
ADAPTER_B_STD = 0.01


@dataclass(frozen=True)
class LayerSizes:
    features: int  # in = out
    tokens: int
    rank: int


SIZES = {
    "full": LayerSizes(features=4096, tokens=8192, rank=16),
    "cpu": LayerSizes(features=256, tokens=512, rank=16),
    "tiny": LayerSizes(features=64, tokens=96, rank=4),
}


class _Holder(nn.Module):
    """The smallest model peft can wrap: one linear layer."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear


def _peft_layer(base: nn.Linear, rank: int, dora: bool) -> nn.Module:
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["linear"], lora_dropout=0.0, use_dora=dora)
    model = peft.get_peft_model(_Holder(copy.deepcopy(base)), config)
    # peft keeps adapters in float32 by default; the benchmark is bf16 throughout.
    layer = model.base_model.model.linear.to(base.weight.dtype)
    with torch.no_grad():
        for name, parameter in layer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, ADAPTER_B_STD)
    return layer


def _ours(base: nn.Linear, rank: int, mode: str) -> nn.Module:
    layer = GradNormLoRPLinear.from_linear(base, rank=rank, alpha=2 * rank, mode=mode)
    if mode == "adapter":
        with torch.no_grad():
            layer.lora_B.normal_(0.0, ADAPTER_B_STD)
    return layer


def _frozen(base: nn.Linear) -> nn.Module:
    layer = copy.deepcopy(base)
    layer.weight.requires_grad_(False)
    return layer


def methods(rank: int, device: torch.device) -> dict[str, Callable[[nn.Linear], nn.Module]]:
    found = {
        FROZEN: _frozen,
        OURS_ADAPTER: lambda base: _ours(base, rank, "adapter"),
        OURS_FULL: lambda base: _ours(base, rank, "full"),
        PEFT_LORA: lambda base: _peft_layer(base, rank, dora=False),
        PEFT_DORA: lambda base: _peft_layer(base, rank, dora=True),
    }
    if device.type == "cuda":
        for name in (OURS_ADAPTER, PEFT_DORA):
            build = found[name]
            found[name + COMPILED] = lambda base, build=build: torch.compile(build(base), mode="reduce-overhead")
    return found


def _our_backend(device: torch.device, mode: str) -> str:
    ops = ("adapter_weight", "adapter_backward") if mode == "adapter" else ("full_forward", "full_backward")
    return "+".join(sorted({_dispatch.select(name, device.type)[0] for name in ops}))


def _measure(layer: nn.Module, size: LayerSizes, sizes: str, device: torch.device) -> dict:
    """Timing and peak extra memory of `layer(x).backward(grad)`, as result columns."""
    dtype = torch.bfloat16
    x = torch.randn(size.tokens, size.features, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(size.tokens, size.features, device=device, dtype=dtype)
    cleared = [x] + [p for p in layer.parameters() if p.requires_grad]

    def forward_backward() -> None:
        layer(x).backward(grad)

    module = getattr(layer, "_orig_mod", layer)
    compiled = module is not layer
    if compiled:  # compilation, then the recording of the graphs, before anything is timed
        # x at a fixed address, as a layer's input inside a compiled model is: else every replay first copies it
        # into the graph's own buffer (H200, D=4096 T=8192: copying x and the upstream gradient took ~100 us of
        # the ~1 ms row; bench/profile_layer.py --compiled). The upstream gradient is still copied.
        torch._dynamo.mark_static_address(x)
        for _ in range(COMPILE_WARMUP_CALLS):
            _timing.clear_grads(cleared)
            forward_backward()
    timing = _timing.time_repeated(forward_backward, device, grad_to_none=cleared, **_timing.windows(sizes))
    # A graph's memory pool is allocated when it is recorded: a replay allocates nothing, so the eager row
    # is the one that says how much memory the layer needs.
    extra = None if compiled else _timing.peak_extra_bytes(forward_backward, device, cleared)
    # The kernels' own time, beside a median that on a slow host times the launches (graph replays: no gaps).
    try:
        kernels = None if compiled else _timing.kernel_ms(forward_backward, device, cleared)
        note = "" if kernels is None else f"GPU kernels {kernels:.3f} ms a call"
    except RuntimeError as exc:  # a profiler that cannot start must not cost the row its timing
        note = f"GPU kernel time unavailable: {exc}"[:200]
    backend = _our_backend(device, module.mode) if isinstance(module, GradNormLoRPLinear) else ""
    return dict(
        backend=backend, median_ms=timing.median_ms, q20_ms=timing.low_ms, q80_ms=timing.high_ms,
        peak_extra_bytes=extra, note=note,
    )


def run(sizes: str, device: torch.device, report: Callable[[dict], None]) -> list[dict]:
    """Time every method; each finished row goes to `report` at once (so a later failure loses nothing)."""
    size = SIZES[sizes]
    name = _timing.device_name(device)
    config = f"D={size.features} T={size.tokens} r={size.rank} bf16"
    rows = []
    torch.manual_seed(0)
    base = nn.Linear(size.features, size.features, bias=False, device=device, dtype=torch.bfloat16)
    for method, build in methods(size.rank, device).items():
        try:
            row = make_row(name, BENCHMARK, config, method, **_measure(build(base), size, sizes, device))
        except Exception as exc:  # one broken method must not cost the others' results
            row = make_row(name, BENCHMARK, config, method, note=f"failed: {type(exc).__name__}: {exc}"[:300])
        _timing.release_memory(device)
        rows.append(row)
        report(row)
    return rows
