"""Swap a model's `nn.Linear` layers for `GradNormLoRPLinear` in place, and merge them back."""

from __future__ import annotations

import re
from typing import Iterable, Union

from torch import nn

from .layer import GradNormLoRPLinear, check_mode

# Output heads are left alone under "all-linear" (as peft does): they are usually tied or task-specific.
_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "out_proj_head")

TargetModules = Union[str, Iterable[str]]


def _is_head(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return last in _HEAD_NAMES or name.startswith(tuple(h + "." for h in _HEAD_NAMES)) or ".classifier." in f".{name}."


def _selector(target_modules: TargetModules):
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return lambda name: not _is_head(name)
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise ValueError(
                f"target_modules must be 'all-linear', a list of module names or a valid regex; {target_modules!r}: {exc}"
            ) from exc
        return lambda name: pattern.fullmatch(name) is not None
    names = list(target_modules)
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"target_modules must be 'all-linear', a regex or a non-empty list of names, got {target_modules!r}")
    # A name matches a module whose full name equals it or ends with ".<name>" (e.g. "q_proj").
    return lambda name: any(name == n or name.endswith("." + n) for n in names)


def wrap(
    model: nn.Module,
    target_modules: TargetModules = "all-linear",
    rank: int = 8,
    alpha: float = 16,
    mode: str = "adapter",
    detach_norm: bool = False,
) -> nn.Module:
    """Replace the selected `nn.Linear` modules of `model` in place; returns `model`.

    mode="adapter" freezes every parameter of the model except the adapters' `lora_A`, `lora_B` and
    `magnitude` (LoRA-style fine-tuning); mode="full" trains everything, the wrapped layers through
    their direction and magnitude. Raises if nothing matched, so a typo cannot train nothing.
    """
    check_mode(mode)
    if isinstance(model, nn.Linear):
        raise TypeError("wrap(model) replaces the linear layers inside a model; for a single nn.Linear use "
                        "GradNormLoRPLinear.from_linear(linear, ...)")
    selected = _selector(target_modules)
    # A module reachable under several names (shared between two places) gets one replacement, set at every name.
    names_of: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name and isinstance(module, nn.Linear) and not isinstance(module, GradNormLoRPLinear):
            names_of.setdefault(id(module), []).append(name)
            modules[id(module)] = module
    targets = [
        (names, modules[key]) for key, names in names_of.items() if any(selected(name) for name in names)
    ]
    if not targets:
        linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"target_modules={target_modules!r} matched no nn.Linear in the model; its linear layers are "
            f"{linear_names[:20]}{' ...' if len(linear_names) > 20 else ''}"
        )
    if mode == "full":
        # A weight tied to another module (e.g. lm_head and the embeddings) cannot become a trained
        # direction: the two would update one storage through two parameters.
        param_names: dict[int, list[str]] = {}
        for pname, parameter in model.named_parameters(remove_duplicate=False):
            param_names.setdefault(id(parameter), []).append(pname)
        for names, module in targets:
            own = {f"{name}.weight" for name in names}
            others = [n for n in param_names.get(id(module.weight), []) if n not in own]
            if others:
                raise ValueError(
                    f"cannot wrap {names[0]!r} in mode='full': its weight is tied to {others[0]!r}; "
                    "untie it, leave it out of target_modules, or use mode='adapter'"
                )
    replacements = []
    for names, module in targets:  # all built before the model is touched: an error changes nothing
        try:
            layer = GradNormLoRPLinear._from_linear(module, rank, alpha, mode, detach_norm, share=True)
        except ValueError as exc:
            raise ValueError(f"cannot wrap {names[0]!r} ({module}): {exc}") from exc
        replacements.append((names, layer))
    if mode == "adapter":
        for parameter in model.parameters():
            parameter.requires_grad_(False)
    for names, layer in replacements:
        for name in names:
            _replace(model, name, layer)
        if mode == "adapter":
            for parameter in (layer.lora_A, layer.lora_B, layer.magnitude):
                parameter.requires_grad_(True)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Replace every `GradNormLoRPLinear` in `model` (or `model` itself) by a plain `nn.Linear`; returns the model."""
    if isinstance(model, GradNormLoRPLinear):
        return model.merge()
    merged: dict[int, nn.Linear] = {}  # a shared layer merges once, into one shared nn.Linear
    layers = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, GradNormLoRPLinear)]
    for name, layer in layers:
        if id(layer) not in merged:
            merged[id(layer)] = layer.merge()
        _replace(model, name, merged[id(layer)])
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
