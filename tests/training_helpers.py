"""Helpers of the training tests."""

from __future__ import annotations

import pytest


def one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    """The command ended with one ``error: ...`` line holding every needle, and no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected an error message"
    assert err[-1].startswith("error: ")
    assert "Traceback" not in "\n".join(err)
    for needle in needles:
        assert needle in err[-1]
