"""The operator's files: the Prometheus alert rules pass the real `promtool`, every PromQL expression of the
rules and the Grafana dashboard parses, and each metric they name is one a real server exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.settings import Settings
from streamflow.training.demo_data import FIRST_USER_ID
from tests.fixtures.metrics import call, metrics_server

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "streamflow.json"

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool"}
PROMQL_WORDS |= {
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
}
"""PromQL keywords and aggregations (`sum by (x) (...)`) that look like identifiers; other functions are told
apart by the `(` after them."""
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".*", "${datasource}": "prometheus"}


def promtool() -> str:
    """The promtool binary (Debian package `prometheus`; `make test` installs it); under CI it must exist."""
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed (apt-get install prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_expressions() -> Iterator[str]:
    """Every PromQL expression of the dashboard, Grafana's variables replaced by values PromQL accepts."""
    for panel in dashboard()["panels"]:
        for target in panel["targets"]:
            yield grafana_free(target["expr"])


def grafana_free(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers outside label matchers, ranges, strings and
    grouping clauses that are neither a function call nor a keyword."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        following = expr[match.end() :].lstrip()
        if match.group() not in PROMQL_WORDS and not following.startswith("("):
            names.add(match.group())
    return names


def test_metric_names_are_found_in_expressions() -> None:
    expr = (
        'sum by (grpc_code) (rate(grpc_server_handled_total{grpc_code!="OK"}[5m])) / ignoring(grpc_code) '
        "group_left sum(rate(grpc_server_handled_total[5m])) > bool 0.5 or absent(streamflow_model_info)"
    )
    assert metric_names(expr) == {"grpc_server_handled_total", "streamflow_model_info"}


def test_alert_rules_pass_promtool() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout


def test_the_alerts_the_issue_asks_for_exist() -> None:
    assert {rule["alert"] for rule in rules()} == {
        "StreamflowNoModelLoaded",
        "StreamflowNoMetrics",
        "StreamflowModelReloadsFailing",
        "StreamflowHighErrorRatio",
        "StreamflowHighP99Latency",
        "StreamflowOnlineStoreUnavailable",
    }
    for rule in rules():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_every_dashboard_expression_parses(tmp_path: Path) -> None:
    """promtool parses PromQL only inside rule files: each dashboard query becomes a recording rule."""
    recorded = [
        {"record": f"streamflow:dashboard_query_{i}", "expr": expr}
        for i, expr in enumerate(dashboard_expressions())
    ]
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}))
    result = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(recorded)} rules found" in result.stdout


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    board = dashboard()
    titles = [panel["title"] for panel in board["panels"]]
    for wanted in (
        "Request rate",
        "Error ratio",
        "p50 / p99",
        "Model version per worker",
        "Model reloads",
        "Online-store errors",
        "Calls in flight",
        "Users per scoring call",
    ):
        assert any(wanted in title for title in titles), wanted
    assert len({panel["id"] for panel in board["panels"]}) == len(board["panels"])


def test_every_metric_the_rules_and_dashboard_name_is_exported(
    fresh_embedded_settings: Settings, tmp_path: Path
) -> None:
    expressions = [str(rule["expr"]) for rule in rules()] + list(dashboard_expressions())
    variable_query = dashboard()["templating"]["list"][1]["query"]
    named = set().union(*map(metric_names, expressions)) | set(
        re.findall(r"label_values\((\w+)", variable_query)
    )
    assert {"grpc_server_handled_total", "streamflow_model_info", "streamflow_worker_restarts_total"} <= named

    with metrics_server(fresh_embedded_settings, tmp_path / "serve.log") as served:
        # One call of each kind, so every per-call series exists (the fixed ones exist from the start).
        call(served.address, "Predict", pb.PredictRequest(user_id=FIRST_USER_ID))
        call(served.address, "Predict", pb.PredictRequest(user_id="nobody-here"))
        call(served.address, "BatchPredict", pb.BatchPredictRequest(user_ids=[FIRST_USER_ID]))
        call(served.address, "ModelInfo", pb.ModelInfoRequest())
        exported = {name for name, _ in served.scrape().samples}

    assert named - exported == set()
