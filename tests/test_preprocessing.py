"""Decoding and preprocessing (service/preprocessing.py): one path for training and serving."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service.preprocessing import (
    ImageError,
    InputSpec,
    decode_image,
    image_from_raw,
    preprocess,
    preprocess_bytes,
)

RGB = InputSpec(height=16, width=16, color_mode="RGB")
GREY = InputSpec(height=16, width=16, color_mode="L")


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _gradient(size: int = 16) -> np.ndarray:
    row = np.arange(size, dtype=np.uint8) * (255 // (size - 1))
    return np.stack([np.tile(row, (size, 1))] * 3, axis=-1)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_lossless_formats_decode_to_the_same_tensor(fmt: str) -> None:
    pixels = _gradient()
    expected = pixels.transpose(2, 0, 1).astype(np.float32) / 255.0
    out = preprocess_bytes(_encode(Image.fromarray(pixels), fmt), RGB)
    assert out.dtype == np.float32 and out.shape == (3, 16, 16)
    np.testing.assert_allclose(out, expected, atol=1e-7)


def test_jpeg_decodes_close_to_the_original() -> None:
    pixels = _gradient()
    out = preprocess_bytes(_encode(Image.fromarray(pixels), "JPEG"), RGB)
    assert np.abs(out - pixels.transpose(2, 0, 1) / 255.0).max() < 0.1


def test_pixel_scale_is_fixed_not_guessed_from_the_data() -> None:
    dark = np.full((16, 16, 3), 10, dtype=np.uint8)
    out = preprocess_bytes(_encode(Image.fromarray(dark), "PNG"), RGB)
    assert out.max() == pytest.approx(10 / 255)


def test_raw_and_encoded_pixels_give_identical_input() -> None:
    pixels = _gradient(24)
    raw = preprocess(image_from_raw(pixels.tobytes(), 24, 24, 3), RGB)
    encoded = preprocess_bytes(_encode(Image.fromarray(pixels), "PNG"), RGB)
    assert raw.shape == (3, 16, 16)
    np.testing.assert_array_equal(raw, encoded)


def test_colour_modes_are_converted_to_the_spec() -> None:
    grey_png = _encode(Image.fromarray(np.full((8, 8), 128, dtype=np.uint8)), "PNG")
    assert preprocess_bytes(grey_png, RGB).shape == (3, 16, 16)
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 255
    as_grey = preprocess_bytes(_encode(Image.fromarray(rgba), "PNG"), GREY)
    assert as_grey.shape == (1, 16, 16)
    assert as_grey.max() == pytest.approx(76 / 255, abs=1 / 255)  # ITU-R 601 luma of red


def test_sixteen_bit_greyscale_keeps_its_top_eight_bits() -> None:
    array = np.full((8, 8), 65535, dtype=np.uint16)
    image = Image.fromarray(array)
    assert image.mode.startswith("I;16")
    out = preprocess_bytes(_encode(image, "PNG"), GREY)
    assert out.max() == pytest.approx(1.0)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("size", "match"),
    [
        (2_000, r"'bomb' is 2000x2000 = 4000000 pixels, over the limit of 1000000"),
        (100_000, r"'bomb' is over the limit of 1000000 pixels"),
    ],
)
def test_pixel_limit_refuses_a_decompression_bomb_before_decoding(size: int, match: str) -> None:
    # Only the header exists: decoding the pixels would fail, so refusal comes from the header.
    with pytest.raises(ImageError, match=match):
        decode_image(_png_header_only(size, size), image_id="bomb", max_pixels=10**6)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "no bytes"),
        (b"not an image at all", "could not be decoded"),
        (_encode(Image.new("RGB", (8, 8)), "PNG")[:40], "could not be decoded"),
        (_encode(Image.new("RGB", (8, 8)), "GIF"), "could not be decoded as PNG, JPEG, BMP"),
    ],
    ids=["empty", "garbage", "truncated", "gif"],
)
def test_undecodable_bytes_name_the_image(data: bytes, match: str) -> None:
    with pytest.raises(ImageError, match=match) as info:
        decode_image(data, image_id="part-7")
    assert "part-7" in str(info.value)


@pytest.mark.parametrize(
    ("pixels", "shape", "match"),
    [
        (b"\0" * 10, (4, 4, 1), r"10 bytes of raw pixels; expected 4x4x1 = 16"),
        (b"", (0, 4, 1), "both must be at least 1"),
        (b"\0" * 32, (4, 4, 2), "2 channels; expected 1 .* 3 .* or 4"),
        (b"\0" * 12, (2, 2, 3), None),
    ],
)
def test_raw_pixels_are_validated(
    pixels: bytes, shape: tuple[int, int, int], match: str | None
) -> None:
    if match is None:
        assert image_from_raw(pixels, *shape, image_id="ok").size == (2, 2)
        return
    with pytest.raises(ImageError, match=match):
        image_from_raw(pixels, *shape, image_id="raw-1")


def test_input_spec_round_trips_and_rejects_nonsense() -> None:
    assert InputSpec.from_dict(RGB.to_dict()) == RGB
    with pytest.raises(ValueError, match="color_mode"):
        InputSpec(height=8, width=8, color_mode="CMYK")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="channels=1"):
        InputSpec.from_dict({**RGB.to_dict(), "channels": 1})
    with pytest.raises(ValueError, match="unknown"):
        InputSpec.from_dict({**RGB.to_dict(), "mean": 0.5})
