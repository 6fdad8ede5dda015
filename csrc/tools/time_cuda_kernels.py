"""Time the compiled `cuda` backend's kernels next to the `triton` backend and the reference ops on a GPU.

    python csrc/tools/time_cuda_kernels.py

`triton.testing.do_bench` medians; bandwidth counts each op's floor of memory traffic (every input read
once, every output written once, in-place tensors once each way: DESIGN.md section 4), as a percentage
of a measured device-to-device copy. The full benchmark suite (`gradnormlorp bench`) measures the same
ops; this is the quick check for the extension alone.
"""

import torch
import triton.testing

from gradnormlorp_kernels import _dispatch, ops

OUT, HIDDEN, ADAPTER_RANK, PROJECTOR_RANK = 11008, 4096, 16, 128
STATE_SHAPES = ((1024, 4096), (4096, 8192))


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cases(device):
    w = torch.randn(OUT, HIDDEN, device=device, dtype=torch.bfloat16)
    # Factors in W0's dtype, as the layer stores them: other dtypes take torch's dense path.
    a = (torch.randn(ADAPTER_RANK, HIDDEN, device=device) * 0.02).to(w.dtype)
    b = (torch.randn(OUT, ADAPTER_RANK, device=device) * 0.01).to(w.dtype)
    norm = torch.empty(OUT, device=device)
    yield "row_norm bf16", lambda: ops.row_norm(w), nbytes(w, norm)
    base_A = torch.empty(OUT, ADAPTER_RANK, device=device)
    yield (
        f"adapter_row_norm bf16 r={ADAPTER_RANK}",
        lambda: ops.adapter_row_norm(w, a, b, 2.0),
        nbytes(w, a, b, norm, base_A),
    )
    left = torch.linalg.qr(torch.randn(OUT, PROJECTOR_RANK, device=device)).Q
    direction = torch.randn(PROJECTOR_RANK, HIDDEN, device=device)
    gate = torch.ones((), device=device)
    yield (
        f"project_back_update bf16 left r={PROJECTOR_RANK}",
        lambda: ops.project_back_update(w, direction, left, None, 1e-6, 0.0, gate),
        2 * nbytes(w) + nbytes(direction, left, norm),
    )
    for shape in STATE_SHAPES:
        blocks = -(-shape[0] * shape[1] // ops.BLOCK_SIZE)
        grad = torch.randn(shape, device=device)
        states = [
            torch.randint(0, 256, shape, device=device, dtype=torch.uint8),
            torch.randint(0, 256, shape, device=device, dtype=torch.uint8),
            torch.rand(blocks, device=device),
            torch.rand(blocks, device=device),
        ]
        maps = [ops.dynamic_map(True, device), ops.dynamic_map(False, device)]
        counters = [torch.full((), 10.0, device=device), torch.zeros((), device=device)]
        yield (
            f"adam_update 8-bit {shape[0]}x{shape[1]}",
            lambda grad=grad, states=states, maps=maps, counters=counters: ops.adam_update(
                grad, *states, *maps, *counters, 0.9, 0.999, 1e-8
            ),
            nbytes(grad) * 2 + 2 * nbytes(*states),  # grad in, direction out, states both ways
        )


def copy_bandwidth(device) -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read plus bytes written)."""
    source = torch.empty(1 << 28, device=device)
    target = torch.empty_like(source)
    return 2 * nbytes(source) / (triton.testing.do_bench(lambda: target.copy_(source)) * 1e6)


def main() -> None:
    device = torch.device("cuda")
    copy_gbps = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name()}: copy {copy_gbps:.0f} GB/s")
    print(f"{'op':45s} {'backend':10s} {'median us':>10s} {'GB/s':>8s} {'% copy':>7s}")
    for name, call, moved in cases(device):
        for backend in ("cuda", "triton", "reference"):
            with _dispatch.use_backend(backend):
                if _dispatch.select(name.split()[0], "cuda")[0] != backend:
                    print(f"{name:45s} {backend:10s} {'not available':>10s}")
                    continue
                ms = triton.testing.do_bench(call)
            gbps = moved / (ms * 1e6)
            print(f"{name:45s} {backend:10s} {ms * 1e3:10.1f} {gbps:8.0f} {100 * gbps / copy_gbps:6.0f}%")


if __name__ == "__main__":
    main()
