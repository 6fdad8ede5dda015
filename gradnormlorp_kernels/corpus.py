"""Byte-level text corpora for the training job: the embedded default and the user's own text.

The default corpus needs no download: it is the Python standard library's own source, read from the
running interpreter's installation in a deterministic order. The split into training and held-out
validation text interleaves fixed-size chunks, so both come from the same mix of files.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MAX_BYTES = 8 * 1024 * 1024
# Every VALIDATION_STRIDE-th chunk is held out (10%).
VALIDATION_STRIDE = 10
MAX_CHUNK_BYTES = 8192
# Directories of the standard library that hold installed third-party code, caches or test data.
_SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


class CorpusError(ValueError):
    """The corpus path does not exist, holds no text, or is too small to train on."""


@dataclass(frozen=True)
class Corpus:
    """Training and validation bytes (uint8 tensors), and where they came from."""

    train: torch.Tensor
    validation: torch.Tensor
    source: str
    files: int

    @property
    def total_bytes(self) -> int:
        return self.train.numel() + self.validation.numel()


def _walk_sorted(root: Path, skipped_dirs: set[str]):
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in skipped_dirs and not d.startswith("."))
        for name in sorted(files):
            yield Path(directory) / name


def _as_text(raw: bytes) -> bytes | None:
    """`raw` if it looks like UTF-8 text (decodes, no NUL bytes), else None."""
    if not raw or b"\x00" in raw:
        return None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return raw


def _collect(paths, max_bytes: int) -> tuple[bytes, int]:
    pieces, total, files = [], 0, 0
    for path in paths:
        if total >= max_bytes:
            break
        try:
            text = _as_text(path.read_bytes())
        except OSError:
            continue
        if text is None:
            continue
        text = text[: max_bytes - total]
        pieces.append(text)
        total += len(text)
        files += 1
    return b"\n".join(pieces), files


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def read_stdlib(max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[bytes, int]:
    """The standard library's `.py` sources (sorted walk, third-party and test dirs skipped), capped."""
    root = stdlib_root()
    paths = (p for p in _walk_sorted(root, _SKIPPED_STDLIB_DIRS) if p.suffix == ".py")
    return _collect(paths, max_bytes)


def read_path(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[bytes, int]:
    """The UTF-8 text of a file, or of every text file under a directory (sorted walk), capped."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"corpus path {str(path)!r} does not exist")
    if path.is_file():
        data, files = _collect([path], max_bytes)
    elif path.is_dir():
        data, files = _collect(_walk_sorted(path, {"__pycache__"}), max_bytes)
    else:
        raise CorpusError(f"corpus path {str(path)!r} is neither a file nor a directory")
    if not data:
        raise CorpusError(f"corpus path {str(path)!r} holds no UTF-8 text")
    return data, files


def split(data: bytes, min_bytes: int, source: str = "", files: int = 0) -> Corpus:
    """Interleaved train/validation split: chunk `data`, hold out every tenth chunk.

    Chunks are at most 8 KiB and at least 20 per corpus, so even a small file has a validation part.
    Raises CorpusError if either part is shorter than `min_bytes` (one training window).
    """
    if min_bytes < 1:
        raise ValueError(f"min_bytes must be >= 1, got {min_bytes!r}")
    chunk = max(1, min(MAX_CHUNK_BYTES, len(data) // (2 * VALIDATION_STRIDE)))
    all_bytes = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    chunk_index = torch.arange(all_bytes.numel()) // chunk
    held_out = chunk_index % VALIDATION_STRIDE == VALIDATION_STRIDE - 1
    train, validation = all_bytes[~held_out].clone(), all_bytes[held_out].clone()
    if train.numel() < min_bytes or validation.numel() < min_bytes:
        raise CorpusError(
            f"corpus {source or '(bytes)'} is too small: {len(data)} bytes give {train.numel()} training and "
            f"{validation.numel()} validation bytes; each needs at least {min_bytes} (sequence length + 1)"
        )
    return Corpus(train=train, validation=validation, source=source, files=files)


def load(path: str | os.PathLike | None, min_bytes: int, max_bytes: int = DEFAULT_MAX_BYTES) -> Corpus:
    """The corpus at `path` (a file or directory of text), or the standard library's source when None."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    if path is None:
        data, files = read_stdlib(max_bytes)
        source = f"Python {sysconfig.get_python_version()} standard library ({stdlib_root()})"
    else:
        data, files = read_path(path, max_bytes)
        source = str(path)
    return split(data, min_bytes, source, files)
