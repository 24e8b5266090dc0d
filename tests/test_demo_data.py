"""The demo dataset generator: layout, masks, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.demo_data import DEFECT_TYPES, draw_defect, generate_demo_dataset, render_part
from training.errors import ConfigError

SMALL = {"image_size": 48, "n_train": 3, "n_test_good": 2, "n_test_per_defect": 2}


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_layout_is_mvtec(demo_data: Path) -> None:
    assert _names(demo_data) == ["ground_truth", "test", "train"]
    assert _names(demo_data / "train") == ["good"]
    assert _names(demo_data / "test") == sorted(["good", *DEFECT_TYPES])
    assert _names(demo_data / "ground_truth") == sorted(DEFECT_TYPES)
    assert len(_names(demo_data / "train" / "good")) == 24
    assert len(_names(demo_data / "test" / "good")) == 6
    for defect in DEFECT_TYPES:
        images = _names(demo_data / "test" / defect)
        masks = _names(demo_data / "ground_truth" / defect)
        assert len(images) == 3
        assert masks == [name.replace(".png", "_mask.png") for name in images]


def test_images_and_masks_match(demo_data: Path) -> None:
    for defect in DEFECT_TYPES:
        for image_path in sorted((demo_data / "test" / defect).iterdir()):
            mask_path = demo_data / "ground_truth" / defect / f"{image_path.stem}_mask.png"
            with Image.open(image_path) as image, Image.open(mask_path) as mask:
                assert image.mode == "RGB" and image.size == (64, 64)
                assert mask.mode == "L" and mask.size == image.size
                values = np.asarray(mask)
            assert set(np.unique(values)) <= {0, 255}
            assert 3 <= (values == 255).sum() < values.size // 4


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_mask_is_exactly_the_changed_pixels(defect: str) -> None:
    for seed in range(4):
        rng = np.random.default_rng(seed)
        part = render_part(rng, 96)
        before = part.image.copy()
        mask = draw_defect(part, rng, defect)
        changed = np.any(np.abs(part.image - before) > 1e-9, axis=2)
        assert not np.any(changed & ~mask), "pixels outside the mask changed"
        assert changed[mask].mean() > 0.95, "the mask covers pixels that did not change"


def test_same_seed_same_dataset_other_seed_differs(tmp_path: Path) -> None:
    a = generate_demo_dataset(tmp_path / "a", seed=3, **SMALL)
    b = generate_demo_dataset(tmp_path / "b", seed=3, **SMALL)
    c = generate_demo_dataset(tmp_path / "c", seed=4, **SMALL)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


def test_normal_images_vary(demo_data: Path) -> None:
    first, second = sorted((demo_data / "train" / "good").iterdir())[:2]
    a = np.asarray(Image.open(first), dtype=np.float32)
    b = np.asarray(Image.open(second), dtype=np.float32)
    assert 0.5 < np.abs(a - b).mean() < 40


def test_bad_size_options_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown demo size options"):
        generate_demo_dataset(tmp_path, n_images=3)
    with pytest.raises(ConfigError, match="n_train"):
        generate_demo_dataset(tmp_path, n_train=0)
    with pytest.raises(ConfigError, match="unknown defect type"):
        draw_defect(render_part(np.random.default_rng(0), 32), np.random.default_rng(0), "dent")
