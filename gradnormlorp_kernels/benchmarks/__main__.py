"""`python -m gradnormlorp_kernels.benchmarks`: the benchmarks without the `gradnormlorp` CLI."""

import argparse
import sys

from . import add_arguments, main

parser = argparse.ArgumentParser(prog="python -m gradnormlorp_kernels.benchmarks", description=main.__doc__)
add_arguments(parser)
sys.exit(main(parser.parse_args()))
