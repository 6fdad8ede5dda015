"""Plug GradNormLoRPLinear into your own PyTorch model and train it with GradNormLoRPAdamW.

A small MLP classifier on a synthetic task (points on interleaved spirals), built directly from
GradNormLoRPLinear layers in full mode: each weight is trained as a direction V and a per-row
magnitude M (W = diag(M / ||V||_row) V), and the optimizer keeps its Adam moments in a rank-r
subspace of each direction's gradient, 8-bit. At the end the layers are merged into plain nn.Linear
for inference, with the same outputs.

    python python/custom_model.py --steps 300
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from gradnormlorp_kernels import GradNormLoRPAdamW, GradNormLoRPLinear, merge


def spirals(n_per_class: int, classes: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`classes` interleaved 2-D spirals with a little noise: a task a linear model cannot solve."""
    radius = torch.linspace(0.1, 1.0, n_per_class).repeat(classes)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    angle = radius * 4.0 + labels * (2 * math.pi / classes) + 0.15 * torch.randn(radius.shape, generator=generator)
    points = torch.stack((radius * angle.cos(), radius * angle.sin()), dim=1)
    return points, labels


class SpiralClassifier(nn.Module):
    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        # Fourier features make the 2-D input wide enough for the hidden layers to matter.
        self.register_buffer("frequencies", torch.randn(2, width // 2, generator=torch.Generator().manual_seed(1)) * 3)
        self.hidden1 = GradNormLoRPLinear(width, width, mode="full")
        self.hidden2 = GradNormLoRPLinear(width, width, mode="full")
        # A small output head stays a plain nn.Linear: a 3 x width matrix has nothing to project.
        self.out = nn.Linear(width, classes)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        angles = points @ self.frequencies
        features = torch.cat((angles.sin(), angles.cos()), dim=1)
        hidden = torch.relu(self.hidden1(features))
        hidden = torch.relu(self.hidden2(hidden))
        return self.out(hidden)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16, help="rank of the projected optimizer states")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    classes = 3
    train_x, train_y = spirals(512, classes, generator)
    test_x, test_y = spirals(128, classes, generator)
    model = SpiralClassifier(args.width, classes)
    # The model-taking form projects every full-mode direction (hidden1, hidden2) and gives the
    # magnitudes, biases and the head plain AdamW. Per-group settings work as in GaLore:
    # GradNormLoRPAdamW([{"params": [...], "rank": 16}, {"params": [...]}], lr=...).
    optimizer = GradNormLoRPAdamW(model, lr=1e-2, rank=args.rank, update_proj_gap=50, scale=0.25)
    loss_fn = nn.CrossEntropyLoss()

    def accuracy(x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return float((model(x).argmax(1) == y).float().mean())

    first_loss = None
    for step in range(args.steps):
        batch = torch.randint(0, train_x.shape[0], (128,), generator=generator)
        loss = loss_fn(model(train_x[batch]), train_y[batch])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        first_loss = float(loss.detach()) if first_loss is None else first_loss
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {float(loss.detach()):.4f}  test accuracy {accuracy(test_x, test_y):.3f}")

    print(f"optimizer state: {optimizer.state_bytes():,} bytes; skipped steps: {optimizer.skipped_steps()}")
    with torch.no_grad():
        before = model(test_x)
    merge(model)  # every GradNormLoRPLinear becomes a plain nn.Linear holding W = diag(M/||V||) V
    with torch.no_grad():
        after = model(test_x)
    difference = float((before - after).abs().max())
    plain = all(type(m) is nn.Linear for m in (model.hidden1, model.hidden2))
    print(f"merged into nn.Linear: {plain}; largest output change {difference:.2e}")
    final_loss = float(loss_fn(after, test_y))
    print(f"first training loss {first_loss:.4f}, final test loss {final_loss:.4f}")
    return 0 if plain and difference < 1e-4 and final_loss < first_loss else 1


if __name__ == "__main__":
    raise SystemExit(main())
