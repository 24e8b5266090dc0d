"""deploy/prometheus: promtool checks the configs and rules and runs the rules' unit tests; the
rules use only metrics the service exports and follow Prometheus naming conventions."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from service.metrics import ServiceMetrics

REPO = Path(__file__).resolve().parents[1]
PROM_DIR = REPO / "deploy" / "prometheus"
RULE_FILES = sorted((PROM_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROM_DIR / "tests").glob("*_test.yml"))
RECORDING_NAME = re.compile(r"^[a-z][a-z0-9_]*:[a-z][a-z0-9_]*:[a-z0-9_]+$")
COLON_NAME = re.compile(r"\b[a-zA-Z_][a-zA-Z0-9_]*:[a-zA-Z0-9_:]*[a-zA-Z0-9_]")
ANOMALY_NAME = re.compile(r"\banomaly_[a-z0-9_]+\b")
DURATION = re.compile(r"^\d+[smh]$")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed: run `make deploy-tools` (Debian package prometheus)")
    return path


def run_promtool(*args: str, cwd: Path = PROM_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def load_yaml(path: Path) -> Any:
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed: run `make deploy-tools`")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def exported_series() -> set[str]:
    """Every series name the service's metrics expose (counters with _total, histogram parts)."""
    registry = CollectorRegistry()
    ServiceMetrics(registry)
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{part}" for part in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def rules() -> list[dict[str, Any]]:
    return [
        rule
        for path in RULE_FILES
        for group in load_yaml(path)["groups"]
        for rule in group["rules"]
    ]


def test_the_rule_files_and_their_tests_are_there() -> None:
    assert [p.name for p in RULE_FILES] == ["alerts.yml", "recording.yml"]
    assert [p.name for p in RULE_TESTS] == ["alerts_test.yml", "recording_test.yml"]


def test_promtool_check_config_accepts_the_scrape_config() -> None:
    result = run_promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 2 rule files found" in result.stdout


