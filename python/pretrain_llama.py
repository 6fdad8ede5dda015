"""Pre-train the small byte-level LLaMA from a script: full mode + GradNormLoRPAdamW (8-bit, projected).

What `gradnormlorp train` does for one method, written out: build the model, `wrap(..., mode="full")`
so every linear layer of the blocks trains as a direction and a magnitude, give the optimizer the
model (directions are projected to rank r with 8-bit moments; embeddings, norms and the head get
8-bit AdamW), train on the standard library's source, checkpoint and resume, merge for inference,
and sample a little text.

    python python/pretrain_llama.py --steps 200 --out runs/pretrain_llama
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from gradnormlorp_kernels import GradNormLoRPAdamW, corpus, merge, wrap
from gradnormlorp_kernels.models import LlamaConfig, TinyLlama


@torch.no_grad()
def validation_loss(model: TinyLlama, data: torch.Tensor, seq_len: int, batches: int = 4) -> float:
    model.eval()
    offsets = torch.linspace(0, data.numel() - seq_len - 1, batches * 8).long().view(batches, 8)
    losses = [float(model.loss(data[o[:, None] + torch.arange(seq_len + 1)].long())) for o in offsets]
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def sample(model: TinyLlama, prompt: bytes, length: int) -> bytes:
    """Greedy continuation of `prompt`, byte by byte."""
    model.eval()
    tokens = torch.tensor([list(prompt)], dtype=torch.long)
    for _ in range(length):
        window = tokens[:, -model.config.max_seq_len:]
        next_token = model(window)[0, -1].argmax()
        tokens = torch.cat((tokens, next_token.view(1, 1)), dim=1)
    return bytes(tokens[0, len(prompt):].tolist())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--out", help="folder for the checkpoint (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    text = corpus.load(None, min_bytes=args.seq_len + 1, max_bytes=4 << 20)
    print(f"corpus: {text.source}, {text.train.numel():,} training bytes")
    model = TinyLlama(LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=4, max_seq_len=args.seq_len))
    wrap(model, target_modules="all-linear", rank=args.rank, mode="full")  # lm_head stays nn.Linear
    optimizer = GradNormLoRPAdamW(model, lr=1e-2, rank=args.rank, update_proj_gap=max(1, args.steps // 4),
                                  scale=0.25, state_bits=8)
    generator = torch.Generator().manual_seed(args.seed)
    print(f"step    0  validation loss {validation_loss(model, text.validation, args.seq_len):.4f}")

    def train_step(step: int) -> float:
        offsets = torch.randint(0, text.train.numel() - args.seq_len - 1, (args.batch_size,), generator=generator)
        tokens = text.train[offsets[:, None] + torch.arange(args.seq_len + 1)].long()
        # Linear warm-up over the first tenth of the run.
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 * min(1.0, (step + 1) / max(1, args.steps // 10))
        loss = model.loss(tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    half = args.steps // 2
    for step in range(half):
        train_step(step)
    print(f"step {half:4d}  validation loss {validation_loss(model, text.validation, args.seq_len):.4f}")

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(args.out or scratch) / "checkpoint.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        # Projectors, 8-bit moments and their absmax are plain tensors: weights_only loading works.
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state()}, path)
        checkpoint = torch.load(path, weights_only=True)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    generator.set_state(checkpoint["generator"])
    print(f"checkpointed and resumed at step {half} ({optimizer.state_bytes():,} bytes of optimizer state)")

    for step in range(half, args.steps):
        train_step(step)
    final = validation_loss(model, text.validation, args.seq_len)
    print(f"step {args.steps:4d}  validation loss {final:.4f}  ({final / 0.6931:.3f} bits per byte)")

    merge(model)  # plain nn.Linear layers for inference
    prompt = b"def "
    print(f"greedy sample after {prompt!r}: {sample(model, prompt, 60)!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
