"""The training loop: crops, synthetic defects, the VAE's ELBO and the defect head's focal loss.

Each step draws random crops of the training images, changes their brightness and contrast a
little (lighting is not a defect), gives some of them a synthetic defect (:mod:`training.synth`),
and trains the VAE to reconstruct the clean crop from the corrupted one (a denoising VAE) and the
defect head (each of them, when there are several) to find the defect's pixels from the corrupted
crop and its reconstruction (on a share of the crops: :meth:`FitConfig.head_batch`). The budget
is a number of steps (:meth:`FitConfig.steps_for`); AdamW's learning rate warms up and anneals
over it, and the final weights are kept. Held-out images are scored at full size a few times
along the way for the history; they never steer the training. When asked for
(:func:`select_precision`), the networks run in bfloat16 mixed precision, whose steps take about
0.6 of the time on CPUs with Intel AMX; the weights, their updates and the losses stay float32,
and the exported graphs are float32.

The coarse VAE is trained afterwards by the same loop, on whole images downsampled by the
coarse factor (the crop size exceeds them) and padded to whole cells as its exported graph pads
them (:func:`downsampled`), for as many steps, at most ``coarse_max_steps``
(:meth:`FitConfig.coarse_steps_for`, :func:`train_both`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor
from tqdm import tqdm

from service.preprocessing import PIXEL_SCALE, Images, model_input
from service.scoring import batch_slices
from training.config import Device, FitConfig, Precision
from training.errors import ConfigError
from training.kernels import amx_held_off
from training.loss import ELBOLoss, focal_loss
from training.model import VAE, cell_padding, downsample, pad_to_cells, reparameterise
from training.synth import SHADED_TRAINING_DEFECTS, TRAINING_DEFECTS, corrupt

log = logging.getLogger(__name__)

F32Array = npt.NDArray[np.float32]
VALIDATIONS = 10  # full-size validation passes over a run, for the history
# Under a time limit, the local model may use this share of it; the coarse VAE gets the rest.
LOCAL_TIME_SHARE = 0.8
DOWNSAMPLE_BATCH = 64


@dataclass(frozen=True)
class StepStats:
    """Training losses averaged since the last record, and the held-out losses at the record."""

    step: int
    train_loss: float
    train_mse: float
    train_kl: float
    head_loss: float
    val_loss: float
    val_mse: float
    val_kl: float


@dataclass(frozen=True)
class TrainResult:
    """The trained model (final weights) and its history."""

    model: VAE
    history: tuple[StepStats, ...]
    steps: int
    planned_steps: int
    stop_reason: str
    seconds: float
    precision: str

    def summary(self) -> dict[str, Any]:
        """JSON-ready facts for the manifest."""
        return {
            "steps": self.steps,
            "precision": self.precision,
            "planned_steps": self.planned_steps,
            "stop_reason": self.stop_reason,
            "seconds": round(self.seconds, 1),
            "final": asdict(self.history[-1]) if self.history else None,
            "history": [
                {k: float(f"{v:.5g}") if isinstance(v, float) else v for k, v in asdict(s).items()}
                for s in self.history
            ],
        }


def select_device(choice: Device) -> torch.device:
    """CUDA when asked for or (``auto``) when available, else CPU; ``cuda`` fails loudly."""
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if choice == "cuda":
        raise ConfigError("option device has value 'cuda' but torch sees no usable CUDA device")
    return torch.device("cpu")


def device_kernels(device: torch.device) -> str:
    """Which kernels trained on ``device``: on a CPU, the instruction set of torch's CPU kernels
    (``AVX512``, ``AVX2``, ...), on CUDA the GPU's name. Two CPUs of different instruction sets
    round differently, so the same command and seed train other weights on them."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return torch.backends.cpu.get_cpu_capability()


