"""The Triton kernels on a real GPU at real shapes, against the reference ops and a float64 truth.

`test_kernels_compile_for_nvidia` runs anywhere (no GPU): it compiles each kernel, at the launchers'
tile sizes, for sm_90 and sm_89 and checks the compiler's resource report for register spills (sm_90) and
the shared memory it needs (both). `python tests/test_triton_gpu.py --sass DIR [ARCH]` (TRITON_INTERPRET=0)
also prints each kernel's SASS instruction mix, registers, shared-memory traffic and layout conversions.
Each other test compares the Triton op with the reference op run in the same low precision on the GPU (the
PyTorch baseline) and with a float64 truth: Triton may be at most `FACTOR` times further from the truth than
the baseline. Run on the device machine:
`python -m pytest -m gpu tests/test_triton_gpu.py`.
`python tests/test_triton_gpu.py` prints median timings of every Triton op against its reference, and the
achieved bandwidth of the memory-bound ones against the measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import collections
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_within_baseline, clone_args, run_op, scaled_error

from gradnormlorp_kernels import ops

FACTOR = 4.0
# Shared memory a block may opt into: sm_90 (H100, H200) and sm_89 (RTX 4090 and the other Ada cards).
SHARED_BYTES = {90: 232448, 89: 101376}
D, T, RANK, PROJECTOR_RANK = 4096, 8192, 16, 128


def _cuda(*shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


def _float64(args):
    return [a.to(torch.float64) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def _check_against_baseline(entry, args, dtype, names=None):
    """Triton vs the reference on copies of `args`, both measured against the float64 reference."""
    ours = run_op(entry, "triton", *clone_args(args))
    baseline = entry.reference(*clone_args(args))
    truth = entry.reference(*_float64(clone_args(args)))
    ours, baseline, truth = (v if isinstance(v, tuple) else (v,) for v in (ours, baseline, truth))
    for i, (a, b, t) in enumerate(zip(ours, baseline, truth)):
        assert a.dtype == b.dtype, f"{entry.op_name} output {i}: {a.dtype} != {b.dtype}"
        name = names[i] if names else f"{entry.op_name} output {i}"
        assert_within_baseline(a, b, t, dtype, factor=FACTOR, name=name)
    return ours


def _compile_cases(shared_bytes):
    """(id, kernel, pointer dtypes other than float32, constexprs, num_warps, options): each kernel at the
    tile sizes its launcher picks for bf16 (and float32 where a launcher picks differently), rank 16/128, on a
    GPU with `shared_bytes` of shared memory a block."""
    from gradnormlorp_kernels.triton import (adam_update, aligned_rows, linear, norm_coefficients, project_back,
                                             project_grad, quant8, row_norm, segmented_adam_update)

    bf16_w = {"w_ptr": "*bf16"}
    quantized_states = {"m_ptr": "*u8", "v_ptr": "*u8", "table_m_ptr": "*u8", "table_v_ptr": "*u8"}
    segments = {"grad_ptr": "*bf16", "out_ptr": "*bf16", "flags_ptr": "*i32", "starts_ptr": "*i64",
                "numels_ptr": "*i64"}
    segmented = {"LERP_FROM_END": False, "BITWISE_BF16": False, "SEARCH_STEPS": 5, "BLOCK": 256}
    lora = {"w_ptr": "*bf16", "a_ptr": "*bf16", "b_ptr": "*bf16"}
    grads = {"g_ptr": "*bf16", "y_ptr": "*bf16", "bias_ptr": "*bf16", "xa_ptr": "*bf16"}
    tile = norm_coefficients.PARTIALS_TILE  # (BLOCK_T, BLOCK_N, warps, stages), with and without factors
    back = {"LOW_RANK": True, "BITWISE_BF16": False, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_R": 32}
    finish_bf16 = {name: "*bf16" for name in ("magnitude_ptr", "b_ptr", "grad_magnitude_ptr", "grad_b_ptr",
                                               "b_scaled_ptr", "b_c2_ptr")}
    finish = {"DETACH": False, "HAS_XA": True, **{f"BITWISE_BF16_{name}": False for name in
                                                  ("GRAD_M", "GRAD_B", "FACTORS")}}
    block_m, block_n, weight_warps, stages = linear.WEIGHT_CONFIG
    weight = {"HAS_LORA": True, "NATIVE_DOT": True, "BITWISE_BF16": False, "BLOCK_M": block_m, "BLOCK_N": block_n,
              "RANK_CHUNKS": 1, "STAGES": stages}
    wide = {}  # rank chunk -> (constexprs, warps) of the weight pass's tile there
    for rank, (wide_m, wide_n, wide_warps, wide_stages) in linear.WIDE_RANK_WEIGHT_CONFIGS.items():
        wide[rank] = ({**weight, "BLOCK_M": wide_m, "BLOCK_N": wide_n, "STAGES": wide_stages, "BLOCK_R": rank},
                      wide_warps)
    return _row_norm_compile_cases(row_norm, bf16_w, lora) + [
        *[(f"column_partials-r{block_r}", norm_coefficients._column_partials_kernel, grads,
           {"HAS_BIAS": True, "HAS_XA": True, "NATIVE_DOT": True, "BLOCK_T": tile[0],
            "BLOCK_N": tile[1], "BLOCK_R": block_r, "STAGES": tile[3]}, tile[2], {})
          for block_r in (16, 32)],
        ("column_partials-r128", norm_coefficients._column_partials_kernel, grads,
         {"HAS_BIAS": True, "HAS_XA": True, "NATIVE_DOT": True, "BLOCK_T": 32, "BLOCK_N": 32, "BLOCK_R": 128,
          "STAGES": None}, 4, {}),
        ("column_partials-plain", norm_coefficients._column_partials_kernel, grads,
         {"HAS_BIAS": False, "HAS_XA": False, "NATIVE_DOT": False, "BLOCK_T": tile[0], "BLOCK_N": tile[1],
          "BLOCK_R": 16, "STAGES": tile[3]}, tile[2], {}),
        ("finish_coefficients-r128", norm_coefficients._finish_coefficients_kernel, finish_bf16,
         {**finish, "BLOCK_N": 16, "BLOCK_R": 128}, 4, {}),
        ("finish_coefficients-r16", norm_coefficients._finish_coefficients_kernel, finish_bf16,
         {**finish, "BLOCK_N": 64, "BLOCK_R": 16}, 4, {}),
        ("adapter_weight-r16", linear._normalized_weight_kernel, {**lora, "magnitude_ptr": "*bf16", "out_ptr": "*bf16"},
         {**weight, "WITH_NORM": True, "WITH_WEIGHT_A": True, "BLOCK_R": 16}, weight_warps, {}),
        *[(f"adapter_weight-r{rank}", linear._normalized_weight_kernel,
           {**lora, "magnitude_ptr": "*bf16", "out_ptr": "*bf16"},
           {**constexprs, "WITH_NORM": True, "WITH_WEIGHT_A": True}, warps, {})
          for rank, (constexprs, warps) in wide.items()],
        ("normalized_weight-r16", linear._normalized_weight_kernel, {**lora, "out_ptr": "*bf16"},
         {**weight, "WITH_NORM": False, "WITH_WEIGHT_A": False, "BLOCK_R": 16}, weight_warps, {}),
        *[(f"normalized_weight-r{rank}", linear._normalized_weight_kernel, {**lora, "out_ptr": "*bf16"},
           {**constexprs, "WITH_NORM": False, "WITH_WEIGHT_A": False}, warps, {})
          for rank, (constexprs, warps) in wide.items()],
        # Above 64 ranks B A is summed over chunks of 64; the forward's W' A^T then comes from torch.
        *[(f"{name}-r128", linear._normalized_weight_kernel, {**lora, "magnitude_ptr": "*bf16", "out_ptr": "*bf16"},
           {**wide[64][0], "WITH_NORM": with_norm, "WITH_WEIGHT_A": False, "RANK_CHUNKS": 2}, wide[64][1], {})
          for name, with_norm in (("adapter_weight", True), ("normalized_weight", False))],
        ("adapter_weight-r256", linear._normalized_weight_kernel,
         {**lora, "magnitude_ptr": "*bf16", "out_ptr": "*bf16"},
         {**wide[64][0], "WITH_NORM": True, "WITH_WEIGHT_A": False, "RANK_CHUNKS": 4}, wide[64][1], {}),
        *_float32_weight_cases(linear, weight, shared_bytes),
        ("full_weight", linear._normalized_weight_kernel, {"w_ptr": "*bf16", "out_ptr": "*bf16"},
         {**weight, "HAS_LORA": False, "NATIVE_DOT": False, "WITH_NORM": False, "WITH_WEIGHT_A": False, "BLOCK_R": 16},
         weight_warps, {}),
        ("direction_grad", linear._direction_grad_kernel, {"g_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*bf16"},
         {"BITWISE_BF16": False, "BLOCK_M": 16, "BLOCK_N": 256}, 4, {}),
        ("matmul_f32", linear._matmul_f32_kernel, {"a_ptr": "*bf16"},
         {"NATIVE_DOT": False, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, 4, {}),
        ("finite_check", adam_update._finite_check_kernel, {}, {"BLOCK": 4096}, 8, {}),
        *[(f"adam_update-8bit{'-tail' if masked else ''}", adam_update._adam_update_kernel,
           {**quantized_states, "flags_ptr": "*i32"},
           {"LERP_FROM_END": False, "QUANTIZED": True, "CANDIDATES_M": 1, "CANDIDATES_V": 1,
            "BLOCKS": adam_update._QUANTIZED_BLOCKS, "BLOCK": 256, "MASKED": masked}, adam_update._QUANTIZED_WARPS,
           {"enable_fp_fusion": False}) for masked in (False, True)],
        ("adam_update-fp32", adam_update._adam_update_kernel, {"flags_ptr": "*i32"},
         {"LERP_FROM_END": False, "QUANTIZED": False, "CANDIDATES_M": 0, "CANDIDATES_V": 0,
          "BLOCKS": adam_update._PLAIN_BLOCKS, "BLOCK": 256, "MASKED": False}, adam_update._PLAIN_WARPS,
         {"enable_fp_fusion": False}),
        ("segmented_adam-8bit", segmented_adam_update._segmented_adam_kernel, {**segments, **quantized_states},
         {**segmented, "QUANTIZED": True, "CANDIDATES_M": 1, "CANDIDATES_V": 1,
          "BLOCKS": segmented_adam_update._QUANTIZED_BLOCKS}, segmented_adam_update._QUANTIZED_WARPS,
         {"enable_fp_fusion": False, "maxnreg": segmented_adam_update._QUANTIZED_MAX_REGISTERS}),
        ("segmented_adam-fp32", segmented_adam_update._segmented_adam_kernel, segments,
         {**segmented, "QUANTIZED": False, "CANDIDATES_M": 0, "CANDIDATES_V": 0,
          "BLOCKS": segmented_adam_update._PLAIN_BLOCKS}, segmented_adam_update._PLAIN_WARPS,
         {"enable_fp_fusion": False}),
        ("quantize", quant8._quantize_blockwise_kernel, {"codes_ptr": "*u8", "table_ptr": "*u8"},
         {"CANDIDATES": 1, "BLOCKS": quant8._BLOCKS_PER_PROGRAM, "BLOCK": 256}, quant8._NUM_WARPS, {}),
        ("dequantize", quant8._dequantize_blockwise_kernel, {"codes_ptr": "*u8"},
         {"BLOCKS": quant8._BLOCKS_PER_PROGRAM, "BLOCK": 256}, quant8._NUM_WARPS, {}),
        ("project_back-bf16", project_back._project_back_update_kernel, bf16_w, {**back, "DOT_PRECISION": "tf32"}, 8,
         {}),
        ("project_back-fp32", project_back._project_back_update_kernel, {},
         {**back, "DOT_PRECISION": "tf32x3", "BLOCK_M": 32}, 8, {}),
        ("project_back-dense", project_back._project_back_update_kernel, bf16_w,
         {**back, "LOW_RANK": False, "DOT_PRECISION": "tf32", "BLOCK_M": 16, "BLOCK_N": 256}, 4, {}),
        ("row_norm_from_squares", project_back._row_norm_from_squares_kernel, {}, {"BLOCK": 1024}, 4, {}),
        *[(f"one_sided_update{suffix}", project_back._one_sided_update_kernel, lora,
           {"DECAY": decay, "BITWISE_BF16": False, "stride_a1": 1, "stride_b1": 1,
            **dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_R"), tile))}, warps, {})
          for suffix, decay, tile, warps in (
              ("", False, project_back._ONE_SIDED_TILE, project_back._ONE_SIDED_WARPS),
              ("-decay", True, project_back._ONE_SIDED_TILE, project_back._ONE_SIDED_WARPS),
              ("-decay-aligned", True, project_back._ALIGNED_DECAY_TILE, project_back._ALIGNED_DECAY_WARPS))],
        *[(f"split_k-r{rank}", project_grad._split_k_kernel, {"a_ptr": "*bf16", "b_ptr": "*bf16"},
           {"M_FASTEST": True, "NATIVE_DOT": True, "DOT_PRECISION": "tf32x3", "BITWISE_BF16": False,
            "stride_am": 1, "stride_bn": 1, "BLOCK_M": config.kwargs["BLOCK_R"], "BLOCK_N": config.kwargs["BLOCK_L"],
            "BLOCK_K": config.kwargs["BLOCK_K"]}, config.num_warps, {"num_stages": config.num_stages})
          for rank, config in ((128, project_grad.default_config(128, True)),
                               (512, project_grad.default_config(512, True)))],
        ("aligned_rows", aligned_rows._aligned_rows_kernel, {"src_ptr": "*bf16", "dst_ptr": "*bf16"},
         dict(zip(("BLOCK_ROWS", "BLOCK_COLS"), aligned_rows._TILE)), aligned_rows._NUM_WARPS, {}),
    ]


def _float32_weight_cases(linear, weight_constexprs, shared_bytes):
    """Full mode's weight pass diag(c) V on float32 weights, at the stages its launcher picks with `shared_bytes`
    a block (float32 factors of an adapter take torch's dense path on a GPU)."""
    block_m, block_n, warps, stages = linear.WEIGHT_CONFIG
    stages = linear.weight_pass_stages(block_m, block_n, 16, 0, 4, stages, shared_bytes)
    constexprs = {**weight_constexprs, "HAS_LORA": False, "NATIVE_DOT": False, "WITH_NORM": False,
                  "WITH_WEIGHT_A": False, "BLOCK_R": 16, "STAGES": stages}
    return [("full_weight-fp32", linear._normalized_weight_kernel, {}, constexprs, warps, {})]


def _row_norm_compile_cases(row_norm, bf16_w, lora):
    """Every config that autotune may pick for the row-norm kernels: row_norm's (bf16) and adapter_row_norm's
    (bf16, tensor-core products; float32 factors take the reference on a GPU), at BLOCK_R 16 to 128."""
    cases = [(f"row_norm-{i}", row_norm._row_norm_kernel, bf16_w, config.kwargs, config.num_warps,
              {"num_stages": config.num_stages}) for i, config in enumerate(row_norm.ROW_NORM_CONFIGS)]
    # The adapter's forward sweeps with split ranges and A A^T, at ranks up to 64.
    variants = ((False, False), (True, False), (True, True))
    for block_r in (16, 32, 64, 128):
        for split, gram in variants if block_r <= 64 else variants[:2]:
            meta = {"NATIVE_DOT": True, "BLOCK_R": block_r, "SPLIT": split, "WITH_GRAM": gram}
            for i, config in enumerate(row_norm._adapter_prune(None, {}, **meta)):
                cases.append((f"adapter_row_norm-bf16-r{block_r}-{i}{'-split' if split else ''}"
                              f"{'-gram' if gram else ''}", row_norm._adapter_row_norm_kernel, lora,
                              {**config.kwargs, **meta}, config.num_warps, {"num_stages": config.num_stages}))
    for block_r in (16, 128):
        cases.append((f"adapter_row_norm_finish-r{block_r}", row_norm._adapter_row_norm_finish_kernel, {},
                      {"BLOCK_M": 32, "BLOCK_R": block_r}, 4, {}))
    return cases


_INTEGER_ARGS = ("rows", "cols", "rank", "numel", "splits", "rows_per_split", "cols_per_split", "M", "N", "K",
                 "base", "half", "base_m", "half_m", "base_v", "half_v", "segments", "flat_blocks",
                 "first_program", "k_per_split", "n_load", "cols_load", "padded")
# Bounds that the launchers pass padded to a multiple of 16 (a copy from `aligned_rows`): specialised as such.
_PADDED_BOUNDS = ("n_load", "cols_load", "padded")


def _nvidia_toolchain():
    """Triton's NVIDIA backend and its cuobjdump, or None where this Triton has none."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError:
        return None
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        return None
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return (triton, GPUTarget, cuobjdump) if cuobjdump.exists() else None


def _instruction_summary(cuobjdump: Path, binary: Path, usage: str, ttgir: str) -> str:
    """A compiled kernel's static SASS instructions by opcode, its registers, its shared-memory traffic and the
    layout conversions in its TTGIR: where a kernel bound by its instructions spends them (the 8-bit kernels)."""
    sass = subprocess.run([str(cuobjdump), "-sass", str(binary)], capture_output=True, text=True, check=True).stdout
    opcodes = collections.Counter(
        op.split(".")[0] for op in re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass))
    registers = max((int(v) for v in re.findall(r"REG:(\d+)", usage)), default=0)
    top = ", ".join(f"{op} {count}" for op, count in opcodes.most_common(8))
    return (f"{sum(opcodes.values())} instructions, {registers} registers ({top}); shared memory STS "
            f"{opcodes['STS']} LDS {opcodes['LDS']} BAR {opcodes['BAR']}; "
            f"{ttgir.count('ttg.convert_layout')} layout conversions")


def compile_kernels(directory: Path, arch: int = 90, summaries: dict[str, str] | None = None) -> list[str]:
    """Compile every kernel case for sm_`arch`; one problem string per kernel that fails, needs more shared
    memory than a block has there or, on sm_90 (where the tiles are tuned), spills registers. `summaries`, if
    given, receives each kernel's `_instruction_summary`.
    Needs kernels defined without TRITON_INTERPRET (the interpreter's kernels cannot be compiled)."""
    toolchain = _nvidia_toolchain()
    if toolchain is None:
        return []
    triton, GPUTarget, cuobjdump = toolchain
    from triton.compiler import ASTSource

    problems = []
    shared_bytes = SHARED_BYTES[arch]
    for name, kernel, pointer_types, constexprs, num_warps, options in _compile_cases(shared_bytes):
        signature = {}
        # As the launcher specialises a call with 16-byte aligned tensors and strides a multiple of 16
        # (the large weights whose speed matters): vectorised loads, asynchronous copies.
        aligned = {}
        for index, arg in enumerate(inspect.signature(kernel.fn).parameters):
            if arg in constexprs:
                signature[arg] = "constexpr"
            elif arg.endswith("_ptr"):
                signature[arg] = pointer_types.get(arg, "*fp32")
            elif arg in _INTEGER_ARGS or arg.startswith("stride"):
                signature[arg] = "i32"
            else:
                signature[arg] = "fp32"
            if arg.endswith("_ptr") or arg.startswith("stride") or arg in _PADDED_BOUNDS:
                aligned[(index,)] = [["tt.divisibility", 16]]
        try:
            compiled = triton.compile(
                ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned),
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": num_warps, **options},
            )
        except Exception as exc:  # report every kernel, not only the first failure
            problems.append(f"{name}: does not compile for sm_{arch}: {type(exc).__name__}: {exc}")
            continue
        binary = directory / f"{name}.cubin"
        binary.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "-res-usage", str(binary)], capture_output=True, text=True, check=True)
        stack = [int(v) for v in re.findall(r"STACK:(\d+)", usage.stdout)]
        if arch == 90 and (not stack or max(stack) > 0):
            problems.append(f"{name}: register spills ({max(stack or [-1])}-byte stack frame) on sm_90")
        if compiled.metadata.shared > shared_bytes:
            problems.append(f"{name}: needs {compiled.metadata.shared} bytes of shared memory, sm_{arch} has "
                            f"{shared_bytes}")
        if summaries is not None:
            summaries[name] = _instruction_summary(cuobjdump, binary, usage.stdout, compiled.asm["ttgir"])
    return problems


