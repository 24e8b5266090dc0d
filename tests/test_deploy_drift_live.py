"""Drift of "normal" live: the real service and a real Prometheus with the project's rules
(tests/prometheus_live.py). Normal demo images fill the drift window; then the same kind of images
under another light (contrast x0.7, brightness -30 of 255: a dimmer lamp) make both drift alerts'
expressions true in Prometheus; normal images again make them false. A washed-out light (contrast
x0.7, brightness +40) lowers most of this tiny model's error scores and raises its latent
distance: the combined score (a soft maximum) stays mostly among the held-out ones, almost nothing
is flagged, and the latent alert alone sees the change.

The session bundle is tiny: it holds out 5 images, so its p-values take 6 values, its windows of
normal images reach a KS distance of about 0.5, and the largest possible is 5/6 (the default KS
threshold, 0.94 for a window of 32, cannot be reached: the server warns). The test sets the KS
threshold to 0.65, between the two; the latent-shift threshold is the default (about 1.6 here;
normal windows give 0.4 to 0.9, the changed light about 5). The figures (after how many images each
gauge and each alert expression changed) are printed: ``pytest -s`` shows them.
"""

from __future__ import annotations

import io
import math
import operator
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from service.client import Client
from service.server_process import ServerProcess
from tests.prometheus_live import (
    DEPLOY,
    Prometheus,
    needs_prometheus,
    start_prometheus,
    stop,
    wait_for,
)
from tests.service_helpers import SERVE_ARGS, scrape

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180), needs_prometheus]

WINDOW = 32
KS_THRESHOLD = 0.65
CONTRAST = 0.7
DIMMER, WASHED_OUT = -30.0, 40.0  # brightness change, of 255
NORMAL_IMAGES = 48
PACE = 0.1  # seconds between images while the test watches the gauges: time for Prometheus
ALERTS = {"p_value_ks": "AnomalyScoreDrift", "latent_shift": "AnomalyLatentDrift"}
GAUGES = {"p_value_ks": "anomaly_drift_p_value_ks", "latent_shift": "anomaly_drift_latent_shift"}


def png(pixels: npt.NDArray[np.uint8]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[bytes]]:
    """Demo test/good images the model has never seen, and the same under a dimmer and under a
    washed-out light."""
    from training.demo_data import generate_demo_dataset

    data = generate_demo_dataset(
        tmp_path_factory.mktemp("drift") / "data",
        seed=1,
        image_size=64,
        n_train=1,
        n_test_good=NORMAL_IMAGES,
        n_test_per_defect=1,
    )
    lights: dict[str, list[bytes]] = {"normal": [], "dimmer": [], "washed_out": []}
    for path in sorted((data / "test" / "good").glob("*.png")):
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
        lights["normal"].append(path.read_bytes())
        for light, brightness in (("dimmer", DIMMER), ("washed_out", WASHED_OUT)):
            changed = np.clip(pixels * CONTRAST + brightness, 0, 255).astype(np.uint8)
            lights[light].append(png(changed))
    return lights


def alert_expressions() -> dict[str, str]:
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed: run `make deploy-tools`")
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "alerts.yml").read_text())
    by_name = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    return {statistic: by_name[name] for statistic, name in ALERTS.items()}


@dataclass
class Phase:
    """Images sent one by one, with when each was sent and the gauges just after it."""

    sent_at: list[float]
    statistics: list[dict[str, float]]
    flagged: int = 0

    def first(self, holds: Callable[[float], bool], statistic: str) -> int | None:
        """The number of images after which ``holds`` became true for good, if it did."""
        values = [s[statistic] for s in self.statistics]
        for index in range(len(values)):
            if all(holds(v) for v in values[index:]):
                return index + 1
        return None

    def images_before(self, moment: float) -> int:
        """Images of the phase sent before ``moment``."""
        return sum(t < moment for t in self.sent_at)


def drift_gauges(port: int) -> dict[str, float]:
    samples = {name: value for (name, _), value in scrape(port).items() if "drift" in name}
    return {
        key: samples[f"{gauge}_statistic" if key == "p_value_ks" else gauge]
        for key, gauge in GAUGES.items()
    } | {f"{key}_threshold": samples[f"{gauge}_threshold"] for key, gauge in GAUGES.items()}


def send(client: Client, images: list[bytes], metrics_port: int, pace: float) -> Phase:
    phase = Phase([], [])
    for index, image in enumerate(images):
        phase.sent_at.append(time.time())
        (result,) = client.score([image], ids=[f"image-{index}"])
        assert result.ok, result.error
        phase.flagged += result.is_anomaly
        phase.statistics.append(drift_gauges(metrics_port))
        time.sleep(pace)
    return phase


def alert_active(prom: Prometheus, name: str) -> bool:
    return bool(prom.query(f'ALERTS{{alertname="{name}"}}'))


def alert_samples(prom: Prometheus, name: str) -> list[float]:
    """Times of the evaluations at which the alert was active (pending or firing), last 5 min."""
    result = prom.query(f'ALERTS{{alertname="{name}"}}[5m]')
    return sorted(float(t) for series in result for t, _ in series["values"])


@pytest.fixture(scope="module")
def live(trained_bundle: Path) -> Iterator[ServerProcess]:
    args = ["--bundle", str(trained_bundle), "--threads", "1", "--grace-period", "2"]
    drift = ["--drift-window", str(WINDOW), "--drift-ks-threshold", str(KS_THRESHOLD)]
    with ServerProcess([*SERVE_ARGS, *args, *drift]) as server:
        server.wait_ready(90)
        yield server


