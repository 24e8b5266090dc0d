"""The training loop (training/train.py): step budget, reproducibility, time limit, crops."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

import training.train
from service.preprocessing import model_input
from training.config import FitConfig
from training.errors import ConfigError
from training.model import VAE, DefectHeads, downsample, pad_to_cells
from training.synth import SHADED_TRAINING_DEFECTS, TRAINING_DEFECTS, Defect, corrupt
from training.train import (
    Budget,
    TrainResult,
    downsampled,
    jitter_intensity,
    learning_rate,
    random_crops,
    select_device,
    select_precision,
    train_both,
    train_vae,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

F32Array = npt.NDArray[np.float32]


def _images(n: int = 12, height: int = 16, width: int = 16) -> F32Array:
    """Grey parts: one smooth pattern with a little noise, like images of good parts."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    base = 0.5 + 0.2 * np.sin(yy / 3.0) * np.cos(xx / 4.0)
    noisy = base[None, None] + rng.normal(0, 0.02, (n, 1, height, width))
    return np.asarray(np.clip(noisy, 0, 1), dtype=np.float32)


def _config(**changes: Any) -> FitConfig:
    options: dict[str, Any] = {
        "image_size": 16,
        "crop_size": 16,
        "width": 4,
        "max_width": 8,
        "latent_channels": 2,
        "head_width": 2,
        "coarse_factor": 2,
        "coarse_width": 4,
        "epochs": 3,
        "max_steps": 1000,
        "batch_size": 4,
        "threads": 1,
        "progress": False,
        **changes,
    }
    return FitConfig(**options)


def _train_both(
    config: FitConfig, images: F32Array | None = None, device: str = "cpu"
) -> tuple[TrainResult, TrainResult]:
    images = _images() if images is None else images
    torch.manual_seed(config.seed)  # as fit does: the reparameterisation noise is torch's
    model = VAE(config.model_config(channels=images.shape[1]))
    return train_both(model, images[:8], images[8:], config, torch.device(device))


def _train(config: FitConfig, images: F32Array | None = None, device: str = "cpu") -> TrainResult:
    return _train_both(config, images, device)[0]


@pytest.mark.parametrize(
    ("epochs", "max_steps", "expected"),
    [(3, 1000, 6), (50, 5, 5)],
    ids=["epochs", "capped"],
)
def test_the_loop_runs_exactly_the_step_budget(
    monkeypatch: pytest.MonkeyPatch, epochs: int, max_steps: int, expected: int
) -> None:
    batches: list[int] = []

    def counting_corrupt(
        images: F32Array, p: float, rng: np.random.Generator, defects: Sequence[Defect]
    ) -> Any:
        batches.append(images.shape[0])
        return corrupt(images, p, rng, defects)

    monkeypatch.setattr(training.train, "corrupt", counting_corrupt)
    config = _config(epochs=epochs, max_steps=max_steps)
    result = _train(config)
    assert config.steps_for(8) == expected
    # Each step corrupts one batch: the local model's steps, then the coarse VAE's.
    assert batches == [config.batch_size] * expected * 2
    assert result.steps == result.planned_steps == expected
    assert result.stop_reason == f"completed {expected} steps"
    steps = [s.step for s in result.history]
    assert steps == sorted(steps) and steps[-1] == expected
    assert not result.model.training


@pytest.mark.parametrize(
    ("shaded", "expected"), [(False, TRAINING_DEFECTS), (True, SHADED_TRAINING_DEFECTS)]
)
def test_shaded_defects_add_the_shade_kind_at_every_step_of_both_vaes(
    monkeypatch: pytest.MonkeyPatch, shaded: bool, expected: tuple[Defect, ...]
) -> None:
    kinds: list[tuple[Defect, ...]] = []

    def recording_corrupt(
        images: F32Array, p: float, rng: np.random.Generator, defects: Sequence[Defect]
    ) -> Any:
        kinds.append(tuple(defects))
        return corrupt(images, p, rng, defects)

    monkeypatch.setattr(training.train, "corrupt", recording_corrupt)
    _train(_config(epochs=1, max_steps=2, shaded_defects=shaded))
    # Two steps of the local model, then two of the coarse VAE.
    assert kinds == [expected] * 4


