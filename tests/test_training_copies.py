"""Copies and near-copies among the good images: grouped, and kept on one side of the split."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

import training.copies
from training.copies import (
    MOST_NEAR_COPIES,
    NEAR_COPY_GAP,
    copy_groups,
    near_copies_of,
    near_copy_pairs,
    thumbnails,
)
from training.data import holdout_split


def test_copies_are_grouped_and_never_split_across_training_and_held_out() -> None:
    rng = np.random.default_rng(0)
    distinct = rng.integers(0, 256, (30, 1, 4, 4), dtype=np.uint8)
    # Image 0 three times, image 5 twice, the rest once: 33 rows.
    rows = np.concatenate([distinct, distinct[[0, 0, 5]]])[rng.permutation(33)]
    groups = copy_groups(rows)
    assert groups[0] == 0 and int(groups.max()) + 1 == 30
    for i in range(33):
        same = np.flatnonzero(groups == groups[i])
        assert all(np.array_equal(rows[j], rows[i]) for j in same)
        assert all(
            not np.array_equal(rows[j], rows[i]) for j in np.flatnonzero(groups != groups[i])
        )
    for seed in range(20):
        train, held = holdout_split(33, fraction=0.2, min_holdout=4, seed=seed, groups=groups)
        assert set(groups[train]).isdisjoint(groups[held]), seed
        np.testing.assert_array_equal(np.sort(np.r_[train, held]), np.arange(33))
        assert round(33 * 0.2) <= len(held) <= round(33 * 0.2) + 2


def parts(count: int, seed: int = 0) -> npt.NDArray[np.uint8]:
    """``count`` different smooth grey parts ``(count, 1, 64, 64)``: a disc of random place,
    size and brightness on a background of random brightness."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:64, :64]
    images = np.empty((count, 1, 64, 64), dtype=np.uint8)
    for i in range(count):
        cy, cx, r = rng.uniform(20, 44), rng.uniform(20, 44), rng.uniform(8, 18)
        background, disc = rng.uniform(40, 120), rng.uniform(140, 230)
        inside = (y - cy) ** 2 + (x - cx) ** 2 < r * r
        images[i, 0] = np.where(inside, disc, background).astype(np.uint8)
    return images


def retaken(images: npt.NDArray[np.uint8], seed: int) -> npt.NDArray[np.uint8]:
    """The same parts photographed again: sensor noise of a few grey levels."""
    noise = np.random.default_rng(seed).normal(0.0, 3.0, images.shape)
    return np.asarray(np.clip(images + noise, 0, 255).round(), dtype=np.uint8)


def test_parts_photographed_twice_are_grouped_and_different_parts_are_not() -> None:
    distinct = parts(40)
    again = retaken(distinct[[3, 17, 29]], seed=1)
    rows = np.concatenate([distinct, again])
    groups = copy_groups(rows)
    assert int(groups.max()) + 1 == 40
    for original, copy in zip((3, 17, 29), (40, 41, 42), strict=True):
        assert groups[original] == groups[copy]
        assert np.flatnonzero(groups == groups[copy]).tolist() == [original, copy]
    # Numbered by first appearance, as the exact copies are.
    np.testing.assert_array_equal(groups[:40], np.arange(40))
    # Without the retaken frames, every part is its own group.
    np.testing.assert_array_equal(copy_groups(distinct), np.arange(40))


def test_a_folder_of_bursts_is_grouped_burst_by_burst() -> None:
    # A line camera's folder: every part photographed three times in a row. No folder-wide
    # distance says what a near-copy is; each image's nearest two are far nearer than the rest.
    distinct = parts(20, seed=3)
    rows = np.concatenate([retaken(distinct, seed=s) for s in (4, 5, 6)])
    groups = copy_groups(rows)
    np.testing.assert_array_equal(groups, np.tile(np.arange(20), 3))


