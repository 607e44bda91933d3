"""The Helm chart, through the real Helm 3 CLI: lint, and what `helm template` renders for each setting.

The chart is installed into a real API server in e2e/; here it is rendered only, which also covers the
ServiceMonitor (it needs prometheus-operator's CRDs, which no test cluster here has). The Dockerfiles
cannot be built on this machine (no Docker engine), so they are checked as text: the operator image
installs no torch, the runtime image pins the torch of pyproject.toml.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from helm import helm, helm_binary
from pipeshift.operator.main import add_arguments, resolve

ROOT = Path(__file__).parent.parent
CHART = ROOT / "helm" / "pipeshift"
NAMESPACE = "pipeshift-system"

# The verbs the operator uses, per (API group, resource): docs/kubernetes.md gives the reason for each.
NAMESPACED = {
    ("pipeshift.dev", "llmpipelines"): {"get", "list", "watch", "patch"},
    ("pipeshift.dev", "llmpipelines/status"): {"get", "patch"},
    ("pipeshift.dev", "llmpipelines/finalizers"): {"update"},
    ("pipeshift.dev", "autoscalingpolicies"): {"get", "list", "watch"},
    ("pipeshift.dev", "autoscalingpolicies/status"): {"get", "patch"},
    ("", "pods"): {"create", "get", "list", "watch", "delete", "patch"},
    ("", "services"): {"create", "get", "list", "watch", "patch", "delete"},
    ("apps", "deployments"): {"create", "get", "list", "watch", "patch", "delete"},
    ("apps", "replicasets"): {"list", "delete"},
    ("", "secrets"): {"create", "get", "delete"},
    ("", "configmaps"): {"get"},
    ("", "events"): {"create", "patch"},
}
# kopf runs with resource scanning off and standalone (no peering): no CRDs, Namespaces or kopfpeerings.
CLUSTER = {("", "nodes"): {"get", "list", "watch"}}


def render(*sets: str, include_crds: bool = False) -> list[dict[str, Any]]:
    args = ["template", "ps", str(CHART), "--namespace", NAMESPACE]
    for s in sets:
        args += ["--set", s]
    if include_crds:
        args.append("--include-crds")
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def rules_of(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """(group, resource) → verbs; every rule names exactly one group and one resource, no wildcards."""
    out: dict[tuple[str, str], set[str]] = defaultdict(set)
    for rule in role["rules"]:
        assert len(rule["apiGroups"]) == 1 and len(rule["resources"]) == 1, rule
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"], rule
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        out[(rule["apiGroups"][0], rule["resources"][0])] |= set(rule["verbs"])
    return dict(out)


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [container] = only(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def test_helm_is_the_bed_s_helm_3() -> None:
    done = helm("version", "--short")
    assert done.stdout.startswith("v3."), done.stdout
    assert helm_binary().is_file()


@pytest.mark.parametrize("sets", [(), ("watchNamespaces={a,b}", "serviceMonitor.enabled=true",
                                      "prometheus.url=http://prometheus.monitoring:9090", "logLevel=debug")])
def test_the_chart_lints_strictly(sets: tuple[str, ...]) -> None:
    args = ["lint", "--strict", str(CHART)]
    for s in sets:
        args += ["--set", s]
    done = helm(*args)
    assert "1 chart(s) linted, 0 chart(s) failed" in done.stdout


def test_the_default_release_renders_exactly_these_objects() -> None:
    docs = render()
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == [("ClusterRole", "ps-pipeshift-cluster"), ("ClusterRole", "ps-pipeshift-workloads"),
                     ("ClusterRoleBinding", "ps-pipeshift-cluster"), ("ClusterRoleBinding", "ps-pipeshift-workloads"),
                     ("Deployment", "ps-pipeshift"), ("Service", "ps-pipeshift-metrics"),
                     ("ServiceAccount", "ps-pipeshift")]
    for d in docs:
        if d["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert d["metadata"]["namespace"] == NAMESPACE


def test_one_operator_replica_recreated_never_rolled() -> None:
    deployment = only(render(), "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "ps-pipeshift"
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = operator_container(render())
    assert container["command"] == ["pipeshift", "operator"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["image"] == "ghcr.io/pipeshift/operator:0.1.0"


@pytest.mark.parametrize("key", ["replicas", "replicaCount"])
def test_the_replica_count_is_not_a_value(key: str) -> None:
    done = helm("template", "ps", str(CHART), "--set", f"{key}=2", check=False)
    assert done.returncode != 0
    assert f"{key} is not a value of this chart: the operator runs exactly one replica" in done.stderr


def test_all_namespaces_by_default_with_cluster_wide_workload_rules() -> None:
    docs = render()
    assert "--all-namespaces" in operator_container(docs)["args"]
    assert not any(a.startswith("--namespace") for a in operator_container(docs)["args"])
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ClusterRole"}
    assert rules_of(roles["ps-pipeshift-workloads"]) == NAMESPACED
    assert rules_of(roles["ps-pipeshift-cluster"]) == CLUSTER
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]
    for binding in (d for d in docs if d["kind"] == "ClusterRoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ps-pipeshift", "namespace": NAMESPACE}]
        assert binding["roleRef"]["name"] == binding["metadata"]["name"]


def test_listed_namespaces_reach_the_operator_and_get_roles_only_there() -> None:
    docs = render("watchNamespaces={team-a,team-b}")
    args = operator_container(docs)["args"]
    assert [a for a in args if a.startswith("--namespace")] == ["--namespace=team-a", "--namespace=team-b"]
    assert "--all-namespaces" not in args
    roles = [d for d in docs if d["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert all(rules_of(r) == NAMESPACED for r in roles)
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    assert all(b["subjects"][0]["namespace"] == NAMESPACE and b["roleRef"]["kind"] == "Role" for b in bindings)
    cluster_roles = [d for d in docs if d["kind"] == "ClusterRole"]
    assert [r["metadata"]["name"] for r in cluster_roles] == ["ps-pipeshift-cluster"]
    assert rules_of(cluster_roles[0]) == CLUSTER


@pytest.mark.parametrize(("sets", "namespaces"), [((), ()),
                                                   (("watchNamespaces={team-a,team-b}",), ("team-a", "team-b"))])
def test_the_operator_command_accepts_the_rendered_flags(sets: tuple[str, ...], namespaces: tuple[str, ...]) -> None:
    """The rendered args parsed by `pipeshift operator` itself: what the chart sets is what the operator runs with."""
    container = operator_container(render(*sets, "prometheus.url=http://prom:9090", "logLevel=debug"))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = resolve(parser.parse_args(container["args"]), environ={})
    assert config.namespaces == namespaces
    assert (config.prometheus_url, config.log_level) == ("http://prom:9090", "DEBUG")
    assert (config.metrics_port, config.health_port) == (8080, 8081)


def test_prometheus_url_and_log_level_reach_the_operator() -> None:
    args = operator_container(render("prometheus.url=http://prometheus.monitoring:9090", "logLevel=debug"))["args"]
    assert "--prometheus-url=http://prometheus.monitoring:9090" in args and "--log-level=debug" in args
    default = operator_container(render())["args"]
    assert "--log-level=info" in default and not any(a.startswith("--prometheus-url") for a in default)


@pytest.mark.parametrize(("value", "message"), [
    ("logLevel=loud", 'logLevel must be one of the following: "debug", "info", "warning", "error"'),
    ("watchNamespaces={Team A}", "watchNamespaces.0: Does not match pattern"),
    ("prometheus.url=prometheus:9090", "prometheus.url: Does not match pattern"),
])
def test_bad_values_are_refused_naming_the_value(value: str, message: str) -> None:
    done = helm("template", "ps", str(CHART), "--set", value, check=False)
    assert done.returncode != 0 and message in done.stderr, done.stderr


def test_the_metrics_service_selects_the_operator_port() -> None:
    docs = render("metrics.port=9100")
    service, deployment = only(docs, "Service"), only(docs, "Deployment")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9100, "targetPort": "metrics", "protocol": "TCP"}]
    assert operator_container(docs)["ports"][0] == {"name": "metrics", "containerPort": 9100, "protocol": "TCP"}
    assert "--metrics-port=9100" in operator_container(docs)["args"]


def test_the_liveness_probe_asks_kopf_s_health_endpoint() -> None:
    container = operator_container(render("health.port=9200"))
    assert "--health-port=9200" in container["args"]
    assert {"name": "health", "containerPort": 9200, "protocol": "TCP"} in container["ports"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_the_service_monitor_only_when_enabled() -> None:
    assert not [d for d in render() if d["kind"] == "ServiceMonitor"]
    docs = render("serviceMonitor.enabled=true", "serviceMonitor.labels.release=kube-prometheus-stack")
    monitor = only(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    service = only(docs, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]


def test_the_chart_ships_the_crds_of_crds_dir() -> None:
    crds = {d["metadata"]["name"]: d for d in render(include_crds=True) if d["kind"] == "CustomResourceDefinition"}
    assert set(crds) == {"llmpipelines.pipeshift.dev", "autoscalingpolicies.pipeshift.dev"}
    for name, file in (("llmpipelines.pipeshift.dev", "llmpipelines.yaml"),
                       ("autoscalingpolicies.pipeshift.dev", "autoscalingpolicies.yaml")):
        assert crds[name] == yaml.safe_load((ROOT / "crds" / file).read_text())


def test_the_chart_version_follows_the_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2" and chart["appVersion"] == project["version"]


def notes(tmp_path: Path, *sets: str) -> str:
    """NOTES.txt as `helm install` prints it: `helm template` skips NOTES, so render a copy as a YAML string."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    lines = (CHART / "templates" / "NOTES.txt").read_text().splitlines()
    (chart / "templates" / "notes-as-yaml.yaml").write_text("notes: |\n" + "".join(f"  {ln}\n" for ln in lines))
    args = ["template", "ps", str(chart), "--namespace", NAMESPACE, "--show-only", "templates/notes-as-yaml.yaml"]
    for s in sets:
        args += ["--set", s]
    return yaml.safe_load(helm(*args).stdout)["notes"]


