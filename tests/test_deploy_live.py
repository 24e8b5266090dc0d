"""deploy/ against a real Prometheus: the service and Debian's Prometheus server run on loopback
with the project's own scrape config and rules; a known mix of images is sent; Prometheus's HTTP
API must give back the anomaly rate that was sent, the alerts must evaluate on the live series, and
every query of the Grafana dashboard must parse and return data. The container health check and
the load generator run against the same server.

Prometheus runs with the project's scrape config, edited only for loopback ports and 1-second
intervals (tests/prometheus_live.py), so the test takes seconds.

Exactness: Prometheus extrapolates rate() to the window's edges, by the same factor for the
flagged and the scored counter when their first samples are in the same proportion as their
increases. So the mix is sent in identical rounds, and Prometheus starts only after the first
round: its first sample of both counters is one whole round, whatever the scrape timing.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from service.client import Client
from service.server_process import ServerProcess
from tests.prometheus_live import (
    DEPLOY,
    JOB,
    Prometheus,
    free_port,
    needs_prometheus,
    start_prometheus,
    stop,
    wait_for,
)

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "anomaly-service.json"
ROUNDS = 3
FORCE_FLAG = -1.0e6  # a threshold every combined score reaches
FORCE_PASS = 1.0e6  # a threshold no combined score reaches
# What Grafana would put in for the dashboard's variables here.
DASHBOARD_VARIABLES = {
    "job": JOB,
    "model_version": ".*",
    "__rate_interval": "1m",
    "__interval": "1s",
    "__range": "5m",
}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240), needs_prometheus]


# --- helpers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """What the test sent, as counted by the client."""

    scored: int
    flagged: int

    @property
    def anomaly_rate(self) -> float:
        return self.flagged / self.scored


@dataclass(frozen=True)
class Stack:
    """The running stack and what was done to it."""

    prometheus: Prometheus
    target: str
    metrics_port: int
    model_id: str
    model_version: str
    provider: str
    expected_false_alarm_rate: float
    mix: Sent  # the known mix, all rounds
    mix_time: float  # a rule evaluation after the mix and before any other traffic
    end_time: float  # an evaluation after all the fixture's traffic
    started: float
    images: Path


def send_round(client: Client, images: list[Path]) -> Sent:
    """One round of the mix: the model's own verdicts, then forced anomalies, forced passes."""
    results = [
        *client.score(images),
        *client.score(images, threshold=FORCE_FLAG),
        *client.score(images, threshold=FORCE_PASS),
    ]
    assert all(r.ok for r in results)
    return Sent(len(results), sum(r.is_anomaly for r in results))


def healthy(target: str) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


# --- the stack ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(
    trained_bundle: Path, demo_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("live")
    bundle = tmp / "bundle"
    shutil.copytree(trained_bundle, bundle)  # a copy: the test breaks it to provoke a reload error
    images = sorted((demo_data / "test").rglob("*.png"))
    assert len(images) >= 10
    started = time.time()
    server = ServerProcess(
        [
            "--bundle", str(bundle),
            "--host", "127.0.0.1",
            "--port", "0",
            "--metrics-port", "0",
            "--device", "auto",
            "--threads", "1",
            "--grace-period", "2",
        ],
    )  # fmt: skip
    prometheus_process: subprocess.Popen[bytes] | None = None
    try:
        server.wait_ready(90)
        target, metrics_port = server.target, server.metrics_port
        assert healthy(target)
        with Client(target, timeout=30) as client:
            info = client.info()
            first = send_round(client, images)
            assert 0 < first.flagged < first.scored
            # Prometheus starts now: its first sample of the counters is one whole round.
            prometheus_process, prom = start_prometheus(tmp, metrics_port)
            scored_total = f'sum(anomaly_images_scored_total{{job="{JOB}"}})'
            sent = [first]
            wait_for("the first scrape", prom.equals(scored_total, first.scored), 30)
            for _ in range(ROUNDS - 1):
                sent.append(send_round(client, images))
                total = sum(s.scored for s in sent)
                wait_for("a scrape of the round", prom.equals(scored_total, total), 30)
            assert len(set(sent)) == 1, f"rounds were scored differently: {sent}"
            mix = Sent(sum(s.scored for s in sent), sum(s.flagged for s in sent))
            mix_time = after_next_evaluation(
                prom, "model_version:anomaly_images_flagged:ratio_rate1h"
            )

            # Everything else the dashboard shows: image and call errors, a stream, reloads.
            bad = client.score([images[0], b"not an image"], ids=["good", "bad"])
            assert bad[0].ok and bad[1].error_code == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as refused:
                client.score([])
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert all(r.ok for r in client.score_stream(images[:4], timeout=30))
            reloads = f'sum(anomaly_model_reloads_total{{job="{JOB}", result="%s"}})'
            server.signal(signal.SIGHUP)
            wait_for("a successful reload", prom.equals(reloads % "success", 1), 60)
            (bundle / "manifest.json").write_text("{}", encoding="utf-8")
            server.signal(signal.SIGHUP)
            wait_for("a refused reload", prom.equals(reloads % "failure", 1), 60)
            wait_for(
                "AnomalyModelReloadFailed",
                lambda: bool(prom.query('ALERTS{alertname="AnomalyModelReloadFailed"}')),
                30,
            )
            end_time = after_next_evaluation(prom, "job:anomaly_image_errors:ratio_rate5m")
        yield Stack(
            prometheus=prom,
            target=target,
            metrics_port=metrics_port,
            model_id=info.model_id,
            model_version=info.model_version,
            provider=info.execution_provider,
            expected_false_alarm_rate=info.default_rule.target_false_alarm_rate,
            mix=mix,
            mix_time=mix_time,
            end_time=end_time,
            started=started,
            images=demo_data / "test",
        )
    finally:
        if prometheus_process is not None:
            stop(prometheus_process, signal.SIGTERM, 10)
        server.stop(15)
        server.close()


