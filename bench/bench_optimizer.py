"""The optimizer benchmark alone: `python bench/bench_optimizer.py [--out DIR] [--csv PATH] [--sizes ...]`.

The same as `gradnormlorp bench --only optimizer`; see gradnormlorp_kernels/benchmarks/optimizer.py.
"""

import argparse
import os
import sys

# Run from a checkout without installing: the package sits next to this folder.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gradnormlorp_kernels import benchmarks  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    benchmarks.add_arguments(parser)
    parser.set_defaults(only=["optimizer"], out=os.path.dirname(os.path.abspath(__file__)))
    sys.exit(benchmarks.main(parser.parse_args()))
