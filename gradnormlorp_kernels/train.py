"""The main job: train a small byte-level LLaMA with GradNormLoRP and its peers, side by side.

Every method starts from the same random initialisation and sees the same batches in the same order
for the same number of steps, under the same learning-rate schedule shape (linear warm-up, cosine
decay to 10%) and gradient clipping (norm 1.0). Pre-training methods run all steps from scratch:

  adamw               torch.optim.AdamW (fused on CUDA), every weight trained
  adamw8bit           bitsandbytes AdamW8bit
  galore              galore_torch.GaLoreAdamW on the blocks' linear weights
  galore8bit          galore_torch.GaLoreAdamW8bit (needs CUDA: it calls torch.cuda.synchronize)
  gradnormlorp-full   wrap(model, mode="full") + GradNormLoRPAdamW, 8-bit moments

Adapter mode is fine-tuning, which only means something from a trained model. Its protocol: AdamW
pre-trains the base for the first half of the steps (that is the adamw run itself, branched off at
half-way), then `gradnormlorp-adapter` (wrap(model, mode="adapter") + GradNormLoRPAdamW) trains only
the adapters and magnitudes for the second half on the same batches. Its final validation loss is
therefore comparable with adamw's, which kept training every weight over the same second half; its
state bytes and step time are those of the fine-tuning phase.
"""

from __future__ import annotations

import csv
import gc
import json
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import corpus as corpus_lib
from .models import LlamaConfig, TinyLlama
from .optimizer import GradNormLoRPAdamW
from .wrap import wrap

METHODS = ("adamw", "adamw8bit", "galore", "galore8bit", "gradnormlorp-full", "gradnormlorp-adapter")
# Peak learning rates. Projected methods use GaLore's pre-training setting (lr 1e-2 with scale 0.25,
# also the paper's); the ones that update every weight directly use AdamW's usual 1e-3 scaled for a
# small model; adapters use a LoRA-style fine-tuning rate.
PEAK_LR = {
    "adamw": 3e-3,
    "adamw8bit": 3e-3,
    "galore": 1e-2,
    "galore8bit": 1e-2,
    "gradnormlorp-full": 1e-2,
    "gradnormlorp-adapter": 3e-3,
}
PROJECTION_SCALE = 0.25
WARMUP_FRACTION = 0.1
FINAL_LR_FRACTION = 0.1
CLIP_NORM = 1.0


@dataclass
class TrainConfig:
    steps: int
    batch_size: int
    seq_len: int
    rank: int
    dim: int
    layers: int
    heads: int
    update_proj_gap: int
    eval_every: int
    eval_batches: int
    methods: tuple[str, ...]
    device: str
    seed: int = 0
    out: str = "runs/train"
    corpus: str | None = None
    max_corpus_bytes: int = corpus_lib.DEFAULT_MAX_BYTES
    progress: bool = True


def default_settings(device: str) -> dict:
    """Defaults that finish in a few minutes: small on CPU (2 cores), larger on a GPU."""
    if torch.device(device).type == "cuda":
        return dict(steps=600, batch_size=32, seq_len=512, rank=128, dim=512, layers=8, heads=8,
                    update_proj_gap=200, eval_every=100, eval_batches=16)
    return dict(steps=200, batch_size=16, seq_len=128, rank=32, dim=128, layers=2, heads=4,
                update_proj_gap=50, eval_every=25, eval_batches=4)


