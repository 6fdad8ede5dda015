"""`GradNormLoRPAdamW`: AdamW with low-rank projected gradients and 8-bit block-wise moments."""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable

import torch
from torch import nn

from . import ops
from .layer import GradNormLoRPLinear

logger = logging.getLogger(__name__)

PROJ_TYPES = ("std", "left", "right", "two_sided")
REFRESH_METHODS = ("randomized", "svd")
STATE_BITS = (8, 32)
# Moments of tensors smaller than this stay float32: quantising them saves nothing worth the error.
MIN_QUANTIZED_NUMEL = 4096
# Randomized refresh: extra sketch columns and power iterations (accuracy of the captured subspace).
OVERSAMPLE = 8
POWER_ITERS = 2


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
    "svd" (exact). Refreshes every `update_proj_gap` steps, staggered across matrices. Moments are
    8-bit block-wise (`state_bits=8`, tensors under 4096 elements stay float32) or float32.
    A matrix whose gradient has a non-finite element skips its step (states and weight untouched);
    `skipped_steps()` counts them.
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
        """New projectors from this gradient; False (projectors kept) when the gradient is not finite."""
        if not bool(torch.isfinite(grad).all()):  # refresh-time sync only
            return False
        rank = group["rank"]
        for side, wanted in (("left", left), ("right", right)):
            if not wanted:
                continue
            if group["refresh"] == "svd":
                projector = ops.svd_projector(grad, rank, side)
            else:
                seed = (self.seed * 1_000_003 + state["index"] * 10_007 + state["refreshes"] * 2 + (side == "right"))
                projector = ops.randomized_projector(grad, rank, side, OVERSAMPLE, POWER_ITERS, seed % (2**63))
            # Kept in the gradient's dtype (bf16 for bf16 weights, as GaLore does): half the bytes of
            # float32, and the projection GEMMs run on bf16 tensor cores.
            state[side] = projector.to(grad.dtype)
        state["refreshes"] += 1
        return True

    def _step_projected(self, p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict) -> None:
        left, right = self._sides(group, p.shape)
        gap = group["update_proj_gap"]
        has_projector = "left" in state or "right" in state
        if not has_projector or (state["calls"] + state["phase"]) % gap == 0 and state["calls"] > 0:
            refreshed = self._refresh(p, grad, group, state, left, right)
            if not refreshed and not has_projector:
                state["skipped"].add_(1)
                state["calls"] += 1
                return
        state["calls"] += 1
        projected = grad
        if left:
            projected = state["left"].T @ projected
        if right:
            projected = projected @ state["right"]
        projected = projected.to(torch.float32)
        if "exp_avg" not in state:
            self._init_moments(state, tuple(projected.shape), p.device, group["state_bits"])
        gate = torch.isfinite(projected).all().to(torch.float32)
        direction = self._adam(state, projected, group)
        lr = group["lr"]
        ops.project_back_update(
            p, direction, state.get("left") if left else None, state.get("right") if right else None,
            float(lr * group["scale"]), float(lr * group["weight_decay"]), gate,
        )

    def _step_plain(self, p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict) -> None:
        if "exp_avg" not in state:
            self._init_moments(state, tuple(p.shape), p.device, group["state_bits"])
        gate = torch.isfinite(grad).all().to(torch.float32)
        direction = self._adam(state, grad, group)
        lr = group["lr"]
        if group["weight_decay"]:
            p.mul_(1.0 - (lr * group["weight_decay"]) * gate.to(p.dtype))
        p.add_(direction.to(p.dtype), alpha=-lr)

    def step_parameter(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        """One optimizer step for one parameter with gradient `grad` (the per-matrix entry point)."""
        if grad.is_sparse:
            raise ValueError("GradNormLoRPAdamW does not support sparse gradients")
        if grad.shape != p.shape or grad.device != p.device:
            raise ValueError(
                f"gradient of shape {tuple(grad.shape)} on {grad.device} does not match its parameter "
                f"of shape {tuple(p.shape)} on {p.device}"
            )
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
        if group["project"]:
            self._step_projected(p, grad, group, state)
        else:
            self._step_plain(p, grad, group, state)

    def _projected_index(self, p: torch.Tensor) -> tuple[int, int]:
        projected = [q for g in self.param_groups if g["project"] for q in g["params"]]
        return next(i for i, q in enumerate(projected) if q is p), len(projected)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.step_parameter(p, p.grad, group)
        return loss

    def skipped_steps(self) -> int:
        """How many parameter steps were skipped for non-finite gradients (synchronises with the GPU)."""
        return int(sum(float(s["skipped"]) for s in self.state.values() if "skipped" in s))

    def state_bytes(self) -> int:
        """Bytes held by optimizer state tensors (moments, absmax, projectors, counters)."""
        return sum(
            t.numel() * t.element_size() for s in self.state.values() for t in s.values() if isinstance(t, torch.Tensor)
        )

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but every state tensor keeps its saved dtype (torch would cast float32 states,
        projectors included, to a bf16 parameter's dtype and break bit-exact resumption)."""
        saved_groups = state_dict["param_groups"]
        super().load_state_dict(state_dict)
        ids = [i for g in saved_groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            for key, value in saved.items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)