@pytest.mark.parametrize("arch", [90, 89], ids=["sm_90", "sm_89"])
def test_kernels_compile_for_nvidia(tmp_path, arch):
    """sm_90 (the lent H100/H200): no spills, within its shared memory. sm_89 (a 24 GB consumer card): the
    fixed tiles fit its 99 KB of shared memory (autotuned kernels drop tiles that do not, by themselves)."""
    if _nvidia_toolchain() is None:
        pytest.skip("this Triton has no NVIDIA backend to compile with")
    # Real (not interpreted) kernels: conftest only sets the interpreter where the variable is unset.
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, __file__, "--compile", str(tmp_path), str(arch)], capture_output=True, text=True, env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def adapter_case(dtype=torch.bfloat16, tokens=T, dim=D, rank=RANK):
    return {
        "x": _cuda(tokens, dim, dtype=dtype),
        "base_weight": _cuda(dim, dim, dtype=dtype, scale=dim**-0.5),
        "lora_A": _cuda(rank, dim, dtype=dtype, scale=dim**-0.5),
        "lora_B": _cuda(dim, rank, dtype=dtype, scale=0.05),
        "magnitude": (torch.rand(dim, device="cuda") + 0.5).to(dtype),
        "bias": _cuda(dim, dtype=dtype, scale=0.1),
        "grad_out": _cuda(tokens, dim, dtype=dtype),
        "scaling": 2.0,
    }


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_norm(dtype):
    _check_against_baseline(ops.row_norm, [_cuda(D, D, dtype=dtype)], dtype)


