"""Wrap a Hugging Face transformers model, fine-tune it in adapter mode, merge, save and reload.

The model is a tiny LlamaForCausalLM built from a config (byte-level vocabulary) so nothing is
downloaded; with a real checkpoint, replace the constructor by `LlamaForCausalLM.from_pretrained(...)`.
It is first trained briefly in full (plain AdamW) to stand in for a pre-trained model, then:

  wrap(model, mode="adapter")   every linear layer of the blocks becomes W0 + adapters, lm_head untouched;
                                only lora_A, lora_B and magnitude are trainable
  GradNormLoRPAdamW(model)      AdamW with 8-bit moments for the adapters
  merge(model)                  plain nn.Linear layers again: save_pretrained / from_pretrained as usual

    python python/finetune_transformers.py --steps 40 --out runs/finetune_llama
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gradnormlorp_kernels import GradNormLoRPAdamW, GradNormLoRPLinear, corpus, merge, wrap


def batches(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    while True:
        offsets = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=generator)
        yield data[offsets[:, None] + torch.arange(seq_len)[None, :]].long()


@torch.no_grad()
def validation_loss(model, data: torch.Tensor, seq_len: int = 128, windows: int = 32) -> float:
    """Mean loss over fixed, evenly spaced held-out windows (one batch's loss is too noisy to compare)."""
    model.eval()
    offsets = torch.linspace(0, data.numel() - seq_len, windows).long()
    tokens = data[offsets[:, None] + torch.arange(seq_len)[None, :]].long()
    loss = float(model(input_ids=tokens, labels=tokens).loss)
    model.train()
    return loss


def train(model, optimizer, stream, steps: int, label: str) -> None:
    model.train()
    for step in range(steps):
        tokens = next(stream)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % max(1, steps // 4) == 0 or step == steps - 1:
            print(f"{label} step {step:3d}  training loss {float(loss.detach()):.4f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40,
                        help="fine-tuning steps (the stand-in pre-training runs as many)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", help="where to save the merged model (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    text = corpus.load(None, min_bytes=129, max_bytes=1 << 20)  # the standard library's source, 1 MiB
    generator = torch.Generator().manual_seed(args.seed)
    stream = batches(text.train, batch_size=8, seq_len=128, generator=generator)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config)

    train(model, torch.optim.AdamW(model.parameters(), lr=3e-3), stream, args.steps, "pre-train (AdamW)")

    wrap(model, target_modules="all-linear", rank=args.rank, alpha=2 * args.rank, mode="adapter")
    wrapped = sum(isinstance(m, GradNormLoRPLinear) for m in model.modules())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"wrapped {wrapped} linear layers; training {trainable:,} of {total:,} parameters")
    optimizer = GradNormLoRPAdamW(model, lr=3e-3, rank=args.rank)
    before = validation_loss(model, text.validation)
    train(model, optimizer, stream, args.steps, "fine-tune (adapter)")
    after = validation_loss(model, text.validation)
    print(f"validation loss: {before:.4f} before fine-tuning, {after:.4f} after")

    model.eval()
    probe = next(stream)
    with torch.no_grad():
        adapted_logits = model(input_ids=probe).logits
    merge(model)
    leftover = sum(isinstance(m, GradNormLoRPLinear) for m in model.modules())
    with torch.no_grad():
        merged_logits = model(input_ids=probe).logits

    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or scratch
        model.save_pretrained(out)
        reloaded = LlamaForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            reloaded_logits = reloaded(input_ids=probe).logits
    merge_change = float((adapted_logits - merged_logits).abs().max())
    reload_change = float((merged_logits - reloaded_logits).abs().max())
    print(f"merged: {leftover} GradNormLoRPLinear left; largest logit change from merging {merge_change:.2e}, "
          f"after save_pretrained + from_pretrained {reload_change:.2e}")
    if args.out:
        print(f"saved the merged model to {args.out}")
    ok = leftover == 0 and merge_change < 1e-3 and reload_change == 0.0 and after < before
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