# The arithmetic each --precision value names (auto resolves to one of them).
PRECISION_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_has_amx() -> bool:
    """Whether this CPU has Intel AMX tiles, which multiply bfloat16 in hardware (torch's own
    probe; False where this torch has none)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


def select_precision(choice: Precision, device: torch.device) -> torch.dtype:
    """The dtype of the training's convolutions: bfloat16 when asked for or (``auto``) on a CPU
    whose kernels may use AMX (not held to AVX2, :mod:`training.kernels`), else float32. bf16 on
    CUDA needs a GPU that computes it (fails loudly)."""
    amx = device.type == "cpu" and cpu_has_amx()
    if choice == "auto":
        choice = "bf16" if amx and not amx_held_off() else "fp32"
    elif choice == "bf16" and amx and amx_held_off():
        log.warning(
            "precision bf16 with the CPU kernels held to AVX2: oneDNN may not use this CPU's "
            "AMX tiles, so bfloat16 steps are no faster than float32 ones (--cpu-kernels native "
            "lets it, and trains another model than other CPUs)"
        )
    if choice == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("option precision has value 'bf16' but this GPU lacks bfloat16")
    return PRECISION_DTYPES[choice]


def mixed_precision(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """Autocast to ``dtype`` on ``device`` (off for float32): convolutions and matrix products
    in ``dtype``, the weights and their updates in float32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


@contextlib.contextmanager
def deterministic_kernels(device: torch.device) -> Iterator[None]:
    """While training on CUDA, deterministic kernels only, so that one seed gives one model.

    cuDNN otherwise picks convolution kernels whose sums run in a varying order, and two fits of
    the same command differ. An operation with no deterministic CUDA kernel then raises rather
    than run. CPU kernels are deterministic already: nothing changes there. The previous
    settings come back afterwards."""
    if device.type != "cuda":
        yield
        return
    # cuBLAS is deterministic only with a fixed workspace, read when torch first uses it.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    cudnn = torch.backends.cudnn
    before = (
        cudnn.deterministic,
        cudnn.benchmark,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    cudnn.deterministic, cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = before[0], before[1]
        torch.use_deterministic_algorithms(before[2], warn_only=before[3])


class Budget:
    """Training progress in [0, 1]: the share of steps done, or of the time limit if larger.

    The learning rate follows this progress, so a run cut short by a time limit still warms up
    and anneals completely instead of stopping at a high learning rate.
    """

    def __init__(self, total_steps: int, time_limit_s: float | None) -> None:
        self.total_steps = total_steps
        self.time_limit_s = time_limit_s
        self.started = time.monotonic()

    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.monotonic() - self.started

    def progress(self, step: int) -> float:
        """Progress after ``step`` optimiser steps."""
        by_steps = step / self.total_steps
        if self.time_limit_s is None:
            return min(1.0, by_steps)
        return min(1.0, max(by_steps, self.elapsed() / self.time_limit_s))


def learning_rate(peak: float, progress: float, warmup: float = 0.05) -> float:
    """Linear warm-up to ``peak``, then cosine annealing to 1% of it."""
    if progress < warmup:
        return peak * (0.1 + 0.9 * progress / warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))
    return peak * (0.01 + 0.99 * cosine)


def random_crops(
    images: Tensor, count: int, size: tuple[int, int], rng: np.random.Generator
) -> Tensor:
    """``count`` crops of ``size = (h, w)`` at random places of random images ``(N, C, H, W)``."""
    n, _, height, width = images.shape
    h, w = size
    picks = rng.integers(0, n, count)
    ys = rng.integers(0, height - h + 1, count)
    xs = rng.integers(0, width - w + 1, count)
    return torch.stack(
        [images[i, :, y : y + h, x : x + w] for i, y, x in zip(picks, ys, xs, strict=True)]
    )


