"""`GradNormLoRPLinear`: a weight-normalised linear layer, as a low-rank adapter or in full."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import ops
from .functions import AdapterLinearFunction, FullLinearFunction
from .ops._common import accumulation_dtype

MODES = ("adapter", "full")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def check_rank(rank, in_features: int, out_features: int) -> int:
    limit = min(in_features, out_features)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(
            f"rank must be an integer in [1, {limit}] (min of in_features={in_features} and "
            f"out_features={out_features}), got {rank!r}"
        )
    return rank


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. "meta")
        return False


class GradNormLoRPLinear(nn.Module):
    """`y = x W^T + b` with `W = diag(M / ||W'||_row) W'`.

    mode="adapter": `W' = W0 + (alpha / rank) B A` with W0 (and the bias) frozen; trains `lora_A`,
    `lora_B` and `magnitude`. Starts equal to W0. mode="full": `W' = V` (`direction`), trains
    `direction`, `magnitude` and the bias. `detach_norm=True` treats the norm as a constant in the
    backward (DoRA's default); the default differentiates it exactly.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 8,
        alpha: float = 16,
        mode: str = "adapter",
        bias: bool = True,
        detach_norm: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self._configure(in_features, out_features, rank, alpha, mode, detach_norm)
        factory = {"device": device, "dtype": dtype}
        weight = torch.empty(out_features, in_features, **factory)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        bias_value = None
        if bias:
            bound = 1.0 / math.sqrt(in_features)
            bias_value = torch.empty(out_features, **factory).uniform_(-bound, bound)
        self._build(weight, bias_value)

    def _configure(self, in_features, out_features, rank, alpha, mode, detach_norm) -> None:
        self.mode = check_mode(mode)
        self.in_features = in_features
        self.out_features = out_features
        self.rank = check_rank(rank, in_features, out_features)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        self.alpha = float(alpha)
        self.detach_norm = bool(detach_norm)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def _build(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Parameters from a dense weight, so that `effective_weight()` equals `weight`."""
        adapter = self.mode == "adapter"
        if adapter:
            self.base_weight = nn.Parameter(weight, requires_grad=False)
            self.direction = None
            self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, device=weight.device, dtype=weight.dtype))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, device=weight.device, dtype=weight.dtype))
        else:
            self.base_weight = None
            self.lora_A = None
            self.lora_B = None
            self.direction = nn.Parameter(weight)
        # M from the very op the forward divides by, so that M / n == 1 exactly at init (W == W0, same outputs).
        if adapter:
            ones = torch.ones(self.out_features, device=weight.device, dtype=weight.dtype)
            _, norm, _ = ops.adapter_weight(weight.detach(), self.lora_A.detach(), self.lora_B.detach(), ones,
                                            self.scaling)
        else:
            norm = ops.row_norm(weight.detach())
        self.magnitude = nn.Parameter(norm.to(weight.dtype))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=not adapter)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, rank: int = 8, alpha: float = 16, mode: str = "adapter", detach_norm: bool = False
    ) -> "GradNormLoRPLinear":
        """A layer whose `effective_weight()` equals `linear.weight` (and bias); `linear` is left unchanged."""
        return cls._from_linear(linear, rank, alpha, mode, detach_norm, share=False)

    @classmethod
    def _from_linear(cls, linear, rank, alpha, mode, detach_norm, share: bool) -> "GradNormLoRPLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._configure(linear.in_features, linear.out_features, rank, alpha, mode, detach_norm)
        # Frozen or replaced-in-place weights can share storage; a trained copy must not alias the user's.
        weight = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach()
        if not share:
            weight = weight.clone()
            bias = None if bias is None else bias.clone()
        layer._build(weight, bias)
        return layer

    def _check_input(self, x: torch.Tensor, autocast: bool = False) -> None:
        weight = self.base_weight if self.mode == "adapter" else self.direction
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dimension must be in_features={self.in_features}, got shape {tuple(x.shape)}")
        if autocast and not x.is_floating_point():
            raise TypeError(f"input dtype {x.dtype} does not match the layer's dtype {weight.dtype}; cast one of them")
        if not autocast and x.dtype != weight.dtype:
            raise TypeError(f"input dtype {x.dtype} does not match the layer's dtype {weight.dtype}; cast one of them")
        if x.device != weight.device:
            raise RuntimeError(f"input is on {x.device} but the layer's weights are on {weight.device}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under torch.autocast (mixed precision with float32 parameters) compute in the autocast dtype, as
        # nn.Linear does: inputs and parameters are cast, gradients flow back to the parameters' dtype.
        autocast_dtype = None
        if isinstance(x, torch.Tensor) and _autocast_enabled(x.device.type):
            autocast_dtype = torch.get_autocast_dtype(x.device.type)
        self._check_input(x, autocast=autocast_dtype is not None)
        flat = x.reshape(-1, self.in_features)
        if autocast_dtype is None:
            out = self._apply_function(flat, lambda t: t)
        else:
            with torch.autocast(x.device.type, enabled=False):
                out = self._apply_function(
                    flat.to(autocast_dtype), lambda t: None if t is None else t.to(autocast_dtype)
                )
        return out.reshape(*x.shape[:-1], self.out_features)

    def _apply_function(self, flat: torch.Tensor, cast) -> torch.Tensor:
        if self.mode == "adapter":
            return AdapterLinearFunction.apply(
                flat, cast(self.base_weight), cast(self.bias), cast(self.lora_A), cast(self.lora_B),
                cast(self.magnitude), self.scaling, self.detach_norm,
            )
        return FullLinearFunction.apply(
            flat, cast(self.direction), cast(self.bias), cast(self.magnitude), self.detach_norm
        )

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The dense `W = diag(M / ||W'||_row) W'`, in the layer's dtype."""
        if self.mode == "adapter":
            # The very weight the forward multiplies by (so a merged layer gives the same outputs).
            return ops.adapter_weight(self.base_weight, self.lora_A, self.lora_B, self.magnitude, self.scaling)[0]
        dense = self.direction.to(accumulation_dtype(self.direction.dtype))
        scale = self.magnitude.to(dense.dtype) / ops.row_norm(self.direction).to(dense.dtype)
        return (dense * scale[:, None]).to(self.direction.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain `nn.Linear` computing the same function (no extra inference latency)."""
        weight = self.effective_weight()
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=weight.device, dtype=weight.dtype
        )
        linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode!r}, "
            f"rank={self.rank}, alpha={self.alpha:g}, bias={self.bias is not None}, detach_norm={self.detach_norm}"
        )
