"""Training steps in float32 and in bfloat16 mixed precision, side by side.

    python bench/train_precision.py [--steps 200] [--rounds 2] [--image-size 256] [--threads N]

Each round trains the default local model and coarse VAE (the fit's own loop,
:func:`training.train.train_both`, default settings but the budget) from the same seed for
``--steps`` steps in each precision, one after the other, on demo-part images made in memory.
Printed per round: each precision's seconds per step for the local model and the coarse VAE,
and bf16's time as a share of fp32's; the shares are comparable where the seconds are not (a
shared machine's speed drifts within minutes). Whether this CPU has Intel AMX is printed too:
without it bf16 is emulated and slower. The script holds no kernels (training.kernels): the
libraries run the CPU's widest, as a fit does with ``--cpu-kernels native``, which bf16's speed
on AMX needs.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

import numpy as np
import numpy.typing as npt
import torch

from service.preprocessing import model_input
from training.config import FitConfig, Precision
from training.demo_data import render_part
from training.model import VAE
from training.train import cpu_has_amx, train_both

PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16")


def demo_samples(count: int, size: int, seed: int = 0) -> npt.NDArray[np.uint8]:
    """``count`` RGB demo parts as 8-bit samples ``(N, 3, size, size)``."""
    rng = np.random.default_rng(seed)
    parts = [render_part(rng, size).image for _ in range(count)]
    pixels = np.rint(np.clip(np.stack(parts), 0.0, 1.0) * 255).astype(np.uint8)
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))


def seconds_per_step(config: FitConfig, samples: npt.NDArray[np.uint8]) -> tuple[float, float]:
    """Seconds per step of the local model and of the coarse VAE, trained as a fit trains them
    (held-out passes for the history included, as in a fit)."""
    torch.manual_seed(config.seed)
    model = VAE(config.model_config(channels=samples.shape[1]))
    held_out = model_input(samples[:4])
    local, coarse = train_both(model, samples[4:], held_out, config, torch.device("cpu"))
    return local.seconds / local.steps, coarse.seconds / coarse.steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="steps per model and precision")
    parser.add_argument("--rounds", type=int, default=2, help="fp32-then-bf16 rounds")
    parser.add_argument("--image-size", type=int, default=256, help="side of the demo images")
    parser.add_argument("--images", type=int, default=64, help="demo images trained on")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.images < 5:
        parser.error("--steps and --rounds must be >= 1 and --images >= 5")
    samples = demo_samples(args.images, args.image_size)
    base = FitConfig(
        image_size=args.image_size,
        epochs=10**6,
        max_steps=args.steps,
        coarse_max_steps=args.steps,
        threads=args.threads,
        progress=False,
    )
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        _compare(base, samples, args.rounds)
    finally:
        torch.set_num_threads(threads_before)


def _compare(base: FitConfig, samples: npt.NDArray[np.uint8], rounds: int) -> None:
    print(
        f"CPU with Intel AMX: {'yes' if cpu_has_amx() else 'no'}; torch's kernels "
        f"{torch.backends.cpu.get_cpu_capability()}; "
        f"{torch.get_num_threads()} torch threads; {base.max_steps} steps per model, crops of "
        f"{base.crop_size}, batches of {base.batch_size}"
    )
    shares: list[tuple[float, float]] = []
    for round_ in range(1, rounds + 1):
        timed = {p: seconds_per_step(replace(base, precision=p), samples) for p in PRECISIONS}
        (local32, coarse32), (local16, coarse16) = timed["fp32"], timed["bf16"]
        shares.append((local16 / local32, coarse16 / coarse32))
        print(
            f"round {round_}: local model {1000 * local32:.0f} ms/step fp32, "
            f"{1000 * local16:.0f} bf16 ({local16 / local32:.2f}); coarse VAE "
            f"{1000 * coarse32:.0f} fp32, {1000 * coarse16:.0f} bf16 ({coarse16 / coarse32:.2f})"
        )
    print(
        f"bf16 time as a share of fp32's, median of {rounds} rounds: local model "
        f"{statistics.median(s[0] for s in shares):.2f}, coarse VAE "
        f"{statistics.median(s[1] for s in shares):.2f}"
    )


if __name__ == "__main__":
    main()
