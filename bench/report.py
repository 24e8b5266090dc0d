"""The benchmark's figures, the targets of issue #5 checked against them, the table and JSON."""

from __future__ import annotations

import math
import os
import platform
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.inprocess import InProcessRow
from bench.loadgen import LoadResult

MIB = 1024 * 1024
LIBRARIES = ("onnxruntime-gpu", "onnxruntime", "grpcio", "protobuf", "numpy", "pillow")


def environment() -> dict[str, str]:
    """The machine and the library versions the figures were taken with."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0
    info = {
        "cpu": _cpu_model() or platform.processor() or platform.machine(),
        "cores": f"{os.cpu_count()} logical, {usable} usable by this process",
        "python": sys.version.split()[0],
    }
    for name in LIBRARIES:
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return info


def _cpu_model() -> str:
    try:
        with Path("/proc/cpuinfo").open(encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` shows them."""
    try:
        return ", ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


@dataclass(frozen=True)
class SoakResult:
    """RSS of the server over a long run at saturation."""

    seconds: float
    images: int
    baseline_rss: int  # median RSS just after the warm-up
    final_rss: int  # median RSS over the last tenth of the run
    peak_rss: int
    slope_mib_per_min: float

    @property
    def growth(self) -> float:
        """Relative growth of RSS from just after the warm-up to the end."""
        return self.final_rss / self.baseline_rss - 1.0


@dataclass(frozen=True)
class Compared:
    """(2a) and (2b) on a server started with extra flags, measured in the same rounds."""

    server_args: tuple[str, ...]
    unary: LoadResult
    stream: LoadResult


@dataclass(frozen=True)
class Figures:
    """Everything one run measured."""

    environment: dict[str, str]
    settings: dict[str, Any]
    images: str
    provider: str
    load_before: str
    load_after: str
    inprocess: list[InProcessRow]
    unary: LoadResult  # (2a)
    stream: LoadResult  # (2b)
    half_rate: LoadResult  # (2a) at half its throughput, for latency
    unbatched: LoadResult  # (2c)
    peak_rss_batched: int
    peak_rss_unbatched: int
    server_commands: list[str]
    soak: SoakResult | None = None
    compared: Compared | None = None

    def best_tensor(self) -> InProcessRow:
        """(1-i) at its best batch size."""
        return max(self.inprocess, key=lambda row: row.tensor_ips)

    def best_png(self) -> InProcessRow:
        """(1-ii) at its best batch size."""
        return max(self.inprocess, key=lambda row: row.png_ips)

    def at_batch(self, size: int) -> InProcessRow | None:
        """The in-process row of one batch size, if measured."""
        return next((row for row in self.inprocess if row.batch_size == size), None)