def test_training_lowers_the_held_out_error() -> None:
    result = _train(_config(epochs=10, learning_rate=5e-3))
    first, last = result.history[0], result.history[-1]
    assert last.val_mse < first.val_mse
    assert all(np.isfinite(s.train_loss) and np.isfinite(s.head_loss) for s in result.history)
    summary = result.summary()
    assert summary["steps"] == 20 and summary["final"]["step"] == 20
    assert len(summary["history"]) == len(result.history)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ),
    ],
)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_same_seed_gives_bit_identical_weights(device: str, precision: str) -> None:
    first = _train(_config(precision=precision), device=device)
    again = _train(_config(precision=precision), device=device)
    other = _train(_config(seed=1, precision=precision), device=device)
    weights, repeated = first.model.state_dict(), again.model.state_dict()
    assert weights.keys() == repeated.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, repeated[name]), name
    assert [s.train_loss for s in first.history] == [s.train_loss for s in again.history]
    assert any(
        not torch.equal(tensor, other.model.state_dict()[name])
        for name, tensor in weights.items()
        if tensor.is_floating_point()
    )


def test_training_on_8_bit_samples_gives_the_model_of_their_model_input() -> None:
    samples = np.asarray(np.rint(_images() * 255), dtype=np.uint8)
    images = model_input(samples)
    config = _config()
    results = []
    for train in (images[:8], samples[:8]):
        torch.manual_seed(config.seed)
        model = VAE(config.model_config(channels=1))
        results.append(train_both(model, train, images[8:], config, torch.device("cpu")))
    for from_input, from_samples in zip(*results, strict=True):
        weights = from_input.model.state_dict()
        for name, tensor in from_samples.model.state_dict().items():
            assert torch.equal(tensor, weights[name]), name


def test_the_coarse_images_are_made_a_batch_at_a_time_as_all_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    samples = np.asarray(np.rint(_images(n=11) * 255), dtype=np.uint8)
    whole = downsample(torch.from_numpy(model_input(samples)), 2).numpy()
    monkeypatch.setattr(training.train, "DOWNSAMPLE_BATCH", 4)
    for images in (samples, model_input(samples)):
        np.testing.assert_array_equal(downsampled(images, 2), whole)


def test_the_coarse_images_are_padded_to_whole_cells_as_the_exported_graph_pads_them() -> None:
    samples = np.asarray(np.rint(_images(n=3, height=32, width=48) * 255), dtype=np.uint8)
    small = downsample(torch.from_numpy(model_input(samples)), 8)  # 4 x 6: not whole cells
    coarse = downsampled(samples, 8)
    assert coarse.shape[-2:] == (8, 8)
    np.testing.assert_array_equal(coarse, pad_to_cells(small, (4, 2)).numpy())


def _kernel_settings() -> tuple[bool, bool, bool]:
    cudnn = torch.backends.cudnn
    return (cudnn.deterministic, cudnn.benchmark, torch.are_deterministic_algorithms_enabled())


