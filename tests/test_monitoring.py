"""deploy/monitoring: the alert rules pass promtool's own checks and unit tests
(alerts-test.yaml), and every metric the rules and the Grafana dashboard read is one a
service exports (a renamed metric would otherwise leave an alert silent)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "monitoring"
SERVICES = ("gateway_svc", "task_svc", "llm_svc", "persistence_svc")
NAME = re.compile(r"\bswitchboard_[a-z_]+")
SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def promtool() -> str:
    found = ROOT / ".venv" / "bin" / "promtool"
    path = str(found) if found.exists() else shutil.which("promtool")
    assert path, "promtool is missing: `make test` unpacks it into .venv/bin"
    return path


def run(*args: str) -> str:
    done = subprocess.run(
        [promtool(), *args], cwd=MONITORING, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def base(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def exported() -> set[str]:
    """Every `switchboard_*` metric name the services' code defines."""
    names: set[str] = set()
    for service in SERVICES:
        for source in (ROOT / service).rglob("*.py"):
            names |= {base(n) for n in re.findall(r'"(switchboard_[a-z_]+)"', source.read_text())}
    return names


def test_the_alert_rules_pass_promtool_checks_and_unit_tests() -> None:
    assert "SUCCESS: 7 rules found" in run("check", "rules", "alerts.yaml")
    assert "SUCCESS" in run("test", "rules", "alerts-test.yaml")


def test_every_alert_has_a_severity_a_summary_and_a_test() -> None:
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())["groups"][0]["rules"]
    tests = (MONITORING / "alerts-test.yaml").read_text()
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert f"alertname: {rule['alert']}" in tests, f"{rule['alert']} is not unit-tested"


def test_the_rules_and_the_dashboard_read_only_metrics_the_services_export() -> None:
    rules = (MONITORING / "alerts.yaml").read_text()
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 20
    used = {base(name) for text in [rules, *exprs] for name in NAME.findall(text)}
    missing = used - exported()
    assert not missing, f"read but never exported: {sorted(missing)}"