@dataclass(frozen=True)
class Check:
    """One target: the measured value, the bound, and whether it holds."""

    name: str
    value: float
    bound: float
    higher_is_better: bool
    unit: str = ""

    @property
    def passed(self) -> bool:
        if math.isnan(self.value) or math.isnan(self.bound):
            return False
        return self.value >= self.bound if self.higher_is_better else self.value <= self.bound

    def line(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        verdict = "PASS" if self.passed else "FAIL"
        value = f"{self.value:.3f}{self.unit}"
        return f"  {self.name:<48} {value:>12} {op} {self.bound:.3f}{self.unit}  {verdict}"


def checks(fig: Figures) -> list[Check]:
    """The targets of issue #5 on these figures."""
    best_png = fig.best_png().png_ips
    best_tensor = fig.best_tensor()
    batch1 = fig.at_batch(1)
    batching_gain = best_tensor.tensor_ips / batch1.tensor_ips if batch1 else math.nan
    max_batch = int(fig.settings["max_batch_size"])
    full_batch = fig.at_batch(max_batch)
    full_batch_ms = (
        1000.0 * full_batch.batch_seconds
        if full_batch
        else 1000.0 * max_batch / best_tensor.tensor_ips
    )
    delay_ms = float(fig.settings["max_batch_delay_ms"])
    result = [
        Check("(2b) stream / (1-ii best)", fig.stream.ips / best_png, 0.85, True),
        Check("(2a) unary x16 / (1-ii best)", fig.unary.ips / best_png, 0.7, True),
        Check(
            "(1-ii best) / (1-i best)  [decode cost]", best_png / best_tensor.tensor_ips, 0.75, True
        ),
        Check(
            "(2a)/(2c) >= 0.8 x (1-i best)/(1-i b=1)",
            fig.unary.ips / fig.unbatched.ips,
            0.8 * batching_gain,
            True,
        ),
        Check(
            f"p99 at half load <= {delay_ms:g} ms + 2 x batch of {max_batch}",
            fig.half_rate.p99_ms,
            delay_ms + 2.0 * full_batch_ms,
            False,
            " ms",
        ),
    ]
    if fig.soak is not None:
        result.append(Check("soak: server RSS growth", 100.0 * fig.soak.growth, 10.0, False, " %"))
    return result


def _load_row(label: str, result: LoadResult) -> str:
    offered = f" (offered {result.offered_ips:.0f}/s)" if result.offered_ips else ""
    errors = f"  errors {result.errors}" if result.errors else ""
    return (
        f"  {label:<34} {result.ips:>9.1f} {result.p50_ms:>9.2f} {result.p99_ms:>9.2f} "
        f"{result.server_cores:>7.2f} {result.client_cores:>7.2f} {result.mean_batch:>6.1f} "
        f"{100 * result.inference_busy:>5.0f}%{offered}{errors}"
    )


def render(fig: Figures) -> str:
    """The printed table."""
    s = fig.settings
    lines = ["", "=== serve_bench: VAE anomaly service vs. ONNX Runtime ==="]
    for key, value in fig.environment.items():
        lines.append(f"  {key:<16} {value}")
    lines.append(f"  {'load average':<16} {fig.load_before} (start), {fig.load_after} (end)")
    lines.append(f"  {'provider':<16} {fig.provider}")
    lines.append(f"  {'images':<16} {fig.images}")
    lines.append(
        f"  {'settings':<16} ORT threads {s['threads'] or 'default'}, max batch "
        f"{s['max_batch_size']}, max delay {s['max_batch_delay_ms']:g} ms, {s['concurrency']} "
        f"unary clients, stream window {s['window']}, {s['duration']:g} s per phase"
    )
    lines += ["", "1. In process, no network (images/s)"]
    lines.append(
        f"  {'batch':>5} {'(i) tensors':>12} {'(ii) PNG':>10} {'(ii)/(i)':>9} "
        f"{'batch ms (i)':>13} {'decode ms/img':>14}"
    )
    for row in fig.inprocess:
        lines.append(
            f"  {row.batch_size:>5} {row.tensor_ips:>12.1f} {row.png_ips:>10.1f} "
            f"{row.png_ips / row.tensor_ips:>9.3f} {1000 * row.batch_seconds:>13.2f} "
            f"{row.decode_ms_per_image:>14.3f}"
        )
    bt, bp = fig.best_tensor(), fig.best_png()
    lines.append(
        f"  best (i) {bt.tensor_ips:.1f}/s at batch {bt.batch_size}; "
        f"best (ii) {bp.png_ips:.1f}/s at batch {bp.batch_size}"
    )
    lines += [
        "",
        "2. Service over loopback (CPU of server and client in cores; mean ORT batch; share of",
        "   the time the server's inference thread was running a batch)",
    ]
    lines.append(
        f"  {'':<34} {'images/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'server':>7} {'client':>7}"
    )
    lines.append(_load_row(f"(a) unary x{s['concurrency']}, batching", fig.unary))
    lines.append(_load_row(f"(b) stream, window {s['window']}", fig.stream))
    lines.append(_load_row("    unary at half of (a)", fig.half_rate))
    lines.append(_load_row(f"(c) unary x{s['concurrency']}, no batching", fig.unbatched))
    for result in (fig.unary, fig.stream, fig.half_rate, fig.unbatched):
        if result.first_error:
            lines.append(f"  first error in {result.name}: {result.first_error[:200]}")
    lines.append(
        f"  peak server RSS: {fig.peak_rss_batched / MIB:.1f} MiB (batching), "
        f"{fig.peak_rss_unbatched / MIB:.1f} MiB (no batching)"
    )
    if fig.soak is not None:
        soak = fig.soak
        lines.append(
            f"  soak {soak.seconds:.0f} s at saturation "
            f"({soak.images / soak.seconds:.1f} images/s): "
            f"RSS {soak.baseline_rss / MIB:.1f} -> {soak.final_rss / MIB:.1f} MiB "
            f"({100 * soak.growth:+.1f} %), peak {soak.peak_rss / MIB:.1f} MiB, "
            f"slope {soak.slope_mib_per_min:+.2f} MiB/min"
        )
    lines += ["", "3. Ratios and targets"]
    batch1 = fig.at_batch(1)
    if batch1:
        lines.append(
            f"  batching gain in raw ORT (1-i best)/(1-i b=1): "
            f"{bt.tensor_ips / batch1.tensor_ips:.3f}; in the service (2a)/(2c): "
            f"{fig.unary.ips / fig.unbatched.ips:.3f}"
        )
    all_checks = checks(fig)
    lines += [check.line() for check in all_checks]
    passed = sum(check.passed for check in all_checks)
    lines.append(f"  {passed} of {len(all_checks)} targets met")
    if fig.compared is not None:
        compared = fig.compared
        lines += ["", f"4. Against a server with {' '.join(compared.server_args)}"]
        lines.append(_load_row(f"(a') unary x{s['concurrency']}, batching", compared.unary))
        lines.append(_load_row(f"(b') stream, window {s['window']}", compared.stream))
        lines.append(
            f"  throughput (2a)/(2a') {fig.unary.ips / compared.unary.ips:.3f}, "
            f"(2b)/(2b') {fig.stream.ips / compared.stream.ips:.3f}"
        )
    lines += ["", "Servers started as:"] + [f"  $ {command}" for command in fig.server_commands]
    return "\n".join(lines)


def to_json(fig: Figures) -> dict[str, Any]:
    """The figures and the targets as a JSON-ready dict."""
    data = asdict(fig)
    for row, raw in zip(fig.inprocess, data["inprocess"], strict=True):
        raw["batch_ms"] = 1000.0 * row.batch_seconds
        raw["decode_ms_per_image"] = row.decode_ms_per_image
    for key in ("unary", "stream", "half_rate", "unbatched"):
        data[key]["images_per_s"] = getattr(fig, key).ips
    if fig.soak is not None:
        data["soak"]["growth"] = fig.soak.growth
    if fig.compared is not None:
        for key in ("unary", "stream"):
            data["compared"][key]["images_per_s"] = getattr(fig.compared, key).ips
            ratio = getattr(fig, key).ips / getattr(fig.compared, key).ips
            data["compared"][f"{key}_ratio"] = ratio
    data["targets"] = [{**asdict(check), "passed": check.passed} for check in checks(fig)]
    return data