def method_availability(method: str, device: str) -> tuple[bool, str]:
    """Whether `method` can run here, and why not."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method in ("galore", "galore8bit"):
        try:
            import galore_torch  # noqa: F401
        except ImportError as exc:
            return False, f"galore-torch is not installed ({exc})"
    if method in ("adamw8bit", "galore8bit"):
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:  # bitsandbytes raises more than ImportError when its binary cannot load
            return False, f"bitsandbytes does not load ({type(exc).__name__}: {exc})"
    if method == "galore8bit" and torch.device(device).type != "cuda":
        return False, "GaLoreAdamW8bit calls torch.cuda.synchronize() in every step, so it needs a CUDA device"
    return True, ""


def resolve_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asked for, but torch sees no CUDA GPU (torch {torch.__version__})")
    return device


# ---- measurement helpers ----

def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes (numel x element size) of every tensor reachable from `optimizer.state`, inside dicts, lists
    and objects such as GaLore's projector; a tensor reached twice (bitsandbytes shares its quantisation
    maps between parameters) counts once. A view counts its own elements, not the storage behind it."""
    seen_tensors: set[tuple] = set()
    seen_objects: set[int] = set()
    total = 0

    def visit(value) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            key = (value.data_ptr(), tuple(value.shape), tuple(value.stride()), value.dtype)
            if key not in seen_tensors:
                seen_tensors.add(key)
                total += value.numel() * value.element_size()
            return
        if id(value) in seen_objects:
            return
        seen_objects.add(id(value))
        if isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif hasattr(value, "__dict__") and not isinstance(value, (type, nn.Module)):
            for item in vars(value).values():
                visit(item)

    for state in optimizer.state.values():
        visit(state)
    return total


