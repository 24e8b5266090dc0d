"""Shared test fixtures and the ``gpu`` marker's skip rule."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from training.kernels import DEFAULT_CPU_KERNELS, hold_cpu_kernels

# Before numpy and torch load: the tests' fits run the kernels of the command line's default.
hold_cpu_kernels(DEFAULT_CPU_KERNELS)

from service.runtime import cuda_device_count  # noqa: E402

# A small demo dataset; training imports (torch) stay inside the fixtures so that serving tests
# can run where torch is not installed.
DEMO_SIZE = {"image_size": 64, "n_train": 24, "n_test_good": 6, "n_test_per_defect": 3}
# A fit of seconds, not minutes: 32x32 input (the 64x64 demo images halved), whole-image crops, a
# narrow VAE with a 4x4 grid of 2 latent channels (32 latent dimensions), a tiny defect head and
# 20 steps. The session bundle and the benchmark tests use it.
TINY_FIT: dict[str, Any] = {
    "image_size": 32,
    "crop_size": 32,
    "width": 8,
    "max_width": 16,
    "latent_channels": 2,
    "head_width": 4,
    "coarse_width": 8,
    # A quarter of 32 pixels: the default's eighth would leave the coarse VAE 4x4 pixels (padded
    # to one cell); tests/test_training_fit.py fits the default's factor with padding.
    "coarse_factor": 4,
    "epochs": 10,
    "max_steps": 20,
    "batch_size": 8,
    "learning_rate": 3e-3,
    "threads": 1,
    "progress": False,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests, saying why, when no CUDA device is usable."""
    if cuda_device_count() > 0:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is visible (no NVIDIA driver or GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def torch_one_thread() -> Iterator[None]:
    """Run torch on one thread: faster for tiny models, and fair on a shared CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated MVTec-layout dataset (64x64 RGB flanges, every defect type)."""
    from training.demo_data import generate_demo_dataset

    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "data", seed=0, **DEMO_SIZE)


@pytest.fixture(scope="session")
def trained_bundle(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle fitted on ``demo_data`` with a tiny config; loads and self-tests."""
    from training.fit import FitConfig, fit_bundle

    config = FitConfig(**TINY_FIT)
    return fit_bundle(demo_data, tmp_path_factory.mktemp("bundle") / "bundle", config)
