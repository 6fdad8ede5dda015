"""PNG plots from a results CSV: `python bench/plot.py [--csv bench/results.csv] [--out bench]`.

Plots are drawn from the CSV alone, so they can be remade (or made elsewhere) without re-running.
"""

import argparse
import os
import sys

# Run from a checkout without installing: the package sits next to this folder.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from gradnormlorp_kernels.benchmarks.plots import make_plots  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--csv", default=os.path.join(HERE, "results.csv"))
    parser.add_argument("--out", default=HERE, help="directory for the PNG files")
    args = parser.parse_args()
    for path in make_plots(args.csv, args.out):
        print(f"wrote {path}")
