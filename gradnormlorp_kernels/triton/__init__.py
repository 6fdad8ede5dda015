"""The `triton` backend: fused GPU kernels for the ops (run on the CPU under TRITON_INTERPRET=1 for tests).

Modules are imported lazily by the op registry, each registered at the end of its op's module in `ops/`.
"""
