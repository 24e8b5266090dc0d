"""Training data: discovery, loading, the held-out split and every bad-input path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.preprocessing import InputSpec, model_input
from training.config import Aspect
from training.data import (
    evenly_spaced,
    find_images,
    holdout_split,
    load_images,
    load_samples,
    resolve_color_mode,
    resolve_input_size,
    split_rows_in_place,
    training_folder,
)
from training.errors import DataError
from training.fit import FitConfig, fit_bundle

SPEC = InputSpec(height=16, width=16, color_mode="RGB")


def write_images(
    folder: Path, count: int, *, mode: str = "RGB", suffix: str = ".png"
) -> list[Path]:
    """``count`` small random images in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        shape = (20, 24, 3) if mode == "RGB" else (20, 24)
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        path = folder / f"img{i:02d}{suffix}"
        Image.fromarray(pixels, mode=mode).save(path)
        paths.append(path)
    return paths


def truncate(path: Path) -> None:
    """Cut a file to half its length, as an interrupted copy would."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_mvtec_layout_uses_train_good(tmp_path: Path) -> None:
    write_images(tmp_path / "train" / "good", 2)
    assert training_folder(tmp_path) == tmp_path / "train" / "good"


def test_plain_folder_is_used_as_is(tmp_path: Path) -> None:
    write_images(tmp_path, 2, suffix=".jpg")
    assert training_folder(tmp_path) == tmp_path
    assert len(find_images(tmp_path)) == 2


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        training_folder(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="is not a folder"):
        training_folder(tmp_path / "file.txt")


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is empty"):
        find_images(tmp_path)


def test_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="holds no images"):
        find_images(tmp_path)


def test_images_only_in_subfolders(tmp_path: Path) -> None:
    write_images(tmp_path / "batch1", 2)
    with pytest.raises(DataError, match="2 in subfolders"):
        find_images(tmp_path)


def test_truncated_image_stops_with_its_path(tmp_path: Path) -> None:
    paths = write_images(tmp_path, 3)
    truncate(paths[1])
    with pytest.raises(DataError, match=r"img01\.png") as info:
        load_images(paths, SPEC, skip_bad=False)
    assert "--skip-bad-images" in str(info.value)


def test_garbage_file_with_image_suffix(tmp_path: Path) -> None:
    paths = write_images(tmp_path, 2)
    paths[0].write_bytes(b"this is not a PNG")
    with pytest.raises(DataError, match=r"img00\.png"):
        load_images(paths, SPEC, skip_bad=False)


def test_bad_images_skipped_and_counted_when_asked(tmp_path: Path) -> None:
    paths = write_images(tmp_path, 4)
    truncate(paths[0])
    paths[2].write_bytes(b"")
    loaded = load_images(paths, SPEC, skip_bad=True)
    assert loaded.paths == (paths[1], paths[3])
    assert loaded.images.shape == (2, 3, 16, 16)
    assert [p for p, _ in loaded.skipped] == [paths[0], paths[2]]


def test_all_images_bad_is_an_error_even_when_skipping(tmp_path: Path) -> None:
    paths = write_images(tmp_path, 2)
    for path in paths:
        truncate(path)
    with pytest.raises(DataError, match="none of the 2 images"):
        load_images(paths, SPEC, skip_bad=True)


def test_pixels_are_scaled_by_the_spec_not_the_data(tmp_path: Path) -> None:
    path = tmp_path / "dim.png"
    Image.fromarray(np.full((8, 8, 3), 51, dtype=np.uint8)).save(path)
    loaded = load_images([path], InputSpec(height=8, width=8), skip_bad=False)
    np.testing.assert_allclose(loaded.images, 0.2, atol=1e-6)


def test_samples_are_the_model_input_in_a_quarter_of_the_memory(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "rgb", 3)
    paths += write_images(tmp_path / "grey", 2, mode="L", suffix=".bmp")
    wide = tmp_path / "wide.png"
    Image.fromarray(np.full((20, 24), 40_000, dtype=np.uint16)).save(wide)
    for spec in (SPEC, InputSpec(height=12, width=20, color_mode="L", wide_sample_bits=12)):
        images = load_images([*paths, wide], spec, skip_bad=False)
        samples = load_samples([*paths, wide], spec, skip_bad=False)
        assert samples.images.dtype == np.uint8 and samples.images.shape == images.images.shape
        assert samples.images.nbytes * 4 == images.images.nbytes
        np.testing.assert_array_equal(model_input(samples.images, spec.scale), images.images)
        assert (samples.paths, samples.fingerprint) == (images.paths, images.fingerprint)
    np.testing.assert_array_equal(model_input(images.images), images.images)  # passes through
    with pytest.raises(ValueError, match="samples are int16; expected uint8"):
        model_input(samples.images.astype(np.int16))  # type: ignore[arg-type]


def test_colour_mode_auto(tmp_path: Path) -> None:
    grey = write_images(tmp_path / "grey", 2, mode="L", suffix=".bmp")
    assert resolve_color_mode(grey, "auto") == "L"
    mixed = [*grey, *write_images(tmp_path / "rgb", 1, suffix=".tiff")]
    assert resolve_color_mode(mixed, "auto") == "RGB"
    assert resolve_color_mode(mixed, "L") == "L"


def sized_images(folder: Path, *sizes: tuple[int, int]) -> list[Path]:
    """One grey PNG per ``(width, height)``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, size in enumerate(sizes):
        path = folder / f"size{i:02d}.png"
        Image.new("L", size, color=128).save(path)
        paths.append(path)
    return paths