class PeakMemory:
    """Peak memory of one run: CUDA max_memory_allocated on a GPU, the process's peak RSS on the CPU.

    On Linux the RSS high-water mark is reset per run (writing 5 to /proc/self/clear_refs); where that
    is not possible the value is the process's peak so far, and `kind` says so.
    """

    def __init__(self, device: str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.device = device
        self.kind = "cuda_max_allocated" if self.cuda else "process_peak_rss"

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            self.kind = "process_peak_rss_since_start"

    def peak_bytes(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        # ru_maxrss is KiB on Linux, bytes on macOS.
        scale = 1 if os.uname().sysname == "Darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---- data ----

class Batches:
    """The same random training windows for every method, and fixed evenly spaced validation windows."""

    def __init__(self, corpus: corpus_lib.Corpus, steps: int, batch_size: int, seq_len: int, eval_batches: int,
                 seed: int) -> None:
        self.corpus = corpus
        self.window = seq_len + 1
        generator = torch.Generator().manual_seed(seed)
        self.train_offsets = torch.randint(0, corpus.train.numel() - self.window + 1, (steps, batch_size),
                                           generator=generator)
        count = eval_batches * batch_size
        last = corpus.validation.numel() - self.window
        self.validation_offsets = torch.linspace(0, last, count).long().view(eval_batches, batch_size)

    @staticmethod
    def _gather(data: torch.Tensor, offsets: torch.Tensor, window: int) -> torch.Tensor:
        index = offsets[:, None] + torch.arange(window)[None, :]
        return data[index].long()

    def train(self, step: int) -> torch.Tensor:
        return self._gather(self.corpus.train, self.train_offsets[step], self.window)

    def validation(self):
        for offsets in self.validation_offsets:
            yield self._gather(self.corpus.validation, offsets, self.window)


# ---- methods ----

def _block_linear_weights(model: TinyLlama) -> list[nn.Parameter]:
    return [m.weight for m in model.blocks.modules() if isinstance(m, nn.Linear)]


def _galore_groups(model: TinyLlama, config: TrainConfig) -> list[dict]:
    projected = _block_linear_weights(model)
    ids = {id(p) for p in projected}
    regular = [p for p in model.parameters() if id(p) not in ids]
    return [
        {"params": regular},
        {"params": projected, "rank": config.rank, "update_proj_gap": config.update_proj_gap,
         "scale": PROJECTION_SCALE, "proj_type": "std"},
    ]


def build_method(method: str, model: TinyLlama, config: TrainConfig) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The (possibly wrapped) model and the optimizer for `method`; `model` is already on its device."""
    lr = PEAK_LR[method]
    cuda = torch.device(config.device).type == "cuda"
    if method == "adamw":
        return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=cuda)
    if method == "adamw8bit":
        import bitsandbytes as bnb

        return model, bnb.optim.AdamW8bit(model.parameters(), lr=lr, weight_decay=0.0)
    if method == "galore":
        from galore_torch import GaLoreAdamW

        return model, GaLoreAdamW(_galore_groups(model, config), lr=lr, eps=1e-8, weight_decay=0.0,
                                  no_deprecation_warning=True)
    if method == "galore8bit":
        from galore_torch import GaLoreAdamW8bit

        return model, GaLoreAdamW8bit(_galore_groups(model, config), lr=lr, weight_decay=0.0)
    gradnorm_options = dict(lr=lr, rank=config.rank, update_proj_gap=config.update_proj_gap,
                            scale=PROJECTION_SCALE, state_bits=8, seed=config.seed)
    if method == "gradnormlorp-full":
        wrap(model, "all-linear", rank=config.rank, mode="full")
        return model, GradNormLoRPAdamW(model, **gradnorm_options)
    if method == "gradnormlorp-adapter":
        wrap(model, "all-linear", rank=config.rank, alpha=2 * config.rank, mode="adapter")
        return model, GradNormLoRPAdamW(model, **gradnorm_options)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over the first 10% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, int(WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, device: str) -> float:
    was_training = model.training
    model.eval()
    losses = [float(model.loss(tokens.to(device))) for tokens in batches.validation()]
    model.train(was_training)
    return sum(losses) / len(losses)


@dataclass
class MethodResult:
    method: str
    final_val_loss: float
    optimizer_state_bytes: int
    mean_step_ms: float
    peak_memory_bytes: int
    memory_kind: str
    trainable_params: int
    first_step: int
    steps: int
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (step, train loss, val loss or nan)


def _train_steps(model, optimizer, batches: Batches, config: TrainConfig, first: int, last: int,
                 on_step: Callable[[int, float, float], None], snapshot_at: int | None = None):
    """Train for steps [first, last) and call on_step(step, train loss, seconds) after each;
    returns a CPU copy of the weights after `snapshot_at` steps when asked for."""
    peak_lrs = [group["lr"] for group in optimizer.param_groups]
    trainable = [p for p in model.parameters() if p.requires_grad]
    snapshot = None
    model.train()
    for step in range(first, last):
        if step == snapshot_at:
            snapshot = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        factor = lr_factor(step, config.steps)
        for group, peak in zip(optimizer.param_groups, peak_lrs):
            group["lr"] = peak * factor
        tokens = batches.train(step).to(config.device, non_blocking=True)
        _sync(config.device)
        start = time.perf_counter()
        loss = model.loss(tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, CLIP_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(config.device)
        on_step(step, float(loss.detach()), time.perf_counter() - start)
    if snapshot_at == last:
        snapshot = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    for group, peak in zip(optimizer.param_groups, peak_lrs):
        group["lr"] = peak
    return snapshot


def run_method(method: str, init_state: dict, model_config: LlamaConfig, batches: Batches, config: TrainConfig,
               first_step: int = 0, progress=None, snapshot_at: int | None = None):
    """Train `method` from `init_state` over steps [first_step, config.steps); returns (result, snapshot)."""
    memory = PeakMemory(config.device)
    memory.reset()
    torch.manual_seed(config.seed)
    model = TinyLlama(model_config)
    model.load_state_dict(init_state)
    model.to(config.device)
    model, optimizer = build_method(method, model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    curve: list[tuple[int, float, float]] = [(first_step, float("nan"), evaluate(model, batches, config.device))]
    step_seconds: list[float] = []

    def on_step(step: int, loss: float, seconds: float) -> None:
        if not math.isfinite(loss):
            raise FloatingPointError(f"{method}: training loss became {loss} at step {step}")
        step_seconds.append(seconds)
        done = step + 1
        val = float("nan")
        if done % config.eval_every == 0 or done == config.steps:
            val = evaluate(model, batches, config.device)
        curve.append((done, loss, val))
        if progress is not None:
            progress.update(1)
            progress.set_postfix_str(f"{method} loss {loss:.3f}", refresh=False)

    snapshot = _train_steps(model, optimizer, batches, config, first_step, config.steps, on_step, snapshot_at)
    # The first step includes one-off set-up (state allocation, the first projector): timed separately.
    timed = step_seconds[1:] or step_seconds
    result = MethodResult(
        method=method,
        final_val_loss=curve[-1][2],
        optimizer_state_bytes=optimizer_state_bytes(optimizer),
        mean_step_ms=1000 * sum(timed) / len(timed),
        peak_memory_bytes=memory.peak_bytes(),
        memory_kind=memory.kind,
        trainable_params=trainable,
        first_step=first_step,
        steps=config.steps - first_step,
        curve=curve,
    )
    return result, snapshot


# ---- reporting ----

def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def format_table(results: list[MethodResult]) -> str:
    header = ("method", "steps", "final val loss", "bits/byte", "opt state MiB", "mean step ms", "peak mem MiB")
    rows = [
        (r.method, f"{r.first_step}-{r.first_step + r.steps}", f"{r.final_val_loss:.4f}",
         f"{r.final_val_loss / math.log(2):.3f}", _mib(r.optimizer_state_bytes), f"{r.mean_step_ms:.1f}",
         _mib(r.peak_memory_bytes))
        for r in results
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_outputs(results: list[MethodResult], config: TrainConfig, model_config: LlamaConfig,
                  corpus: corpus_lib.Corpus) -> dict[str, Path]:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.csv", "curves": out / "losses.csv", "plot": out / "loss.png",
             "config": out / "config.json"}
    with open(paths["results"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "first_step", "steps", "final_val_loss", "optimizer_state_bytes", "mean_step_ms",
                         "peak_memory_bytes", "memory_kind", "trainable_params", "device"])
        for r in results:
            writer.writerow([r.method, r.first_step, r.steps, f"{r.final_val_loss:.6f}", r.optimizer_state_bytes,
                             f"{r.mean_step_ms:.3f}", r.peak_memory_bytes, r.memory_kind, r.trainable_params,
                             config.device])
    with open(paths["curves"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "step", "train_loss", "val_loss"])
        for r in results:
            for step, train_loss, val_loss in r.curve:
                writer.writerow([r.method, step, "" if math.isnan(train_loss) else f"{train_loss:.6f}",
                                 "" if math.isnan(val_loss) else f"{val_loss:.6f}"])
    paths["config"].write_text(json.dumps({
        "train": {k: v for k, v in asdict(config).items() if k != "progress"},
        "model": model_config.to_dict(),
        "corpus": {"source": corpus.source, "files": corpus.files, "train_bytes": corpus.train.numel(),
                   "validation_bytes": corpus.validation.numel()},
        "peak_lr": {m: PEAK_LR[m] for m in config.methods},
        "torch": torch.__version__,
    }, indent=2))
    plot_losses(results, paths["plot"], config)
    return paths


def plot_losses(results: list[MethodResult], path: Path, config: TrainConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (train_axis, val_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    # One colour per method, whichever subset ran, so plots of different runs compare at a glance.
    colours = {method: plt.get_cmap("tab10")(i) for i, method in enumerate(METHODS)}
    for r in results:
        train = [(s, loss) for s, loss, _ in r.curve if not math.isnan(loss)]
        smoothed, ema = [], None
        for step, loss in train:
            ema = loss if ema is None else 0.9 * ema + 0.1 * loss
            smoothed.append((step, ema))
        if smoothed:
            train_axis.plot(*zip(*smoothed), label=r.method, color=colours[r.method])
        val = [(s, v) for s, _, v in r.curve if not math.isnan(v)]
        val_axis.plot(*zip(*val), marker="o", markersize=3, label=r.method, color=colours[r.method])
    train_axis.set_title("training loss (EMA 0.9)")
    val_axis.set_title("validation loss")
    for axis in (train_axis, val_axis):
        axis.set_xlabel("step")
        axis.set_ylabel("cross-entropy (nats/byte)")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"byte-level LLaMA dim {config.dim} x {config.layers} layers, rank {config.rank}, "
                    f"batch {config.batch_size} x {config.seq_len}, {config.device}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---- the job ----

def run(config: TrainConfig, log: Callable[[str], None] = lambda message: None) -> tuple[list[MethodResult], dict]:
    """Run every method in `config.methods`; returns the results and the paths of the files written.

    On CUDA, float32 matrix products use TensorFloat-32 for the duration (every method alike).
    """
    previous_precision = torch.get_float32_matmul_precision()
    if torch.device(config.device).type == "cuda":
        torch.set_float32_matmul_precision("high")
    try:
        return _run(config, log)
    finally:
        torch.set_float32_matmul_precision(previous_precision)


def _run(config: TrainConfig, log: Callable[[str], None]) -> tuple[list[MethodResult], dict]:
    for method in config.methods:
        ok, why = method_availability(method, config.device)
        if not ok:
            raise ValueError(f"method {method!r} cannot run here: {why}")
    corpus = corpus_lib.load(config.corpus, min_bytes=config.seq_len + 1, max_bytes=config.max_corpus_bytes)
    log(f"corpus: {corpus.source}: {corpus.files} files, {corpus.train.numel():,} training and "
        f"{corpus.validation.numel():,} validation bytes")
    model_config = LlamaConfig(dim=config.dim, n_layers=config.layers, n_heads=config.heads,
                               max_seq_len=config.seq_len)
    torch.manual_seed(config.seed)
    init_state = {k: v.clone() for k, v in TinyLlama(model_config).state_dict().items()}
    parameters = sum(v.numel() for v in init_state.values())
    log(f"model: {parameters:,} parameters {model_config.to_dict()}; device {config.device}")
    batches = Batches(corpus, config.steps, config.batch_size, config.seq_len, config.eval_batches, config.seed)

    branch_step = config.steps // 2
    adapter = "gradnormlorp-adapter" in config.methods
    order = [m for m in config.methods if m == "adamw"] + [m for m in config.methods if m != "adamw"]
    total = sum(config.steps - (branch_step if m == "gradnormlorp-adapter" else 0) for m in order)
    if adapter and "adamw" not in order:
        total += branch_step
    from tqdm.auto import tqdm

    results: list[MethodResult] = []
    pretrained = None
    with tqdm(total=total, desc="train", unit="step", disable=not config.progress, mininterval=1.0) as progress:
        for method in order:
            if method == "gradnormlorp-adapter":
                if pretrained is None:
                    # adamw was not asked for: pre-train the base for the first half without reporting it.
                    progress.set_description("adamw (base for adapters)")
                    pretrained = _pretrain_base(init_state, model_config, batches, config, branch_step, progress)
                progress.set_description(method)
                result, _ = run_method(method, pretrained, model_config, batches, config, first_step=branch_step,
                                       progress=progress)
            else:
                progress.set_description(method)
                snapshot_at = branch_step if (method == "adamw" and adapter) else None
                result, snapshot = run_method(method, init_state, model_config, batches, config, progress=progress,
                                              snapshot_at=snapshot_at)
                if snapshot is not None:
                    pretrained = snapshot
            results.append(result)
    paths = write_outputs(results, config, model_config, corpus)
    return results, paths


def _pretrain_base(init_state, model_config, batches, config: TrainConfig, branch_step: int, progress) -> dict:
    """CPU weights after AdamW trains `init_state` for `branch_step` steps (the adamw run's first half)."""
    torch.manual_seed(config.seed)
    model = TinyLlama(model_config)
    model.load_state_dict(init_state)
    model.to(config.device)
    model, optimizer = build_method("adamw", model, config)
    return _train_steps(model, optimizer, batches, config, 0, branch_step, lambda *_: progress.update(1),
                        snapshot_at=branch_step)
