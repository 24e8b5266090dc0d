"""The CPU kernels a fit runs on: held to AVX2 by default, so that x86 CPUs train the same model.

Libraries pick their kernels by the CPU's instruction set, and kernels of another instruction
set round differently: the same command and seed train other weights on a CPU with AVX-512 than
on one with AVX2 only (see docs/quality-history.md). AVX2 is the widest set nearly every x86
machine shares, so by default a fit holds torch, oneDNN, MKL, numpy and OpenBLAS to it; the
``native`` choice lets each library use the widest set of the CPU instead.

The libraries read these settings from environment variables when they load, so
:func:`hold_cpu_kernels` must run before numpy or torch is first imported (the command line's
entry does). Nothing here imports either; :func:`kernels_wider_than_held` checks, once they are
loaded, that the hold took effect.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

CpuKernels = Literal["avx2", "native"]
CPU_KERNEL_CHOICES: tuple[str, ...] = typing.get_args(CpuKernels)
DEFAULT_CPU_KERNELS: CpuKernels = "avx2"
CPU_KERNELS_FLAG = "--cpu-kernels"

# Each library's ceiling, read when it loads. numpy's names are those of numpy >= 2.4 (the train
# extra's floor): its dispatched groups above X86_V3 (AVX2, FMA3, F16C, BMI) are all AVX-512.
AVX2_ENVIRONMENT: Mapping[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's own vectorised kernels
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN: torch's convolutions
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # MKL: torch's matrix products
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",  # numpy's dispatched loops
    "OPENBLAS_CORETYPE": "Haswell",  # OpenBLAS: numpy's matrix products
}
# numpy's dispatch targets that use no instruction beyond AVX2 (its names before and after 2.4).
_NUMPY_AVX2_TARGETS = frozenset(
    {"SSE", "SSE2", "SSE3", "SSSE3", "SSE41", "POPCNT", "SSE42", "AVX", "F16C", "FMA3", "AVX2"}
    | {"X86_V2", "X86_V3"}
)
_LIBRARIES_READING_THE_VARIABLES = ("numpy", "torch")


def is_x86() -> bool:
    """Whether this machine is x86-64, the only family whose kernels the hold concerns."""
    return platform.machine().lower() in ("x86_64", "amd64")


def cpu_has_avx512(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU announces AVX-512 (``avx512f`` among the flags of ``/proc/cpuinfo``).
    Where that file is absent (not Linux) this says False; the check after loading still tells
    whether the libraries run wider kernels than held."""
    try:
        text = cpuinfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    return any(line.startswith("flags") and "avx512f" in line.split() for line in text.splitlines())


def hold_cpu_kernels(choice: str, *, cpuinfo: Path = Path("/proc/cpuinfo")) -> None:
    """Hold the libraries' kernels to ``choice`` by setting their environment variables.

    ``native`` changes nothing. ``avx2`` sets :data:`AVX2_ENVIRONMENT` on an x86 CPU with
    AVX-512 (elsewhere the kernels are AVX2 or narrower already); unless they hold already, it
    must run before numpy or torch is imported, and says so with a RuntimeError otherwise.
    """
    if choice not in CPU_KERNEL_CHOICES:
        raise ValueError(f"cpu kernels {choice!r}: expected one of {list(CPU_KERNEL_CHOICES)}")
    if choice == "native" or not is_x86() or not cpu_has_avx512(cpuinfo) or _held():
        return
    loaded = [name for name in _LIBRARIES_READING_THE_VARIABLES if name in sys.modules]
    if loaded:
        raise RuntimeError(
            f"cannot hold the CPU kernels to AVX2: {' and '.join(loaded)} already loaded; call "
            "training.kernels.hold_cpu_kernels('avx2') before importing them"
        )
    os.environ.update(AVX2_ENVIRONMENT)


def _held() -> bool:
    return all(os.environ.get(k) == v for k, v in AVX2_ENVIRONMENT.items())


def amx_held_off() -> bool:
    """Whether oneDNN is held below AMX (to AVX2), so bfloat16 gets no hardware speed-up."""
    return os.environ.get("ONEDNN_MAX_CPU_ISA") == AVX2_ENVIRONMENT["ONEDNN_MAX_CPU_ISA"]


def why_wider(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """What to do when :func:`kernels_wider_than_held` names libraries: why the hold did not
    take, and the ways to a held fit."""
    if not cpuinfo.is_file():
        variables = " ".join(f"{k}={v}" for k, v in AVX2_ENVIRONMENT.items())
        return (
            f"without {cpuinfo} the hold cannot tell whether this CPU has AVX-512 and sets "
            f"nothing: set {variables} before starting Python, or ask for native kernels "
            "(--cpu-kernels native: another model than other CPUs')"
        )
    return (
        "numpy or torch loaded before the hold: run the command line (python -m training), or "
        "call training.kernels.hold_cpu_kernels('avx2') before importing them, or ask for "
        "native kernels (--cpu-kernels native: another model than other CPUs')"
    )


def cpu_kernels_from_argv(argv: Sequence[str]) -> str:
    """The value of ``--cpu-kernels`` in a command line, before the full parser (which needs
    torch) is built; the default where absent or not a valid choice, which the full parser then
    refuses before anything runs."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument(CPU_KERNELS_FLAG, dest="cpu_kernels", default=DEFAULT_CPU_KERNELS)
    known, _ = parser.parse_known_args(list(argv))
    value: str = known.cpu_kernels
    return value if value in CPU_KERNEL_CHOICES else DEFAULT_CPU_KERNELS


def kernels_wider_than_held() -> list[str]:
    """The loaded libraries that run kernels wider than AVX2 (``avx2`` asked), each with what it
    runs; empty when the hold took effect or the machine is not x86. Imports numpy and torch."""
    if not is_x86():
        return []
    import importlib

    import torch

    umath = importlib.import_module("numpy._core._multiarray_umath")

    dispatch: list[str] = getattr(umath, "__cpu_dispatch__", [])
    features: dict[str, bool] = getattr(umath, "__cpu_features__", {})

    wider = []
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.upper().startswith("AVX512"):
        wider.append(f"torch ({capability})")
    enabled = [name for name in dispatch if features.get(name) and name not in _NUMPY_AVX2_TARGETS]
    if enabled:
        wider.append(f"numpy ({', '.join(enabled)})")
    if cpu_has_avx512():
        wider.extend(
            f"{variable}={os.environ.get(variable, '(unset)')}"
            for variable in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "OPENBLAS_CORETYPE")
            if os.environ.get(variable) != AVX2_ENVIRONMENT[variable]
        )
    return wider