def test_input_size_of_square_images(tmp_path: Path) -> None:
    paths = sized_images(tmp_path, (64, 64), (64, 64))
    assert resolve_input_size(paths, 32, "auto", 8) == (32, 32)
    # Never enlarged: a larger limit keeps the images' own size.
    assert resolve_input_size(paths, 256, "auto", 8) == (64, 64)
    assert resolve_input_size(paths, 256, "square", 8) == (64, 64)


@pytest.mark.parametrize(
    ("width", "height", "side", "expected", "square"),
    [
        # 150 wide, 60 high at about 256 x 256 pixels would be larger than the images: their
        # own size, rounded down to multiples of 8.
        (150, 60, 256, (56, 144), (144, 144)),
        (60, 150, 256, (144, 56), (144, 144)),
        # About 64 x 64 pixels in the ratio 0.4: 40.5 x 101.2, rounded down to 40 x 96.
        (150, 60, 64, (40, 96), (64, 64)),
        (60, 150, 64, (96, 40), (64, 64)),
    ],
    ids=["wide", "tall", "wide-limited", "tall-limited"],
)
def test_input_size_keeps_the_aspect_ratio_and_the_area(
    tmp_path: Path,
    width: int,
    height: int,
    side: int,
    expected: tuple[int, int],
    square: tuple[int, int],
) -> None:
    paths = sized_images(tmp_path, *[(width, height)] * 3)
    assert resolve_input_size(paths, side, "auto", 8) == expected
    assert resolve_input_size(paths, side, "square", 8) == square


def test_input_size_is_the_median_of_mixed_sizes_rounded_to_the_multiple(tmp_path: Path) -> None:
    paths = sized_images(tmp_path, (100, 100), (100, 100), (200, 50), (40, 100))
    # Median longer side 100 (96 at a multiple of 8 or 32), median ratio 1.
    assert resolve_input_size(paths, 512, "auto", 8) == (96, 96)
    assert resolve_input_size(paths, 512, "auto", 32) == (96, 96)
    wide = sized_images(tmp_path / "wide", (100, 70), (110, 70), (120, 70))
    # Long side 110 -> 96 (multiple of 32); ratio 70/110 gives 61.1, rounded to 64.
    assert resolve_input_size(wide, 512, "auto", 32) == (64, 96)
    aspects: tuple[Aspect, ...] = ("auto", "square")
    for multiple in (8, 16, 32):
        for aspect in aspects:
            height, width = resolve_input_size(wide, 512, aspect, multiple)
            assert height % multiple == 0 and width % multiple == 0
            assert max(height, width) <= 110


def test_an_input_size_the_images_have_is_kept_despite_rounding(tmp_path: Path) -> None:
    # Images smaller than the side asked are taken at their own size, a float product that can
    # land a hair below it: 256 * sqrt(0.75) * (192 / 221.7...) must give 192, not 160.
    paths = sized_images(tmp_path, (256, 192), (256, 192))
    assert resolve_input_size(paths, 256, "auto", 32) == (192, 256)
    paths = sized_images(tmp_path / "small", (192, 128), (128, 64), (64, 48))
    assert resolve_input_size(paths[:1], 256, "auto", 32) == (128, 192)
    assert resolve_input_size(paths[1:2], 256, "auto", 32) == (64, 128)
    assert resolve_input_size(paths[2:], 64, "auto", 16) == (48, 64)


def test_input_size_of_small_images_is_never_enlarged_past_one_multiple(tmp_path: Path) -> None:
    paths = sized_images(tmp_path, (20, 12), (20, 12))
    assert resolve_input_size(paths, 256, "auto", 8) == (8, 16)
    assert resolve_input_size(paths, 256, "auto", 16) == (16, 16)


def test_input_size_skips_unreadable_files(tmp_path: Path) -> None:
    paths = sized_images(tmp_path, (150, 60), (150, 60))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert resolve_input_size([broken, *paths], 256, "auto", 8) == (56, 144)


