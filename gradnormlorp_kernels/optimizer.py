"""`GradNormLoRPAdamW`: AdamW with low-rank projected gradients and 8-bit block-wise moments."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import operator
from typing import Any

import torch
from torch import nn

from . import _device_eigh, _dispatch, _host_eigh, _step_graph, ops
from ._flat_moments import FlatMoments
from ._step_graph import FinishGraph, GroupGraphs, Lanes, SketchGraph, SketchRun
from .ops import refresh as refresh_ops
from .layer import GradNormLoRPLinear

logger = logging.getLogger(__name__)

# What the graphed step reads of every tensor, each in one C-level `map` (it runs before each replay).
_GRAD = operator.attrgetter("grad")
_DTYPE = operator.attrgetter("dtype")
_SHAPE_DTYPE_DEVICE_LAYOUT = operator.attrgetter("shape", "dtype", "device", "layout")

PROJ_TYPES = ("std", "left", "right", "two_sided")
REFRESH_METHODS = ("randomized", "svd")
STATE_BITS = (8, 32)
# Moments of tensors smaller than this stay float32: quantising them saves nothing worth the error.
MIN_QUANTIZED_NUMEL = 4096
# Randomized refresh: extra sketch columns and power iterations (accuracy of the captured subspace).
OVERSAMPLE = 8
POWER_ITERS = 2
# What a sketched refresh keeps in the state until a later step finishes it.
PENDING = ("basis", "gram", "healthy")
# Gaps from which a randomized refresh's sketch is spread over steps, one part a step (each part short
# enough to run beside a step's update), and finished HOST_SOLVE_LAG steps after its last part (by then the
# host has solved its eigendecomposition), or DEVICE_SOLVE_LAG steps after it where cuSOLVER solves it on a
# GPU (k above _host_eigh.MAX_K: 6-8 ms at k = 520 on an H200, a few steps' time); with shorter gaps it is
# sketched at once and finished the next step. Spreading puts the new projector in effect three (host) or
# five (GPU) steps later: at most 3% or 5% of a gap from 100 on (GaLore's default gap is 200), while short
# gaps, which ask for fresh projectors, keep the quick schedule.
SPREAD_MIN_GAP = 100
HOST_SOLVE_LAG = 2
DEVICE_SOLVE_LAG = 4
# The refresh's work beside a replay (sketch parts, finishes, solves) is a chain of small latency-bound kernels
# (k x k factorisations, Newton-Schulz GEMMs of a few tiles) that the next step waits for, while the replay's
# lanes keep every multiprocessor's queue full: at the default priority the chain's blocks wait behind the
# replay's and a step with a sketch part took the part's whole length on top of the replay. A higher priority
# (lower number; CUDA clamps it to the device's range) lets the chain's blocks start first.
REFRESH_STREAM_PRIORITY = -1


def _number(name: str, value, low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or value > high or (high_open and value == high):
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}")
    return value


def _integer(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _choice(name: str, value, allowed: tuple) -> Any:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _model_groups(model: nn.Module) -> list[dict]:
    """Full-mode directions are projected; every other trainable parameter gets plain AdamW."""
    projected, plain, seen = [], [], set()
    for module in model.modules():
        if isinstance(module, GradNormLoRPLinear) and module.mode == "full" and module.direction.requires_grad:
            projected.append(module.direction)
            seen.add(id(module.direction))
    for parameter in model.parameters():
        if parameter.requires_grad and id(parameter) not in seen:
            plain.append(parameter)
            seen.add(id(parameter))
    groups = []
    if projected:
        groups.append({"params": projected, "project": True})
    if plain:
        groups.append({"params": plain, "project": False})
    return groups


class GradNormLoRPAdamW(torch.optim.Optimizer):
    """AdamW whose projected matrices keep their moments in a rank-`rank` subspace (DESIGN.md 3).

    `params_or_model`: a model (full-mode `GradNormLoRPLinear` directions are projected, everything
    else is plain AdamW), or parameters / param groups like GaLore's: a group is projected when it
    has `"project": True` or a `"rank"` key, and may override any default below.

    proj_type: "std" projects the smaller side as GaLore does (projector min(out, in) x r, state
    max(out, in) x r), "left" (state r x in),
    "right" (out x r), "two_sided" (r x r). refresh: "randomized" (range finder, GEMMs only) or
    "svd" (exact). Refreshes every `update_proj_gap` steps, staggered across matrices; a randomized
    refresh (after a matrix's first) is sketched from that step's gradient after the step's update and
    finished after the next step's, taking effect from the step after that; from a gap of SPREAD_MIN_GAP
    (100) the sketch is spread over three steps (one part each) and finished two steps after its last part,
    taking effect five steps after the due one. On a GPU every phase overlaps a step's update and the
    small eigendecomposition runs on the host in a worker thread, so no step waits for a refresh. Moments are
    8-bit block-wise (`state_bits=8`, tensors under 4096 elements stay float32) or float32.
    A matrix whose gradient has a non-finite element skips its step (states and weight untouched);
    `skipped_steps()` counts them.

    cuda_graph: on a GPU, each group's device work (everything but the occasional refresh) is captured
    in a CUDA graph and replayed, since launching a dozen kernels per matrix costs far more host time
    than the GPU spends on them. Results are bit-identical to the launch-by-launch path, which is used
    on the first step, off the GPU, when `cuda_graph=False`, and for a group whose tensors keep moving.
    """

    def __init__(
        self,
        params_or_model,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int = 128,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        refresh: str = "randomized",
        state_bits: int = 8,
        seed: int = 0,
        cuda_graph: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            refresh=refresh,
            state_bits=state_bits,
            project=False,
        )
        self._check_group(defaults)
        self.seed = _integer("seed", seed, 0)
        if not isinstance(cuda_graph, bool):
            raise ValueError(f"cuda_graph must be True or False, got {cuda_graph!r}")
        _device_eigh.enabled()  # a bad $GRADNORMLORP_EIGH_WORKER raises here, not at a refresh mid-run
        self.cuda_graph = cuda_graph
        self._side_streams: dict[tuple, torch.cuda.Stream | Lanes] = {}
        self._sketch_graphs: dict[tuple, list[SketchGraph]] = {}  # by shape: one per sketch in progress at once
        # By id of a matrix's state: (that state, its sketches in progress by side).
        self._sketching: dict[int, tuple[dict, list]] = {}
        self._finish_graphs: dict[tuple, FinishGraph] = {}
        # By id of a pending Gram matrix: (that matrix, its eigendecomposition started on a worker).
        self._eigh_jobs: dict[int, tuple] = {}
        self._graphs: dict[int, GroupGraphs] = {}  # by group index
        # By group index: the matrices of each moment kind, whose moments one launch steps.
        self._flat: dict[int, list[tuple[list, FlatMoments]]] = {}
        # By group index: its parameters' addresses, (shape, dtype, device, layout) and whether they share a
        # dtype (`_graph_states`); its states, their projectors and those addresses (`_projector_addresses`).
        self._checked: dict[int, tuple] = {}
        self._projectors: dict[int, tuple] = {}
        if isinstance(params_or_model, nn.Module):
            params = _model_groups(params_or_model)
        else:
            params = list(params_or_model)
            params = [
                {**g, "project": g.get("project", "rank" in g)} if isinstance(g, dict) else g for g in params
            ]
        super().__init__(params, defaults)
        if not any(g["project"] for g in self.param_groups):
            logger.info("GradNormLoRPAdamW: no projected matrix; every parameter gets plain (8-bit) AdamW")

    @staticmethod
    def _check_group(group: dict) -> None:
        _number("lr", group["lr"], 0.0)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        _number("betas[0]", betas[0], 0.0, 1.0, high_open=True)
        _number("betas[1]", betas[1], 0.0, 1.0, high_open=True)
        _number("eps", group["eps"], 0.0, low_open=True)
        _number("weight_decay", group["weight_decay"], 0.0)
        _integer("rank", group["rank"], 1)
        _integer("update_proj_gap", group["update_proj_gap"], 1)
        _number("scale", group["scale"], 0.0, low_open=True)
        _choice("proj_type", group["proj_type"], PROJ_TYPES)
        _choice("refresh", group["refresh"], REFRESH_METHODS)
        _choice("state_bits", group["state_bits"], STATE_BITS)
        if group["state_bits"] == 8:
            ops.dynamic_map(True)  # needs bitsandbytes: say so now, not inside a first step (or its capture)

    def add_param_group(self, param_group: dict) -> None:
        # A GaLore-style group (one with "rank") is projected whether it comes through the constructor or here.
        if isinstance(param_group, dict) and "project" not in param_group:
            param_group = {**param_group, "project": "rank" in param_group}
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._check_group(merged)
        # Check every parameter before torch adds the group, so a rejected group changes nothing.
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError("optimizer params must be an ordered collection (a list or tuple), not a set")
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        param_group = {**param_group, "params": params}
        group = merged
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"optimizer params must be tensors, got {type(p).__name__}")
            if p.is_sparse:
                raise ValueError("GradNormLoRPAdamW does not support sparse parameters")
            if group["project"]:
                if p.dim() != 2:
                    raise ValueError(
                        f"projected parameters must be 2-D weight matrices, got one of shape {tuple(p.shape)}; "
                        "put it in a group with project=False"
                    )
                if group["rank"] > min(p.shape):
                    raise ValueError(
                        f"rank={group['rank']} is larger than the {tuple(p.shape)} matrix allows "
                        f"(at most {min(p.shape)})"
                    )
        super().add_param_group(param_group)

    # ---- per-matrix logic, callable one matrix at a time (the in-backward update reuses it) ----

    @staticmethod
    def _sides(group: dict, shape: torch.Size) -> tuple[bool, bool]:
        proj_type = group["proj_type"]
        if proj_type == "std":
            # GaLore's choice: the projector spans the smaller side, so it is the smaller of the two
            # factors kept (it is bf16/fp32; the moments on the larger side are 8-bit).
            return (False, True) if shape[0] >= shape[1] else (True, False)
        return proj_type in ("left", "two_sided"), proj_type in ("right", "two_sided")

    @staticmethod
    def _init_moments(state: dict, shape: tuple, device: torch.device, state_bits: int) -> None:
        numel = math.prod(shape)
        if state_bits == 8 and numel >= MIN_QUANTIZED_NUMEL:
            blocks = -(-numel // ops.BLOCK_SIZE)
            # Codes for zero: the index of 0.0 in each map.
            zero_signed = int(torch.argmin(ops.dynamic_map(True).abs()))
            zero_unsigned = int(torch.argmin(ops.dynamic_map(False).abs()))
            state["exp_avg"] = torch.full(shape, zero_signed, dtype=torch.uint8, device=device)
            state["exp_avg_sq"] = torch.full(shape, zero_unsigned, dtype=torch.uint8, device=device)
            state["absmax_exp_avg"] = torch.zeros(blocks, dtype=torch.float32, device=device)
            state["absmax_exp_avg_sq"] = torch.zeros(blocks, dtype=torch.float32, device=device)
        else:
            state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=device)
            state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=device)

    def _adam(self, state: dict, grad: torch.Tensor, group: dict) -> torch.Tensor:
        quantized = "absmax_exp_avg" in state
        device = grad.device
        beta1, beta2 = group["betas"]
        return ops.adam_update(
            grad,
            state["exp_avg"],
            state["exp_avg_sq"],
            state.get("absmax_exp_avg"),
            state.get("absmax_exp_avg_sq"),
            ops.dynamic_map(True, device) if quantized else None,
            ops.dynamic_map(False, device) if quantized else None,
            state["step"],
            state["skipped"],
            float(beta1),
            float(beta2),
            float(group["eps"]),
        )

    def _refresh(self, p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict, left: bool, right: bool) -> bool:
        """New projectors from this gradient, before the update: a matrix's first (randomized or exact) and
        exact ("svd") refreshes. False (projectors kept) when the gradient is not finite."""
        rank = group["rank"]
        if not bool(torch.isfinite(grad).all()):  # host sync: an SVD, or a first projector
            return False
        for side, wanted in (("left", left), ("right", right)):
            if not wanted:
                continue
            if group["refresh"] == "svd":
                projector = ops.svd_projector(grad, rank, side)
            else:
                run = self._start_sketch(grad, rank, side, self._refresh_seed(state, side), spread=False)
                basis, gram, healthy = run.complete()
                # Written the way later refreshes are (so a GPU captures their graph here, not mid-run).
                projector = torch.full((basis.shape[0], rank), torch.nan, dtype=grad.dtype, device=grad.device)
                self._write_projector(projector, basis, *self._ritz_vectors(gram, healthy), rank)
                if not bool(torch.isfinite(projector).all()):  # a first projector only
                    projector = ops.svd_projector(grad, rank, side)
            # Kept in the gradient's dtype (bf16 for bf16 weights, as GaLore does): half the bytes of
            # float32, and the projection GEMMs run on bf16 tensor cores. Written in place when it can be,
            # so that a captured step graph keeps reading it.
            projector = projector.to(grad.dtype)
            kept = state.get(side)
            if kept is not None and kept.shape == projector.shape and kept.dtype == projector.dtype:
                kept.copy_(projector)
            else:
                state[side] = projector
                self._projectors.clear()  # a graph key names the projectors by address
        state["refreshes"] += 1
        return True

    def _refresh_seed(self, state: dict, side: str) -> int:
        seed = self.seed * 1_000_003 + state["index"] * 10_007 + state["refreshes"] * 2 + (side == "right")
        return seed % (2**63)

    @staticmethod
    def _pending(state: dict) -> bool:
        return "pending_left_basis" in state or "pending_right_basis" in state

    def _begin_refresh(self, grad: torch.Tensor, group: dict, state: dict, left: bool, right: bool) -> None:
        """Phase one of a later randomized refresh, after this step's update: each side's sketch of this
        gradient (`ops.refresh.sketch`), spread over this and the next steps one part a step when the gap is
        at least SPREAD_MIN_GAP, else all run now. A complete sketch is kept in the state
        (`pending_<side>_basis`, `_gram`, `_healthy`; saved with it) and, on a GPU, its eigendecomposition
        started on a worker (`_host_eigh` or `_device_eigh`); `pending_finish_call` is the call that finishes
        it. Launches only: no host synchronisation."""
        spread = group["update_proj_gap"] >= SPREAD_MIN_GAP
        call = state["calls"] - 1  # this step's: the counter has moved on
        sides = [side for side, wanted in (("left", left), ("right", right)) if wanted]
        if spread:
            on_device = any(_device_eigh.takes_size(refresh_ops.sketch_size(
                refresh_ops.oriented(grad, side).shape, group["rank"], OVERSAMPLE), grad.device) for side in sides)
            lag = DEVICE_SOLVE_LAG if on_device else HOST_SOLVE_LAG
            state["pending_finish_call"] = call + refresh_ops.sketch_parts(POWER_ITERS) - 1 + lag
        else:
            state["pending_finish_call"] = call + 1
        runs = [(side, self._start_sketch(grad, group["rank"], side, self._refresh_seed(state, side), spread))
                for side in sides]
        state["refreshes"] += 1
        self._sketching[id(state)] = (state, runs)
        self._advance_sketch(state, everything=not spread)

    def _advance_sketch(self, state: dict, everything: bool = False) -> None:
        """The next part of the matrix's sketch in progress (with `everything`, all that remain); a complete
        sketch goes into the state."""
        _, runs = self._sketching[id(state)]
        for side, run in runs:
            sketched = run.complete() if everything else run.advance()
            if sketched is not None:
                for name, tensor in zip(PENDING, sketched):
                    state[f"pending_{side}_{name}"] = tensor.clone()  # a sketch graph's outputs are reused
                gram, healthy = state[f"pending_{side}_gram"], state[f"pending_{side}_healthy"]
                if _host_eigh.on_host(gram):
                    self._eigh_jobs[id(gram)] = (gram, _host_eigh.start(gram, healthy))
                elif _device_eigh.takes(gram) and not torch.cuda.is_current_stream_capturing():
                    self._eigh_jobs[id(gram)] = (gram, _device_eigh.start(
                        gram, healthy, self._side_stream("solve", gram.device)))
        if not any(run.busy for _, run in runs):
            del self._sketching[id(state)]

    def _finishing(self, state: dict) -> bool:
        """Whether this call (read before its counter moves) finishes the matrix's pending refresh."""
        return self._pending(state) and state.get("pending_finish_call", state["calls"]) <= state["calls"]

    def _take_pending(self, state: dict) -> list[tuple]:
        """The matrix's pending sketches, removed from its state: (side, basis, gram, healthy, the host
        eigendecomposition started for that gram or None) for each side."""
        taken = []
        state.pop("pending_finish_call", None)
        for side in ("left", "right"):
            if f"pending_{side}_basis" in state:
                basis, gram, healthy = (state.pop(f"pending_{side}_{name}") for name in PENDING)
                started = self._eigh_jobs.pop(id(gram), None)
                taken.append((side, basis, gram, healthy, started[1] if started and started[0] is gram else None))
        return taken

    def _finish_pending(self, group: dict, state: dict, taken: list,
                        before_write: torch.cuda.Event | None = None) -> None:
        """Phase two, after its finishing step's update: the projector from the pending sketch (`taken` from
        the state; the k x k eigendecomposition, on a GPU usually solved by a worker since the sketch), written
        in place; a result that is not finite (a non-finite gradient, a broken-down sketch) keeps the old
        projector, decided on the device. `before_write`: an event the current stream waits for before
        overwriting the projector."""
        for side, basis, gram, healthy, job in taken:
            if before_write is not None:
                stream = torch.cuda.current_stream(basis.device)
                for tensor in (basis, gram, healthy):  # a loaded state's were made on another stream
                    tensor.record_stream(stream)
            vectors, healthy = self._ritz_vectors(gram, healthy, job)
            self._write_projector(state[side], basis, vectors, healthy, group["rank"], before_write)

    @staticmethod
    def _ritz_vectors(gram: torch.Tensor, healthy: torch.Tensor, job=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(`ops.refresh.ritz_vectors(gram, healthy)`, healthy and the solve succeeded): from `job` (what
        `_host_eigh.start` or `_device_eigh.start` returned for them) when given, else solved now by the same
        routine that such a job runs (the same bits)."""
        if isinstance(job, _device_eigh.Job):
            return job.collect()
        if job is None and _device_eigh.takes(gram):
            return _device_eigh.solve(gram, healthy)
        return _host_eigh.ritz_vectors(gram, healthy, job), healthy

    def _graphable(self, tensor: torch.Tensor) -> bool:
        return self.cuda_graph and tensor.is_cuda and not torch.compiler.is_compiling() and \
            not torch.cuda.is_current_stream_capturing()

    def _write_projector(self, kept: torch.Tensor, basis: torch.Tensor, vectors: torch.Tensor,
                         healthy: torch.Tensor, rank: int, before_write: torch.cuda.Event | None = None) -> None:
        """`ops.refresh.write_ritz_projector`, the current stream waiting for `before_write` (if given) only
        before it writes `kept`; on a GPU from a graph per shape (same kernels, same bits: three copies, a
        replay and a select instead of a dozen launches)."""
        if not self._graphable(kept):
            refresh_ops.write_ritz_projector(kept, basis, vectors, healthy, rank, before_write)
            return
        key = (tuple(basis.shape), basis.dtype, tuple(vectors.shape), rank, kept.dtype, kept.device)
        graph = self._finish_graphs.get(key)
        if graph is None:
            graph = self._finish_graphs[key] = FinishGraph(
                basis, vectors, healthy, rank, kept.dtype, self._side_stream("finish capture", kept.device))
        graph.run(kept, basis, vectors, healthy, before_write)

    def _start_sketch(self, grad: torch.Tensor, rank: int, side: str, seed: int, spread: bool):
        """A sketch of `grad` with the random inputs of `seed`, begun (no part run yet): on a GPU in a free
        `SketchGraph` of the gradient's shape (same kernels, same bits; a few launches instead of a hundred),
        else a `SketchRun` (which keeps a copy of the gradient when `spread`)."""
        g = refresh_ops.oriented(grad, side)
        k = refresh_ops.sketch_size(g.shape, rank, OVERSAMPLE)
        if not self._graphable(grad):
            return SketchRun(grad, side, k, POWER_ITERS, seed, keep_grad=spread)
        graphs = self._sketch_graphs.setdefault((tuple(grad.shape), grad.dtype, side, k, grad.device), [])
        graph = next((graph for graph in graphs if not graph.busy), None)
        if graph is None:
            # Captured GEMMs keep the capturing stream's cuBLAS workspace: sketch parts (replayed on the sketch
            # stream) and finishes (on the refresh stream) can run at once, so they must not share one.
            graph = SketchGraph(grad, side, k, POWER_ITERS, self._side_stream("sketch capture", grad.device))
            graphs.append(graph)
        graph.begin(grad, seed)
        return graph

    def _advance_projected(self, p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict) -> tuple[bool, bool]:
        """The host-side part of a projected step: counters, and the refreshes that come before the update.
        Returns (update, refresh_after): whether the update goes ahead (not when the matrix has no
        projector yet and this gradient could not give one) and whether a randomized refresh from this
        gradient is due after the update.

        A matrix's first projector and exact ("svd") refreshes come before the update, as in GaLore. A later
        randomized refresh is sketched from this step's gradient after this step's update (spread over three
        steps when the gap is at least SPREAD_MIN_GAP) and finished (its eigendecomposition) one step later
        (HOST_SOLVE_LAG or DEVICE_SOLVE_LAG steps after the last part when spread), taking effect from the step
        after that: on a GPU every phase runs beside a step's update, so that no step waits for a refresh. A
        refresh due while the last is still in flight (a gap changed mid-run) is not begun."""
        calls = state["calls"]
        state["calls"] += 1
        if "left" not in state and "right" not in state:
            if not self._refresh(p, grad, group, state, *self._sides(group, p.shape)):
                state["skipped"].add_(1)
                return False, False
            return True, False
        due = calls > 0 and (calls + state["phase"]) % group["update_proj_gap"] == 0
        if due and group["refresh"] == "svd":
            self._refresh(p, grad, group, state, *self._sides(group, p.shape))
            return True, False
        return True, due and state.get("pending_finish_call", -1) <= calls

    def _lanes(self, device: torch.device, count: int):
        """`count` contexts to launch independent work in: the device's `Lanes` when more than one."""
        if count == 1:
            return contextlib.nullcontext([contextlib.nullcontext()])
        key = ("lanes", device)
        if key not in self._side_streams:
            self._side_streams[key] = Lanes(device)
        return self._side_streams[key].fork(count)

    def _side_stream(self, purpose: str, device: torch.device) -> torch.cuda.Stream:
        """The refresh's stream for `purpose`, at REFRESH_STREAM_PRIORITY (captured graphs keep the priority
        of the stream they were captured on)."""
        key = (purpose, device)
        if key not in self._side_streams:
            self._side_streams[key] = torch.cuda.Stream(device, priority=REFRESH_STREAM_PRIORITY)
        return self._side_streams[key]

    def _sketch_beside(self, advancing: list, beginning: list, group: dict, device: torch.device,
                       grads_ready: torch.cuda.Event) -> torch.cuda.Stream:
        """The next parts of the sketches in progress of `advancing` (states), then the sketches of
        `beginning` (parameters) from their gradients, on a side stream beside the replay; returns that stream,
        which the current stream must wait for."""
        side = self._side_stream("sketch", device)
        side.wait_event(grads_ready)
        with torch.cuda.stream(side):
            for state in advancing:
                self._advance_sketch(state)
            for p in beginning:
                p.grad.record_stream(side)  # the caller may free the gradient while the sketch reads it
                self._begin_refresh(p.grad, group, self.state[p], *self._sides(group, p.shape))
        return side

    def _finish_beside(self, finishing: list, group: dict, device: torch.device,
                       grads_ready: torch.cuda.Event) -> torch.cuda.Stream:
        """The refreshes `finishing` ((state, taken pending sketches) pairs) on a side stream after the replay
        is launched: each projector is computed beside the replay and written once the replay, which reads the
        old projectors, is done. Returns that stream, for the current stream to wait for."""
        replayed = torch.cuda.Event()
        replayed.record(torch.cuda.current_stream(device))
        side = self._side_stream("refresh", device)
        side.wait_event(grads_ready)
        with torch.cuda.stream(side):
            for state, taken in finishing:
                self._finish_pending(group, state, taken, before_write=replayed)
        return side

    def _update_projected(self, p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict, lr) -> None:
        """The device part of a projected step (no host synchronisation: capturable). `lr` is a float or
        a 0-d float32 device tensor; both give the same bits."""
        left, right = self._sides(group, p.shape)
        projected = self._project(grad, state, left, right)
        if "exp_avg" not in state:
            self._init_moments(state, tuple(projected.shape), p.device, group["state_bits"])
        gate = self._gate(projected, group, lr)
        direction = self._adam(state, projected, group)
        ops.project_back_update(
            p, direction, state.get("left") if left else None, state.get("right") if right else None,
            float(group["scale"]), float(group["weight_decay"]), gate, with_norm=False,
        )

    @staticmethod
    def _project(grad: torch.Tensor, state: dict, left: bool, right: bool,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """The projected gradient P^T G, G Q or P^T G Q (into `out` when given)."""
        if grad.is_cuda and (grad.stride(0) * grad.element_size()) % 16:
            # Rows not 16-byte aligned (LLaMA's 5461-wide MLP): cuBLAS falls back to a slow kernel there.
            projected = ops.project_grad(grad, state["left"] if left else None, state["right"] if right else None)
            return projected if out is None else out.copy_(projected)
        if left and right:
            projected = state["left"].T @ grad
            return projected @ state["right"] if out is None else torch.matmul(projected, state["right"], out=out)
        if left:
            return state["left"].T @ grad if out is None else torch.matmul(state["left"].T, grad, out=out)
        if right:
            return grad @ state["right"] if out is None else torch.matmul(grad, state["right"], out=out)
        return grad if out is None else out.copy_(grad)

    def _update_projected_flat(self, params: list, group: dict, flat: FlatMoments, lr: torch.Tensor) -> None:
        """`_update_projected` of every matrix of a group with one Adam launch over `flat`, or one a part of it
        inside a capture (capturable): the projections write into one flat gradient, and a one-sided bf16/fp16
        update gets its direction already multiplied by lr and rounded, as the per-matrix path rounds it; the
        result is bit-identical to `_update_projected` matrix by matrix. Inside a capture each of `flat.parts` runs
        its projections, Adam launch and project-backs on a stream of its own (`Lanes`), so the replay
        overlaps the parts' small kernels; the same kernels on the same data, so the same bits."""
        sides = [self._sides(group, p.shape) for p in params]
        decay = float(group["weight_decay"])
        # Where project_back_update rounds the gated direction to the weight's dtype before its product
        # (triton backend, one-sided, bf16/fp16), the Adam launch does that rounding instead.
        gated = params[0].is_cuda and params[0].dtype in (torch.bfloat16, torch.float16) and \
            all(left != right for left, right in sides) and \
            _dispatch.select("project_back_update", "cuda")[0] == "triton"
        beta1, beta2 = group["betas"]
        codes = (ops.dynamic_map(True, lr.device), ops.dynamic_map(False, lr.device)) if flat.quantized else (None, None)
        scale = lr if gated else torch.ones_like(lr)
        out_dtype = params[0].dtype if gated else torch.float32
        projected = torch.empty(flat.total, dtype=params[0].grad.dtype, device=params[0].device)
        parts = flat.parts if len(flat.parts) > 1 and torch.cuda.is_current_stream_capturing() else [flat.whole]
        with self._lanes(params[0].device, len(parts)) as places:
            for part, place in zip(parts, places):
                first, last, lo, hi = part.first, part.last, part.lo, part.hi
                members = list(zip(params[first:last], flat.spans[first:last], sides[first:last]))
                with place:
                    for p, (start, numel), (left, right) in members:
                        state = self.state[p]
                        self._project(p.grad, state, left, right,
                                      out=projected[start:start + numel].view(state["exp_avg"].shape))
                    skipped = flat.skipped[first:last].clone() if decay else None
                    directions = flat.update(projected[lo:hi], *codes, float(beta1), float(beta2),
                                             float(group["eps"]), scale, out_dtype, part)
                    # With decay a skipped step must not decay the weight. The Adam launch's check has counted
                    # each matrix's non-finite step in `skipped`: the gates of `_gate`, without a reduction each.
                    gates = (flat.skipped[first:last] == skipped).to(torch.float32) * lr if decay else None
                    for index, (p, (start, numel), (left, right)) in enumerate(members):
                        state = self.state[p]
                        gate = gates[index] if decay else self._gate(projected[start:start + numel], group, lr)
                        ops.project_back_update(
                            p, directions[start - lo:start - lo + numel].view(state["exp_avg"].shape),
                            state["left"] if left else None, state["right"] if right else None,
                            float(group["scale"]), decay, gate, with_norm=False, direction_gated=gated,
                        )

    def _update_plain(self, p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict, lr) -> None:
        """A plain AdamW step on the device (capturable), `lr` as in `_update_projected`."""
        if "exp_avg" not in state:
            self._init_moments(state, tuple(p.shape), p.device, group["state_bits"])
        gate = self._gate(grad, group, lr)
        direction = self._adam(state, grad, group)
        if group["weight_decay"]:
            p.mul_((1.0 - group["weight_decay"] * gate).to(p.dtype))
        p.sub_((direction * gate).to(p.dtype))

    @staticmethod
    def _gate(grad: torch.Tensor, group: dict, lr) -> torch.Tensor:
        """The step size as a 0-d float32 device tensor, 0 on a skipped step where that matters: a skipped
        step's Adam direction is zero (adam_update's contract), so only weight decay needs the finiteness."""
        if group["weight_decay"]:
            return torch.isfinite(grad).all().to(torch.float32) * lr
        if isinstance(lr, torch.Tensor):
            return lr
        return torch.full((), lr, dtype=torch.float32, device=grad.device)

    @staticmethod
    def _check_grad(p: torch.Tensor, grad: torch.Tensor) -> None:
        if grad.is_sparse:
            raise ValueError("GradNormLoRPAdamW does not support sparse gradients")
        if grad.shape != p.shape or grad.device != p.device:
            raise ValueError(
                f"gradient of shape {tuple(grad.shape)} on {grad.device} does not match its parameter "
                f"of shape {tuple(p.shape)} on {p.device}"
            )

    def step_parameter(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        """One optimizer step for one parameter with gradient `grad` (the per-matrix entry point)."""
        self._check_grad(p, grad)
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["skipped"] = torch.zeros((), dtype=torch.float32, device=p.device)
            if group["project"]:
                index, count = self._projected_index(p)
                state["index"] = index
                state["phase"] = (index * group["update_proj_gap"]) // max(count, 1)
                state["calls"] = 0
                state["refreshes"] = 0
        if not group["project"]:
            self._update_plain(p, grad, group, state, group["lr"])
            return
        finishing = self._take_pending(state) if self._finishing(state) else None
        update, refresh_after = self._advance_projected(p, grad, group, state)
        if update:
            self._update_projected(p, grad, group, state, group["lr"])
        if finishing:
            self._finish_pending(group, state, finishing)
        if id(state) in self._sketching:
            self._advance_sketch(state)
        if refresh_after:
            self._begin_refresh(grad, group, state, *self._sides(group, p.shape))

    def _projected_index(self, p: torch.Tensor) -> tuple[int, int]:
        projected = [q for g in self.param_groups if g["project"] for q in g["params"]]
        return next(i for i, q in enumerate(projected) if q is p), len(projected)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            params = group["params"]
            grads = list(map(_GRAD, params))
            if not all(map(operator.is_not, grads, itertools.repeat(None))):
                params = [p for p, grad in zip(params, grads) if grad is not None]
                grads = [grad for grad in grads if grad is not None]
            graphed = self._graph_states(index, params, grads)
            if graphed is not None:
                self._step_group_graphed(index, group, params, grads, *graphed)
            else:
                for p, grad in zip(params, grads):
                    self.step_parameter(p, grad, group)
        return loss

    def _graph_states(self, index: int, params: list, grads: list) -> tuple[list[dict], tuple, bool] | None:
        """(the states of the group's matrices, the parameters' addresses, whether the parameters share one
        dtype and the gradients one) when its step can replay a graph: on the GPU, past the first step
        (states exist), every tensor dense and on one device, outside another capture or compilation, and not
        given up on; else None. A gradient that does not match its parameter raises, as on the per-matrix
        path.

        Everything from here up to the replay runs before the step's first kernel, at every step: each kind
        of attribute is read in one C-level `map`, and the parameters' shapes, dtypes and devices are read
        again only when their addresses change."""
        if not (params and self._graphable(params[0])) or (index in self._graphs and self._graphs[index].given_up):
            return None
        addresses = tuple(map(torch.Tensor.data_ptr, params))
        checked = self._checked.get(index)
        if checked is None or checked[0] != addresses:
            layouts = list(map(_SHAPE_DTYPE_DEVICE_LAYOUT, params))
            device = params[0].device
            if sum(layout[2] == device and layout[3] == torch.strided for layout in layouts) != len(params):
                return None
            one_dtype = sum(layout[1] == layouts[0][1] for layout in layouts) == len(params)
            self._checked[index] = checked = (addresses, layouts, one_dtype)
        one_dtype = checked[2]
        if list(map(_SHAPE_DTYPE_DEVICE_LAYOUT, grads)) != checked[1]:
            for p, grad in zip(params, grads):  # in order, as the per-matrix path would meet them
                if grad.is_sparse:
                    return None
                if grad.shape != p.shape or grad.device != p.device:
                    self._check_grad(p, grad)
            one_dtype = one_dtype and len(set(map(_DTYPE, grads))) == 1
        states = list(map(self.state.__getitem__, params))
        if not all(map(operator.contains, states, itertools.repeat("exp_avg"))):
            return None
        return states, addresses, one_dtype

    def _graph_key(self, index: int, group: dict, params: list, grads: list, states: list, addresses: tuple,
                   flat: list | None = None) -> tuple:
        """Everything a captured step depends on besides lr: tensor addresses and layouts, the settings.
        Moments held by flat layouts are named by their serials (they do not move while held), projectors by
        their addresses (`_projector_addresses`); the gradients share one dtype there."""
        key: list = [_dispatch.current_preference(), group["project"], tuple(group["betas"]), group["eps"],
                     group["weight_decay"], group["scale"], group["proj_type"], group["state_bits"]]
        if flat is None:
            for p, grad, state in zip(params, grads, states):
                key.append((p.data_ptr(), grad.data_ptr(), grad.dtype, grad.stride()))
                key.extend((k, t.data_ptr(), t.dtype) for k, t in state.items()
                           if isinstance(t, torch.Tensor) and not k.startswith("pending_"))
            return tuple(key)
        key.append(tuple(layout.serial for _, layout in flat))
        key.append(grads[0].dtype)
        key.append(addresses)
        key.append(tuple(map(torch.Tensor.data_ptr, grads)))
        key.append(tuple(map(torch.Tensor.stride, grads)))
        key.append(self._projector_addresses(index, states))
        return tuple(key)

    def _projector_addresses(self, index: int, states: list) -> tuple:
        """The addresses of the group's projectors, kept while each state still holds the same projector
        tensors (refreshes write them in place; `_refresh` forgets this when it makes a new one)."""
        kept = self._projectors.get(index)
        if kept is not None:
            kept_states, entry_states, entry_keys, entry_tensors, addresses = kept
            if len(kept_states) == len(states) and all(map(operator.is_, states, kept_states)) and \
                    all(map(operator.is_, map(dict.get, entry_states, entry_keys), entry_tensors)):
                return addresses
        entries = [(state, side) for state in states for side in ("left", "right") if side in state]
        entry_states = [state for state, _ in entries]
        entry_keys = [side for _, side in entries]
        entry_tensors = list(map(dict.get, entry_states, entry_keys))
        addresses = tuple(zip(entry_keys, map(torch.Tensor.data_ptr, entry_tensors)))
        self._projectors[index] = (list(states), entry_states, entry_keys, entry_tensors, addresses)
        return addresses

    def _flat_moments(self, index: int, params: list, states: list,
                      one_dtype: bool) -> list[tuple[list, FlatMoments]] | None:
        """The group's matrices by moment kind (8-bit, float32), each kind's moments flat (built, states
        copied in, when the states are not its views); None when they cannot share Adam launches (not
        `one_dtype`: the parameters, or the gradients, are not all of one dtype)."""
        if not one_dtype:
            return None
        layouts = self._flat.get(index, [])
        if len(layouts) == 1 and layouts[0][1].holds(states):  # one kind of moments, as built: the usual case
            return layouts
        kinds: dict[bool, tuple[list, list]] = {}
        for p, state in zip(params, states):
            members, member_states = kinds.setdefault("absmax_exp_avg" in state, ([], []))
            members.append(p)
            member_states.append(state)
        if len(layouts) == len(kinds) and all(
                flat.holds(kinds.get(flat.quantized, ([], []))[1]) for _, flat in layouts):
            return layouts
        layouts = [
            (members, FlatMoments(member_states, [s["exp_avg"].numel() for s in member_states], members[0].device,
                                  _step_graph.LANES if members[0].is_cuda else 1))
            for members, member_states in kinds.values()
        ]
        self._flat[index] = layouts
        return layouts

    def _advance_graphed(self, group: dict, params: list, grads: list, states: list) -> tuple[list, list]:
        """The host-side part of a graphed projected step (`_advance_projected` of every matrix): returns
        the parameters whose refresh begins after the update, and the (state, taken pending sketches) pairs
        of the refreshes this step finishes."""
        refresh_after, finishing = [], []
        for p, grad, state in zip(params, grads, states):  # every matrix has its projector here: none is skipped
            if self._finishing(state):  # taken first: this step may begin the matrix's next refresh
                finishing.append((state, self._take_pending(state)))
            if self._advance_projected(p, grad, group, state)[1]:
                refresh_after.append(p)
        return refresh_after, finishing

    def _step_group_graphed(self, index: int, group: dict, params: list, grads: list, states: list,
                            addresses: tuple, one_dtype: bool) -> None:
        """A group's step as a graph replay. Its host-side bookkeeping (counters, which refreshes are due)
        runs after the replay is launched, so that the GPU is not kept waiting for it, except where an exact
        ("svd") refresh may write projectors before the update."""
        refresh_after, finishing = [], []
        flat = None
        if group["project"]:
            exact = group["refresh"] == "svd"
            if exact:
                refresh_after, finishing = self._advance_graphed(group, params, grads, states)
            flat = self._flat_moments(index, params, states, one_dtype)

            def update_all(lr):
                if flat is not None:
                    for members, layout in flat:
                        self._update_projected_flat(members, group, layout, lr)
                else:
                    for p in params:
                        self._update_projected(p, p.grad, group, self.state[p], lr)
        else:
            def update_all(lr):
                for p in params:
                    self._update_plain(p, p.grad, group, self.state[p], lr)
        device = params[0].device
        main = torch.cuda.current_stream(device)
        grads_ready = torch.cuda.Event()
        grads_ready.record(main)
        graphs = self._graphs.get(index) or self._graphs.setdefault(index, GroupGraphs())
        try:
            key = self._graph_key(index, group, params, grads, states, addresses, flat)
            graphs.run(key, update_all, device, group["lr"])
        except RuntimeError as exc:  # capture is an optimisation (and runs nothing): launch one by one instead
            logger.warning("GradNormLoRPAdamW: CUDA graph capture failed (%s); stepping without graphs", exc)
            graphs.give_up()
            update = self._update_projected if group["project"] else self._update_plain
            for p in params:
                update(p, p.grad, group, self.state[p], group["lr"])
        if group["project"] and not exact:
            refresh_after, finishing = self._advance_graphed(group, params, grads, states)
        beside = []
        advancing = [state for state in states if id(state) in self._sketching] if self._sketching else []
        if advancing or refresh_after:
            beside.append(self._sketch_beside(advancing, refresh_after, group, device, grads_ready))
        if finishing:
            beside.append(self._finish_beside(finishing, group, device, grads_ready))
        for side in beside:
            main.wait_stream(side)

    def skipped_steps(self) -> int:
        """How many parameter steps were skipped for non-finite gradients (synchronises with the GPU)."""
        return int(sum(float(s["skipped"]) for s in self.state.values() if "skipped" in s))

    def state_bytes(self) -> int:
        """Bytes held by optimizer state tensors (moments, absmax, projectors, counters)."""
        return sum(
            t.numel() * t.element_size() for s in self.state.values() for t in s.values() if isinstance(t, torch.Tensor)
        )

    def state_dict(self) -> dict:
        """As torch's, with every sketch in progress completed first (its remaining parts run now, with the
        bits they would have had at the later steps), so that the saved state holds all refreshes in flight."""
        for state, _ in list(self._sketching.values()):
            self._advance_sketch(state, everything=True)
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but every state tensor keeps its saved dtype (torch would cast float32 states,
        projectors included, to a bf16 parameter's dtype and break bit-exact resumption)."""
        saved_groups = state_dict["param_groups"]
        super().load_state_dict(state_dict)
        self._graphs.clear()  # the states are new tensors: graphs are captured anew on them
        self._eigh_jobs.clear()
        for _, runs in self._sketching.values():  # the loaded states replace these refreshes
            for _, run in runs:
                run.cancel()
        self._sketching.clear()
        self._flat.clear()
        self._projectors.clear()
        self._checked.clear()
        ids = [i for g in saved_groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            for key, value in saved.items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)