def after_next_evaluation(prom: Prometheus, recorded: str) -> float:
    """Wait for a rule evaluation that sees the current samples; return its time."""
    now = time.time()
    wait_for(
        f"an evaluation of {recorded}",
        lambda: (prom.value(f"max(timestamp({recorded}))") or 0) > now + 1.0,
        timeout=30,
    )
    return float(prom.value(f"max(timestamp({recorded}))") or 0)


# --- what Prometheus makes of it ---------------------------------------------------------------


def test_the_projects_scrape_config_scrapes_the_service(stack: Stack) -> None:
    (up,) = stack.prometheus.query(f'up{{job="{JOB}"}}')
    assert up["value"][1] == "1"
    assert up["metric"]["instance"] == f"127.0.0.1:{stack.metrics_port}"
    assert up["metric"]["environment"] == "local"  # the config's target label
    prom, at = stack.prometheus, stack.mix_time
    assert prom.value(f'sum(anomaly_images_scored_total{{job="{JOB}"}})', at) == stack.mix.scored
    assert prom.value(f'sum(anomaly_images_flagged_total{{job="{JOB}"}})', at) == stack.mix.flagged


def test_recording_rules_give_the_anomaly_rate_that_was_sent(stack: Stack) -> None:
    labels = {"job": JOB, "model_id": stack.model_id, "model_version": stack.model_version}
    for window in ("5m", "1h"):
        (series,) = stack.prometheus.query(
            f"model_version:anomaly_images_flagged:ratio_rate{window}", stack.mix_time
        )
        assert series["metric"] == {
            "__name__": f"model_version:anomaly_images_flagged:ratio_rate{window}",
            **labels,
        }
        assert float(series["value"][1]) == pytest.approx(stack.mix.anomaly_rate, rel=1e-9)
    (expected,) = stack.prometheus.query(
        "model_version:anomaly_expected_false_alarm_rate:max", stack.mix_time
    )
    assert expected["metric"] == {
        "__name__": "model_version:anomaly_expected_false_alarm_rate:max",
        **labels,
    }
    assert float(expected["value"][1]) == pytest.approx(stack.expected_false_alarm_rate)


def test_throughput_and_latency_rules_give_sensible_values(stack: Stack) -> None:
    prom, at = stack.prometheus, stack.mix_time
    images_per_second = prom.value("job:anomaly_images_scored:rate5m", at)
    # The rounds took seconds; over the 5-minute window that is at least the increase / 300 s.
    assert images_per_second is not None
    assert images_per_second >= (stack.mix.scored * (ROUNDS - 1) / ROUNDS) / 300
    p50 = prom.value('method:anomaly_request_duration_seconds:p50_rate5m{method="ScoreBatch"}', at)
    p99 = prom.value('method:anomaly_request_duration_seconds:p99_rate5m{method="ScoreBatch"}', at)
    assert p50 is not None and p99 is not None
    assert 0 < p50 <= p99 < 10


