"""`pipeshift operator`: flags over environment over defaults, bad values named, and its `/metrics`.

The metrics exposition is checked by `promtool check metrics` (Prometheus's own linter) and read over
a real socket from the operator's metrics server.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from pipeshift.errors import UserError
from pipeshift.operator.main import OperatorConfig, add_arguments, resolve
from pipeshift.operator.metrics import Counter, OperatorMetrics, serve_metrics


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_watch_every_namespace_and_serve_metrics_on_8080() -> None:
    assert resolve(parse(), {}) == OperatorConfig()
    assert OperatorConfig().namespaces == () and OperatorConfig().metrics_port == 8080


def test_flags_win_over_the_environment() -> None:
    env = {"PIPESHIFT_OPERATOR_NAMESPACES": "a, b", "PIPESHIFT_OPERATOR_METRICS_PORT": "9100",
           "PIPESHIFT_OPERATOR_LOG_LEVEL": "debug", "PIPESHIFT_OPERATOR_RECHECK_SECONDS": "2.5",
           "PIPESHIFT_OPERATOR_HEALTH_PORT": "8081"}
    from_env = resolve(parse(), env)
    assert from_env == OperatorConfig(namespaces=("a", "b"), metrics_port=9100, log_level="DEBUG",
                                      recheck_seconds=2.5, health_port=8081)
    from_flags = resolve(parse("--namespace", "c", "--metrics-port", "off", "--log-level", "ERROR"), env)
    assert from_flags.namespaces == ("c",) and from_flags.metrics_port is None and from_flags.log_level == "ERROR"
    everywhere = resolve(parse("--all-namespaces", "--prometheus-url", "http://prom:9090/"), env)
    assert everywhere.namespaces == () and everywhere.prometheus_url == "http://prom:9090"


@pytest.mark.parametrize(("argv", "env", "named"), [
    (("--metrics-port", "http"), {}, "--metrics-port='http'"),
    ((), {"PIPESHIFT_OPERATOR_METRICS_PORT": "70000"}, "PIPESHIFT_OPERATOR_METRICS_PORT='70000'"),
    (("--log-level", "LOUD"), {}, "--log-level='LOUD'"),
    ((), {"PIPESHIFT_OPERATOR_RECHECK_SECONDS": "0"}, "PIPESHIFT_OPERATOR_RECHECK_SECONDS='0'"),
    (("--health-port", "-1"), {}, "--health-port='-1'"),
    (("--prometheus-url", "prom:9090"), {}, "--prometheus-url='prom:9090'"),
    (("--namespace", "a", "--all-namespaces"), {}, "--namespace and --all-namespaces"),
])
def test_bad_values_name_their_flag_or_variable(argv: tuple[str, ...], env: dict[str, str], named: str) -> None:
    with pytest.raises(UserError) as info:
        resolve(parse(*argv), env)
    assert str(info.value).startswith(named)


def test_the_cli_reports_a_bad_flag_as_one_line() -> None:
    done = subprocess.run([sys.executable, "-m", "pipeshift.cli", "operator", "--metrics-port", "http"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == ("pipeshift operator: error: --metrics-port='http': must be a port in "
                                   "0..65535 or 'off'")


def test_metrics_pass_promtool_and_are_served_over_http() -> None:
    metrics = OperatorMetrics()
    metrics.reconciles.inc(outcome="ready")
    metrics.reconciles.inc(outcome="ready")
    metrics.created.inc(kind="Pod", role="stage")
    metrics.events.inc(type="Warning", reason="InvalidSpec")
    text = metrics.render()
    assert 'pipeshift_operator_reconciles_total{outcome="ready"} 2.0' in text
    assert 'pipeshift_operator_objects_created_total{kind="Pod",role="stage"} 1.0' in text
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is installed by `make tools`"
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    with serve_metrics(metrics, "127.0.0.1", 0) as port:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert resp.read().decode() == text
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
        assert info.value.code == 404


def test_counters_refuse_wrong_labels_and_going_down() -> None:
    c = Counter("x_total", "x", ("outcome",))
    with pytest.raises(ValueError, match="takes labels"):
        c.inc(kind="Pod")
    with pytest.raises(ValueError, match="only go up"):
        c.inc(-1, outcome="ok")
    with pytest.raises(ValueError, match="_total"):
        Counter("x", "x", ())
    c.inc(outcome='a"b')
    assert 'outcome="a\\"b"' in c.render() and c.value(outcome='a"b') == 1.0


def test_the_operator_loads_without_torch_or_the_runtime() -> None:
    """The operator image has no torch: importing everything the operator runs must not pull it in."""
    code = ("import sys, pipeshift.cli, pipeshift.operator.main, pipeshift.operator.handlers; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('pipeshift.runtime')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
