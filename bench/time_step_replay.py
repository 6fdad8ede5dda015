"""The graphed optimizer step on the optimizer benchmark's 28 LLaMA-1B-shaped weights, by how many streams
(`_step_graph.LANES`) the captured step spreads its matrices over: the replay's GPU time (`do_bench` of the
captured graph) and the median step from an idle GPU (host work included, as the benchmark times it).

    python bench/time_step_replay.py [--rank 128] [--lanes 1,2,4,8] [--weight-decay 0]
"""

import argparse
import statistics

import torch
import triton

from gradnormlorp_kernels import GradNormLoRPAdamW, _step_graph
from gradnormlorp_kernels.benchmarks.optimizer import SIZES, weight_shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--lanes", default="1,2,4,8")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    weights = [torch.randn(shape, device=device, dtype=torch.bfloat16) * 0.02 for shape in weight_shapes(SIZES["full"])]
    grads = [torch.randn_like(w) for w in weights]
    for lanes in (int(value) for value in args.lanes.split(",")):
        _step_graph.LANES = lanes  # read when the optimizer lays out its moments
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        optimizer = GradNormLoRPAdamW([{"params": params, "project": True}], lr=1e-3, rank=args.rank,
                                      update_proj_gap=10**6, scale=0.25, state_bits=8,
                                      weight_decay=args.weight_decay)

        def step() -> None:
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()

        for _ in range(5):  # first step, then the captures (one per gradient address)
            step()
        torch.cuda.synchronize()
        graph = next(iter(optimizer._graphs[0].graphs.values())).graph
        replay_ms = triton.testing.do_bench(graph.replay, warmup=50, rep=400)
        from_idle = []
        for _ in range(60):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            from_idle.append(start.elapsed_time(end))
        print(f"rank {args.rank} lanes {lanes} weight decay {args.weight_decay:g}: replay {1e3 * replay_ms:7.1f} us, "
              f"step from idle median {1e3 * statistics.median(from_idle):7.1f} us", flush=True)


if __name__ == "__main__":
    main()
