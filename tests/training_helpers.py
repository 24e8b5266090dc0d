"""Helpers of the training tests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest


def one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    """The command ended with one ``error: ...`` line holding every needle, and no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected an error message"
    assert err[-1].startswith("error: ")
    assert "Traceback" not in "\n".join(err), err
    for needle in needles:
        assert needle in err[-1], err[-3:]


def fit_flags(options: Mapping[str, Any]) -> list[str]:
    """The ``fit`` / ``benchmark`` flags of FitConfig options given as a dict."""
    flags: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + name.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags
