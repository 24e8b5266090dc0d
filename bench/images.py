"""The encoded images a benchmark sends: files from a folder, or a set made from the bundle."""

from __future__ import annotations

import argparse
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from service.bundle import Bundle
from service.preprocessing import list_image_files


@dataclass(frozen=True)
class ImageSet:
    """Encoded image files (PNG bytes and the like) with names, and where they came from."""

    names: tuple[str, ...]
    encoded: tuple[bytes, ...]
    source: str

    def __len__(self) -> int:
        return len(self.encoded)

    def describe(self) -> str:
        """One line: how many images, their mean size in bytes and pixels, the source."""
        with Image.open(io.BytesIO(self.encoded[0])) as first:
            size = f"{first.width}x{first.height} {first.mode}"
        mean_kib = sum(map(len, self.encoded)) / len(self) / 1024
        return f"{len(self)} images ({size}, {mean_kib:.1f} KiB each on average) from {self.source}"


def _png(array: npt.NDArray[np.uint8]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


def from_bundle(bundle: Bundle) -> ImageSet:
    """PNGs at the bundle's input size made from its golden inputs, flipped and rotated.

    The golden inputs are real preprocessed training images, so the PNGs compress (and decode)
    like the images the model was trained on; four variants of each make the set less repetitive.
    """
    inputs = bundle.golden.inputs  # (N, C, H, W) in [0, 1]
    hwc = np.clip(np.rint(inputs.transpose(0, 2, 3, 1) * 255.0), 0, 255).astype(np.uint8)
    names: list[str] = []
    encoded: list[bytes] = []
    for index, image in enumerate(hwc):
        variants = (image, image[:, ::-1], image[::-1], image[::-1, ::-1])
        for variant_index, variant in enumerate(variants):
            names.append(f"golden-{index}-{variant_index}.png")
            encoded.append(_png(np.ascontiguousarray(variant)))
    return ImageSet(tuple(names), tuple(encoded), f"the golden inputs of {bundle.path}")


def from_folder(folder: Path, limit: int) -> ImageSet:
    """Up to ``limit`` image files found under ``folder`` (recursively), read as bytes."""
    files = list_image_files(folder, recursive=True)[:limit]
    if not files:
        raise SystemExit(f"serve_bench: no image files (.png, .jpg, ...) under {folder}")
    names = tuple(str(path.relative_to(folder)) for path in files)
    return ImageSet(names, tuple(path.read_bytes() for path in files), str(folder))


def add_arguments(parser: argparse.ArgumentParser, max_images: int) -> None:
    """The options every benchmark shares: the bundle to serve and the images to send."""
    parser.add_argument("--bundle", type=Path, required=True, help="bundle directory to serve")
    parser.add_argument(
        "--images",
        type=Path,
        default=None,
        help="folder of images to send (searched recursively); default: PNGs made from the "
        "bundle's golden inputs, at its input size",
    )
    parser.add_argument(
        "--max-images", type=int, default=max_images, help="most images read from --images"
    )


def chosen(args: argparse.Namespace, bundle: Bundle) -> ImageSet:
    """The images :func:`add_arguments`' options ask for."""
    return from_folder(args.images, args.max_images) if args.images else from_bundle(bundle)
