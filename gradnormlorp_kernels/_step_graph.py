"""CUDA-graph replay of one parameter group's optimizer step.

On a GPU the step of many matrices is bound by kernel launches (about a dozen per matrix, each costing
tens of microseconds of host time), not by the GPU. The device work of a group's step (projection, Adam,
project-back) is the same sequence of kernels every step on tensors that stay where they are, so it is
captured once and replayed. The learning rate is a device scalar written before each replay, so a
schedule needs no recapture. A graph is valid for one key: the addresses of every tensor it reads
(parameters, gradients, states) and the group's other settings. A few graphs are kept per group, since
gradients freed and allocated anew each step often alternate between a few addresses; a group whose key
keeps changing goes back to launching kernels one by one.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Hashable, Iterator

import torch

from .ops import refresh

GRAPHS_KEPT = 4
# Streams a captured step spreads its matrices over (runs of consecutive ones: `FlatMoments.parts`, `Lanes`).
LANES = 4
# Captures after which a group that reused too few of them gives up on graphs.
CAPTURES_BEFORE_GIVING_UP = 8


def capture(fn: Callable[[], object], device: torch.device, stream: torch.cuda.Stream, pool=None,
            generators: tuple = ()):
    """`(graph, fn())`: a CUDA graph of `fn` (which it does not run), captured on the side `stream` ordered
    after the current one and before what follows it, without `torch.cuda.graph`'s device synchronisation,
    gc.collect() and empty_cache(): they cost tens of milliseconds in a large process, and the capture
    records kernels on its own stream only. `generators`: the ones `fn` draws from (each replay reads their
    seed and offset as they stand then)."""
    graph = torch.cuda.CUDAGraph()
    for generator in generators:
        graph.register_generator_state(generator)
    current = torch.cuda.current_stream(device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        # thread_local: the eigendecomposition worker (`_device_eigh`) may synchronise meanwhile.
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            outputs = fn()
        finally:
            graph.capture_end()
    current.wait_stream(stream)
    return graph, outputs


class Lanes:
    """Side streams for independent parts of a capture, so that a replay runs them at once: the step's
    projections and project-backs are small GEMMs that alone leave most of the GPU idle while they ramp up
    and drain, and its Adam launches are bound by arithmetic, not bytes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.streams: list[torch.cuda.Stream] = []

    @contextlib.contextmanager
    def fork(self, count: int) -> Iterator[list]:
        """Yields `count` stream contexts, each ordered after the current stream, which is ordered after them
        all on exit."""
        while len(self.streams) < count:
            self.streams.append(torch.cuda.Stream(self.device))
        current = torch.cuda.current_stream(self.device)
        streams = self.streams[:count]
        for stream in streams:
            stream.wait_stream(current)
        try:
            yield [torch.cuda.stream(stream) for stream in streams]
        finally:
            for stream in streams:
                current.wait_stream(stream)


class StepGraph:
    """`run(lr)` captured once, with `lr` a device scalar; `replay(lr)` runs it for a new lr."""

    def __init__(self, run: Callable[[torch.Tensor], None], device: torch.device, stream: torch.cuda.Stream,
                 pool=None) -> None:
        self.lr = torch.zeros((), dtype=torch.float32, device=device)
        self.last_lr = None
        self.graph, _ = capture(lambda: run(self.lr), device, stream, pool)

    def replay(self, lr: float) -> None:
        # Stream-ordered after the previous replay: a host-side (pinned) scalar could be overwritten
        # before a queued replay read it. Skipped when lr has not changed (a launch saved per step).
        if lr != self.last_lr:
            self.lr.fill_(lr)
            self.last_lr = lr
        self.graph.replay()


class GroupGraphs:
    """The captured steps of one parameter group, by key; their temporaries share one memory pool (the
    graphs run one at a time, in stream order)."""

    def __init__(self) -> None:
        self.graphs: dict[Hashable, StepGraph] = {}
        self.pool = None
        self.stream: torch.cuda.Stream | None = None
        self.captures = 0
        self.reuses = 0
        self.disabled = False

    @property
    def given_up(self) -> bool:
        return self.disabled or (self.captures >= CAPTURES_BEFORE_GIVING_UP and self.reuses < self.captures)

    def give_up(self) -> None:
        self.disabled = True
        self.graphs.clear()

    def run(self, key: Hashable, step: Callable[[torch.Tensor], None], device: torch.device, lr: float) -> None:
        """Replay the graph for `key`, capturing it first if there is none (capture runs nothing)."""
        graph = self.graphs.get(key)
        if graph is None:
            self.captures += 1
            if self.stream is None:
                self.stream = torch.cuda.Stream(device)
            graph = StepGraph(step, device, self.stream, self.pool)
            self.pool = graph.graph.pool()
            self.graphs[key] = graph
            if len(self.graphs) > GRAPHS_KEPT:
                self.graphs.pop(next(iter(self.graphs)))
        else:
            self.reuses += 1
        graph.replay(lr)


class _PartedSketch:
    """A randomized refresh's sketch (`ops.refresh.sketch_part` after part): `advance()` launches the next
    part (subclasses), `busy` until the last has run."""

    part: int
    parts: int

    def advance(self) -> tuple | None:
        raise NotImplementedError

    @property
    def busy(self) -> bool:
        return self.part < self.parts

    def cancel(self) -> None:
        self.part = self.parts

    def complete(self) -> tuple:
        """Every part that remains; the sketch's (basis, gram, healthy)."""
        while (sketched := self.advance()) is None:
            pass
        return sketched