def jitter_intensity(x: F32Array, amount: float, rng: np.random.Generator) -> F32Array:
    """Random brightness and contrast changes of up to ``amount`` per image ``(N, C, H, W)``."""
    if amount <= 0:
        return x
    n = x.shape[0]
    gain = rng.uniform(1 - amount, 1 + amount, (n, 1, 1, 1)).astype(np.float32)
    contrast = rng.uniform(1 - amount, 1 + amount, (n, 1, 1, 1)).astype(np.float32)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return np.asarray(np.clip((x - mean) * contrast + mean * gain, 0.0, 1.0), dtype=np.float32)


def _validate(model: VAE, loss_fn: ELBOLoss, x: Tensor, batch_size: int) -> tuple[float, ...]:
    model.eval()
    totals = np.zeros(3)
    with torch.no_grad():
        for rows in batch_slices(x.shape[0], batch_size):
            batch = x[rows]
            recon, mu, logvar = model(batch)
            _, parts = loss_fn(recon, batch, mu, logvar)
            totals += np.array([parts.total, parts.mse, parts.kl]) * batch.shape[0]
    model.train()
    return tuple(float(v) for v in totals / x.shape[0])


def train_both(
    model: VAE,
    train_images: Images,
    val_images: F32Array,
    config: FitConfig,
    device: torch.device,
    *,
    scale: float = PIXEL_SCALE,
) -> tuple[TrainResult, TrainResult]:
    """Train the local model and its head, then the coarse VAE; results in that order.

    ``train_images`` may be 8-bit samples, read as the model input at ``scale`` (a crop, a
    batch at a time). A time limit (``config.time_limit_minutes``) bounds the two together. On
    CUDA the kernels are deterministic (:func:`deterministic_kernels`)."""
    if model.coarse is None:
        raise ConfigError("the model has no coarse VAE; a bundle needs one")
    precision = select_precision(config.precision, device)
    with deterministic_kernels(device):
        limit = None if config.time_limit_minutes is None else 60 * config.time_limit_minutes
        n_train = train_images.shape[0]
        local = train_vae(
            model,
            train_images,
            val_images,
            config,
            device,
            steps=config.steps_for(n_train),
            time_limit_s=None if limit is None else LOCAL_TIME_SHARE * limit,
            scale=scale,
            precision=precision,
        )
        factor = model.cfg.coarse_factor
        coarse = train_vae(
            model.coarse,
            downsampled(train_images, factor, scale),
            downsampled(val_images, factor, scale),
            config,
            device,
            steps=config.coarse_steps_for(n_train),
            time_limit_s=(
                None
                if limit is None
                else max(limit - local.seconds, (1 - LOCAL_TIME_SHARE) * limit)
            ),
            name="coarse",
            precision=precision,
        )
        return local, coarse


