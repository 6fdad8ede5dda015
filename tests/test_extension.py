"""The compiled extension `_C`: its cpu (and, on a GPU, cuda) kernels against the reference ops, its
argument checks, and the package's behaviour when it is missing or was built for another torch."""

import pytest
import torch
from conftest import DEVICE, assert_close_scaled

from gradnormlorp_kernels import _dispatch, _extension, backends, ops

KERNEL_OPS = ("row_norm", "adapter_row_norm", "adam_update", "project_back_update")
SHAPES = [(1, 1), (3, 17), (129, 257), (64, 1000)]
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
# Scaled tolerance of the kernels against the reference, per weight dtype (float32 sums in another order;
# bf16 weights are rounded identically, but a sum landing on the other side of a rounding tie moves one ulp).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2}


def compiled_backends() -> list:
    """The extension's backend for the test device (skipped where the extension did not load)."""
    backend = "cuda" if DEVICE == "cuda" else "cpu"
    marks = []
    if _extension.load() is None:
        marks.append(pytest.mark.skip(reason=f"extension not loaded: {_extension.load_error()}"))
    elif backend == "cuda" and not _extension.load().has_cuda():
        marks.append(pytest.mark.skip(reason="extension built without CUDA"))
    return [pytest.param(backend, id=backend, marks=marks)]


def run(backend, entry, *args):
    with _dispatch.use_backend(backend):
        chosen, _ = _dispatch.select(entry.op_name, DEVICE)
        assert chosen == backend, f"{entry.op_name}: asked for {backend}, dispatch chose {chosen}"
        return entry(*args)


def reference(entry, *args):
    with _dispatch.use_backend("reference"):
        return entry(*args)


@pytest.mark.parametrize("backend", compiled_backends())
def test_backends_report_the_extension(backend):
    report = backends()
    assert report["backends"][backend]["available"], report["backends"][backend]
    for name in KERNEL_OPS:
        assert report["ops"][DEVICE][name] in (backend, "triton"), (name, report["ops"][DEVICE])


