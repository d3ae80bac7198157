"""The shipped alert rules pass `promtool check rules` and their unit tests."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.cloud_sync.service.prometheus import binary

HERE = Path(__file__).resolve().parent
RULES = HERE.parents[2] / "cloud_sync" / "service" / "prometheus" / "sightline-alerts.yml"


def test_the_alert_rules_are_valid_prometheus_rules():
    checked = subprocess.run([binary("promtool"), "check", "rules", str(RULES)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 9 rules found" in checked.stdout


def test_every_alert_rule_passes_its_promtool_unit_test():
    tested = subprocess.run([binary("promtool"), "test", "rules", "alerts-test.yml"],
                            cwd=HERE / "promtool", capture_output=True, text=True, timeout=120)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_rule_has_a_unit_test():
    rules = set(re.findall(r"^\s*- alert: (\w+)", RULES.read_text(), re.M))
    tests = (HERE / "promtool" / "alerts-test.yml").read_text()
    assert len(rules) == 9 and rules == set(re.findall(r"alertname: (\w+)", tests))
