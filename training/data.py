"""Training data: folder discovery, loading through the shared preprocessing, the held-out split."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from PIL import Image

from service.preprocessing import (
    IMAGE_SUFFIXES,
    WIDE_GREY_MODES,
    WIDE_SAMPLE_BITS,
    ColorMode,
    ImageFiles,
    InputSpec,
    decode_image,
    list_image_files,
    pixels,
    preprocess_bytes,
    wide_sample_max,
)
from training.config import Aspect, ColorChoice
from training.errors import DataError

log = logging.getLogger(__name__)

MIN_TRAIN_IMAGES = 2
_GREY_MODES = frozenset({"1", "L", "LA", "I;16", "I;16B", "I;16L", "I;16N", "I", "F"})


Sample = TypeVar("Sample", np.float32, np.uint8)


@dataclass(frozen=True)
class ImageSet(Generic[Sample]):
    """Preprocessed images ``(N, C, H, W)`` (the model input, or its 8-bit samples), their
    paths, and the files that were skipped."""

    paths: tuple[Path, ...]
    images: npt.NDArray[Sample]
    skipped: tuple[tuple[Path, str], ...]
    fingerprint: str


def training_folder(data_dir: Path) -> Path:
    """The folder of normal images: ``DATA_DIR/train/good`` in MVTec layout, else ``DATA_DIR``."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise DataError(f"data folder {data_dir} does not exist")
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} is not a folder")
    mvtec = data_dir / "train" / "good"
    return mvtec if mvtec.is_dir() else data_dir