@pytest.mark.gpu
def test_adapter_row_norm():
    c = adapter_case()
    _check_against_baseline(
        ops.adapter_row_norm, [c["base_weight"], c["lora_A"], c["lora_B"], c["scaling"]], torch.bfloat16
    )


def _saved_for_backward(c):
    _, norm, weight_A = ops.adapter_weight.reference(c["base_weight"], c["lora_A"], c["lora_B"], c["magnitude"],
                                                     c["scaling"])
    row_scale = c["magnitude"].float() / norm
    weight, _, _ = ops.adapter_weight.reference(c["base_weight"], c["lora_A"], c["lora_B"], c["magnitude"],
                                                c["scaling"])
    y = (c["x"] @ weight.T + c["bias"]).to(c["x"].dtype)
    return norm, weight_A, row_scale, y, c["x"] @ c["lora_A"].T


@pytest.mark.gpu
def test_adapter_weight():
    c = adapter_case()
    args = [c["base_weight"], c["lora_A"], c["lora_B"], c["magnitude"], c["scaling"]]
    _check_against_baseline(ops.adapter_weight, args, torch.bfloat16, names=["W", "n", "W' A^T"])


@pytest.mark.gpu
@pytest.mark.parametrize("detach_norm", [False, True], ids=["exact", "detach"])
def test_adapter_backward(detach_norm):
    c = adapter_case()
    norm, weight_A, _, y, x_A = _saved_for_backward(c)
    args = [c["grad_out"], c["x"], y, x_A, c["base_weight"], weight_A, c["lora_A"], c["lora_B"], c["magnitude"], norm,
            c["bias"], c["scaling"], detach_norm]
    _check_against_baseline(ops.adapter_backward, args, torch.bfloat16, names=["dx", "dA", "dB", "dM"])


