"""Scenario 2 of issue 7: invalid LLMPipelines and AutoscalingPolicies are refused, naming the field.

Two layers, both real: the API server (Kubernetes 1.20) refuses what the CRDs' structural schemas can
express (types, enums, bounds, patterns, required fields), with its own `spec.x: ...` messages; what 1.20
cannot express (no CEL: cross-field rules; typos inside the policy body, which the schema keeps instead
of pruning) is accepted and then marked invalid by the operator: phase Failed, a Ready=False
(InvalidSpec) or Valid=False (InvalidPolicy) condition and a Warning Event, each naming the field path.

The operator runs as a local process with the token of the ServiceAccount that `helm install` of the
chart created, so it has exactly the chart's RBAC. The chart's own operator Deployment is pinned to a
node label no node has: its pod stays Pending instead of the process kubelet starting a second operator.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.bed import Cluster
from e2e.bed.paths import venv_bin
from e2e.bed.procs import Managed, wait_until
from e2e.bed.rest import ApiError

ROOT = Path(__file__).resolve().parent.parent
PINNED: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "llmpipeline-pinned.yaml").read_text())
POLICY: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "autoscalingpolicy-latency-slo.yaml").read_text())
INLINE = {"targets": {"ttft_p95_seconds": 1.0, "tpot_p95_seconds": 0.05, "max_queue": 4},
          "metrics": {"scrape": {"url": "http://tiny-frontend:8000/metrics"}}}


def edited(doc: dict[str, Any], name: str, *changes: tuple[list[str | int], Any]) -> dict[str, Any]:
    """A copy named `name` with each (path, value) set; the value `KeyError` deletes the key."""
    out = copy.deepcopy(doc)
    out["metadata"] = {"name": name}
    for path, value in changes:
        node: Any = out
        for key in path[:-1]:
            node = node[key]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return out


@pytest.fixture(scope="module")
def crds(cluster: Cluster) -> None:
    """The CRDs of crds/ (the chart's crds/ holds the same files), applied and Established."""
    cluster.kubectl("apply", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    "crd/llmpipelines.pipeshift.dev", "crd/autoscalingpolicies.pipeshift.dev")


@pytest.fixture(scope="module")
def schema_ns(cluster: Cluster, crds: None) -> Iterator[str]:
    """A namespace for objects the API server should refuse (nothing in it needs pods)."""
    name = f"e2e-schema-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def apply(cluster: Cluster, namespace: str, doc: dict[str, Any], *, validate: bool = False) -> Any:
    """`kubectl apply`; `validate=False` leaves judging to the API server (no client-side OpenAPI check)."""
    return cluster.kubectl("apply", "-n", namespace, f"--validate={str(validate).lower()}", "-f", "-",
                           input=json.dumps(doc), check=False)


# --- refused by the API server's schema (1.20 names list items without their index: `spec.pools.gpu`)

SCHEMA_CASES = [
    ("gpu", edited(PINNED, "bad-gpu", (["spec", "pools", 1, "gpu"], "A200")),
     ['spec.pools.gpu: Unsupported value: "A200"', '"a100-80gb"']),
    ("image", edited(PINNED, "bad-image", (["spec", "image"], KeyError)), ["spec.image: Required value"]),
    ("min-stages", edited(PINNED, "bad-min", (["spec", "minStages"], 0)),
     ["spec.minStages: Invalid value: 0", "greater than or equal to 1"]),
    ("pool-name", edited(PINNED, "bad-pool-name", (["spec", "pools", 0, "name"], "A100")),
     ['spec.pools.name: Invalid value: "A100"', "should match"]),
    ("layers", edited(PINNED, "bad-layers", (["spec", "layout", "stages", 0, "layers"], [0])),
     ["spec.layout.stages.layers: Invalid value: 1", "should have at least 2 items"]),
    ("dtype", edited(PINNED, "bad-dtype", (["spec", "dtype"], "fp8")), ['spec.dtype: Unsupported value: "fp8"']),
    ("model-path", edited(PINNED, "bad-path", (["spec", "model", "path"], "models/tiny")),
     ['spec.model.path: Invalid value: "models/tiny"']),
    ("slo", edited(PINNED, "bad-slo", (["spec", "slo", "ttftP95Seconds"], 0)),
     ["spec.slo.ttftP95Seconds: Invalid value: 0", "greater than 0"]),
    ("quantity", edited(PINNED, "bad-quantity", (["spec", "resources", "limits", "memory"], True)),
     ["spec.resources.limits.memory"]),
    ("name", edited(PINNED, "a" * 55), ["metadata.name: Invalid value", "should be at most 54 chars long"]),
    ("policy-mode", edited(POLICY, "bad-mode", (["spec", "mode"], "fastest")),
     ['spec.mode: Unsupported value: "fastest"', '"latency", "cost"']),
    ("policy-bound", edited(POLICY, "bad-bound", (["spec", "targets", "tpot_p95_seconds"], -1)),
     ["spec.targets.tpot_p95_seconds: Invalid value: -1", "greater than 0"]),
    ("policy-required", edited(POLICY, "bad-required", (["spec", "metrics"], KeyError)),
     ["spec.metrics: Required value"]),
    ("policy-url", edited(POLICY, "bad-url", (["spec", "metrics", "prometheus", "url"], "prometheus:9090")),
     ['spec.metrics.prometheus.url: Invalid value: "prometheus:9090"']),
]


@pytest.mark.parametrize(("doc", "expected"), [(d, e) for _, d, e in SCHEMA_CASES], ids=[c[0] for c in SCHEMA_CASES])
def test_the_api_server_refuses_what_the_schema_expresses(cluster: Cluster, schema_ns: str, doc: dict[str, Any],
                                                          expected: list[str]) -> None:
    done = apply(cluster, schema_ns, doc)
    assert done.returncode != 0, f"accepted: {doc['metadata']['name']}\n{done.stdout}"
    assert f'The {doc["kind"]} "{doc["metadata"]["name"]}" is invalid' in done.stderr, done.stderr
    for text in expected:
        assert text in done.stderr, done.stderr
    found = cluster.kubectl("get", "-n", schema_ns, doc["kind"].lower(), doc["metadata"]["name"], check=False)
    assert found.returncode != 0, "a refused object must not exist"


def test_the_examples_are_accepted_and_the_printer_columns_show(cluster: Cluster, schema_ns: str) -> None:
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        done = cluster.kubectl("apply", "-n", schema_ns, "--dry-run=server", "-f", str(path), check=False)
        assert done.returncode == 0, f"{path.name}: {done.stderr}"
    # Invalid for the operator (a gap), so no operator anywhere in the bed would start pods for it.
    gap = edited(PINNED, "columns", (["spec", "layout", "stages", 1, "layers"], [3, 4]))
    assert apply(cluster, schema_ns, gap).returncode == 0
    header = cluster.kubectl("get", "llmp", "-n", schema_ns).stdout.splitlines()[0].split()
    assert header == ["NAME", "STAGES", "LAYOUT", "PHASE", "AGE"]
    assert cluster.kubectl("get", "asp", "-n", schema_ns).returncode == 0


def test_unknown_fields_kubectl_names_them_and_the_server_prunes_them(cluster: Cluster, schema_ns: str) -> None:
    """What 1.20 does with a misspelt key outside the policy body: kubectl's client-side validation names it;
    without that validation the API server drops it silently (why validation.py flags unknown keys in files)."""
    doc = edited(PINNED, "typo", (["spec", "layout", "stages", 1, "layers"], [3, 4]), (["spec", "minStage"], 1))
    checked = apply(cluster, schema_ns, doc, validate=True)
    assert checked.returncode != 0 and 'unknown field "minStage"' in checked.stderr, checked.stderr
    assert apply(cluster, schema_ns, doc).returncode == 0
    stored = json.loads(cluster.kubectl("get", "llmp", "typo", "-n", schema_ns, "-o", "json").stdout)
    assert "minStage" not in stored["spec"]


def test_a_typo_inside_a_policy_is_kept_for_the_operator_to_name(cluster: Cluster, schema_ns: str) -> None:
    doc = edited(POLICY, "kept-typo", (["spec", "scale_up", "stabilisation_seconds"], 30))
    assert apply(cluster, schema_ns, doc, validate=True).returncode == 0
    stored = json.loads(cluster.kubectl("get", "asp", "kept-typo", "-n", schema_ns, "-o", "json").stdout)
    assert stored["spec"]["scale_up"]["stabilisation_seconds"] == 30


# --- accepted by the schema, marked invalid by the operator

class Operator:
    """`pipeshift operator` for one namespace, as a local process holding the chart's ServiceAccount token."""

    def __init__(self, cluster: Cluster, namespace: str, proc: Managed, kubeconfig: Path) -> None:
        self.cluster, self.namespace, self.proc, self.kubeconfig = cluster, namespace, proc, kubeconfig

    def get(self, plural: str, name: str) -> dict[str, Any]:
        return self.cluster.rest.get(f"/apis/pipeshift.dev/v1alpha1/namespaces/{self.namespace}/{plural}/{name}")

    def events_for(self, name: str) -> list[dict[str, Any]]:
        items = self.cluster.rest.get(f"/api/v1/namespaces/{self.namespace}/events")["items"]
        return [e for e in items if e.get("involvedObject", {}).get("name") == name]

    def wait(self, check: Callable[[], bool], what: str) -> None:
        wait_until(check, 60, what, watch=[self.proc], interval=0.5)


@pytest.fixture(scope="module")
def operator(cluster: Cluster, crds: None, helm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    work = tmp_path_factory.mktemp("invalid-operator")
    namespace = f"e2e-invalid-{uuid.uuid4().hex[:6]}"
    release = f"inv-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", namespace)
    values = work / "values.yaml"
    values.write_text(yaml.safe_dump({"watchNamespaces": [namespace],
                                      "nodeSelector": {"pipeshift.dev/no-such-node": "operator-runs-locally"}}))
    proc = None
    try:
        install = cluster_helm(cluster, helm, "install", release, str(ROOT / "helm" / "pipeshift"),
                               "--namespace", namespace, "-f", str(values), "--wait=false")
        assert "watching " + namespace in install, install
        account = f"{release}-pipeshift"

        def token() -> str:
            sa = cluster.rest.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}")
            secret = cluster.rest.get(f"/api/v1/namespaces/{namespace}/secrets/{sa['secrets'][0]['name']}")
            return base64.b64decode(secret["data"]["token"]).decode()

        wait_until(lambda: bool(token()), 60, f"a token for ServiceAccount {account}")
        kubeconfig = cluster.token_kubeconfig(token(), work / "operator.kubeconfig", namespace)
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
        env["KUBECONFIG"] = str(kubeconfig)
        proc = Managed("operator", [str(venv_bin() / "pipeshift"), "operator", "--namespace", namespace,
                                    "--metrics-port", "off", "--log-level", "debug", "--recheck-seconds", "5"],
                       work / "operator.log", env=env)
        wait_until(lambda: "watching namespaces" in proc.log.read_text(), 60, "the operator to start", watch=[proc])
        yield Operator(cluster, namespace, proc, kubeconfig)
    finally:
        if proc is not None:
            proc.stop()
        cluster_helm(cluster, helm, "uninstall", release, "--namespace", namespace, check=False)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def cluster_helm(cluster: Cluster, helm: Path, *args: str, check: bool = True) -> str:
    """Helm against the bed (its kubeconfig, helm's state in the bed's work dir)."""
    done = subprocess.run([str(helm), *args], capture_output=True, text=True, env=cluster.env, timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed: {done.stdout}{done.stderr}")
    return done.stdout + done.stderr


OPERATOR_CASES = [
    ("gap", [(["spec", "layout", "stages", 1, "layers"], [3, 4])],
     "spec.layout.stages[1].layers: starts at layer 3, expected 2"),
    ("pool", [(["spec", "layout", "stages", 0, "pool"], "h100")],
     "spec.layout.stages[0].pool: 'h100' is not a pool of spec.pools"),
    ("short", [(["spec", "layout", "stages", 1, "layers"], [2, 3])],
     "the layout ends at layer 3; the model has 4"),
    ("both-policies", [(["spec", "policy"], "latency-slo"), (["spec", "inlinePolicy"], INLINE)],
     "spec.inlinePolicy: set spec.policy or spec.inlinePolicy, not both"),
    ("inline-typo", [(["spec", "inlinePolicy"], {**INLINE, "scale_up": {"stabilisation_seconds": 5}})],
     "spec.inlinePolicy.scale_up.stabilisation_seconds: unknown key 'stabilisation_seconds'"),
    ("bounds", [(["spec", "minStages"], 3), (["spec", "maxStages"], 2)],
     "spec.maxStages: 2 is less than spec.minStages (3)"),
]


@pytest.mark.parametrize(("changes", "message"), [(c, m) for _, c, m in OPERATOR_CASES],
                         ids=[c[0] for c in OPERATOR_CASES])
def test_the_operator_marks_what_the_schema_cannot_catch(cluster: Cluster, operator: Operator,
                                                         changes: list[tuple[list[str | int], Any]],
                                                         message: str) -> None:
    name = f"invalid-{uuid.uuid4().hex[:6]}"
    doc = edited(PINNED, name, *changes)
    done = apply(cluster, operator.namespace, doc, validate=True)
    assert done.returncode == 0, f"the schema should accept this one: {done.stderr}"

    def marked() -> bool:
        status = operator.get("llmpipelines", name).get("status") or {}
        ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
        return status.get("phase") == "Failed" and ready.get("reason") == "InvalidSpec" and \
            message in ready.get("message", "")

    operator.wait(marked, f"{name} marked invalid naming {message!r}")
    operator.wait(lambda: any(e["type"] == "Warning" and message in e["message"] for e in operator.events_for(name)),
                  f"a Warning Event on {name} naming the field")
    pods = cluster.rest.get(f"/api/v1/namespaces/{operator.namespace}/pods",
                            labelSelector=f"pipeshift.dev/pipeline={name}")["items"]
    assert pods == [], "nothing is started for an invalid spec"


def test_the_operator_marks_a_policy_typo_and_accepts_a_valid_policy(cluster: Cluster, operator: Operator) -> None:
    typo = edited(POLICY, "typo-policy", (["spec", "scale_up", "stabilisation_seconds"], 30))
    typo["spec"]["name"] = "typo-policy"
    valid = edited(POLICY, "latency-slo")
    for doc in (typo, valid):
        assert apply(cluster, operator.namespace, doc, validate=True).returncode == 0
    message = "spec.scale_up.stabilisation_seconds: unknown key 'stabilisation_seconds'"

    def condition(name: str) -> dict[str, Any]:
        try:
            status = operator.get("autoscalingpolicies", name).get("status") or {}
        except ApiError:
            return {}
        return next((c for c in status.get("conditions", []) if c["type"] == "Valid"), {})

    operator.wait(lambda: condition("typo-policy").get("status") == "False"
                  and message in condition("typo-policy").get("message", ""), "typo-policy marked Valid=False")
    assert condition("typo-policy")["reason"] == "InvalidPolicy"
    operator.wait(lambda: any(e["reason"] == "InvalidPolicy" and message in e["message"]
                              for e in operator.events_for("typo-policy")), "an InvalidPolicy Event")
    operator.wait(lambda: condition("latency-slo").get("status") == "True", "latency-slo marked Valid=True")
    valid_column = cluster.kubectl("get", "asp", "-n", operator.namespace).stdout
    assert any(line.split()[0] == "typo-policy" and "False" in line.split() for line in valid_column.splitlines())


@pytest.mark.parametrize(("verb", "resource", "where", "allowed"), [
    ("create", "pods", "watched", True),
    ("delete", "pods", "watched", True),
    ("patch", "llmpipelines.pipeshift.dev/status", "watched", True),
    ("create", "events", "watched", True),
    ("get", "configmaps", "watched", True),
    ("list", "secrets", "watched", False),
    ("delete", "llmpipelines.pipeshift.dev", "watched", False),
    ("patch", "autoscalingpolicies.pipeshift.dev", "watched", False),
    ("create", "pods", "default", False),
    ("list", "llmpipelines.pipeshift.dev", "default", False),
    ("list", "nodes", "cluster", True),
    ("delete", "nodes", "cluster", False),
    ("list", "customresourcedefinitions.apiextensions.k8s.io", "cluster", False),
])
def test_the_chart_grants_the_operator_only_what_it_uses(cluster: Cluster, operator: Operator, verb: str,
                                                       resource: str, where: str, allowed: bool) -> None:
    """The chart's RBAC as the API server applies it, asked as the operator's ServiceAccount."""
    scope = {"watched": ["-n", operator.namespace], "default": ["-n", "default"], "cluster": []}[where]
    done = cluster.kubectl(f"--kubeconfig={operator.kubeconfig}", "auth", "can-i", verb, resource, *scope,
                           check=False)
    assert done.stdout.strip() == ("yes" if allowed else "no"), done.stdout + done.stderr