def test_the_notes_say_what_is_watched_and_how_to_check(tmp_path: Path) -> None:
    text = notes(tmp_path, "watchNamespaces={team-a,team-b}")
    assert "installed in namespace pipeshift-system (watching team-a, team-b)" in text
    assert "kubectl -n pipeshift-system get deployment ps-pipeshift" in text
    assert "scrapes the pipelines' /metrics directly" in text
    text = notes(tmp_path / "2", "prometheus.url=http://prom:9090", "serviceMonitor.enabled=true")
    assert "(watching every namespace)" in text and "Prometheus at http://prom:9090" in text
    assert "scraped through a ServiceMonitor" in text


# --- images (static: no Docker engine here)

def dockerfile(name: str) -> str:
    return (ROOT / "docker" / name).read_text()


def run_lines(text: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line for line in joined.splitlines() if line.startswith("RUN ")]


def test_the_operator_image_installs_no_torch() -> None:
    text = dockerfile("operator.Dockerfile")
    installs = [line for line in run_lines(text) if "pip install" in line]
    assert installs == [line for line in installs if '".[operator]"' in line] and installs
    assert "torch" not in " ".join(run_lines(text)) and "[runtime]" not in text and "[dev]" not in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = " ".join(project["dependencies"] + project["optional-dependencies"]["operator"])
    assert "torch" not in needed and "pipeshift[runtime]" not in needed


def test_the_runtime_image_pins_the_torch_of_pyproject() -> None:
    text = dockerfile("runtime.Dockerfile")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [pin] = [r for r in project["optional-dependencies"]["runtime"] if r.startswith("torch")]
    version = pin.split("==")[1]
    assert f"ARG TORCH_VERSION={version}" in text
    runs = run_lines(text)
    torch_at = next(i for i, line in enumerate(runs) if '"torch==${TORCH_VERSION}"' in line)
    extra_at = next(i for i, line in enumerate(runs) if '".[runtime]"' in line)
    assert torch_at < extra_at, "torch first, so the runtime extra finds it installed"


@pytest.mark.parametrize("name", ["operator.Dockerfile", "runtime.Dockerfile"])
def test_the_images_run_as_the_chart_s_non_root_user(name: str) -> None:
    text = dockerfile(name)
    uid = yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]["runAsUser"]
    assert f"USER {uid}:{uid}" in text
    ignore = (ROOT / "docker" / f"{name}.dockerignore").read_text().split()
    assert ignore[ignore.index("*"):][:4] == ["*", "!pyproject.toml", "!README.md", "!pipeshift/"]