def downsampled(images: Images, factor: int, scale: float = PIXEL_SCALE) -> F32Array:
    """The coarse VAE's images (:func:`downsample`, padded to whole cells by
    :func:`pad_to_cells` as the exported graph pads them) of model input or 8-bit samples at
    ``scale``, made a batch at a time so that the model input of all is never held at once."""
    padding = cell_padding(images.shape[-2] // factor, images.shape[-1] // factor)
    parts = [
        pad_to_cells(
            downsample(torch.from_numpy(model_input(images[rows], scale)), factor), padding
        ).numpy()
        for rows in batch_slices(images.shape[0], DOWNSAMPLE_BATCH)
    ]
    return np.concatenate(parts)


def train_vae(
    model: VAE,
    train_images: Images,
    val_images: F32Array,
    config: FitConfig,
    device: torch.device,
    *,
    steps: int,
    time_limit_s: float | None = None,
    name: str = "fit",
    scale: float = PIXEL_SCALE,
    precision: torch.dtype = torch.float32,
) -> TrainResult:
    """Train ``model`` (and its defect head, not its coarse VAE) on crops of ``train_images``
    (model input, or 8-bit samples read at ``scale``) for ``steps`` optimiser steps, or until
    ``time_limit_s`` seconds have passed. The networks run in ``precision``
    (:func:`mixed_precision`); the losses are computed in float32."""
    rng = np.random.default_rng(config.seed)
    defects = SHADED_TRAINING_DEFECTS if config.shaded_defects else TRAINING_DEFECTS
    model.to(device).train()
    x_train = torch.from_numpy(train_images)
    x_val = torch.from_numpy(val_images).to(device)
    _, _, height, width = train_images.shape
    crop = (min(config.crop_size, height), min(config.crop_size, width))
    loss_fn = ELBOLoss(config.beta)
    optimiser = torch.optim.AdamW(
        model.own_parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    total = steps
    head_batch = config.head_batch()
    limit = time_limit_s
    budget = Budget(total, limit)
    record_every = max(1, total // VALIDATIONS)
    history: list[StepStats] = []
    sums, count = np.zeros(4), 0
    stop_reason = f"completed {total} steps"
    bar = tqdm(total=total, desc=name, unit="step", disable=not config.progress)
    step = 0
    while step < total:
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(config.learning_rate, budget.progress(step))
        crops = random_crops(x_train, config.batch_size, crop, rng).numpy()
        clean = jitter_intensity(model_input(crops, scale), config.jitter, rng)
        corrupted, masks = corrupt(clean, config.corruption, rng, defects)
        target = torch.from_numpy(clean).to(device)
        inputs = torch.from_numpy(corrupted).to(device)
        with mixed_precision(device, precision):
            mu, logvar = model.encoder(inputs)
        mu, logvar = mu.float(), logvar.float()
        if not config.encoder_denoises:
            # The encoder learns from clean crops only, so that it describes a defect rather
            # than hides it; the decoder learns to draw the clean part from whatever it says.
            clean_rows = torch.from_numpy(~masks.reshape(len(masks), -1).any(axis=1)).to(device)
            keep = clean_rows.view(-1, 1, 1, 1).to(mu.dtype)
            mu = mu * keep + mu.detach() * (1 - keep)
            logvar = logvar * keep + logvar.detach() * (1 - keep)
        with mixed_precision(device, precision):
            recon = model.decoder(reparameterise(mu, logvar)).float()
        loss, parts = loss_fn(recon, target, mu, logvar)
        head_loss = torch.zeros(())
        if model.head is not None:
            # The crops are in random order, corrupted or not, so the first ones are a fair share.
            with mixed_precision(device, precision):
                logits = model.head(inputs[:head_batch], recon[:head_batch].detach()).float()
            head_target = torch.from_numpy(masks[:head_batch]).to(device).unsqueeze(1)
            # Each head (one channel of the logits) learns from its own loss, as a lone head.
            for k in range(logits.shape[1]):
                head_loss = head_loss + focal_loss(logits[:, k : k + 1], head_target)
            loss = loss + head_loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        step += 1
        sums += (parts.total, parts.mse, parts.kl, float(head_loss.detach()))
        count += 1
        bar.update(1)
        out_of_time = limit is not None and budget.elapsed() >= limit and step < total
        if step % record_every == 0 or step == total or out_of_time:
            val = _validate(model, loss_fn, x_val, config.batch_size)
            history.append(StepStats(step, *(float(v) for v in sums / count), *val))
            sums, count = np.zeros(4), 0
            bar.set_postfix(
                mse=f"{history[-1].train_mse:.2e}",
                head=f"{history[-1].head_loss:.3f}",
                val_mse=f"{val[1]:.2e}",
            )
            if not config.progress:
                log.info(
                    "%s step %d/%d: mse %.2e, kl %.1f, head loss %.4f; held-out mse %.2e, %.0f s",
                    name, step, total, history[-1].train_mse, history[-1].train_kl,
                    history[-1].head_loss, val[1], budget.elapsed(),
                )  # fmt: skip
        if out_of_time:
            stop_reason = f"time limit of {limit:.3g} s reached"
            break
    bar.close()
    model.eval()
    return TrainResult(
        model, tuple(history), step, total, stop_reason, budget.elapsed(), _dtype_name(precision)
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, known in PRECISION_DTYPES.items() if known == dtype)
