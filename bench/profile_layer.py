"""Where a layer's forward+backward spends its time: torch.profiler's kernel table for one config, then
the host side (Python + launches) alone: wall time of the call without waiting for the GPU, and cProfile's
functions by own time.

    python bench/profile_layer.py [--mode adapter|full] [--features 4096] [--tokens 8192] [--rank 16] [--compiled]

--compiled profiles the layer under torch.compile(mode="reduce-overhead"), as the layer benchmark's compiled row
times it: what the graphs' replays add to the eager kernels (input copies, gaps between graphs).
"""

import argparse

import torch

from profiling import profile_call

from gradnormlorp_kernels import GradNormLoRPLinear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("adapter", "full"), default="adapter")
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rows", type=int, default=25, help="kernels to list")
    parser.add_argument("--compiled", action="store_true", help='torch.compile(mode="reduce-overhead") first')
    args = parser.parse_args()
    device = torch.device("cuda")
    base = torch.nn.Linear(args.features, args.features, bias=False, device=device, dtype=torch.bfloat16)
    layer = GradNormLoRPLinear.from_linear(base, rank=args.rank, alpha=2 * args.rank, mode=args.mode)
    with torch.no_grad():
        if layer.lora_B is not None:
            layer.lora_B.normal_(std=0.01)
    module = torch.compile(layer, mode="reduce-overhead") if args.compiled else layer
    x = torch.randn(args.tokens, args.features, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(args.tokens, args.features, device=device, dtype=torch.bfloat16)
    if args.compiled:  # as the layer benchmark's compiled rows: x is not copied into the graph at each replay
        torch._dynamo.mark_static_address(x)

    def step() -> None:
        module(x).backward(grad)
        x.grad = None
        for p in layer.parameters():
            p.grad = None

    profile_call(step, "forward+backward", args.rows)


if __name__ == "__main__":
    main()
