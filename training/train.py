"""The training loop.

AdamW with warm-up and cosine annealing over the step or time budget, validation on the held-out
images every epoch, early stopping, and the weights of the best validation epoch kept.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor
from tqdm import tqdm

from training.config import Augment, Device, FitConfig
from training.errors import ConfigError
from training.loss import ELBOLoss
from training.model import VAE
from training.synth import corrupt

log = logging.getLogger(__name__)

LOG_EVERY = 10  # epochs between log lines when there is no progress bar


@dataclass(frozen=True)
class EpochStats:
    """Per-image losses of one epoch."""

    epoch: int
    train_loss: float
    train_mse: float
    train_kl: float
    val_loss: float
    val_mse: float
    val_kl: float


@dataclass(frozen=True)
class TrainResult:
    """The trained model (weights of the best validation epoch) and its history."""

    model: VAE
    history: tuple[EpochStats, ...]
    best_epoch: int
    stop_reason: str
    seconds: float

    def summary(self) -> dict[str, Any]:
        """JSON-ready facts for the manifest."""
        best = self.history[self.best_epoch - 1]
        return {
            "epochs_run": len(self.history),
            "best_epoch": self.best_epoch,
            "stop_reason": self.stop_reason,
            "seconds": round(self.seconds, 1),
            "best": asdict(best),
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


def augment_batch(x: Tensor, mode: Augment, generator: torch.Generator) -> Tensor:
    """Random flips and/or small shifts (up to 1/16 of the side, reflected borders)."""
    if mode in ("flip", "flip+shift"):
        flips = torch.rand(2, x.shape[0], generator=generator)
        x = torch.where((flips[0] < 0.5).view(-1, 1, 1, 1).to(x.device), x.flip(3), x)
        x = torch.where((flips[1] < 0.5).view(-1, 1, 1, 1).to(x.device), x.flip(2), x)
    if mode in ("shift", "flip+shift"):
        pad = max(1, x.shape[-1] // 16)
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
        dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=generator))
        x = padded[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]
    return x


def _evaluate(model: VAE, loss_fn: ELBOLoss, x: Tensor, batch_size: int) -> tuple[float, ...]:
    model.eval()
    totals = np.zeros(3)
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            batch = x[start : start + batch_size]
            recon, mu, logvar = model(batch)
            _, parts = loss_fn(recon, batch, mu, logvar)
            totals += np.array([parts.total, parts.mse, parts.kl]) * batch.shape[0]
    return tuple(float(v) for v in totals / x.shape[0])


class Budget:
    """Training progress in [0, 1]: the larger of the share of steps and of the time budget.

    The learning rate follows this progress, so a run cut short by its time budget still
    warms up and anneals completely instead of stopping at a high learning rate.
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


def train_vae(
    model: VAE,
    train_images: npt.NDArray[np.float32],
    val_images: npt.NDArray[np.float32],
    config: FitConfig,
    device: torch.device,
) -> TrainResult:
    """Train ``model`` on ``train_images``; keep the weights with the lowest validation loss.

    With ``config.corruption > 0`` it is trained as a denoising VAE: that share of the inputs
    carries a synthetic defect, and the loss compares the reconstruction with the clean image.
    """
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model.to(device)
    x_train = torch.from_numpy(train_images).to(device)
    x_val = torch.from_numpy(val_images).to(device)
    loss_fn = ELBOLoss(config.beta)
    n = x_train.shape[0]
    batch_size = min(config.batch_size, n)
    steps_per_epoch = max(1, n // batch_size)  # full batches only: BatchNorm needs 2+ images
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    limit = None if config.time_limit_minutes is None else 60 * config.time_limit_minutes
    budget = Budget(config.epochs * steps_per_epoch, limit)
    history: list[EpochStats] = []
    best_loss, best_epoch, best_state = math.inf, 0, copy.deepcopy(model.state_dict())
    stop_reason = "completed all epochs"
    step = 0
    bar = tqdm(range(1, config.epochs + 1), desc="fit", unit="epoch", disable=not config.progress)
    for epoch in bar:
        model.train()
        order = torch.randperm(n, generator=generator).to(device)
        sums = np.zeros(3)
        for i in range(steps_per_epoch):
            for group in optimiser.param_groups:
                group["lr"] = learning_rate(config.learning_rate, budget.progress(step))
            target = augment_batch(
                x_train[order[i * batch_size : (i + 1) * batch_size]], config.augment, generator
            )
            inputs = _corrupt(target, config.corruption, rng)
            recon, mu, logvar = model(inputs)
            loss, parts = loss_fn(recon, target, mu, logvar)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            step += 1
            sums += np.array([parts.total, parts.mse, parts.kl])
        train = sums / steps_per_epoch
        val = _evaluate(model, loss_fn, x_val, batch_size)
        history.append(EpochStats(epoch, *(float(v) for v in train), *val))
        if val[0] < best_loss:
            best_loss, best_epoch = val[0], epoch
            best_state = copy.deepcopy(model.state_dict())
        bar.set_postfix(
            loss=f"{train[0]:.0f}",
            mse=f"{train[1]:.2e}",
            kl=f"{train[2]:.1f}",
            val=f"{val[0]:.0f}",
            val_mse=f"{val[1]:.2e}",
            best=best_epoch,
        )
        if not config.progress and (epoch % LOG_EVERY == 0 or epoch == config.epochs):
            log.info(
                "epoch %d/%d: loss %.1f (mse %.2e, kl %.1f), val loss %.1f (mse %.2e), "
                "best epoch %d, %.0f s",
                epoch, config.epochs, *train, val[0], val[1], best_epoch, budget.elapsed(),
            )  # fmt: skip
        if epoch - best_epoch >= config.patience:
            stop_reason = f"early stop: no validation improvement for {config.patience} epochs"
            break
        if budget.progress(step) >= 1.0 and epoch < config.epochs:
            stop_reason = f"time budget of {config.time_limit_minutes} minutes used"
            break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model, tuple(history), best_epoch, stop_reason, budget.elapsed())


def _corrupt(batch: Tensor, probability: float, rng: np.random.Generator) -> Tensor:
    if probability <= 0:
        return batch
    images = batch.detach().cpu().numpy()
    return torch.from_numpy(corrupt(images, probability, rng)).to(batch.device)
