"""Synthetic defects (training/synth.py): masks of exactly the changed pixels, two families."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from service.preprocessing import InputSpec, list_image_files, load_image_file, stack
from training.synth import (
    CHANGED,
    HELD_OUT_DEFECTS,
    SHADED_TRAINING_DEFECTS,
    TRAINING_DEFECTS,
    Defect,
    corrupt,
    held_out_defects,
    perlin_mask,
    perlin_noise,
    perlin_texture,
    shade,
    synthesised_batches,
)

F32Array = npt.NDArray[np.float32]
ALL_DEFECTS: tuple[Defect, ...] = tuple(
    dict.fromkeys((*SHADED_TRAINING_DEFECTS, *HELD_OUT_DEFECTS))
)
SIZES = [(32, 32), (48, 64)]
DRAWS = 20


@pytest.fixture(scope="module")
def demo_images(demo_data: Path) -> dict[tuple[int, int], F32Array]:
    """Four demo training images at each of SIZES: real parts, as the training sees them."""
    files = list_image_files(demo_data / "train" / "good")[:4]
    return {
        (h, w): stack([load_image_file(p, InputSpec(height=h, width=w)) for p in files])
        for h, w in SIZES
    }


def _changed(after: F32Array, before: F32Array) -> npt.NDArray[np.bool_]:
    return np.asarray(np.abs(after - before).max(axis=0) > CHANGED)


def test_the_families_are_disjoint_and_complete() -> None:
    assert set(SHADED_TRAINING_DEFECTS).isdisjoint(HELD_OUT_DEFECTS)
    assert set(SHADED_TRAINING_DEFECTS) - set(TRAINING_DEFECTS) == {shade}
    names = {d.__name__ for d in ALL_DEFECTS}
    assert names == {"perlin_texture", "crack", "shade", "paste", "blotch", "noise", "relight"}


@pytest.mark.parametrize("size", SIZES, ids=["32x32", "48x64"])
def test_a_shaded_region_keeps_the_texture_and_covers_an_area(
    demo_images: dict[tuple[int, int], F32Array], size: tuple[int, int]
) -> None:
    images = demo_images[size]
    covered, darker = [], 0
    for seed in range(40):
        before = images[seed % len(images)]
        image = before.copy()
        mask = shade(image, images, np.random.default_rng(seed))
        covered.append(mask.mean())
        if not mask.any():
            continue
        # Inside the region each channel is the image times one gain (where nothing clipped).
        for after_c, before_c in zip(image[:, mask], before[:, mask], strict=True):
            kept = (before_c > 0.05) & (after_c < 1.0) & (after_c > 0.0)
            if kept.sum() > 3:
                ratio = after_c[kept] / before_c[kept]
                assert ratio.std() < 1e-4 * ratio.mean(), seed
        darker += bool(image[:, mask].mean() < before[:, mask].mean())
    # Areas, not specks: a region is a few per cent of the image or more, most of them darker.
    assert np.median(covered) > 0.02
    assert 0.5 * 40 < darker < 40


@pytest.mark.parametrize("size", SIZES, ids=["32x32", "48x64"])
@pytest.mark.parametrize("defect", ALL_DEFECTS, ids=lambda d: d.__name__)
def test_each_defect_returns_the_mask_of_exactly_the_pixels_it_changed(
    demo_images: dict[tuple[int, int], F32Array], defect: Defect, size: tuple[int, int]
) -> None:
    images = demo_images[size]
    changed_some = 0
    for seed in range(DRAWS):
        image = images[seed % len(images)].copy()
        before = image.copy()
        mask = defect(image, images, np.random.default_rng(seed))
        assert mask.dtype == np.bool_ and mask.shape == size
        assert image.dtype == np.float32 and image.min() >= 0.0 and image.max() <= 1.0
        np.testing.assert_array_equal(mask, _changed(image, before))
        # Outside the mask nothing moved by more than CHANGED.
        assert np.abs(image - before).max(axis=0)[~mask].max(initial=0.0) <= CHANGED
        changed_some += bool(mask.any())
    # A defect may now and then fall off the image (a crack) or nearly match it (a mild
    # relighting); nearly always it changes some pixels.
    assert changed_some >= DRAWS - 2


@pytest.mark.parametrize("size", SIZES, ids=["32x32", "48x64"])
def test_perlin_regions_are_never_empty(
    demo_images: dict[tuple[int, int], F32Array], size: tuple[int, int]
) -> None:
    h, w = size
    for seed in range(300):
        assert perlin_mask(h, w, np.random.default_rng(seed)).any(), seed
    images = demo_images[size]
    for seed in range(50):
        image = images[seed % len(images)].copy()
        assert perlin_texture(image, images, np.random.default_rng(seed)).any(), seed


def test_perlin_regions_range_from_specks_to_blobs() -> None:
    """Real defects come in every size: the training's Perlin regions cover from under 1% of a
    96x96 crop (a speck) to over 3% (a blob like DRAEM's), not one size only."""
    coverage = np.array(
        [perlin_mask(96, 96, np.random.default_rng(seed)).mean() for seed in range(400)]
    )
    tenth, median, ninetieth = np.percentile(coverage, [10, 50, 90])
    assert tenth < 0.01, tenth
    assert 0.005 < median < 0.04, median
    assert ninetieth > 0.03, ninetieth


def test_perlin_noise_range_and_lattice() -> None:
    values = []
    for seed in range(3):
        for cells in ((1, 1), (2, 4), (4, 2), (8, 8), (16, 4)):
            noise = perlin_noise(32, 64, cells, np.random.default_rng(seed))
            assert noise.shape == (32, 64)
            # Gradient noise is zero at the lattice points.
            np.testing.assert_allclose(noise[:: 32 // cells[0], :: 64 // cells[1]], 0.0, atol=1e-12)
            values.append(noise)
    every = np.stack(values)
    # 2-D Perlin noise with unit gradients lies within +-sqrt(1/2).
    assert np.abs(every).max() <= np.sqrt(0.5) + 1e-9
    assert every.max() > 0.4 and every.min() < -0.4
    again = perlin_noise(32, 64, (4, 2), np.random.default_rng(1))
    np.testing.assert_array_equal(again, values[5 + 2])


@pytest.mark.parametrize("size", SIZES, ids=["32x32", "48x64"])
def test_corrupt_gives_images_and_masks_deterministically_by_seed(
    demo_images: dict[tuple[int, int], F32Array], size: tuple[int, int]
) -> None:
    images = np.concatenate([demo_images[size]] * 4)  # 16 images
    out, masks = corrupt(images, 1.0, np.random.default_rng(0))
    assert out.dtype == np.float32 and out.shape == images.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert masks.dtype == np.bool_ and masks.shape == (16, *size)
    for after, before, mask in zip(out, images, masks, strict=True):
        np.testing.assert_array_equal(mask, _changed(after, before))
    assert masks.reshape(16, -1).any(axis=1).sum() >= 14
    again, again_masks = corrupt(images, 1.0, np.random.default_rng(0))
    np.testing.assert_array_equal(again, out)
    np.testing.assert_array_equal(again_masks, masks)
    other, _ = corrupt(images, 1.0, np.random.default_rng(1))
    assert not np.array_equal(other, out)
    untouched, none = corrupt(images, 0.0, np.random.default_rng(0))
    np.testing.assert_array_equal(untouched, images)
    assert not none.any()
    half = corrupt(images, 0.5, np.random.default_rng(2))[1].reshape(16, -1).any(axis=1).sum()
    assert 2 <= half <= 14
    # The input is never changed in place.
    np.testing.assert_array_equal(images, np.concatenate([demo_images[size]] * 4))


def synthesise_anomalies(images: F32Array, **options: Any) -> F32Array:
    """Every defective copy at once, the batches joined."""
    return np.concatenate(list(synthesised_batches(images, batch=64, **options)))


def test_synthetic_anomalies_change_every_image_locally(
    demo_images: dict[tuple[int, int], F32Array],
) -> None:
    images = demo_images[(32, 32)][:3]
    copies = len(HELD_OUT_DEFECTS)
    out = synthesise_anomalies(images, copies=copies, seed=0)
    assert out.shape == (3 * copies, 3, 32, 32)
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    source = np.repeat(images, copies, axis=0)
    changed = np.any(np.abs(out - source) > 1e-6, axis=1).reshape(out.shape[0], -1).mean(axis=1)
    assert np.all(changed > 0) and np.all(changed < 0.5)
    np.testing.assert_array_equal(out, synthesise_anomalies(images, copies=copies, seed=0))
    assert not np.array_equal(out, synthesise_anomalies(images, copies=copies, seed=1))
    np.testing.assert_array_equal(images, demo_images[(32, 32)][:3])
    trained_on = synthesise_anomalies(images, copies=2, seed=0, defects=TRAINING_DEFECTS)
    assert trained_on.shape == (6, 3, 32, 32) and not np.array_equal(trained_on, source[:6])


def test_synthetic_anomalies_in_batches_are_the_same_whatever_the_batch(
    demo_images: dict[tuple[int, int], F32Array],
) -> None:
    # The fit scores its synthetic defects a batch at a time; the batches must not change them.
    images = demo_images[(32, 32)][:5]
    copies = 3
    # The whole set made at once, one copy of each image per row, as the batches must give it.
    whole = np.repeat(images, copies, axis=0)
    rng = np.random.default_rng(4)
    for i in range(whole.shape[0]):
        HELD_OUT_DEFECTS[i % len(HELD_OUT_DEFECTS)](whole[i], images, rng)
    np.clip(whole, 0.0, 1.0, out=whole)
    for batch in (1, 4, 15, 64):
        parts = list(synthesised_batches(images, copies=copies, seed=4, batch=batch))
        assert [p.shape[0] for p in parts[:-1]] == [batch] * (len(parts) - 1)
        np.testing.assert_array_equal(np.concatenate(parts), whole, err_msg=f"batch {batch}")
    np.testing.assert_array_equal(synthesise_anomalies(images, copies=copies, seed=4), whole)
    np.testing.assert_array_equal(images, demo_images[(32, 32)][:5])
    with pytest.raises(ValueError, match="batch is 0"):
        next(synthesised_batches(images, copies=copies, seed=4, batch=0))


def test_held_out_defects_scaled_to_a_quarter_are_specks_and_at_one_are_the_fits(
    demo_images: dict[tuple[int, int], F32Array],
) -> None:
    images = demo_images[(48, 64)]
    copies = 4 * len(HELD_OUT_DEFECTS)
    source = np.repeat(images, copies, axis=0)
    made = {
        size: synthesise_anomalies(images, copies=copies, seed=2, defects=held_out_defects(size))
        for size in (1.0, 0.25)
    }
    # Size 1 is what the fit's rule check draws, pixel for pixel.
    np.testing.assert_array_equal(made[1.0], synthesise_anomalies(images, copies=copies, seed=2))
    area = {
        size: np.mean(
            [_changed(after, before).mean() for after, before in zip(out, source, strict=True)]
        )
        for size, out in made.items()
    }
    # A quarter of each side's bounds: about a sixteenth of the area.
    assert 0.0 < area[0.25] < area[1.0] / 6
    for size in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError, match="expected a scale in"):
            held_out_defects(size)
