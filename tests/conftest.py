"""Shared test fixtures and the ``gpu`` marker's skip rule."""

from __future__ import annotations

import pytest

from service.scorer import cuda_device_count


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests, saying why, when no CUDA device is usable."""
    if cuda_device_count() > 0:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is visible (no NVIDIA driver or GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
