"""The CPU kernels a fit runs on: held to AVX2 by default, so that x86 CPUs train one model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import training.kernels
from tests.conftest import TINY_FIT
from tests.training_helpers import fit_flags
from training.cli import build_parser
from training.config import FitConfig
from training.errors import ConfigError
from training.kernels import (
    AVX2_ENVIRONMENT,
    cpu_has_avx512,
    cpu_kernels_from_argv,
    hold_cpu_kernels,
    kernels_wider_than_held,
    why_wider,
)

ROOT = Path(__file__).resolve().parents[1]
AVX512_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512vl\n"
AVX2_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"


@pytest.fixture
def cpuinfo(tmp_path: Path) -> Path:
    return tmp_path / "cpuinfo"


@pytest.fixture
def x86_with_avx512(cpuinfo: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An x86 machine whose cpuinfo (the returned file) announces AVX-512."""
    monkeypatch.setattr(training.kernels, "is_x86", lambda: True)
    cpuinfo.write_text(AVX512_CPUINFO)
    return cpuinfo


@pytest.fixture
def no_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process environment without the hold's variables (restored after the test)."""
    for variable in AVX2_ENVIRONMENT:
        monkeypatch.delenv(variable, raising=False)


def _native_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in AVX2_ENVIRONMENT}


def test_avx512_is_read_from_the_flags_of_cpuinfo(cpuinfo: Path) -> None:
    cpuinfo.write_text(AVX512_CPUINFO)
    assert cpu_has_avx512(cpuinfo)
    cpuinfo.write_text(AVX2_CPUINFO + "model name\t: avx512f in a name, not a flag\n")
    assert not cpu_has_avx512(cpuinfo)
    assert not cpu_has_avx512(cpuinfo.with_name("absent"))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["fit", "data", "--out", "b"], "avx2"),
        (["fit", "data", "--cpu-kernels", "native", "--out", "b"], "native"),
        (["benchmark", "d1", "d2", "--cpu-kernels=native"], "native"),
        (["fit", "data", "--cpu-kernels", "avx2"], "avx2"),
        # Not a choice: the hold takes the default and the full parser refuses the value.
        (["fit", "data", "--cpu-kernels", "sse"], "avx2"),
    ],
)
def test_the_choice_is_read_before_the_full_parser(argv: list[str], expected: str) -> None:
    assert cpu_kernels_from_argv(argv) == expected


@pytest.mark.parametrize("value", ["avx2", "native"])
def test_the_pre_parser_reads_the_full_parsers_flag(value: str) -> None:
    argv = ["fit", "data", "--out", "b", "--cpu-kernels", value]
    full = build_parser().parse_args(argv)
    assert cpu_kernels_from_argv(argv) == FitConfig.from_namespace(full).cpu_kernels == value


@pytest.mark.usefixtures("no_hold")
def test_native_and_cpus_without_avx512_set_nothing(x86_with_avx512: Path) -> None:
    cpuinfo = x86_with_avx512
    hold_cpu_kernels("native", cpuinfo=cpuinfo)
    cpuinfo.write_text(AVX2_CPUINFO)
    hold_cpu_kernels("avx2", cpuinfo=cpuinfo)
    assert not set(AVX2_ENVIRONMENT) & set(os.environ)
    with pytest.raises(ValueError, match=r"'sse': expected one of \['avx2', 'native'\]"):
        hold_cpu_kernels("sse", cpuinfo=cpuinfo)


@pytest.mark.usefixtures("no_hold")
def test_holding_after_numpy_loaded_is_refused_not_ignored(x86_with_avx512: Path) -> None:
    assert "numpy" in sys.modules
    with pytest.raises(
        RuntimeError, match=r"AVX2: numpy( and torch)? already loaded; call training"
    ):
        hold_cpu_kernels("avx2", cpuinfo=x86_with_avx512)
    assert not set(AVX2_ENVIRONMENT) & set(os.environ)


def test_the_advice_names_the_cause(cpuinfo: Path) -> None:
    assert "set ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2" in why_wider(cpuinfo)
    cpuinfo.write_text(AVX512_CPUINFO)
    assert why_wider(cpuinfo).startswith("numpy or torch loaded before the hold")


def test_the_tests_run_the_held_kernels() -> None:
    # conftest.py holds them before numpy and torch load, as the command line does.
    assert kernels_wider_than_held() == []


def test_a_fit_refuses_wider_kernels_than_asked(
    demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.fit
    from training.config import FitConfig

    monkeypatch.setattr(training.fit, "kernels_wider_than_held", lambda: ["torch (AVX512)"])
    out = tmp_path / "bundle"
    with pytest.raises(ConfigError, match=r"'avx2' but wider kernels run: torch \(AVX512\)"):
        training.fit.fit_bundle(demo_data, out, FitConfig(**TINY_FIT))
    assert not out.exists()
    config = FitConfig(**{**TINY_FIT, "max_steps": 2, "cpu_kernels": "native"})
    training.fit.fit_bundle(demo_data, out, config)
    assert json.loads((out / "manifest.json").read_text())["training"]["config"]["cpu_kernels"] == (
        "native"
    )


def _capability_of_a_fresh_torch(env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env=env, capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return done.stdout.strip()


@pytest.mark.slow
def test_the_command_line_holds_the_kernels_unless_native_is_asked(
    demo_data: Path, tmp_path: Path
) -> None:
    env = _native_environment()
    native = _capability_of_a_fresh_torch(env)
    held = "AVX2" if native.startswith("AVX512") else native
    for choice, expected in (("avx2", held), ("native", native)):
        out = tmp_path / choice
        flags = [*fit_flags({**TINY_FIT, "max_steps": 2}), "--cpu-kernels", choice]
        subprocess.run(
            [sys.executable, "-m", "training", "fit", str(demo_data), "--out", str(out), *flags],
            cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=300,
        )  # fmt: skip
        training = json.loads((out / "manifest.json").read_text())["training"]
        assert (training["device_kernels"], training["config"]["cpu_kernels"]) == (expected, choice)