@pytest.mark.gpu
def test_norm_coefficients():
    c = adapter_case()
    norm, _, _, y, _ = _saved_for_backward(c)
    args = [c["grad_out"], y, c["bias"], c["magnitude"], norm, False]
    _check_against_baseline(ops.norm_coefficients, args, torch.bfloat16, names=["c1", "c2", "dM"])


def _full_case():
    c = adapter_case()
    direction = c["base_weight"]
    norm = ops.row_norm.reference(direction)
    row_scale = c["magnitude"].float() / norm
    y = ops.full_forward.reference(c["x"], direction, row_scale, c["bias"])
    return c, direction, norm, row_scale, y


@pytest.mark.gpu
def test_full_forward_backward():
    c, direction, norm, row_scale, y = _full_case()
    _check_against_baseline(ops.full_forward, [c["x"], direction, row_scale, c["bias"]], torch.bfloat16, ["y"])
    args = [c["grad_out"], c["x"], y, direction, c["magnitude"], norm, c["bias"], False]
    _check_against_baseline(ops.full_backward, args, torch.bfloat16, names=["dx", "dV", "dM"])


@pytest.mark.gpu
@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_projected_grad(side):
    c, direction, norm, _, y = _full_case()
    row_scale, c2, _ = ops.norm_coefficients.reference(c["grad_out"], y, c["bias"], c["magnitude"], norm, False)
    left = torch.linalg.qr(torch.randn(D, PROJECTOR_RANK, device="cuda")).Q if side != "right" else None
    right = torch.linalg.qr(torch.randn(D, PROJECTOR_RANK, device="cuda")).Q if side != "left" else None
    args = [c["grad_out"], c["x"], direction, row_scale, c2, left, right]
    _check_against_baseline(ops.projected_grad, args, torch.bfloat16)