def test_cuda_training_asks_for_deterministic_kernels_and_restores_the_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = _kernel_settings()
    with training.train.deterministic_kernels(torch.device("cpu")):
        assert _kernel_settings() == before  # CPU kernels are deterministic already
    with training.train.deterministic_kernels(torch.device("cuda")):
        assert _kernel_settings() == (True, False, True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert _kernel_settings() == before
    with (
        pytest.raises(RuntimeError, match="stops here"),
        training.train.deterministic_kernels(torch.device("cuda")),
    ):
        raise RuntimeError("stops here")
    assert _kernel_settings() == before


def test_both_models_train_inside_the_deterministic_kernels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    entered: list[torch.device] = []
    steps_inside: list[int] = []
    real_train_vae = training.train.train_vae

    @contextlib.contextmanager
    def recording(device: torch.device) -> Iterator[None]:
        entered.append(device)
        yield
        entered.append(device)  # left

    def counting_train_vae(*args: Any, **kwargs: Any) -> TrainResult:
        assert len(entered) == 1, "trained outside the deterministic kernels"
        result = real_train_vae(*args, **kwargs)
        steps_inside.append(result.steps)
        return result

    monkeypatch.setattr(training.train, "deterministic_kernels", recording)
    monkeypatch.setattr(training.train, "train_vae", counting_train_vae)
    local, coarse = _train_both(_config(epochs=2, coarse_max_steps=1))
    assert entered == [torch.device("cpu")] * 2
    assert steps_inside == [local.steps, coarse.steps] == [4, 1]


def test_a_time_limit_stops_early_and_says_so() -> None:
    # A limit shorter than one step: the loop stops after its first step.
    config = _config(epochs=500, time_limit_minutes=1e-9)
    result, coarse = _train_both(config)
    assert result.planned_steps == coarse.planned_steps == config.steps_for(8) == 1000
    assert result.steps == coarse.steps == 1
    # The local model may use 80% of the limit, the coarse VAE the rest.
    assert result.stop_reason == "time limit of 4.8e-08 s reached"
    assert coarse.stop_reason.startswith("time limit of") and coarse.stop_reason.endswith("reached")


@pytest.mark.parametrize("time_limit", [None, 1e-9], ids=["completed", "time-limited"])
def test_the_history_ends_at_the_final_weights(time_limit: float | None) -> None:
    """The last record (the manifest's ``final``) describes the weights that are kept."""
    result = _train(_config(epochs=500, time_limit_minutes=time_limit, max_steps=30))
    assert result.history, "no record of the kept weights"
    assert result.history[-1].step == result.steps
    assert result.summary()["final"]["step"] == result.steps


def test_training_on_crops_validates_on_whole_images() -> None:
    # Crops of 8x8 from 16x32 images: the model is fully convolutional.
    images = _images(height=16, width=32)
    result = _train(_config(crop_size=8, epochs=1), images)
    assert result.steps == 2
    with torch.no_grad():
        recon, mu, _ = result.model(torch.from_numpy(images[8:]))
    assert recon.shape == (4, 1, 16, 32) and mu.shape == (4, 2, 2, 4)


def test_the_coarse_vae_stops_at_coarse_max_steps() -> None:
    local, coarse = _train_both(_config(epochs=3, coarse_max_steps=2))
    assert (local.planned_steps, coarse.planned_steps) == (6, 2)
    assert (local.steps, coarse.steps) == (6, 2)
    assert coarse.stop_reason == "completed 2 steps"


@pytest.mark.parametrize(("head_share", "expected"), [(0.5, 2), (1.0, 4), (0.1, 1)])
def test_the_defect_head_learns_from_its_share_of_each_batch(
    head_share: float, expected: int
) -> None:
    config = _config(epochs=1, head_share=head_share)
    images = _images()
    model = VAE(config.model_config(channels=1))
    assert model.head is not None
    seen: list[tuple[int, int]] = []
    model.head.register_forward_hook(
        lambda _module, inputs, _out: seen.append((inputs[0].shape[0], inputs[1].shape[0]))
    )
    train_both(model, images[:8], images[8:], config, torch.device("cpu"))
    assert seen == [(expected, expected)] * config.steps_for(8)


def test_each_of_several_heads_learns_as_a_lone_head_and_none_steers_the_vae() -> None:
    config = _config(epochs=2, head_count=2)
    images = _images()
    torch.manual_seed(0)
    pair = VAE(config.model_config(channels=1))
    lone = VAE(_config(epochs=2, head_count=1).model_config(channels=1))
    assert isinstance(pair.head, DefectHeads) and lone.head is not None
    first, second = list(pair.head.members)
    lone.encoder.load_state_dict(pair.encoder.state_dict())
    lone.decoder.load_state_dict(pair.decoder.state_dict())
    lone.head.load_state_dict(second.state_dict())
    first_before = {k: v.clone() for k, v in first.state_dict().items()}
    for model in (pair, lone):
        torch.manual_seed(1)  # the same reparameterisation noise for both
        train_vae(model, images[:8], images[8:], config, torch.device("cpu"), steps=4)
    for part in ("encoder", "decoder"):
        for key, value in getattr(lone, part).state_dict().items():
            assert torch.equal(value, getattr(pair, part).state_dict()[key]), (part, key)
    for key, value in lone.head.state_dict().items():
        torch.testing.assert_close(second.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(first_before[k], v) for k, v in first.state_dict().items())
    assert not any(
        torch.allclose(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True)
    )


def test_the_coarse_vae_trains_on_whole_downsampled_images() -> None:
    images = _images(height=16, width=32)
    config = _config(crop_size=8, epochs=3)
    torch.manual_seed(0)
    untrained = VAE(config.model_config(channels=1))
    assert untrained.coarse is not None
    before = {k: v.clone() for k, v in untrained.coarse.state_dict().items()}
    local, coarse = _train_both(config, images)
    assert local.steps == coarse.steps == config.steps_for(8) == 6
    assert coarse.model is local.model.coarse
    after = coarse.model.state_dict()
    assert any(
        not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point()
    )
    with torch.no_grad():
        small = torch.nn.functional.avg_pool2d(torch.from_numpy(images[8:]), 2)
        recon, mu, _ = coarse.model(small)
    assert recon.shape == (4, 1, 8, 16) and mu.shape == (4, 2, 1, 2)
    # Its held-out history is measured on the downsampled whole images.
    assert coarse.history and coarse.history[-1].val_mse > 0


def test_random_crops_have_the_requested_size_and_come_from_the_images() -> None:
    images = torch.arange(5 * 2 * 20 * 30, dtype=torch.float32).reshape(5, 2, 20, 30)
    crops = random_crops(images, 7, (8, 16), np.random.default_rng(0))
    assert crops.shape == (7, 2, 8, 16)
    for crop in crops:
        # Every value is unique: the first one says where the crop was taken.
        n, _, y, x = np.unravel_index(int(crop[0, 0, 0]), tuple(images.shape))
        assert torch.equal(crop, images[n, :, y : y + 8, x : x + 16])
    again = random_crops(images, 7, (8, 16), np.random.default_rng(0))
    assert torch.equal(crops, again)
    whole = random_crops(images, 3, (20, 30), np.random.default_rng(1))
    assert all(any(torch.equal(c, image) for image in images) for c in whole)


def test_jitter_stays_in_the_unit_range_and_is_the_identity_at_zero() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (6, 3, 8, 8)).astype(np.float32)
    x[0], x[1] = 0.0, 1.0
    np.testing.assert_array_equal(jitter_intensity(x, 0.0, rng), x)
    for amount in (0.1, 0.5):
        out = jitter_intensity(x, amount, rng)
        assert out.dtype == np.float32 and out.shape == x.shape
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert not np.array_equal(out, x)
        # Brightness and contrast: a small change, the same for every pixel of an image.
        assert np.abs(out - x).max() <= 2 * amount + 1e-6
    np.testing.assert_array_equal(
        jitter_intensity(x, 0.2, np.random.default_rng(3)),
        jitter_intensity(x, 0.2, np.random.default_rng(3)),
    )


