"""The Adam states of a group's projected matrices laid end to end, so one `segmented_adam_update` steps
them all.

Each matrix keeps its own state entries (`exp_avg`, `exp_avg_sq`, the absmax, `step`, `skipped`), as views
into flat buffers, so the per-matrix code paths, `state_dict()` and every test see the same tensors as
before. A layout is rebuilt (states copied in) whenever an entry is no longer its view, after
`load_state_dict` say.
"""

from __future__ import annotations

import itertools
import operator
from typing import NamedTuple

import torch

from . import ops
from .ops.quant8 import BLOCK_SIZE


class FlatPart(NamedTuple):
    """Matrices `first` to `last` (exclusive) of a layout: flat elements `lo` to `hi`, and their segments'
    starts (relative to `lo`) and sizes on the device."""

    first: int
    last: int
    lo: int
    hi: int
    starts: torch.Tensor
    numels: torch.Tensor


class FlatMoments:
    """Flat moments of `states` (all 8-bit or all float32, on one device), in order; `numels` are the
    moments' sizes. `parts`: into how many runs of consecutive matrices, about equal in elements, `parts`
    cuts them (a step can then update each run on its own stream)."""

    _serials = itertools.count()

    def __init__(self, states: list[dict], numels: list[int], device: torch.device, parts: int = 1) -> None:
        self.serial = next(self._serials)  # names this layout in a graph key (an id() could be reused)
        self.quantized = "absmax_exp_avg" in states[0]
        self.starts, self.numels, total = ops.segment_layout(numels, device)
        self.total = total
        starts = self.starts.tolist()
        moments_dtype = states[0]["exp_avg"].dtype
        self.spans = [(start, numel) for start, numel in zip(starts, numels)]
        self.exp_avg = torch.empty(total, dtype=moments_dtype, device=device)
        self.exp_avg_sq = torch.empty(total, dtype=moments_dtype, device=device)
        blocks = total // BLOCK_SIZE
        self.absmax_exp_avg = torch.zeros(blocks, dtype=torch.float32, device=device) if self.quantized else None
        self.absmax_exp_avg_sq = torch.zeros(blocks, dtype=torch.float32, device=device) if self.quantized else None
        self.step = torch.empty(len(states), dtype=torch.float32, device=device)
        self.skipped = torch.empty(len(states), dtype=torch.float32, device=device)
        # What `holds` compares, flat: each entry's state dict, key and view.
        self._states: list[dict] = list(states)
        self._entry_states: list[dict] = []
        self._entry_keys: list[str] = []
        self._entry_views: list[torch.Tensor] = []
        for index, (state, (start, numel)) in enumerate(zip(states, self.spans)):
            block = start // BLOCK_SIZE
            views = {
                "exp_avg": self.exp_avg[start:start + numel],
                "exp_avg_sq": self.exp_avg_sq[start:start + numel],
                "step": self.step[index],
                "skipped": self.skipped[index],
            }
            if self.quantized:
                blocks_of = state["absmax_exp_avg"].numel()
                views["absmax_exp_avg"] = self.absmax_exp_avg[block:block + blocks_of]
                views["absmax_exp_avg_sq"] = self.absmax_exp_avg_sq[block:block + blocks_of]
            for key, view in views.items():
                view.copy_(state[key].reshape(view.shape))
                state[key] = view.view(state[key].shape)
                self._entry_states.append(state)
                self._entry_keys.append(key)
                self._entry_views.append(state[key])
        self.whole = FlatPart(0, len(states), 0, total, self.starts, self.numels)
        self.parts = self._cut(numels, parts)

    def _cut(self, numels: list[int], count: int) -> list[FlatPart]:
        prefix = list(itertools.accumulate(numels, initial=0))
        cuts = [0]
        for run in range(1, count):
            # Each run ends where the running total is nearest its share, every run keeping one matrix.
            if cuts[-1] + 1 >= len(numels):
                break
            share = run * prefix[-1] / count
            cuts.append(min(range(cuts[-1] + 1, len(numels)), key=lambda end: abs(prefix[end] - share)))
        cuts = sorted(set(cuts)) + [len(numels)]
        if len(cuts) == 2:
            return [self.whole]
        parts = []
        for first, last in zip(cuts, cuts[1:]):
            lo = self.spans[first][0]
            hi = self.spans[last][0] if last < len(self.spans) else self.total
            starts, part_numels, _ = ops.segment_layout(numels[first:last], self.starts.device)
            parts.append(FlatPart(first, last, lo, hi, starts, part_numels))
        return parts

    def holds(self, states: list[dict]) -> bool:
        """Whether `states` are this layout's, in order, and every entry is still its view (identity: exact,
        and cheap: the optimizer asks at every step, before the step's launch)."""
        return (len(states) == len(self._states) and all(map(operator.is_, states, self._states))
                and all(map(operator.is_, map(dict.get, self._entry_states, self._entry_keys), self._entry_views)))

    def update(self, grad: torch.Tensor, code_signed, code_unsigned, beta1: float, beta2: float, eps: float,
               scale: torch.Tensor, out_dtype: torch.dtype, part: FlatPart | None = None) -> torch.Tensor:
        """`segmented_adam_update` of the flat gradient `grad` on `part` of these moments (default: `whole`;
        `grad` holds that part's elements, laid out as `spans` from `part.lo`). The same bits part by part
        as at once, since each segment is updated on its own."""
        part = self.whole if part is None else part
        blocks = slice(part.lo // BLOCK_SIZE, part.hi // BLOCK_SIZE)
        return ops.segmented_adam_update(
            grad, self.exp_avg[part.lo:part.hi], self.exp_avg_sq[part.lo:part.hi],
            self.absmax_exp_avg[blocks] if self.quantized else None,
            self.absmax_exp_avg_sq[blocks] if self.quantized else None, code_signed, code_unsigned, part.starts,
            part.numels, self.step[part.first:part.last], self.skipped[part.first:part.last], beta1, beta2, eps,
            scale, out_dtype,
        )