def test_the_rule_holds_at_any_scale_and_a_pair_at_half_the_distance_is_not_grouped() -> None:
    points = np.random.default_rng(2).normal(size=(30, 16))
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    nearest = distances.min(axis=1)
    # Row 30 lies next to row 0, far nearer than row 0's nearest other; row 31 lies from row 1
    # at half row 1's nearest distance: nearer than anything else, but not by far enough.
    close = points[0] + (NEAR_COPY_GAP / 4) * nearest[0] * np.eye(16)[0]
    halfway = points[1] + 0.5 * nearest[1] * np.eye(16)[1]
    for scale in (1e-3, 1.0, 1e3):
        assert near_copy_pairs(scale * np.vstack([points, close, halfway])) == [(0, 30)], scale


def test_blocks_of_rows_find_the_pairs_a_whole_matrix_finds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = np.concatenate([parts(25, seed=4), retaken(parts(25, seed=4)[[0, 9, 24]], seed=5)])
    points = thumbnails(rows)
    whole = near_copy_pairs(points)
    assert whole == [(0, 25), (9, 26), (24, 27)]
    monkeypatch.setattr(training.copies, "_ROWS_PER_BLOCK", 4)
    monkeypatch.setattr(training.copies, "_IMAGES_PER_CHUNK", 3)
    assert near_copy_pairs(thumbnails(rows)) == whole
    np.testing.assert_array_equal(thumbnails(rows), points)


def test_a_burst_longer_than_the_most_looked_for_is_not_grouped() -> None:
    # Within the limit, one burst of a part among other parts is one group; past it, the
    # image's nearest neighbours are all frames of its own burst and no gap shows.
    others = parts(12, seed=7)
    for frames, grouped in ((MOST_NEAR_COPIES + 1, True), (MOST_NEAR_COPIES + 2, False)):
        burst = np.concatenate([retaken(parts(1, seed=8), seed=s) for s in range(frames)])
        groups = copy_groups(np.concatenate([others, burst]))
        assert (int(groups.max()) + 1 == 13) is grouped, frames


def test_thumbnails_are_block_means_on_the_shorter_side() -> None:
    images = np.arange(2 * 3 * 70 * 100, dtype=np.float64).reshape(2, 3, 70, 100) % 251
    # Shorter side 70: blocks of 2, the last row of 70 dropped, 35 x 50 blocks per channel.
    found = thumbnails(images.astype(np.uint8))
    assert found.shape == (2, 3 * 35 * 50)
    expected = images[:, :, :70, :100].reshape(2, 3, 35, 2, 50, 2).mean(axis=(3, 5))
    np.testing.assert_allclose(found, expected.reshape(2, -1))
    np.testing.assert_allclose(thumbnails(images.astype(np.uint8), np.array([1])), found[1:])
    # Smaller than the thumbnail side: each pixel is its own block.
    small = np.ones((2, 1, 8, 12), dtype=np.uint8)
    assert thumbnails(small).shape == (2, 96)


def test_images_alike_in_their_thumbnails_only_are_grouped() -> None:
    # Every image differs from the others in two pixels of one block, whose mean stays: the
    # thumbnails are equal and no positive nearest-neighbour distance sets a radius; they are
    # copies all the same.
    rows = np.full((5, 1, 64, 64), 100, dtype=np.uint8)
    for i in range(5):
        rows[i, 0, 2 * i, :2] = (101, 99)
    assert len({row.tobytes() for row in rows}) == 5
    np.testing.assert_array_equal(copy_groups(rows), np.zeros(5, dtype=np.intp))
    assert near_copy_pairs(np.zeros((2, 4))) == [(0, 1)]
    assert near_copy_pairs(np.zeros((1, 4))) == []


def test_near_copies_of_reference_rows_are_found_with_their_nearest() -> None:
    reference = thumbnails(parts(30, seed=9))
    again = retaken(parts(30, seed=9)[[4, 21]], seed=10)
    points = thumbnails(np.concatenate([parts(5, seed=11), again]))
    assert near_copies_of(reference, points) == [(5, 4), (6, 21)]
    assert near_copies_of(reference, points[:5]) == []
    assert near_copies_of(reference[:1], reference[:1]) == [(0, 0)]
    assert near_copies_of(reference[:0], points) == []