def test_learning_rate_warms_up_and_anneals() -> None:
    assert learning_rate(1.0, 0.0) == pytest.approx(0.1)
    assert learning_rate(1.0, 0.05) == pytest.approx(1.0)
    assert learning_rate(1.0, 1.0) == pytest.approx(0.01)
    rates = [learning_rate(1.0, p) for p in np.linspace(0.05, 1.0, 20)]
    assert rates == sorted(rates, reverse=True)
    budget = Budget(total_steps=10, time_limit_s=None)
    assert [budget.progress(s) for s in (0, 5, 10, 12)] == [0.0, 0.5, 1.0, 1.0]
    assert Budget(total_steps=10, time_limit_s=1e-9).progress(1) == 1.0


def test_device_policy() -> None:
    assert select_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert select_device("auto").type == "cpu"
        with pytest.raises(ConfigError, match="cuda"):
            select_device("cuda")


def test_auto_precision_is_bf16_on_a_cpu_with_amx_only(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(training.train, "amx_held_off", lambda: False)
    monkeypatch.setattr(training.train, "cpu_has_amx", lambda: True)
    assert select_precision("auto", cpu) == torch.bfloat16
    assert select_precision("auto", cuda) == torch.float32
    monkeypatch.setattr(training.train, "cpu_has_amx", lambda: False)
    assert select_precision("auto", cpu) == torch.float32
    assert select_precision("bf16", cpu) == torch.bfloat16
    assert select_precision("fp32", cpu) == torch.float32


def test_kernels_held_to_avx2_keep_auto_from_bf16_and_warn_when_it_is_asked(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(training.train, "cpu_has_amx", lambda: True)
    monkeypatch.setattr(training.train, "amx_held_off", lambda: True)
    with caplog.at_level(logging.WARNING, logger="training.train"):
        assert select_precision("auto", cpu) == torch.float32
        assert not caplog.records
        assert select_precision("bf16", cpu) == torch.bfloat16
    assert "held to AVX2: oneDNN may not use this CPU's AMX tiles" in caplog.text


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    with pytest.raises(ConfigError, match=r"precision has value 'bf16'.*lacks bfloat16"):
        select_precision("bf16", torch.device("cuda"))


@pytest.mark.parametrize(
    ("precision", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)]
)
def test_the_precision_is_what_the_convolutions_compute_in(
    precision: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: set[torch.dtype] = set()
    real_conv = torch.nn.Conv2d.forward

    def recording_conv(self: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        out = real_conv(self, x)
        if self.training:  # training steps, not the full-size validation passes
            seen.add(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Conv2d, "forward", recording_conv)
    local, coarse = _train_both(_config(precision=precision))
    assert seen == {dtype}
    assert local.summary()["precision"] == coarse.summary()["precision"] == precision
    for model in (local.model, coarse.model):
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_and_fp32_training_give_different_models() -> None:
    fp32 = _train(_config(precision="fp32")).model.state_dict()
    bf16 = _train(_config(precision="bf16")).model.state_dict()
    assert any(
        not torch.equal(tensor, bf16[name])
        for name, tensor in fp32.items()
        if tensor.is_floating_point()
    )
