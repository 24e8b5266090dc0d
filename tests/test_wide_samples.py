"""16-bit greyscale images from a camera of fewer bits (12: samples 0-4095): the fit records the
bits its training images use, and training, the scorer and a real server read such an image as
the top 8 of those bits, the way they read its 8-bit copy, instead of as its top byte (0-15)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from service.bundle import load_bundle
from service.client import Client
from service.model_slot import load_model
from service.preprocessing import (
    InputSpec,
    list_image_files,
    load_image_file,
    preprocess_bytes,
    stack,
)
from service.runtime import Scorer
from service.server import ServerThread
from tests.conftest import TINY_FIT
from tests.service_helpers import serve_config
from training.data import resolve_wide_sample_bits
from training.fit import FitConfig, fit_bundle

pytestmark = pytest.mark.usefixtures("torch_one_thread")

GREY = InputSpec(height=8, width=8, color_mode="L")


def png(array: npt.NDArray[np.uint8] | npt.NDArray[np.uint16]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def twelve_bit(grey: npt.NDArray[np.uint8], seed: int) -> npt.NDArray[np.uint16]:
    """A 12-bit sample for each 8-bit one: the same top 8 bits, 4 random low bits below."""
    low = np.random.default_rng(seed).integers(0, 16, grey.shape)
    return np.asarray((grey.astype(np.uint16) << 4) | low, dtype=np.uint16)


def test_a_wide_sample_is_read_as_the_top_eight_of_the_bits_in_use() -> None:
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    wide = twelve_bit(grey, seed=0)
    assert Image.open(io.BytesIO(png(wide))).mode.startswith("I;16")
    as_eight = preprocess_bytes(png(grey), GREY)
    twelve = InputSpec(height=8, width=8, color_mode="L", wide_sample_bits=12)
    np.testing.assert_array_equal(preprocess_bytes(png(wide), twelve), as_eight)
    # Without the fit's word (16 bits), a 12-bit image is its top byte: at most 15 of 255.
    assert np.rint(preprocess_bytes(png(wide), GREY) * 255).max() == 15
    all_sixteen = np.asarray(wide << 4, dtype=np.uint16)
    np.testing.assert_array_equal(preprocess_bytes(png(all_sixteen), GREY), as_eight)
    # A sample beyond the bits in use saturates at white, as an 8-bit camera's does.
    hot = wide.copy()
    hot[0, 0] = 40_000
    read = preprocess_bytes(png(hot), twelve)
    assert read[0, 0, 0] == 1.0
    np.testing.assert_array_equal(read[0].ravel()[1:], as_eight[0].ravel()[1:])


@pytest.mark.parametrize("bits", [7, 17])
def test_an_input_spec_refuses_bits_outside_8_to_16(bits: int) -> None:
    with pytest.raises(ValueError, match=f"wide_sample_bits is {bits}; expected 8 to 16"):
        InputSpec(height=8, width=8, wide_sample_bits=bits)


def test_the_spec_round_trips_its_bits() -> None:
    spec = InputSpec(height=8, width=8, color_mode="L", wide_sample_bits=10)
    assert spec.to_dict()["wide_sample_bits"] == 10
    assert InputSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    ("largest", "expected"), [(4095, 12), (4096, 13), (1023, 10), (200, 8), (65535, 16)]
)
def test_the_fit_takes_the_bits_of_the_largest_sample(
    tmp_path: Path, largest: int, expected: int
) -> None:
    paths = []
    for i, top in enumerate((largest // 3, largest)):
        array = np.full((6, 6), top, dtype=np.uint16)
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(png(array))
    paths.append(tmp_path / "eight.png")  # an 8-bit image counts for nothing
    paths[-1].write_bytes(png(np.full((6, 6), 255, dtype=np.uint8)))
    assert resolve_wide_sample_bits(paths) == expected


def test_a_folder_without_16_bit_greyscale_keeps_16(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png(np.full((6, 6, 3), 255, dtype=np.uint8)))
    assert resolve_wide_sample_bits([path]) == 16


def test_a_fit_on_12_bit_images_scores_them_as_their_8_bit_copies(
    demo_data: Path, tmp_path: Path
) -> None:
    folder, copies = tmp_path / "wide", tmp_path / "eight"
    folder.mkdir()
    copies.mkdir()
    for seed, path in enumerate(list_image_files(demo_data / "train" / "good")[:12]):
        with Image.open(path) as image:
            grey = np.asarray(image.convert("L"))
        (folder / path.name).write_bytes(png(twelve_bit(grey, seed)))
        (copies / path.name).write_bytes(png(grey))
    config = FitConfig(**{**TINY_FIT, "max_steps": 2})
    bundle_dir = fit_bundle(folder, tmp_path / "bundle", config)
    spec = load_bundle(bundle_dir).manifest.input
    assert (spec.color_mode, spec.wide_sample_bits) == ("L", 12)

    wide_files, eight_files = sorted(folder.iterdir()), sorted(copies.iterdir())
    wide = stack([load_image_file(p, spec) for p in wide_files])
    np.testing.assert_array_equal(wide, stack([load_image_file(p, spec) for p in eight_files]))
    expected = Scorer(load_bundle(bundle_dir), device="cpu").score(wide).combined
    assert wide.max() > 0.5  # the images keep their range, not 16 grey levels

    model = load_model(bundle_dir, "cpu", threads=1)
    with (
        ServerThread(serve_config(bundle_dir), model=model) as server,
        Client(f"127.0.0.1:{server.port}", retries=0) as client,
    ):
        assert client.info().input.wide_sample_bits == 12
        for files in (wide_files, eight_files):
            results = client.score([p.read_bytes() for p in files])
            served = [r.scores.combined for r in results if r.scores is not None]
            np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
