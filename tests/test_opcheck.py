"""torch.library.opcheck on every registered op (schema, mutations, fake tensors, AOT dispatch), per backend."""

import importlib.util

import pytest
import torch
from conftest import DEVICE, backends_for

from gradnormlorp_kernels import _dispatch, _extension, ops

OUT, IN, RANK, T = 5, 7, 2, 3


def rand(*shape):
    return torch.randn(*shape, device=DEVICE)


def positive(*shape):
    return torch.rand(*shape, device=DEVICE) + 0.5


def counters(*shape):
    return torch.zeros(shape, device=DEVICE), torch.zeros(shape, device=DEVICE)


def segments(numels):
    starts, counts, _ = ops.segment_layout(numels, DEVICE)
    return starts, counts


def adam_8bit_flat_args(numel):
    codes = torch.randint(0, 256, (numel,), dtype=torch.uint8, device=DEVICE)
    blocks = -(-numel // ops.BLOCK_SIZE)
    return [codes, codes.clone(), positive(blocks), positive(blocks), ops.dynamic_map(True, DEVICE),
            ops.dynamic_map(False, DEVICE)]


def adam_8bit_args():
    codes = torch.randint(0, 256, (20, 15), dtype=torch.uint8, device=DEVICE)
    return [
        rand(20, 15), codes, codes.clone(), positive(2), positive(2),
        ops.dynamic_map(True, DEVICE), ops.dynamic_map(False, DEVICE), *counters(), 0.9, 0.999, 1e-8,
    ]


def sample_args() -> dict[str, list[list]]:
    """Small float32 inputs for every op; several variants where optional arguments change the path."""
    x, base, lora_A, lora_B = rand(T, IN), rand(OUT, IN), rand(RANK, IN), rand(OUT, RANK)
    grad_out, out, direction = rand(T, OUT), rand(T, OUT), rand(OUT, IN)
    magnitude, norm, bias = positive(OUT), positive(OUT), rand(OUT)
    left, right = rand(OUT, RANK), rand(IN, RANK)
    gate = torch.ones((), device=DEVICE)
    code = ops.dynamic_map(True, DEVICE)
    return {
        "row_norm": [[base]],
        "aligned_rows": [[rand(OUT, IN)], [rand(OUT, IN).bfloat16()], [rand(IN, OUT).T]],
        "adapter_row_norm": [[base, lora_A, lora_B, 2.0]],
        "adapter_weight": [[base, lora_A, lora_B, magnitude, 2.0]],
        "adapter_backward": [
            [grad_out, x, out, rand(T, RANK), base, rand(OUT, RANK), lora_A, lora_B, magnitude, norm, bias, 2.0, False],
            [grad_out, x, out, rand(T, RANK), base, rand(OUT, RANK), lora_A, lora_B, magnitude, norm, None, 2.0, True],
        ],
        "norm_coefficients": [
            [grad_out, out, bias, magnitude, norm, False],
            [grad_out, out, None, magnitude, norm, True],
        ],
        "full_forward": [[x, direction, positive(OUT), bias], [x, direction, positive(OUT), None]],
        "full_backward": [
            [grad_out, x, out, direction, magnitude, norm, bias, False],
            [grad_out, x, out, direction, magnitude, norm, None, True],
        ],
        "projected_grad": [
            [grad_out, x, direction, positive(OUT), rand(OUT), left, None],
            [grad_out, x, direction, positive(OUT), rand(OUT), None, right],
            [grad_out, x, direction, positive(OUT), rand(OUT), left, right],
        ],
        "randomized_projector": [[rand(9, 6), RANK, "left", 2, 1, 0], [rand(9, 6), RANK, "right", 2, 1, 0]],
        "svd_projector": [[rand(9, 6), RANK, "left"], [rand(9, 6), RANK, "right"]],
        "quantize_blockwise": [[rand(300), code], [rand(20, 15), code]],
        "dequantize_blockwise": [
            [torch.randint(0, 256, (300,), dtype=torch.uint8, device=DEVICE), positive(2), code]
        ],
        "adam_update": [
            [rand(OUT, IN), rand(OUT, IN), positive(OUT, IN), None, None, None, None, *counters(), 0.9, 0.999, 1e-8],
            adam_8bit_args(),
        ],
        "project_grad": [
            [rand(OUT, IN), left, None],
            [rand(OUT, IN), None, right],
            [rand(OUT, IN), left, right],
            [rand(OUT, IN).bfloat16(), left.bfloat16(), None],
            [rand(IN, OUT).T, None, right],
        ],
        "project_back_update": [
            [rand(OUT, IN), rand(RANK, IN), left, None, 0.1, 0.01, gate],
            [rand(OUT, IN), rand(OUT, RANK), None, right, 0.1, 0.01, gate],
            [rand(OUT, IN), rand(RANK, RANK), left, right, 0.1, 0.01, gate],
            [rand(OUT, IN), rand(OUT, IN), None, None, 0.1, 0.01, gate],
            [rand(OUT, IN).bfloat16(), rand(RANK, IN), left, None, 0.1, 0.01, gate],
            [rand(OUT, IN).bfloat16(), rand(RANK, IN), left, None, 0.1, 0.0, gate, False],
            [rand(OUT, IN).bfloat16(), rand(RANK, IN).bfloat16(), left, None, 0.1, 0.0, gate, False, True],
        ],
        # Segments that cover the whole buffer: outside them the output is undefined.
        "segmented_adam_update": [
            [rand(768), rand(768), positive(768), None, None, None, None, *segments([256, 512]), *counters(2), 0.9,
             0.999, 1e-8, gate, torch.float32],
            [rand(768), *adam_8bit_flat_args(768), *segments([256, 512]), *counters(2), 0.9, 0.999, 1e-8, gate,
             torch.bfloat16],
        ],
    }


def cases():
    for name in _dispatch.registered_ops():
        for backend in backends_for(name):
            yield pytest.param(name, backend, id=f"{name}-{backend}")


def test_usable_backends_load():
    # A backend that fails to import drops out of every parametrised op test, so a load error here must fail.
    for name in _dispatch.registered_ops():
        _dispatch.implementations(name)
    usable = {"triton": importlib.util.find_spec("triton") is not None and _dispatch._device_allows("triton", DEVICE)}
    usable["cpu"] = _extension.load() is not None
    errors = _dispatch.load_errors()
    for backend, expected in usable.items():
        if expected:
            assert backend not in errors, f"{backend}: {errors.get(backend)}"


def test_every_registered_op_has_sample_inputs():
    assert set(_dispatch.registered_ops()) <= set(sample_args())


@pytest.mark.parametrize("name,backend", list(cases()))
def test_opcheck(name, backend):
    entry = getattr(ops, name)
    for args in sample_args().get(name, []):
        with _dispatch.use_backend(backend):
            torch.library.opcheck(entry.custom_op, tuple(args))