@pytest.mark.gpu
def test_quantize_roundtrip_matches_reference():
    code = ops.dynamic_map(True, "cuda")
    x = torch.randn(PROJECTOR_RANK, D, device="cuda")
    codes, absmax = run_op(ops.quantize_blockwise, "triton", x, code)
    ref_codes, ref_absmax = ops.quantize_blockwise.reference(x, code)
    assert torch.equal(absmax, ref_absmax)
    assert torch.equal(codes, ref_codes)
    values = run_op(ops.dequantize_blockwise, "triton", codes, absmax, code)
    assert torch.equal(values, ops.dequantize_blockwise.reference(codes, absmax, code))


def _adam_args(shape, quantized, nonfinite=False):
    grad = torch.randn(shape, device="cuda") * 1e-2
    if nonfinite:
        grad[shape[0] // 2, 7] = float("nan")
    signed, unsigned = ops.dynamic_map(True, "cuda"), ops.dynamic_map(False, "cuda")
    if quantized:
        m, m_absmax = ops.quantize_blockwise.reference(torch.randn(shape, device="cuda") * 1e-2, signed)
        v, v_absmax = ops.quantize_blockwise.reference(torch.rand(shape, device="cuda") * 1e-4, unsigned)
        states = [m, v, m_absmax, v_absmax, signed, unsigned]
    else:
        states = [torch.randn(shape, device="cuda") * 1e-2, torch.rand(shape, device="cuda") * 1e-4] + [None] * 4
    step = torch.tensor(7.0, device="cuda")
    return [grad] + states + [step, torch.zeros((), device="cuda"), 0.9, 0.999, 1e-8]


@pytest.mark.gpu
@pytest.mark.parametrize("quantized", [True, False], ids=["8bit", "fp32"])
@pytest.mark.parametrize("nonfinite", [False, True], ids=["finite", "nan"])
def test_adam_update(quantized, nonfinite):
    args = _adam_args((PROJECTOR_RANK, D), quantized, nonfinite)
    ours_args, reference_args = clone_args(args), clone_args(args)
    direction = run_op(ops.adam_update, "triton", *ours_args)
    expected = ops.adam_update.reference(*reference_args)
    assert scaled_error(direction, expected) <= 1e-6
    for i, (a, e) in enumerate(zip(ours_args[1:9], reference_args[1:9])):
        if not isinstance(a, torch.Tensor):
            continue
        if a.dtype == torch.uint8:
            # Nearest-code ties may round either way after a one-ulp difference in the moment.
            differ = a != e
            assert differ.float().mean().item() <= 1e-4, f"state {i}: {int(differ.sum())} codes differ"
            assert (a.int() - e.int()).abs().max().item() <= 1
        else:
            assert scaled_error(a, e) <= 1e-6, f"state {i}"
    if nonfinite:
        for a, original in zip(ours_args[1:5], args[1:5]):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, original)
        assert ours_args[8].item() == 1.0 and ours_args[7].item() == 7.0