def test_fingerprint_depends_on_content(tmp_path: Path) -> None:
    paths = write_images(tmp_path, 2)
    first = load_images(paths, SPEC, skip_bad=False).fingerprint
    assert load_images(paths, SPEC, skip_bad=False).fingerprint == first
    Image.fromarray(np.zeros((20, 24, 3), dtype=np.uint8)).save(paths[0])
    assert load_images(paths, SPEC, skip_bad=False).fingerprint != first


def test_holdout_split_is_seeded_and_disjoint() -> None:
    train, held = holdout_split(50, fraction=0.2, min_holdout=4, seed=1)
    assert len(held) == 10 and len(train) == 40
    assert not set(train) & set(held)
    again = holdout_split(50, fraction=0.2, min_holdout=4, seed=1)
    assert np.array_equal(again[1], held)
    assert not np.array_equal(holdout_split(50, fraction=0.2, min_holdout=4, seed=2)[1], held)
    assert len(holdout_split(10, fraction=0.2, min_holdout=4, seed=0)[1]) == 4


@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_the_split_reorders_the_rows_in_place_into_two_views(n: int) -> None:
    train_idx, holdout_idx = holdout_split(n + 6, fraction=0.3, min_holdout=4, seed=n)
    rows = np.random.default_rng(n).random((n + 6, 2, 3, 3)).astype(np.float32)
    expected_train, expected_holdout = rows[train_idx], rows[holdout_idx]
    train, holdout = split_rows_in_place(rows, train_idx, holdout_idx)
    np.testing.assert_array_equal(train, expected_train)
    np.testing.assert_array_equal(holdout, expected_holdout)
    assert np.shares_memory(train, rows) and np.shares_memory(holdout, rows)  # no copy
    assert train.flags.c_contiguous and holdout.flags.c_contiguous


def test_a_split_that_misses_or_repeats_a_row_is_refused() -> None:
    rows = np.zeros((5, 1, 2, 2), dtype=np.float32)
    for train_idx, holdout_idx in (([0, 1, 2], [3]), ([0, 1, 2], [3, 3]), ([0, 1, 2, 3], [5])):
        with pytest.raises(ValueError, match="not each of the 5 images once"):
            split_rows_in_place(rows, np.array(train_idx), np.array(holdout_idx))


def test_the_split_without_copies_is_the_seeded_permutations() -> None:
    # The split every fit before copy groups made: a bundle's held-out files stay the same.
    for n, seed in ((50, 1), (320, 0), (9, 3)):
        order = np.random.default_rng(seed).permutation(n)
        held = max(4, round(n * 0.2))
        train, held_out = holdout_split(
            n, fraction=0.2, min_holdout=4, seed=seed, groups=np.arange(n)
        )
        np.testing.assert_array_equal(held_out, np.sort(order[:held]))
        np.testing.assert_array_equal(train, np.sort(order[held:]))
        np.testing.assert_array_equal(
            held_out, holdout_split(n, fraction=0.2, min_holdout=4, seed=seed)[1]
        )


def test_a_folder_of_copies_of_too_few_images_is_refused() -> None:
    # Ten files, two different images: whichever side the nine copies fall on, too few are left.
    groups = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1, 1], dtype=np.intp)
    for seed in range(5):
        with pytest.raises(DataError, match="found 10 usable images, but only 2 differ"):
            holdout_split(10, fraction=0.2, min_holdout=4, seed=seed, groups=groups)
    with pytest.raises(ValueError, match="3 group numbers for 10 images"):
        holdout_split(10, fraction=0.2, min_holdout=4, seed=0, groups=np.arange(3))


def test_too_few_images(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="found 5 usable images; a fit needs at least 6"):
        holdout_split(5, fraction=0.2, min_holdout=4, seed=0)


def test_fit_on_too_few_images_is_a_clear_error(tmp_path: Path) -> None:
    write_images(tmp_path / "data", 3)
    with pytest.raises(DataError, match="found 3 usable images"):
        fit_bundle(tmp_path / "data", tmp_path / "bundle", FitConfig(progress=False))
    assert not (tmp_path / "bundle").exists()


def test_evenly_spaced_rows_are_every_row_up_to_the_limit_then_every_kth() -> None:
    rows = np.arange(40.0).reshape(10, 4)
    every = evenly_spaced(10, 10)
    assert every == slice(None) and np.shares_memory(rows[every], rows)  # a view, no copy
    for n, limit, expected in ((10, 4, [0, 3, 6, 9]), (10, 5, [0, 2, 4, 6, 8]), (7, 3, [0, 3, 6])):
        picked = np.arange(n)[evenly_spaced(n, limit)]
        np.testing.assert_array_equal(picked, expected)
        assert len(picked) <= limit
    spread = np.arange(2400)[evenly_spaced(2400, 1000)]
    assert 500 <= len(spread) <= 1000 and spread[-1] >= 2400 - 3  # across the whole folder
    with pytest.raises(ValueError, match="at least 1"):
        evenly_spaced(10, 0)