class SketchRun(_PartedSketch):
    """A sketch run part by part without graphs (off the GPU, or with `cuda_graph=False`). `keep_grad`: the
    gradient is copied, for parts that run at later steps (after the caller may have changed it)."""

    def __init__(self, grad: torch.Tensor, side: str, k: int, power_iters: int, seed: int, keep_grad: bool) -> None:
        self.grad = grad.clone(memory_format=torch.contiguous_format) if keep_grad else grad
        self.g = refresh.oriented(self.grad, side)
        self.inputs = refresh.sketch_inputs(self.g, k, seed)
        self.power_iters = power_iters
        self.parts = refresh.sketch_parts(power_iters)
        self.part = 0
        self.carry: tuple | None = None

    def advance(self) -> tuple | None:
        """The next part; after the last, the sketch's (basis, gram, healthy), else None."""
        self.carry = refresh.sketch_part(self.part, self.g, *self.inputs, self.power_iters, self.carry)
        self.part += 1
        return self.carry if self.part == self.parts else None


class SketchGraph(_PartedSketch):
    """`SketchRun` for one gradient shape, dtype and side, each part captured once and replayed: the random
    draws, products, Newton-Schulz steps and the last Cholesky-QR, about a hundred small launches; the k x k
    eigendecomposition, which checks its result on the host, stays outside. The gradient is copied into a
    static buffer (a gradient-sized copy per shape: cheaper than a graph per gradient address), the parts
    pass their carry through static buffers, and the draws come from a generator registered with the first
    part's graph and reseeded before each replay: the same draws as `sketch_inputs` of that seed. One sketch
    at a time: `busy` from `begin` to its last part."""

    def __init__(self, grad: torch.Tensor, side: str, k: int, power_iters: int, stream: torch.cuda.Stream) -> None:
        self.side, self.k, self.power_iters = side, k, power_iters
        self.grad = torch.empty_like(grad, memory_format=torch.contiguous_format)
        g = refresh.oriented(self.grad, side)
        m, n = g.shape
        self.inputs = (torch.empty(n, k, dtype=g.dtype, device=g.device),
                       torch.empty(m, k, dtype=torch.float64, device=g.device))
        self.carry: tuple | None = None  # made like the first carry (its layout: the next part's GEMM reads it)
        self.generator = torch.Generator(device=g.device)
        self.parts = refresh.sketch_parts(power_iters)
        self.graphs: list[torch.cuda.CUDAGraph | None] = [None] * self.parts
        self.stream = stream
        self.outputs: tuple | None = None
        self.part = self.parts

    def begin(self, grad: torch.Tensor, seed: int) -> None:
        """Start a sketch of `grad` with the random inputs of `seed` (copies the gradient; runs no part)."""
        self.grad.copy_(grad)
        self.generator.manual_seed(seed)
        self.part = 0

    def _part(self, part: int) -> tuple:
        g = refresh.oriented(self.grad, self.side)
        if part == 0:
            refresh.draw_sketch_inputs(g, self.k, self.generator, out=self.inputs)
        result = refresh.sketch_part(part, g, *self.inputs, self.power_iters, None if part == 0 else self.carry)
        if part + 1 < self.parts:
            if self.carry is None:
                self.carry = tuple(torch.empty_like(value) for value in result)
            for buffer, value in zip(self.carry, result):
                buffer.copy_(value)
        return result

    def advance(self) -> tuple | None:
        """The next part; after the last, (basis, gram, healthy), valid until this graph's next sketch ends;
        else None. A part's first run is eager (which also initialises the solver libraries, something a
        capture may not do), then captured for the sketches after it."""
        part = self.part
        self.part += 1
        last = self.part == self.parts
        if self.graphs[part] is not None:
            self.graphs[part].replay()
            return self.outputs if last else None
        eager = self._part(part)
        self.graphs[part], captured = capture(lambda: self._part(part), self.grad.device, self.stream,
                                              generators=(self.generator,) if part == 0 else ())
        if last:
            self.outputs = captured
        return eager if last else None


class FinishGraph:
    """The end of a randomized refresh after its eigendecomposition (`ops.refresh.write_ritz_projector`:
    the projector from the Ritz vectors, written in place unless it is not finite; a dozen small launches)
    for one shape of sketch and projector: the candidate projector and its finiteness captured once and
    replayed from static inputs, then one in-place select into the kept projector. The Ritz vectors may come
    from the host (pinned memory): copied in without blocking."""

    def __init__(self, basis: torch.Tensor, vectors: torch.Tensor, healthy: torch.Tensor, rank: int,
                 dtype: torch.dtype, stream: torch.cuda.Stream) -> None:
        self.inputs = tuple(torch.empty_like(t, device=basis.device) for t in (basis, vectors, healthy))
        self.rank, self.dtype = rank, dtype
        self.stream = stream
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple | None = None

    def run(self, kept: torch.Tensor, basis: torch.Tensor, vectors: torch.Tensor, healthy: torch.Tensor,
            before_write: torch.cuda.Event | None = None) -> None:
        """Write the projector into `kept`, the current stream waiting for `before_write` (if given) first.
        The first call runs eagerly (as SketchGraph's), then captures."""
        for buffer, value in zip(self.inputs, (basis, vectors, healthy)):
            buffer.copy_(value, non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
            projector, finite = self.outputs
        else:
            projector, finite = refresh.ritz_candidate(*self.inputs, self.rank, self.dtype)
            self.graph, self.outputs = capture(lambda: refresh.ritz_candidate(*self.inputs, self.rank, self.dtype),
                                               kept.device, self.stream)
        if before_write is not None:
            torch.cuda.current_stream(kept.device).wait_event(before_write)
        torch.where(finite, projector, kept, out=kept)
