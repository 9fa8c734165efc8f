"""The monitoring that ships with pdoflowd: Prometheus alerting rules and
the Grafana dashboard.

The rules are checked and unit-tested by the real ``promtool``; every
dashboard query is parsed by it too, and every metric name the rules and
the dashboard use must be one that :mod:`pdoflowd.daemon.metrics` exports.
A real Prometheus server then scrapes the endpoint, evaluates the rules and
answers every dashboard query with data.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from devtools.devcluster import free_port
from pdoflowd.daemon.httpserver import HttpServer
from pdoflowd.daemon.metrics import (
    MetricsEndpoint,
    PoolMetrics,
    readiness,
)
from pdoflowd.daemon.tally import JobRun, batch_report

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "packaging" / "prometheus" / "pdoflowd-rules.yml"
RULE_TESTS = ROOT / "packaging" / "prometheus" / "pdoflowd-rules.test.yml"
DASHBOARD = ROOT / "packaging" / "grafana" / "pdoflowd.json"

# PromQL's own words: aggregations, functions and keywords the queries use.
PROMQL_WORDS = frozenset(
    {
        "abs", "absent", "and", "avg", "bool", "ceil", "clamp_max",
        "clamp_min", "count", "delta", "deriv", "floor", "group",
        "histogram_quantile", "idelta", "increase", "irate", "label_replace",
        "max", "max_over_time", "min", "min_over_time", "offset", "or",
        "quantile", "rate", "resets", "round", "scalar", "sort",
        "sort_desc", "stddev", "sum", "time", "timestamp", "topk",
        "bottomk", "unless", "vector", "by", "without", "on", "ignoring",
        "group_left", "group_right",
    }
)  # fmt: skip
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
# A number (durations too) is one token, so "5m" does not yield "m".
_TOKEN = re.compile(r"[0-9][0-9A-Za-z_.]*|[A-Za-z_:][A-Za-z0-9_:]*")
_METRIC_IN_TEXT = re.compile(r"\b(?:pdoflowd|process)_[a-z0-9_]*[a-z0-9]\b")


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(
            "PROMTOOL MISSING: the rules and dashboard are not checked;"
            " install it (Debian: apt-get install prometheus)"
        )
    return path


@pytest.fixture(scope="module")
def exported() -> frozenset[str]:
    return PoolMetrics(version="0").metric_names()


def run_promtool(promtool: str, *args: str, cwd: Path) -> str:
    result = subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    expr = _STRING.sub('""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = _GROUPING.sub("", expr)
    return {
        token
        for token in _TOKEN.findall(expr)
        if token not in PROMQL_WORDS and not token[0].isdigit()
    }


def alert_names(text: str) -> set[str]:
    return set(re.findall(r"^\s*-?\s*alert:\s*(\S+)", text, re.MULTILINE))


# ------------------------------------------------------------ rules


def test_rules_pass_promtool_check_rules(promtool: str) -> None:
    output = run_promtool(
        promtool, "check", "rules", RULES.name, cwd=RULES.parent
    )
    assert "SUCCESS" in output


def test_rules_pass_their_promtool_unit_tests(promtool: str) -> None:
    output = run_promtool(
        promtool, "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent
    )
    assert "SUCCESS" in output


def test_the_rules_raise_the_alerts_the_daemon_needs() -> None:
    assert alert_names(RULES.read_text()) == {
        "PdoflowdNoLiveWorkers",
        "PdoflowdJobsWaitingNoneProcessed",
        "PdoflowdOldestWaitingJobTooOld",
        "PdoflowdHighErrorRatio",
        "PdoflowdWorkerRestartsFlapping",
        "PdoflowdDatabaseErrors",
        "PdoflowdConfigReloadFailed",
        "PdoflowdResourceLimitsDiffer",
    }


def test_every_alert_is_unit_tested_firing() -> None:
    tested = set(
        re.findall(r"alertname:\s*(\S+)", RULE_TESTS.read_text(), re.MULTILINE)
    )
    assert alert_names(RULES.read_text()) <= tested


def test_every_alert_is_documented() -> None:
    docs = (ROOT / "docs" / "metrics.md").read_text()
    for alert in alert_names(RULES.read_text()):
        assert f"`{alert}`" in docs, alert


@pytest.mark.parametrize("path", [RULES, RULE_TESTS], ids=lambda p: p.name)
def test_rules_and_their_tests_name_only_exported_metrics(
    path: Path, exported: frozenset[str]
) -> None:
    used = set(_METRIC_IN_TEXT.findall(path.read_text()))
    assert used, "no metric found: the pattern is wrong"
    assert used <= exported, sorted(used - exported)


# ------------------------------------------------------------ dashboard


def dashboard() -> dict[str, Any]:
    with DASHBOARD.open() as file:
        data: dict[str, Any] = json.load(file)
    return data


def panels(data: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in data["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return [p for p in found if p.get("type") != "row"]


def queries(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in panels(data)
        for target in panel.get("targets", [])
    ]


def as_promql(expr: str) -> str:
    """A panel query with Grafana's interval variables made concrete."""
    return re.sub(r"\$__(?:rate_)?interval|\$__range", "5m", expr)


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    data = dashboard()
    assert data["title"] == "pdoflowd"
    assert data["uid"] == "pdoflowd"
    ids = [panel["id"] for panel in data["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(data):
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}


def test_every_dashboard_query_parses_as_promql(
    promtool: str, tmp_path: Path
) -> None:
    # promtool parses the queries when they stand as recording rules.
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for index, (_, expr) in enumerate(queries(dashboard())):
        lines.append(f"      - record: dashboard:query_{index}")
        lines.append(f"        expr: {json.dumps(as_promql(expr))}")
    (tmp_path / "dashboard-rules.yml").write_text("\n".join(lines) + "\n")
    run_promtool(
        promtool, "check", "rules", "dashboard-rules.yml", cwd=tmp_path
    )


def test_the_dashboard_uses_only_metrics_pdoflowd_exports(
    exported: frozenset[str],
) -> None:
    data = dashboard()
    for title, expr in queries(data):
        used = metric_names_in(expr)
        assert used, f"{title!r}: no metric in {expr}"
        assert used <= exported, f"{title!r}: {sorted(used - exported)}"
    for variable in data["templating"]["list"]:
        if variable["type"] == "query":
            found = re.match(r"label_values\((\w+)", variable["definition"])
            assert found, variable["definition"]
            assert found[1] in exported


def test_the_dashboard_shows_the_quantiles_and_the_queue() -> None:
    text = " ".join(expr for _, expr in queries(dashboard()))
    for needed in (
        "histogram_quantile(0.9, sum by (le) "
        "(rate(pdoflowd_job_queue_wait_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) "
        "(rate(pdoflowd_job_duration_seconds_bucket",
        "pdoflowd_queue_jobs",
        "pdoflowd_queue_oldest_waiting_seconds",
        "pdoflowd_workers",
        "sum by (outcome) (rate(pdoflowd_jobs_processed_total",
    ):
        assert needed in text, needed


def test_metric_names_are_found_in_promql() -> None:
    assert metric_names_in(
        'histogram_quantile(0.9, sum by (le, outcome) (rate(a_bucket{x="y"}'
        "[5m]))) / on (job) group_left b_total and c offset 5m > 0.25"
    ) == {"a_bucket", "b_total", "c"}


# ------------------------------------------------------------ a real server


@pytest.fixture
def prometheus_server() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip(
            "PROMETHEUS MISSING: the rules and the dashboard are not tried on"
            " a real server; install it (Debian: apt-get install prometheus)"
        )
    return path


class FedEndpoint:
    """The endpoint in a selectors loop of its own, fed like the daemon's."""

    def __init__(self) -> None:
        self.pool = PoolMetrics(version="0.1.0", function_labels=["pkg.f"])
        self.selector = selectors.DefaultSelector()
        endpoint = MetricsEndpoint(
            self.pool,
            lambda: readiness(
                started=True,
                draining=False,
                live_workers=1,
                database_reachable=True,
            ),
        )
        self.server = HttpServer(self.selector, "127.0.0.1", 0, endpoint)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def feed(self, round_: int) -> None:
        runs = [
            JobRun("done", "pkg.f", 0.01 * (1 + round_ % 7)),
            JobRun("done", "pkg.g", 0.2),
            JobRun("failed", "pkg.f", 1.5),
        ]
        self.pool.apply_worker_report(
            batch_report(
                claimed=3, claim_s=[0.002], wait_s=[0.3, 0.6, 2.0], runs=runs
            )
        )
        self.pool.set_workers([(0, os.getpid(), "running")])
        self.pool.set_queue({"waiting": 10, "executing": 3}, 4.0)

    def run(self) -> None:
        round_ = 0
        next_feed = 0.0
        while not self.stop.is_set():
            for key, events in self.selector.select(0.05):
                self.server.handle(key, events)
            self.server.expire()
            if time.monotonic() >= next_feed:
                self.feed(round_)
                round_ += 1
                next_feed = time.monotonic() + 0.2

    def __enter__(self) -> FedEndpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        self.server.close()
        self.selector.close()


def api(port: int, path: str, **params: str) -> Any:
    query = urllib.parse.urlencode(params)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(
        f"http://127.0.0.1:{port}{path}?{query}", timeout=10
    ) as answer:
        return json.load(answer)


@pytest.mark.slow
def test_a_real_prometheus_scrapes_evaluates_the_rules_and_the_dashboard(
    prometheus_server: str, tmp_path: Path
) -> None:
    port = free_port()
    with FedEndpoint() as fed:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  evaluation_interval: 1s\n"
            f"rule_files: [{json.dumps(str(RULES))}]\n"
            "scrape_configs:\n"
            "  - job_name: pdoflowd\n"
            "    static_configs:\n"
            f"      - targets: ['127.0.0.1:{fed.server.address[1]}']\n"
        )
        log = (tmp_path / "prometheus.log").open("wb")
        server = subprocess.Popen(
            [
                prometheus_server,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_scrapes(port, server)
            for title, expr in queries(dashboard()):
                promql = as_promql(expr).replace("$job", ".*")
                promql = promql.replace("$instance", ".*")
                answer = api(port, "/api/v1/query", query=promql)
                assert answer["status"] == "success", (title, answer)
                assert answer["data"]["result"], f"{title!r}: no data"
            rules = api(port, "/api/v1/rules")["data"]["groups"][0]["rules"]
            assert len(rules) == len(alert_names(RULES.read_text()))
            for rule in rules:
                assert rule["health"] == "ok", rule
        finally:
            server.terminate()
            server.wait(10)
            log.close()


def wait_for_scrapes(port: int, server: subprocess.Popen[bytes]) -> None:
    """Until five scrapes are stored and every rule was evaluated."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert server.poll() is None, "prometheus exited"
        try:
            samples = api(
                port,
                "/api/v1/query",
                query="count_over_time(up[1m])",
            )["data"]["result"]
            rules = api(port, "/api/v1/rules")["data"]["groups"]
        except (OSError, ValueError, KeyError):
            samples, rules = [], []
        if (
            samples
            and float(samples[0]["value"][1]) >= 5
            and rules
            and all(r["health"] != "unknown" for r in rules[0]["rules"])
        ):
            return
        time.sleep(0.5)
    raise AssertionError("prometheus did not scrape the endpoint in time")