def test_alerts_evaluate_on_the_live_series(stack: Stack) -> None:
    active = {
        a["metric"]["alertname"]: a["metric"]
        for a in stack.prometheus.query("ALERTS", stack.end_time)
    }
    # The mix is far above the calibrated rate, with enough images: AnomalyRateHigh is pending
    # (it fires after 10 minutes), for this model.
    assert stack.mix.anomaly_rate > 5 * stack.expected_false_alarm_rate
    rate_high = active.pop("AnomalyRateHigh")
    assert rate_high["alertstate"] == "pending"
    assert rate_high["model_version"] == stack.model_version
    # The refused bundle fires at once.
    failed = active.pop("AnomalyModelReloadFailed")
    assert failed["alertstate"] == "firing"
    assert failed["instance"] == f"127.0.0.1:{stack.metrics_port}"
    # Over the hour window the rounds are few images; should they count, only as pending.
    sustained = active.pop("AnomalyRateHighSustained", None)
    assert sustained is None or sustained["alertstate"] == "pending"
    # --device auto without a GPU serves on CPU: pending (fires after 5 minutes).
    if stack.provider == "CPUExecutionProvider":
        on_cpu = active.pop("AnomalyServingOnCPU")
        assert on_cpu["alertstate"] == "pending" and on_cpu["requested_device"] == "auto"
    # Up, scoring, few errors, an empty queue: nothing else.
    assert active == {}


# --- the dashboard -----------------------------------------------------------------------------


def dashboard_queries() -> list[Any]:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [
        pytest.param(panel["title"], target["expr"], id=f"{panel['title']} {target['refId']}")
        for panel in board["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def substitute(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return DASHBOARD_VARIABLES[name]

    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", value, expr)


@pytest.mark.parametrize(("panel", "expr"), dashboard_queries())
def test_dashboard_query_parses_and_returns_data(stack: Stack, panel: str, expr: str) -> None:
    data = stack.prometheus.get(
        "/api/v1/query_range",
        query=substitute(expr),
        start=f"{stack.started:.3f}",
        end=f"{stack.end_time:.3f}",
        step="1",
    )
    assert data["resultType"] == "matrix"
    values = [float(v) for series in data["result"] for _, v in series["values"]]
    assert values, f"{panel}: no data for {expr}"
    assert any(math.isfinite(v) for v in values), f"{panel}: only NaN/Inf for {expr}"


def test_dashboard_variables_resolve_against_prometheus(stack: Stack) -> None:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    expected = {"job": JOB, "model_version": stack.model_version}
    for variable in board["templating"]["list"]:
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"])
        assert match, variable["definition"]
        selector, label = substitute(match.group(1)), match.group(2)
        values = stack.prometheus.get(f"/api/v1/label/{label}/values", **{"match[]": selector})
        assert expected[variable["name"]] in values, (variable["name"], values)


# --- the container health check and the load generator ----------------------------------------


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_container_health_check_reports_the_live_server(stack: Stack) -> None:
    script = str(DEPLOY / "docker" / "healthcheck.py")
    for service in ("anomaly.v1.AnomalyDetector", ""):
        result = run_script(script, "--address", stack.target, "--service", service)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip().endswith(": SERVING")
    nobody = f"127.0.0.1:{free_port()}"
    result = run_script(script, "--address", nobody, "--timeout", "1")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stdout


def test_load_generator_traffic_is_what_prometheus_counts(stack: Stack) -> None:
    prom = stack.prometheus
    scored = f'sum(anomaly_images_scored_total{{job="{JOB}"}})'
    errors = f'sum(anomaly_image_errors_total{{job="{JOB}"}})'
    before_scored, before_errors = prom.value(scored), prom.value(errors)
    assert before_scored is not None and before_errors is not None
    result = run_script(
        str(DEPLOY / "loadgen" / "loadgen.py"),
        "--target", stack.target,
        "--images", str(stack.images),
        "--rate", "40",
        "--duration", "2",
        "--bad-share", "0.1",
        "--defect-share", "0.5",
        "--seed", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    bad = summary["image_errors"].get("INVALID_ARGUMENT", 0)
    assert summary["calls"]["OK"] >= 10
    assert summary["images_sent"] == summary["scored"] + sum(summary["image_errors"].values())
    assert summary["scored"] > 0 and bad > 0
    wait_for(
        "Prometheus to count the load generator's images",
        lambda: (
            prom.value(scored) == before_scored + summary["scored"]
            and prom.value(errors) == before_errors + bad
        ),
        timeout=30,
    )
