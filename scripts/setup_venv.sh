#!/usr/bin/env bash
# Creates (or reuses) .venv at the repository root with torch and everything the package, its tests,
# benchmarks and CLI need, and installs the package in editable mode. Idempotent; safe to re-run.
#   TORCH_SPEC   which torch to install when the venv has none (default torch==2.13.0, the CPU build
#                this project's CI machines carry; on a GPU machine use your CUDA build instead)
#   GRADNORMLORP_NO_EXTENSION=1 / GRADNORMLORP_REQUIRE_EXTENSION=1   skip / insist on the compiled
#                extension gradnormlorp_kernels._C (built by the editable install below; see setup.py)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip setuptools wheel ninja pybind11
if ! $py -c "import torch" 2>/dev/null; then
  $py -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
$py -m pip install -q --no-build-isolation -e ".[dev]"
