"""deploy/grafana: the provisioned dashboard is well-formed, uses the provisioned datasource and
only metrics and recording rules that exist, and has the panels operators need.

Every query is also run against a real Prometheus in tests/test_deploy_live.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "anomaly-service.json"
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range"}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def exprs() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


def provisioned(name: str) -> Any:
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed: run `make deploy-tools`")
    return yaml.safe_load((GRAFANA / "provisioning" / name).read_text(encoding="utf-8"))


def test_dashboard_identity_and_refresh() -> None:
    board = dashboard()
    assert board["uid"] == "anomaly-service"
    assert board["title"] == "Anomaly detection service"
    assert board["refresh"] and board["time"]["from"].startswith("now-")
    assert board["schemaVersion"] >= 36


def test_panel_ids_are_unique_and_every_panel_queries_and_explains() -> None:
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    titles = [p["title"] for p in panels()]
    assert len(titles) == len(set(titles))
    for panel in panels():
        assert panel["targets"], panel["title"]
        assert len(panel["description"]) > 40, f"{panel['title']}: say what it shows"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_panels_fit_the_grid_without_overlapping() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(pos["x"] + dx, pos["y"] + dy) for dx in range(pos["w"]) for dy in range(pos["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_every_query_uses_the_provisioned_datasource() -> None:
    (source,) = provisioned("datasources/prometheus.yml")["datasources"]
    assert source["type"] == "prometheus"
    expected = {"type": "prometheus", "uid": source["uid"]}
    for panel in panels():
        assert panel["datasource"] == expected, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == expected, panel["title"]
    for variable in dashboard()["templating"]["list"]:
        assert variable["datasource"] == expected, variable["name"]


def test_dashboard_provider_reads_where_compose_mounts_the_dashboards() -> None:
    (provider,) = provisioned("dashboards/anomaly-service.yml")["providers"]
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed: run `make deploy-tools`")
    compose = yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text(encoding="utf-8"))
    grafana = compose["services"]["grafana"]
    mounts = {v["source"]: v["target"] for v in grafana["volumes"] if isinstance(v, dict)}
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


def test_queries_use_only_defined_variables() -> None:
    defined = {v["name"] for v in dashboard()["templating"]["list"]} | BUILTIN_VARIABLES
    for expr in exprs():
        for braced, plain in VARIABLE.findall(expr):
            assert (braced or plain) in defined, expr


def test_queries_use_only_recording_rules_that_exist() -> None:
    recording = (REPO / "deploy" / "prometheus" / "rules" / "recording.yml").read_text(
        encoding="utf-8"
    )
    recorded = set(re.findall(r"record: (\S+)", recording))
    for expr in exprs():
        used = set(re.findall(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b", expr))
        assert used <= recorded, expr


@pytest.mark.parametrize(
    ("need", "pattern"),
    [
        ("anomaly rate", r"model_version:anomaly_images_flagged:ratio_rate5m"),
        ("its reference line", r"model_version:anomaly_expected_false_alarm_rate:max"),
        ("images/s", r"rate\(anomaly_images_scored_total"),
        ("latency p50", r"anomaly_request_duration_seconds:p50"),
        ("latency p99", r"anomaly_request_duration_seconds:p99"),
        ("recon_error distribution", r'anomaly_score_bucket\{[^}]*score="recon_error"'),
        ("kl distribution", r'anomaly_score_bucket\{[^}]*score="kl"'),
        ("local_error distribution", r'anomaly_score_bucket\{[^}]*score="local_error"'),
        ("combined score distribution", r"anomaly_combined_score_bucket"),
        ("batch size", r"anomaly_batch_size_images_bucket"),
        ("queue depth", r"anomaly_queue_depth_images"),
        ("call errors by code", r'sum by \(method, code\).*code!="OK"'),
        ("image errors by code", r"sum by \(code\).*anomaly_image_errors_total"),
        ("model version and provider", r"anomaly_model_info"),
        ("p-value drift", r"anomaly_drift_p_value_ks_statistic\{"),
        ("its threshold", r"anomaly_drift_p_value_ks_threshold\{"),
        ("latent drift", r"anomaly_drift_latent_shift\{"),
        ("its threshold", r"anomaly_drift_latent_shift_threshold\{"),
        ("drift window fill", r"anomaly_drift_window_images\{.*/ anomaly_drift_window_size"),
    ],
)
def test_dashboard_shows(need: str, pattern: str) -> None:
    assert any(re.search(pattern, expr) for expr in exprs()), f"no panel shows the {need}"


def test_anomaly_rate_panel_draws_the_expected_rate_as_a_reference_line() -> None:
    (panel,) = [p for p in panels() if p["title"] == "Anomaly rate vs expected false-alarm rate"]
    targets = {t["legendFormat"]: t["expr"] for t in panel["targets"]}
    reference = [k for k, v in targets.items() if v.startswith("model_version:anomaly_expected")]
    assert reference, "the expected false-alarm rate is not drawn"
    dashed = [
        o["matcher"]["options"]
        for o in panel["fieldConfig"]["overrides"]
        if {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}
        in o["properties"]
    ]
    assert any(re.fullmatch(regex, reference[0]) for regex in dashed)
    assert panel["fieldConfig"]["defaults"]["unit"] == "percentunit"


def test_heatmaps_read_prometheus_buckets_as_they_are() -> None:
    heatmaps = [p for p in panels() if p["type"] == "heatmap"]
    assert len(heatmaps) == 4
    for panel in heatmaps:
        assert panel["options"]["calculate"] is False, panel["title"]
        (target,) = panel["targets"]
        assert target["format"] == "heatmap" and "sum by (le)" in target["expr"], panel["title"]
