"""`python -m gradnormlorp_kernels info | train | bench` (the same as the `gradnormlorp` command)."""

import sys

from .cli import main

sys.exit(main())