@pytest.mark.parametrize("backend", compiled_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_row_norm_matches_reference(backend, dtype, shape):
    weight = torch.randn(shape, device=DEVICE).to(DTYPES[dtype])
    weight[0] = 0  # the norm floor
    got = run(backend, ops.row_norm, weight)
    expected = reference(ops.row_norm, weight)
    assert got.dtype == expected.dtype
    assert_close_scaled(got, expected, TOLERANCE[torch.float32] if dtype == "bfloat16" else TOLERANCE[DTYPES[dtype]])
    assert_close_scaled(run(backend, ops.row_norm, weight.T), reference(ops.row_norm, weight.T), 1e-5, "transposed")


@pytest.mark.parametrize("backend", compiled_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", [1, 8, 48])  # 48: above the CPU kernel's fused-rank limit (the GEMM path)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: f"{s[0]}x{s[1]}")
def test_adapter_row_norm_matches_reference(backend, dtype, rank, shape):
    dt = DTYPES[dtype]
    acc = torch.float64 if dt == torch.float64 else torch.float32
    base = torch.randn(shape, device=DEVICE).to(dt)
    lora_A = torch.randn(rank, shape[1], device=DEVICE, dtype=acc) / shape[1] ** 0.5
    lora_B = torch.randn(shape[0], rank, device=DEVICE, dtype=acc) * 0.1
    norms, base_A = run(backend, ops.adapter_row_norm, base, lora_A, lora_B, 1.5)
    expected_norms, expected_base_A = reference(ops.adapter_row_norm, base, lora_A, lora_B, 1.5)
    tol = 1e-12 if dt == torch.float64 else 2e-5
    assert_close_scaled(norms, expected_norms, tol, "norms")
    assert_close_scaled(base_A, expected_base_A, tol, "W0 A^T")


def adam_state(shape, quantized):
    numel = torch.Size(shape).numel()
    if not quantized:
        zeros = torch.zeros(shape, device=DEVICE)
        return [zeros.clone(), zeros.clone(), None, None, None, None]
    blocks = -(-numel // ops.BLOCK_SIZE)
    zero_signed = int(torch.argmin(ops.dynamic_map(True).abs()))
    zero_unsigned = int(torch.argmin(ops.dynamic_map(False).abs()))
    return [
        torch.full(shape, zero_signed, dtype=torch.uint8, device=DEVICE),
        torch.full(shape, zero_unsigned, dtype=torch.uint8, device=DEVICE),
        torch.zeros(blocks, device=DEVICE),
        torch.zeros(blocks, device=DEVICE),
        ops.dynamic_map(True, DEVICE),
        ops.dynamic_map(False, DEVICE),
    ]


@pytest.mark.parametrize("backend", compiled_backends())
@pytest.mark.parametrize("quantized", [True, False], ids=["8bit", "fp32"])
@pytest.mark.parametrize("grad_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (17, 241), (64, 515)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_adam_update_matches_reference_step_by_step(backend, quantized, grad_dtype, shape):
    """The same gradients into both: states, counters and directions agree after every step (8-bit codes
    exactly, but for a rare float32 tie at a midpoint), a non-finite gradient included."""
    ours, theirs = adam_state(shape, quantized), adam_state(shape, quantized)
    counters = {name: [torch.zeros((), device=DEVICE) for _ in range(2)] for name in ("ours", "theirs")}
    for t in range(6):
        grad = (torch.randn(shape, device=DEVICE) * 10.0 ** (t % 3 - 2)).to(DTYPES[grad_dtype])
        if t == 3:
            grad.view(-1)[-1] = float("nan")
        got = run(backend, ops.adam_update, grad, *ours, *counters["ours"], 0.9, 0.999, 1e-8)
        expected = reference(ops.adam_update, grad, *theirs, *counters["theirs"], 0.9, 0.999, 1e-8)
        assert_close_scaled(got, expected, 1e-5, f"direction at step {t}")
        assert [float(c) for c in counters["ours"]] == [float(c) for c in counters["theirs"]]
        if quantized:
            for name, a, b in (("exp_avg", ours[0], theirs[0]), ("exp_avg_sq", ours[1], theirs[1])):
                mismatched = (a != b).sum().item()
                assert mismatched <= max(1, a.numel() // 1000), f"{name}: {mismatched} codes differ at step {t}"
            assert_close_scaled(ours[2], theirs[2], 1e-6, "absmax_avg")
            assert_close_scaled(ours[3], theirs[3], 1e-6, "absmax_avg_sq")
        else:
            assert_close_scaled(ours[0], theirs[0], 1e-6, "exp_avg")
            assert_close_scaled(ours[1], theirs[1], 1e-6, "exp_avg_sq")
    assert [float(c) for c in counters["ours"]] == [5.0, 1.0]


@pytest.mark.parametrize("backend", compiled_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sides", ["left", "right", "both", "none"])
@pytest.mark.parametrize("shape, gate", [(s, 1.0) for s in SHAPES] + [(SHAPES[2], 0.0)], ids=str)
def test_project_back_update_matches_reference(backend, dtype, sides, shape, gate):
    dt = DTYPES[dtype]
    acc = torch.float64 if dt == torch.float64 else torch.float32
    rank = 3
    out, inn = shape
    left = torch.linalg.qr(torch.randn(out, max(rank, out), device=DEVICE, dtype=acc))[0][:, :rank]
    right = torch.linalg.qr(torch.randn(inn, max(rank, inn), device=DEVICE, dtype=acc))[0][:, :rank]
    left = left if sides in ("left", "both") else None
    right = right if sides in ("right", "both") else None
    rows = left.shape[1] if left is not None else out
    cols = right.shape[1] if right is not None else inn
    direction = torch.randn(rows, cols, device=DEVICE)
    weight = torch.randn(shape, device=DEVICE).to(dt)
    expected_weight = weight.clone()
    gate_tensor = torch.tensor(gate, device=DEVICE)
    norms = run(backend, ops.project_back_update, weight, direction, left, right, 0.05, 0.1, gate_tensor)
    expected_norms = reference(ops.project_back_update, expected_weight, direction, left, right, 0.05, 0.1, gate_tensor)
    assert norms.dtype == expected_norms.dtype
    assert_close_scaled(weight, expected_weight, TOLERANCE[dt], "weight")
    # The norms are those of the weight as stored (after rounding to its dtype).
    assert_close_scaled(norms, expected_norms, 1e-12 if dt == torch.float64 else 2e-6, "norms")
    if gate == 0.0:
        assert torch.equal(weight, expected_weight)


@pytest.mark.parametrize("backend", compiled_backends())
def test_bad_arguments_are_rejected_with_the_argument_named(backend):
    weight = torch.randn(6, 8, device=DEVICE)
    with _dispatch.use_backend(backend):
        with pytest.raises(RuntimeError, match="left must have shape"):
            ops.project_back_update(weight, torch.randn(2, 8, device=DEVICE), torch.randn(5, 2, device=DEVICE), None,
                                    1.0, 0.0, torch.ones((), device=DEVICE))
        with pytest.raises(RuntimeError, match="weight is updated in place and must be contiguous"):
            ops.project_back_update(weight.T, torch.randn(8, 6, device=DEVICE), None, None, 1.0, 0.0,
                                    torch.ones((), device=DEVICE))
        with pytest.raises(RuntimeError, match="gate must be a 0-d"):
            ops.project_back_update(weight, torch.randn(6, 8, device=DEVICE), None, None, 1.0, 0.0,
                                    torch.ones(1, device=DEVICE))
        with pytest.raises(RuntimeError, match="weight must be 2-D"):
            ops.row_norm(torch.randn(5, device=DEVICE))
        with pytest.raises(RuntimeError, match="lora_B must have shape"):
            ops.adapter_row_norm(weight, torch.randn(2, 8, device=DEVICE), torch.randn(6, 3, device=DEVICE), 1.0)
        state = adam_state((4, 4), quantized=True)
        state[2] = torch.zeros(3, device=DEVICE)
        with pytest.raises(RuntimeError, match=r"absmax_avg must have shape \(1,\)"):
            ops.adam_update(torch.randn(4, 4, device=DEVICE), *state, torch.zeros((), device=DEVICE),
                            torch.zeros((), device=DEVICE), 0.9, 0.999, 1e-8)
        state = adam_state((4, 4), quantized=False)
        with pytest.raises(RuntimeError, match="step must be torch.float32, got torch.int64"):
            ops.adam_update(torch.randn(4, 4, device=DEVICE), *state, torch.zeros((), device=DEVICE, dtype=torch.int64),
                            torch.zeros((), device=DEVICE), 0.9, 0.999, 1e-8)


@pytest.mark.parametrize("backend", compiled_backends())
def test_row_norm_of_a_weight_requiring_grad_keeps_the_graph(backend):
    """The kernels have no derivative: a call autograd must record goes to the reference."""
    weight = torch.randn(4, 5, device=DEVICE, requires_grad=True)
    norms = run(backend, ops.row_norm, weight)
    norms.sum().backward()
    assert_close_scaled(weight.grad, weight.detach() / weight.detach().norm(dim=1, keepdim=True), 1e-6)
    with torch.no_grad():
        assert run(backend, ops.row_norm, weight).grad_fn is None


@pytest.fixture
def fresh_extension(monkeypatch):
    """`_extension` with its cached module, error and kernels forgotten (restored afterwards)."""
    monkeypatch.setattr(_extension, "_module", None)
    monkeypatch.setattr(_extension, "_error", None)
    _extension._kernel.cache_clear()
    yield _extension
    _extension._kernel.cache_clear()


def test_missing_extension_falls_back_and_says_why(fresh_extension, monkeypatch):
    real_import = _extension.importlib.import_module

    def import_module(name, *args):
        if name == "gradnormlorp_kernels._C":
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args)

    monkeypatch.setattr(_extension.importlib, "import_module", import_module)
    assert fresh_extension.load() is None
    assert "not built" in fresh_extension.load_error()
    with pytest.raises(ImportError, match="not built"):
        fresh_extension.cpu_row_norm  # noqa: B018 (the lookup is what the registry does)
    assert backends()["backends"]["cpu"] == {"available": False, "reason": fresh_extension.load_error()}
    monkeypatch.setattr(_dispatch, "_LOADED", {})
    monkeypatch.setattr(_dispatch, "_LOAD_ERRORS", {})
    weight = torch.randn(3, 4)
    with _dispatch.use_backend("cpu"):
        assert _dispatch.select("row_norm", "cpu")[0] == "reference"
        assert_close_scaled(ops.row_norm(weight), weight.norm(dim=1), 1e-6)
    assert "not built" in _dispatch.load_errors()["cpu"]


def test_extension_built_for_another_torch_is_refused(fresh_extension, monkeypatch):
    class OtherBuild:
        torch_version = "1.0"

    monkeypatch.setattr(_extension.importlib, "import_module", lambda name, *args: OtherBuild)
    assert fresh_extension.load() is None
    assert "built for torch 1.0" in fresh_extension.load_error()


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError):
        _extension.cpu_not_an_op  # noqa: B018
