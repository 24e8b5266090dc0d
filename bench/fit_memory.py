"""Peak resident memory of a command, such as a fit, and where in its log it was reached.

    python bench/fit_memory.py [--interval S] [--log FILE] -- python -m training fit DIR --out B

The command runs as a child process; its resident set size is sampled every ``--interval``
seconds. Printed: the peak, when it came, and the command's wall time and exit status; with
``--log``, every line the command writes, prefixed by the seconds since the start and the
resident memory then (progress bars' redraws are left out). Compare two versions by running the
same command with each, one after the other on a quiet machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import psutil

GB = 1e9


@dataclass(frozen=True)
class MemoryTrace:
    """Resident memory samples ``(seconds since start, bytes)`` of one run and its outcome."""

    samples: tuple[tuple[float, int], ...]
    seconds: float
    returncode: int

    @property
    def peak(self) -> tuple[float, int]:
        """The first sample at the highest resident memory: ``(seconds, bytes)``."""
        if not self.samples:
            return (0.0, 0)
        return max(self.samples, key=lambda sample: sample[1])

    def summary(self) -> str:
        """One line: the peak, when it came, the wall time and the exit status."""
        at, peak = self.peak
        return (
            f"peak resident memory {peak / GB:.2f} GB at {at:.1f} s; wall {self.seconds:.1f} s; "
            f"{len(self.samples)} samples; exit status {self.returncode}"
        )


def _resident(process: psutil.Process) -> int:
    """The process's resident memory and its children's, in bytes (0 once it has gone)."""
    try:
        family = [process, *process.children(recursive=True)]
        return sum(p.memory_info().rss for p in family)
    except psutil.Error:
        return 0


def trace(command: list[str], *, interval: float, log: TextIO | None = None) -> MemoryTrace:
    """Run ``command`` to its end, sampling its resident memory every ``interval`` seconds."""
    if interval <= 0:
        raise ValueError(f"interval is {interval}; expected a positive number of seconds")
    start = time.monotonic()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    process = psutil.Process(child.pid)
    samples: list[tuple[float, int]] = []

    def sample() -> None:
        while child.poll() is None:
            samples.append((time.monotonic() - start, _resident(process)))
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    assert child.stdout is not None
    for chunk in child.stdout:
        for line in chunk.replace("\r", "\n").splitlines():
            if log is not None and line and "step/s" not in line and "it/s" not in line:
                now = time.monotonic() - start
                log.write(f"{now:8.1f} s {_resident(process) / GB:6.2f} GB  {line}\n")
    returncode = child.wait()
    sampler.join()
    return MemoryTrace(tuple(samples), time.monotonic() - start, returncode)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between samples")
    parser.add_argument("--log", type=Path, help="write the command's output here, annotated")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    if args.log is None:
        result = trace(command, interval=args.interval)
    else:
        with args.log.open("w") as log:
            result = trace(command, interval=args.interval, log=log)
    print(result.summary())
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
