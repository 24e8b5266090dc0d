"""bench/train_precision.py: both precisions timed by the fit's own loop, and their ratio."""

from __future__ import annotations

import re

import numpy as np
import pytest

from bench.train_precision import demo_samples, main


def test_demo_samples_are_8_bit_colour_parts() -> None:
    samples = demo_samples(3, 32)
    assert samples.shape == (3, 3, 32, 32) and samples.dtype == np.uint8
    assert samples.std() > 10  # parts on a background, not a blank
    assert np.array_equal(samples, demo_samples(3, 32))


def test_each_round_prints_both_precisions_and_their_share(
    capsys: pytest.CaptureFixture[str],
) -> None:
    main(["--steps", "2", "--rounds", "2", "--image-size", "32", "--images", "6", "--threads", "1"])
    out = capsys.readouterr().out
    assert re.search(
        r"CPU with Intel AMX: (yes|no); torch's kernels [A-Z0-9]+; 1 torch threads; "
        r"2 steps per model",
        out,
    )
    rounds = re.findall(
        r"round (\d): local model \d+ ms/step fp32, \d+ bf16 \((\d+\.\d\d)\); coarse VAE \d+ fp32, "
        r"\d+ bf16 \((\d+\.\d\d)\)",
        out,
    )
    assert [r[0] for r in rounds] == ["1", "2"]
    assert all(float(share) > 0 for r in rounds for share in r[1:])
    assert "median of 2 rounds: local model" in out


def test_bad_budgets_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--steps", "0"])
    assert "--steps and --rounds must be >= 1" in capsys.readouterr().err