def test_promtool_check_config_accepts_the_kubernetes_scrape_config(tmp_path: Path) -> None:
    """Debian's promtool is built without Kubernetes discovery, so the pod discovery block is
    swapped for a static target; everything else (relabelling, rule files) is checked as is."""
    text = (PROM_DIR / "prometheus-kubernetes.yml").read_text(encoding="utf-8")
    discovery = "    kubernetes_sd_configs:\n      - role: pod\n"
    assert text.count(discovery) == 1
    probe = run_promtool("check", "config", str(PROM_DIR / "prometheus-kubernetes.yml"))
    if probe.returncode != 0 and "kubernetes_sd_configs not found" not in probe.stderr:
        pytest.fail(probe.stdout + probe.stderr)
    shutil.copytree(PROM_DIR / "rules", tmp_path / "rules")
    config = tmp_path / "prometheus-kubernetes.yml"
    config.write_text(
        text.replace(discovery, "    static_configs:\n      - targets: ['10.0.0.1:9100']\n"),
        encoding="utf-8",
    )
    result = run_promtool("check", "config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules_accepts_every_rule_file() -> None:
    result = run_promtool("check", "rules", *(str(p) for p in RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_FILES)


def test_rule_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", *(str(p) for p in RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS)
    assert "FAILED" not in result.stdout


@pytest.mark.parametrize(
    ("rule_file", "original", "broken"),
    [
        # The anomaly rate divided the wrong way round.
        (
            "recording.yml",
            "(rate(anomaly_images_flagged_total[5m]))\n",
            "(rate(anomaly_images_scored_total[5m]))\n",
        ),
        # The anomaly-rate alert at 50 times instead of 5 times the expected rate.
        ("alerts.yml", "5 * model_version:", "50 * model_version:"),
        # The drift alert below its threshold instead of above.
        (
            "alerts.yml",
            "anomaly_drift_p_value_ks_statistic > anomaly_drift",
            "anomaly_drift_p_value_ks_statistic < anomaly_drift",
        ),
    ],
    ids=["anomaly-rate-inverted", "anomaly-rate-alert-at-50x", "score-drift-inverted"],
)
def test_rule_unit_tests_catch_a_broken_rule(
    tmp_path: Path, rule_file: str, original: str, broken: str
) -> None:
    shutil.copytree(PROM_DIR, tmp_path / "prometheus")
    path = tmp_path / "prometheus" / "rules" / rule_file
    text = path.read_text(encoding="utf-8")
    assert original in text
    path.write_text(text.replace(original, broken, 1), encoding="utf-8")
    tests = sorted((tmp_path / "prometheus" / "tests").glob("*_test.yml"))
    result = run_promtool("test", "rules", *(str(p) for p in tests), cwd=tmp_path)
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr


def test_rules_use_only_metrics_the_service_exports() -> None:
    exported = exported_series()
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    for rule in rules():
        text = rule["expr"] + " ".join(rule.get("annotations", {}).values())
        used_recorded = set(COLON_NAME.findall(text))
        assert used_recorded <= recorded, f"{rule}: unknown recording rules"
        used = set(ANOMALY_NAME.findall(COLON_NAME.sub(" ", text)))
        assert used <= exported, f"{rule.get('record') or rule.get('alert')}: {used - exported}"


def test_every_exported_metric_is_used_by_a_rule_or_the_dashboard() -> None:
    text = "".join(p.read_text(encoding="utf-8") for p in RULE_FILES)
    text += (REPO / "deploy" / "grafana" / "dashboards" / "anomaly-service.json").read_text(
        encoding="utf-8"
    )
    used = set(ANOMALY_NAME.findall(COLON_NAME.sub(" ", text)))
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in exported_series()}
    unused = {f for f in families if not any(u.startswith(f) for u in used)}
    assert not unused, f"metrics neither alerted on nor charted: {sorted(unused)}"


def test_recording_rules_follow_the_level_metric_operations_convention() -> None:
    names = [rule["record"] for rule in rules() if "record" in rule]
    assert len(names) == len(set(names))
    for name in names:
        assert RECORDING_NAME.match(name), name
        level, metric, operations = name.split(":")
        # The labels kept besides job (see the header of recording.yml).
        assert level in ("job", "instance", "method", "model_version"), name
        assert metric.startswith("anomaly_"), name
        assert not metric.endswith("_total"), f"{name}: drop _total once rated"
        # Operations end with the window they cover, or are a plain aggregation over replicas.
        assert re.search(r"\d+[smh]$", operations) or operations in ("max", "sum"), name


def test_recording_rules_asked_for_by_the_issue_exist() -> None:
    names = {rule["record"] for rule in rules() if "record" in rule}
    assert {
        "job:anomaly_images_scored:rate5m",
        "model_version:anomaly_images_flagged:ratio_rate5m",
        "model_version:anomaly_images_flagged:ratio_rate1h",
        "method:anomaly_request_duration_seconds:p50_rate5m",
        "method:anomaly_request_duration_seconds:p99_rate5m",
    } <= names


def test_alerts_have_severity_annotations_and_a_hold_duration() -> None:
    alerts = [rule for rule in rules() if "alert" in rule]
    assert {
        "AnomalyRateHigh",
        "AnomalyServiceDown",
        "AnomalyNoImagesScored",
        "AnomalyServingOnCPU",
        "AnomalyServiceErrorRatioHigh",
        "AnomalyQueueSaturated",
        "AnomalyScoreDrift",
        "AnomalyLatentDrift",
    } <= {a["alert"] for a in alerts}
    for alert in alerts:
        name = alert["alert"]
        assert re.fullmatch(r"Anomaly[A-Z][A-Za-z]+", name), name
        assert alert["labels"]["severity"] in ("critical", "warning"), name
        annotations = alert["annotations"]
        assert len(annotations["summary"]) <= 140, f"{name}: summary is one short line"
        assert len(annotations["description"]) > len(annotations["summary"]), name
        assert annotations["runbook_url"] == "deploy/README.md#alerts", name
        assert DURATION.match(str(alert["for"])), f"{name}: 'for' must be explicit"
    readme = (REPO / "deploy" / "README.md").read_text(encoding="utf-8")
    for alert in alerts:
        assert f"`{alert['alert']}`" in readme, (
            f"deploy/README.md does not explain {alert['alert']}"
        )
