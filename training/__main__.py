"""``python -m training`` and ``anomaly-train``: the training command line.

The CPU kernels are held (``--cpu-kernels``, :mod:`training.kernels`) before the command line's
modules import numpy and torch, which read the hold when they load.
"""

from __future__ import annotations

import sys

from training.kernels import cpu_kernels_from_argv, hold_cpu_kernels


def main() -> int:
    """Hold the CPU kernels the command line asks for, then run it."""
    hold_cpu_kernels(cpu_kernels_from_argv(sys.argv[1:]))
    from training.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
