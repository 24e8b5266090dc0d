"""Copies among the good images: files identical once preprocessed, and near-copies (the same
part photographed twice, frames of one burst), which the held-out split keeps on one side, and
test images that are near-copies of training images, which ``evaluate`` counts.

A held-out image whose copy was trained on scores as low as a training image, so it lowers the
threshold it helps set. Near-copies are found on small thumbnails, image by image: the images
nearest to one are its near-copies when they are all far nearer to it than the next one
(``NEAR_COPY_GAP``), as frames of one part are next to other parts. No distance is fixed, so
the rule holds at any scale of difference between parts, and for a folder made of bursts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

F64Array = npt.NDArray[np.float64]

# An image's nearest neighbours are its near-copies when the farthest of them is nearer to it
# than this share of the distance to the next. Chosen on the good folders of the four
# quality-suite datasets (no test image): the nearest neighbour of each of kolektorsdd's six
# re-photographed pairs lies at 0.07-0.14 of the second's distance, while among different
# images no such ratio falls below 0.34 (bottle), 0.35 (elpv-mono), 0.36 (screw), 0.88
# (kolektorsdd), over the first seventeen neighbours.
NEAR_COPY_GAP = 0.2
# The most near-copies of one image looked for: bursts of up to 17 frames.
MOST_NEAR_COPIES = 16
# Thumbnails have about this many pixels on their shorter side: noise and sub-pixel shifts
# average out, and distances among a few thousand images take seconds.
THUMBNAIL_SIDE = 32
_ROWS_PER_BLOCK = 512
_IMAGES_PER_CHUNK = 64


def copy_groups(images: npt.NDArray[Any]) -> npt.NDArray[np.intp]:
    """A group number per image ``(N, C, H, W)``, numbered by first appearance: images identical
    after preprocessing (a file copied under another name, or saved again) and near-copies
    (:func:`near_copy_pairs`), with whatever they are copies of, share one."""
    n = images.shape[0]
    parent = np.arange(n, dtype=np.intp)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    def join(i: int, j: int) -> None:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    first: dict[bytes, int] = {}
    for i, image in enumerate(images):
        key = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()
        join(first.setdefault(key, i), i)
    distinct = np.array(sorted(first.values()), dtype=np.intp)
    for a, b in near_copy_pairs(thumbnails(images, distinct)):
        join(int(distinct[a]), int(distinct[b]))
    numbers: dict[int, int] = {}
    return np.array([numbers.setdefault(root(i), len(numbers)) for i in range(n)], dtype=np.intp)


def thumbnails(images: npt.NDArray[Any], rows: npt.NDArray[np.intp] | None = None) -> F64Array:
    """The images ``rows`` (default: all) of ``(N, C, H, W)`` as means of square blocks, about
    ``THUMBNAIL_SIDE`` of them on the shorter side, flattened ``(len(rows), D)``, on the scale
    of the samples. A few images at a time: a folder's images are never copied whole."""
    _, c, h, w = images.shape
    k = max(1, min(h, w) // THUMBNAIL_SIDE)
    height, width = h // k, w // k
    picked = np.arange(images.shape[0]) if rows is None else rows
    out = np.empty((picked.size, c * height * width), dtype=np.float64)
    for start in range(0, picked.size, _IMAGES_PER_CHUNK):
        chunk = picked[start : start + _IMAGES_PER_CHUNK]
        cut = np.asarray(images[chunk, :, : height * k, : width * k], dtype=np.float64)
        blocks = cut.reshape(chunk.size, c, height, k, width, k).mean(axis=(3, 5))
        out[start : start + chunk.size] = blocks.reshape(chunk.size, -1)
    return out


def _squared_distances(block: F64Array, reference: F64Array, norms: F64Array) -> F64Array:
    """Squared distances ``(len(block), len(reference))``; ``norms`` are the reference's."""
    squared = (
        np.einsum("ij,ij->i", block, block)[:, None] + norms[None, :] - 2.0 * (block @ reference.T)
    )
    np.maximum(squared, 0.0, out=squared)
    return np.asarray(squared, dtype=np.float64)


def _blocks(n: int) -> Iterator[slice]:
    for start in range(0, n, _ROWS_PER_BLOCK):
        yield slice(start, min(start + _ROWS_PER_BLOCK, n))


def _near_counts(distances: F64Array) -> npt.NDArray[np.intp]:
    """Per row of ascending distances ``(N, k)`` to a row's nearest neighbours, how many of the
    first are its near-copies: up to the first gap (the farthest nearer than ``NEAR_COPY_GAP``
    times the next), and at least every equal one."""
    equal = np.count_nonzero(distances == 0.0, axis=1)
    if distances.shape[1] < 2:  # no next neighbour to compare with
        return np.asarray(equal)
    gaps = distances[:, :-1] < NEAR_COPY_GAP * distances[:, 1:]
    first_gap = np.where(gaps.any(axis=1), gaps.argmax(axis=1) + 1, 0)
    return np.asarray(np.maximum(first_gap, equal))


def _nearest(squared: F64Array, depth: int) -> tuple[npt.NDArray[np.intp], F64Array]:
    order = np.argsort(squared, axis=1, kind="stable")[:, :depth]
    return order, np.sqrt(np.take_along_axis(squared, order, axis=1))


def near_copy_pairs(points: F64Array) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i < j``, of rows of ``points`` ``(N, D)`` that are near-copies: for
    some ``k`` up to ``MOST_NEAR_COPIES``, ``j`` is among the ``k`` rows nearest to ``i`` (or
    the other way round), and the farthest of those ``k`` is nearer to it than ``NEAR_COPY_GAP``
    times the distance to the next. Equal rows are near-copies too."""
    n = points.shape[0]
    if n < 2:
        return []
    norms = np.einsum("ij,ij->i", points, points)
    depth = min(MOST_NEAR_COPIES + 1, n - 1)
    pairs: set[tuple[int, int]] = set()
    for rows in _blocks(n):
        squared = _squared_distances(points[rows], points, norms)
        squared[np.arange(squared.shape[0]), np.arange(rows.start, rows.stop)] = np.inf  # self
        nearest, distances = _nearest(squared, depth)
        for offset, count in enumerate(_near_counts(distances)):
            i = rows.start + offset
            pairs.update((min(i, int(j)), max(i, int(j))) for j in nearest[offset, :count])
    return sorted(pairs)


def near_copies_of(reference: F64Array, points: F64Array) -> list[tuple[int, int]]:
    """For each row of ``points`` ``(M, D)`` that is a near-copy of rows of ``reference``
    ``(N, D)`` (the rule of :func:`near_copy_pairs`, its neighbours looked for among
    ``reference``), the pair ``(row, nearest reference row)``."""
    if reference.shape[0] == 0 or points.shape[0] == 0:
        return []
    depth = min(MOST_NEAR_COPIES + 1, reference.shape[0])
    reference_norms = np.einsum("ij,ij->i", reference, reference)
    found: list[tuple[int, int]] = []
    for rows in _blocks(points.shape[0]):
        squared = _squared_distances(points[rows], reference, reference_norms)
        nearest, distances = _nearest(squared, depth)
        counts = _near_counts(distances)
        found += [(rows.start + int(i), int(nearest[i, 0])) for i in np.flatnonzero(counts)]
    return found