def test_a_dimmer_light_raises_both_drift_alerts_and_normal_traffic_clears_them(
    live: ServerProcess,
    images: dict[str, list[bytes]],
    tmp_path: Path,
) -> None:
    normal, shifted = images["normal"], images["dimmer"]
    expressions = alert_expressions()
    process, prom = start_prometheus(tmp_path, live.metrics_port)
    try:
        with Client(live.target, timeout=30) as client:
            info = client.info()
            assert info.drift.window_size == WINDOW
            assert info.drift.p_value_ks_threshold == KS_THRESHOLD
            thresholds = {
                "p_value_ks": KS_THRESHOLD,
                "latent_shift": info.drift.latent_shift_threshold,
            }

            def expression_true(statistic: str) -> bool:
                return bool(prom.query(expressions[statistic]))

            def raised(statistic: str) -> bool:
                """True on the latest samples, and so in the rule's evaluations: pending."""
                return expression_true(statistic) and alert_active(prom, ALERTS[statistic])

            def cleared(statistic: str) -> bool:
                return not (expression_true(statistic) or alert_active(prom, ALERTS[statistic]))

            # Normal traffic fills the window: both statistics below their thresholds.
            filled = send(client, normal, live.metrics_port, pace=0.0)
            for statistic, threshold in thresholds.items():
                value = filled.statistics[-1][statistic]
                assert math.isfinite(value) and value < threshold, (statistic, value)
                assert filled.statistics[-1][f"{statistic}_threshold"] == threshold
            window = 'anomaly_drift_window_images{job="anomaly-service"}'
            wait_for("Prometheus to see a full window", prom.equals(window, WINDOW), 30)
            time.sleep(2.5)  # two more scrapes and evaluations of the full window
            for statistic in thresholds:
                assert not expression_true(statistic), statistic

            # The light changes.
            changed = send(client, shifted[:WINDOW], live.metrics_port, PACE)
            for statistic in thresholds:
                wait_for(
                    f"{ALERTS[statistic]}'s expression to become true, and the alert pending",
                    partial(raised, statistic),
                    20,
                )
            became_true = {s: alert_samples(prom, ALERTS[s]) for s in thresholds}
            for statistic, moments in became_true.items():
                (active,) = prom.query(f'ALERTS{{alertname="{ALERTS[statistic]}"}}')
                assert active["metric"]["alertstate"] == "pending"  # fires after 5 minutes
                assert active["metric"]["model_id"] == info.model_id
                assert moments, statistic

            # Normal traffic resumes.
            resumed = send(client, normal, live.metrics_port, PACE)
            for statistic in thresholds:
                wait_for(
                    f"{ALERTS[statistic]}'s expression to become false, and the alert inactive",
                    partial(cleared, statistic),
                    20,
                )
            cleared_at = {s: alert_samples(prom, ALERTS[s])[-1] for s in thresholds}
    finally:
        stop(process, signal.SIGTERM, 10)

    report = [f"drift window {WINDOW} images; {changed.flagged} of {WINDOW} shifted images flagged"]
    for statistic, threshold in thresholds.items():
        crossed = changed.first(partial(operator.lt, threshold), statistic)  # above it
        below = resumed.first(partial(operator.ge, threshold), statistic)
        assert crossed is not None, f"{statistic} never crossed {threshold}"
        assert below is not None, f"{statistic} stayed above {threshold}"
        assert 1 < crossed <= WINDOW and below <= NORMAL_IMAGES
        before, highest = (
            filled.statistics[-1][statistic],
            max(s[statistic] for s in changed.statistics),
        )
        true_after = changed.images_before(became_true[statistic][0])
        false_after = resumed.images_before(cleared_at[statistic] + 1.0)
        report.append(
            f"{statistic} (threshold {threshold:.3f}): normal {before:.3f}, after the shift up to "
            f"{highest:.3f}; gauge above after {crossed} shifted images, alert expression true in "
            f"Prometheus after {true_after}; gauge back below after {below} normal images, "
            f"expression false after {false_after}"
        )
    print("\n".join(["", *report]))


def test_a_washed_out_light_that_flags_almost_nothing_raises_the_latent_alert_alone(
    live: ServerProcess,
    images: dict[str, list[bytes]],
    tmp_path: Path,
) -> None:
    expressions = alert_expressions()
    process, prom = start_prometheus(tmp_path, live.metrics_port)
    try:
        with Client(live.target, timeout=30) as client:
            send(client, images["normal"][:WINDOW], live.metrics_port, pace=0.0)
            changed = send(client, images["washed_out"][:WINDOW], live.metrics_port, PACE)
            wait_for(
                "AnomalyLatentDrift's expression to become true, and the alert pending",
                lambda: (
                    bool(prom.query(expressions["latent_shift"]))
                    and alert_active(prom, ALERTS["latent_shift"])
                ),
                20,
            )
            time.sleep(2.5)  # two more scrapes and evaluations of the changed window
            assert not prom.query(expressions["p_value_ks"])
            assert not alert_active(prom, ALERTS["p_value_ks"])
    finally:
        stop(process, signal.SIGTERM, 10)
    # The anomaly rate barely moves (a light change that flags 1 or 2 of 32 parts reads like a
    # few defects); the score statistic stays below its threshold throughout.
    assert changed.flagged <= 2
    assert all(s["p_value_ks"] < KS_THRESHOLD for s in changed.statistics)
    assert changed.statistics[-1]["latent_shift"] > changed.statistics[-1]["latent_shift_threshold"]