def find_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``; a clear error when there are none."""
    files = list_image_files(folder)
    if files:
        return files
    entries = list(folder.iterdir())
    if not entries:
        raise DataError(f"data folder {folder} is empty; expected images of good parts")
    nested = list_image_files(folder, recursive=True)
    if nested:
        raise DataError(
            f"data folder {folder} holds no images directly but {len(nested)} in subfolders; "
            "point at the folder of good images, or at an MVTec-layout folder with train/good"
        )
    raise DataError(
        f"data folder {folder} holds no images: {len(entries)} entries, none with a suffix "
        f"among {', '.join(IMAGE_SUFFIXES)}"
    )


def _headers(paths: list[Path]) -> Iterator[tuple[Path, str, tuple[int, int]]]:
    """Each readable file's path, Pillow mode and ``(width, height)``, from its header alone;
    unreadable files are left out here and reported by the load."""
    for path in paths:
        try:
            with Image.open(path) as image:
                mode, size = image.mode, image.size
        except (OSError, ValueError):
            continue
        yield path, mode, size


def resolve_color_mode(paths: list[Path], choice: ColorChoice) -> ColorMode:
    """The colour mode to train in: the choice, or for ``auto`` greyscale iff all files are."""
    if choice != "auto":
        return choice
    return "RGB" if any(mode not in _GREY_MODES for _, mode, _ in _headers(paths)) else "L"


def resolve_wide_sample_bits(paths: list[Path]) -> int:
    """The bits the folder's 16-bit greyscale images use: the bit length of their largest
    sample (12 for a 12-bit camera's 0-4095), at least 8; ``WIDE_SAMPLE_BITS`` when there are
    none. Only such images are decoded (their headers say which)."""
    largest: int | None = None
    for path, mode, _ in _headers(paths):
        if mode not in WIDE_GREY_MODES:
            continue
        try:
            top = wide_sample_max(decode_image(path.read_bytes(), image_id=str(path)))
        except (OSError, ValueError):
            continue  # unreadable files are reported by the load
        if top is not None:
            largest = top if largest is None else max(largest, top)
    return WIDE_SAMPLE_BITS if largest is None else max(8, largest.bit_length())


def resolve_input_size(
    paths: list[Path], side: int, aspect: Aspect, multiple: int
) -> tuple[int, int]:
    """Model input ``(height, width)`` for images of the sizes in ``paths`` (read from headers).

    The input has about ``side * side`` pixels, whatever its shape, so a model costs the same
    per image. With ``aspect="auto"`` it keeps the images' median aspect ratio: a frame twice as
    tall as wide becomes about ``1.41 side x 0.71 side``, and every image is resized to that size
    (an image of another shape is stretched to it). ``"square"`` makes it ``side x side``. The
    input is never larger than the images' median size, and both sides are multiples of
    ``multiple``.
    """
    sizes = [(h, w) for _, _, (w, h) in _headers(paths) if w > 0 and h > 0]
    if not sizes:
        return side, side
    heights, widths = np.array(sizes, dtype=np.float64).T
    median_h, median_w = float(np.median(heights)), float(np.median(widths))
    ratio = 1.0 if aspect == "square" else float(np.median(heights / widths))
    h, w = side * math.sqrt(ratio), side / math.sqrt(ratio)
    if aspect == "square":
        shrink = min(1.0, max(median_h, median_w) / side)
    else:
        shrink = min(1.0, median_h / h, median_w / w)

    def fit(length: float) -> int:
        # The tolerance keeps a side the images have from losing a whole multiple to the float
        # product's rounding (256x192 images gave a 160x256 input).
        return max(multiple, math.floor(length * shrink / multiple + 1e-9) * multiple)

    return fit(h), fit(w)


def load_images(paths: list[Path], spec: InputSpec, *, skip_bad: bool) -> ImageSet[np.float32]:
    """Read and preprocess every file into the model input; a bad file stops the load unless
    ``skip_bad``. Each image goes straight into one array, so that memory holds it once."""
    return _load(paths, spec, skip_bad, np.float32, preprocess_bytes)


def load_samples(paths: list[Path], spec: InputSpec, *, skip_bad: bool) -> ImageSet[np.uint8]:
    """Like :func:`load_images`, keeping each image's 8-bit samples (a quarter of the memory);
    :func:`service.preprocessing.model_input` turns any rows of them into the model input."""

    def read(data: bytes, spec: InputSpec, *, image_id: str) -> npt.NDArray[np.uint8]:
        return pixels(decode_image(data, image_id=image_id), spec)

    return _load(paths, spec, skip_bad, np.uint8, read)


Read = TypeVar("Read", np.float32, np.uint8, covariant=True)


class _Reader(Protocol[Read]):
    def __call__(self, data: bytes, spec: InputSpec, *, image_id: str) -> npt.NDArray[Read]: ...


def _load(
    paths: list[Path],
    spec: InputSpec,
    skip_bad: bool,
    dtype: type[Sample],
    read: _Reader[Sample],
) -> ImageSet[Sample]:
    out = np.empty((len(paths), *spec.shape), dtype=dtype)
    kept: list[Path] = []
    files = ImageFiles(skip_bad, DataError)
    for path, array in files.read(paths, lambda data, name: read(data, spec, image_id=name)):
        out[len(kept)] = array
        kept.append(path)
    skipped = files.skipped
    if not kept:
        raise DataError(f"none of the {len(paths)} images could be read; {skipped[0][1]}")
    images = out if len(kept) == len(paths) else out[: len(kept)].copy()
    return ImageSet(tuple(kept), images, tuple(skipped), files.fingerprint.hexdigest())


def evenly_spaced(n: int, limit: int) -> slice:
    """At most ``limit`` of ``n`` rows, evenly spaced from the first: every ``k``-th row for the
    smallest ``k`` that keeps them within ``limit`` (every row when ``n <= limit``). A slice, so
    indexing an array with it takes a view, not a copy; spread over the whole folder, so a
    folder whose files drift in time is sampled across its drift."""
    if limit < 1:
        raise ValueError(f"at most {limit} rows; expected at least 1")
    return slice(None, None, math.ceil(n / limit)) if n > limit else slice(None)


def holdout_split(
    n: int,
    *,
    fraction: float,
    min_holdout: int,
    seed: int,
    groups: npt.NDArray[np.intp] | None = None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Indices ``(train, held_out)`` of a seeded random split of ``n`` images.

    With ``groups`` (:func:`training.copies.copy_groups`), the images of a group lie on one
    side: whole groups, in a seeded random order, are held out until at least the share asked
    is. Where every group is one image, the split is the one without groups."""
    n_holdout = max(min_holdout, round(n * fraction))
    if n - n_holdout < MIN_TRAIN_IMAGES:
        raise DataError(
            f"found {n} usable images; a fit needs at least {min_holdout + MIN_TRAIN_IMAGES} "
            f"({min_holdout} held out for validation and calibration, "
            f"{MIN_TRAIN_IMAGES} to train on)"
        )
    if groups is None:
        groups = np.arange(n, dtype=np.intp)
    if groups.shape != (n,):
        raise ValueError(f"{groups.shape[0]} group numbers for {n} images")
    n_groups = int(groups.max()) + 1 if n else 0
    sizes = np.bincount(groups, minlength=n_groups)
    order = np.random.default_rng(seed).permutation(n_groups)
    held_groups = order[: int(np.searchsorted(np.cumsum(sizes[order]), n_holdout)) + 1]
    held = np.isin(groups, held_groups)
    if n - int(held.sum()) < MIN_TRAIN_IMAGES:
        raise DataError(
            f"found {n} usable images, but only {n_groups} differ (the others are copies or "
            f"near-copies of them, kept on one side of the split); a fit needs at least "
            f"{min_holdout + MIN_TRAIN_IMAGES} different ones"
        )
    return np.flatnonzero(~held).astype(np.int64), np.flatnonzero(held).astype(np.int64)


def split_rows_in_place(
    images: npt.NDArray[Sample],
    train_idx: npt.NDArray[np.int64],
    holdout_idx: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[Sample], npt.NDArray[Sample]]:
    """``(images[train_idx], images[holdout_idx])`` as two views of ``images``, whose rows are
    reordered in place (training rows first): no copy of the images, where indexing would make
    one of each part. ``train_idx`` and ``holdout_idx`` must together name every row once."""
    order = np.concatenate([train_idx, holdout_idx])
    if not np.array_equal(np.sort(order), np.arange(images.shape[0])):
        raise ValueError(
            f"the split names {order.size} rows, not each of the {images.shape[0]} images once"
        )
    placed = np.zeros(order.size, dtype=bool)
    for start in range(order.size):
        if placed[start]:
            continue
        # Follow the cycle from ``start``: row ``j`` takes the row ``order[j]`` held before.
        first, j = images[start].copy(), start
        while order[j] != start:
            images[j] = images[order[j]]
            placed[j] = True
            j = int(order[j])
        images[j] = first
        placed[j] = True
    return images[: train_idx.size], images[train_idx.size :]