@pytest.mark.gpu
@pytest.mark.parametrize("side", ["left", "right", "both"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_project_back_update(dtype, side):
    weight = _cuda(D, D, dtype=dtype, scale=0.02)
    left = torch.linalg.qr(torch.randn(D, PROJECTOR_RANK, device="cuda")).Q if side != "right" else None
    right = torch.linalg.qr(torch.randn(D, PROJECTOR_RANK, device="cuda")).Q if side != "left" else None
    shape = (PROJECTOR_RANK if left is not None else D, PROJECTOR_RANK if right is not None else D)
    args = [weight, torch.randn(shape, device="cuda"), left, right, 1e-3, 1e-4, torch.ones((), device="cuda")]
    ours_args, reference_args, truth_args = clone_args(args), clone_args(args), _float64(clone_args(args))
    norm = run_op(ops.project_back_update, "triton", *ours_args)
    reference_norm = ops.project_back_update.reference(*reference_args)
    truth_norm = ops.project_back_update.reference(*truth_args)
    assert_within_baseline(ours_args[0], reference_args[0], truth_args[0], dtype, factor=FACTOR, name="weight")
    assert_within_baseline(norm, reference_norm, truth_norm, dtype, factor=FACTOR, name="norm")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["adapter", "full"])
def test_layer_forward_backward(mode):
    """The whole layer on the Triton backend against the reference backend (bf16) and float64."""
    import copy

    from gradnormlorp_kernels import GradNormLoRPLinear, use_backend

    linear = torch.nn.Linear(D // 4, D // 2, device="cuda", dtype=torch.bfloat16)
    layer = GradNormLoRPLinear.from_linear(linear, rank=RANK, alpha=2 * RANK, mode=mode)
    with torch.no_grad():  # away from the init (B = 0, M = n) so that every gradient term matters
        for name, p in layer.named_parameters():
            if name == "lora_B":
                p.normal_(0, 0.02)
            if name == "magnitude":
                p.mul_(torch.rand_like(p) + 0.5)
    x = _cuda(T // 4, D // 4)
    grad = _cuda(T // 4, D // 2)

    def run(module, backend, dtype):
        inputs = x.to(dtype).requires_grad_()
        module.zero_grad(set_to_none=True)
        with use_backend(backend):
            out = module(inputs)
            out.backward(grad.to(dtype))
        trainable = [p.grad for p in module.parameters() if p.requires_grad]
        return [out, inputs.grad] + trainable

    truth = run(copy.deepcopy(layer).double(), "reference", torch.float64)
    baseline = run(layer, "reference", torch.bfloat16)
    ours = run(layer, "triton", torch.bfloat16)
    for i, (a, b, t) in enumerate(zip(ours, baseline, truth)):
        assert_within_baseline(a, b, t, torch.bfloat16, factor=FACTOR, name=f"{mode} layer output/gradient {i}")


# ---- timings: python tests/test_triton_gpu.py ----


def _bench_cases():
    """(name, bytes of the floor or 0 for GEMM-bound ops, function of a backend name)."""
    c = adapter_case()
    norm, weight_A, row_scale, y, x_A = _saved_for_backward(c)
    element = 2
    big = D * D * element
    act = T * D * element
    shape = (PROJECTOR_RANK, D)
    adam8 = _adam_args(shape, True)
    adam32 = _adam_args(shape, False)
    weight = _cuda(D, D, scale=0.02)
    left = torch.linalg.qr(torch.randn(D, PROJECTOR_RANK, device="cuda")).Q
    direction = torch.randn(PROJECTOR_RANK, D, device="cuda")
    gate = torch.ones((), device="cuda")
    _, row_c2, _ = ops.norm_coefficients.reference(c["grad_out"], y, c["bias"], c["magnitude"], norm, False)
    numel = PROJECTOR_RANK * D
    return [
        ("row_norm", big, lambda: ops.row_norm(c["base_weight"])),
        ("adapter_row_norm", big, lambda: ops.adapter_row_norm(c["base_weight"], c["lora_A"], c["lora_B"], 2.0)),
        ("norm_coefficients", 2 * act, lambda: ops.norm_coefficients(c["grad_out"], y, c["bias"], c["magnitude"], norm,
                                                                      False)),
        ("adam_update 8-bit", numel * (4 + 2 + 2 + 4), lambda: ops.adam_update(*adam8)),
        ("adam_update fp32", numel * (4 + 16 + 4), lambda: ops.adam_update(*adam32)),
        ("project_back_update", 2 * big,
         lambda: ops.project_back_update(weight, direction, left, None, 1e-6, 0.0, gate)),
        ("adapter_weight", 2 * big, lambda: ops.adapter_weight(c["base_weight"], c["lora_A"], c["lora_B"],
                                                               c["magnitude"], 2.0)),
        ("adapter_backward", 0, lambda: ops.adapter_backward(c["grad_out"], c["x"], y, x_A, c["base_weight"],
                                                             weight_A, c["lora_A"], c["lora_B"], c["magnitude"], norm,
                                                             c["bias"], 2.0, False)),
        ("projected_grad left", 0, lambda: ops.projected_grad(c["grad_out"], c["x"], c["base_weight"], row_scale,
                                                              row_c2, left, None)),
        ("nn.Linear forward (GEMM floor)", 0, lambda: torch.nn.functional.linear(c["x"], c["base_weight"], c["bias"])),
        ("nn.Linear dx (GEMM floor)", 0, lambda: c["grad_out"] @ c["base_weight"]),
    ]


def _layer_seconds(do_bench):
    """Median fwd+bwd of a bf16 D x D layer at T tokens with a fixed upstream gradient: frozen nn.Linear
    (the floor) against GradNormLoRPLinear (adapter, rank RANK) on each backend."""
    from gradnormlorp_kernels import GradNormLoRPLinear, use_backend

    linear = torch.nn.Linear(D, D, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    ours = GradNormLoRPLinear.from_linear(linear, rank=RANK, alpha=2 * RANK)
    with torch.no_grad():
        ours.lora_B.normal_(0, 0.01)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)

    def step(module):
        def run():
            x.grad = None
            for p in module.parameters():
                p.grad = None
            module(x).backward(grad)
        return run

    times = {"nn.Linear (frozen)": do_bench(step(linear), return_mode="median")}
    for backend in ("triton", "reference"):
        with use_backend(backend):
            times[f"GradNormLoRPLinear adapter ({backend})"] = do_bench(step(ours), return_mode="median")
    return times


def _copy_bandwidth(do_bench) -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read and written."""
    source = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    milliseconds = do_bench(lambda: target.copy_(source), return_mode="median")
    return 2 * source.numel() / milliseconds / 1e6


def main() -> int:
    from triton.testing import do_bench

    from gradnormlorp_kernels import use_backend

    torch.manual_seed(0)
    copy_bw = _copy_bandwidth(do_bench)
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy_bw:.0f} GB/s (read + write)")
    print(f"{'op':34s} {'triton ms':>10s} {'reference ms':>13s} {'speed-up':>9s} {'GB/s':>7s} {'of copy':>8s}")
    for name, floor_bytes, call in _bench_cases():
        times = {}
        for backend in ("triton", "reference"):
            with use_backend(backend):
                times[backend] = do_bench(call, return_mode="median")
        ours = times["triton"]
        line = f"{name:34s} {ours:10.4f} {times['reference']:13.4f} {times['reference'] / ours:8.2f}x"
        if floor_bytes:
            bandwidth = floor_bytes / ours / 1e6
            line += f" {bandwidth:7.0f} {bandwidth / copy_bw:7.0%}"
        print(line, flush=True)
    layer = _layer_seconds(do_bench)
    floor = layer["nn.Linear (frozen)"]
    print(f"layer fwd+bwd, bf16, D={D}, T={T}, r={RANK}:")
    for name, ms in layer.items():
        print(f"  {name:40s} {ms:8.4f} ms  {ms / floor:5.2f}x the frozen nn.Linear")
    return 0


if __name__ == "__main__":
    # --compile DIR [ARCH]: the compile check; --sass DIR [ARCH]: each kernel's instruction summary too.
    if sys.argv[1:2] in (["--compile"], ["--sass"]):
        arch = int(sys.argv[3]) if len(sys.argv) > 3 else 90
        summaries = {} if sys.argv[1] == "--sass" else None
        found = compile_kernels(Path(sys.argv[2]), arch, summaries)
        for name, summary in (summaries or {}).items():
            print(f"{name}: {summary}")
        print("\n".join(found) or f"every kernel compiles for sm_{arch}, within its shared memory")
        sys.exit(1 if found else 0)
    sys.exit(main())
