"""bench/fit_memory.py: the peak resident memory of a real child process, and its log."""

from __future__ import annotations

import io
import sys

import pytest

from bench.fit_memory import GB, trace

# Holds 300 MB for a moment, then prints and ends with the given status.
HOLDER = (
    "import sys, time; block = bytearray(300_000_000); block[::4096] = b'x' * len(block[::4096]); "
    "print('held', flush=True); time.sleep(0.6); del block; print('done'); sys.exit({status})"
)


def test_the_peak_of_a_child_that_holds_memory_is_measured() -> None:
    log = io.StringIO()
    result = trace([sys.executable, "-c", HOLDER.format(status=0)], interval=0.05, log=log)
    at, peak = result.peak
    assert result.returncode == 0
    assert 0.3 * GB <= peak < 0.6 * GB
    assert 0 < at <= result.seconds
    assert "peak resident memory" in result.summary() and "exit status 0" in result.summary()
    lines = log.getvalue().splitlines()
    assert [line.split("GB  ")[1] for line in lines] == ["held", "done"]
    # The line printed while the block was held carries its memory.
    assert float(lines[0].split()[2]) >= 0.3


def test_a_failing_command_reports_its_status() -> None:
    result = trace([sys.executable, "-c", HOLDER.format(status=3)], interval=0.05)
    assert result.returncode == 3 and "exit status 3" in result.summary()


def test_a_non_positive_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="interval is 0"):
        trace([sys.executable, "-c", "pass"], interval=0)
