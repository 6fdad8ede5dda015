"""What one launch costs the host on this machine: the wall time of issuing a call while a sleep kernel keeps
the GPU busy (so nothing waits on the GPU), per call, for the building blocks of the layer's forward and
backward. On the lent GPU hosts (Firecracker VMs) these costs, not the kernels, set an eager layer's speed.

    python bench/time_host_launch.py [--calls 200]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _few_args_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n), mask=offsets < n)


@triton.jit
def _many_args_kernel(x_ptr, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, n, s1, s2, s3, s4, s5, s6, f1, f2,
                      C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n), mask=offsets < n)


def host_us(fn, calls: int) -> float:
    """Median host microseconds per call of `fn`, the GPU kept busy by a sleep kernel."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls // 10):
        torch.cuda._sleep(50_000_000)
        start = time.perf_counter()
        for _ in range(10):
            fn()
        times.append((time.perf_counter() - start) / 10 * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    device = torch.device("cuda")
    x = torch.randn(4096, device=device)
    others = [torch.randn(16, device=device) for _ in range(10)]
    a = torch.randn(16, 4096, device=device, dtype=torch.bfloat16)
    big_x = torch.randn(8192, 4096, device=device, dtype=torch.bfloat16)
    big_w = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, grad):
            return grad

    leaf = torch.randn(16, device=device, requires_grad=True)
    seed = torch.ones(16, device=device)
    cases = {
        "triton launch, 2 args": lambda: _few_args_kernel[(4,)](x, 4096, BLOCK=1024),
        "triton launch, 20 args": lambda: _many_args_kernel[(4,)](
            x, *others, 4096, 1, 2, 3, 4, 5, 6, 1.0, 2.0, C1=True, C2=False, C3=16, BLOCK=1024),
        "torch.empty (4096,)": lambda: torch.empty(4096, device=device),
        "torch.empty_like (8192x4096)": lambda: torch.empty_like(big_x),
        "x.mul(2.0) (4096,)": lambda: x.mul(2.0),
        "torch.mm 16x4096 @ 4096x16 bf16": lambda: torch.mm(a, a.T),
        "F.linear 8192x4096 @ 4096x4096 bf16": lambda: F.linear(big_x, big_w),
        "torch.mm 8192x4096 @ 4096x16 bf16": lambda: torch.mm(big_x, a.T),
        "autograd.Function fwd+bwd (identity)": lambda: Identity.apply(leaf).backward(seed),
    }
    print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}, triton {triton.__version__}")
    for name, fn in cases.items():
        print(f"  {name:<44} {host_us(fn, args.calls):8.1f} us host per call")


if __name__ == "__main__":
    main()
