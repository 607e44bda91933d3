"""The CRDs: committed YAML equals what `python -m pipeshift.crds` generates, the schemas are structural,
and every example validates against the CRD's openAPIV3Schema (with `jsonschema`) and `validation.py`.

The API server itself is exercised in e2e/test_invalid_resources.py; here the schema is checked with a
JSON Schema validator after converting OpenAPI's `nullable` and treating every field the API server
would prune as an error (in an example file, a pruned field is a typo that would vanish silently).
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pipeshift import crds
from pipeshift.operator.validation import join, validate_pipeline, validate_policy
from pipeshift.placement.catalogue import CATALOGUE
from pipeshift.runtime.agent.config import DTYPES as AGENT_DTYPES

ROOT = Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
POLICIES = sorted((ROOT / "policies").glob("*.yaml"))


def schema_of(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def committed(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "crds" / name).read_text())


def to_jsonschema(node: Any) -> Any:
    """OpenAPI v3.0 (Kubernetes flavour) → JSON Schema draft 4, with pruning made strict."""
    if isinstance(node, list):
        return [to_jsonschema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: (v if k in ("enum", "required", "pattern") else to_jsonschema(v)) for k, v in node.items()
           if k != "nullable" and not k.startswith("x-kubernetes-")}
    if "properties" in node:
        out["properties"] = {name: to_jsonschema(sub) for name, sub in node["properties"].items()}
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


VALIDATORS = {
    "LLMPipeline": jsonschema.Draft4Validator(to_jsonschema(schema_of(committed("llmpipelines.yaml")))),
    "AutoscalingPolicy": jsonschema.Draft4Validator(to_jsonschema(schema_of(committed("autoscalingpolicies.yaml")))),
}


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """`path: message` for each schema violation, paths as kubectl shows them."""
    errors = VALIDATORS[doc["kind"]].iter_errors(doc)
    return sorted(f"{join('', *e.absolute_path) or '(root)'}: {e.message}" for e in errors)


def documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in EXAMPLES:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            yield f"{path.name}#{i}", doc


# --- generated files

def test_the_committed_files_are_the_generated_ones() -> None:
    stale = [str(rel) for rel, text in crds.generated_files(ROOT).items() if (ROOT / rel).read_text() != text]
    assert not stale, f"run `python -m pipeshift.crds` to regenerate: {stale}"


def test_the_chart_carries_the_same_crds() -> None:
    for name in ("llmpipelines.yaml", "autoscalingpolicies.yaml"):
        assert (ROOT / "helm/pipeshift/crds" / name).read_bytes() == (ROOT / "crds" / name).read_bytes()


def test_the_generator_writes_then_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(ROOT / "policies", tmp_path / "policies")
    assert crds.main(["--root", str(tmp_path), "--check"]) == 1
    assert not (tmp_path / "crds").exists(), "--check writes nothing"
    assert crds.main(["--root", str(tmp_path)]) == 0
    assert (tmp_path / "crds/llmpipelines.yaml").read_text() == (ROOT / "crds/llmpipelines.yaml").read_text()
    assert crds.main(["--root", str(tmp_path), "--check"]) == 0
    (tmp_path / "examples/autoscalingpolicy-latency-slo.yaml").write_text("edited by hand\n")
    capsys.readouterr()
    assert crds.main(["--root", str(tmp_path), "--check"]) == 1
    assert "examples/autoscalingpolicy-latency-slo.yaml: out of date" in capsys.readouterr().out


# --- the CRDs themselves

def test_names_scope_versions_and_subresources() -> None:
    for name, kind, plural, short in (("llmpipelines.yaml", "LLMPipeline", "llmpipelines", "llmp"),
                                      ("autoscalingpolicies.yaml", "AutoscalingPolicy", "autoscalingpolicies", "asp")):
        crd = committed(name)
        assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
        assert crd["metadata"]["name"] == f"{plural}.pipeshift.dev"
        spec = crd["spec"]
        assert (spec["group"], spec["scope"]) == ("pipeshift.dev", "Namespaced")
        assert (spec["names"]["kind"], spec["names"]["plural"], spec["names"]["shortNames"]) == (kind, plural, [short])
        [version] = spec["versions"]
        assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
        assert version["subresources"] == {"status": {}}


def test_llmpipeline_printer_columns() -> None:
    columns = committed("llmpipelines.yaml")["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [(c["name"].upper(), c["jsonPath"]) for c in columns] == [
        ("STAGES", ".status.stageCount"), ("LAYOUT", ".status.layoutSummary"), ("PHASE", ".status.phase"),
        ("AGE", ".metadata.creationTimestamp")]


def walk(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path (properties by name, items as [])."""
    if not isinstance(node, dict):
        return
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("name", ["llmpipelines.yaml", "autoscalingpolicies.yaml"])
def test_the_schemas_are_structural_for_kubernetes_1_20(name: str) -> None:
    """Every node typed (or int-or-string), only OpenAPI v3.0 keywords, boolean exclusive bounds, no defaults."""
    for path, node in walk(schema_of(committed(name))):
        assert set(node) <= crds.ALLOWED_KEYWORDS, f"{path}: {set(node) - crds.ALLOWED_KEYWORDS}"
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            assert node.get(bound, True) is True, f"{path}.{bound} must be a boolean in OpenAPI v3.0"


@pytest.mark.parametrize(("crd", "path"), [("autoscalingpolicies.yaml", ".spec"),
                                           ("llmpipelines.yaml", ".spec.inlinePolicy")])
def test_the_policy_body_keeps_unknown_fields_at_every_level(crd: str, path: str) -> None:
    """1.20 prunes unknown fields silently; kept, a typo reaches validation.py, which names it."""
    body = dict(walk(schema_of(committed(crd))))[path]
    objects = [(p, n) for p, n in walk(body) if n.get("type") == "object"]
    assert len(objects) > 10
    assert all(n.get("x-kubernetes-preserve-unknown-fields") is True for _, n in objects), \
        [p for p, n in objects if not n.get("x-kubernetes-preserve-unknown-fields")]
    assert "name" not in body["required"] and {"targets", "metrics"} <= set(body["required"])
    bounds = body["properties"]["targets"]["properties"]["tpot_p95_seconds"]
    assert (bounds["minimum"], bounds["exclusiveMinimum"]) == (0, True)


def test_enums_follow_the_catalogue_and_the_agent() -> None:
    spec = schema_of(committed("llmpipelines.yaml"))["properties"]["spec"]["properties"]
    assert spec["pools"]["items"]["properties"]["gpu"]["enum"] == list(CATALOGUE)
    assert tuple(spec["dtype"]["enum"]) == AGENT_DTYPES
    phases = schema_of(committed("llmpipelines.yaml"))["properties"]["status"]["properties"]["phase"]["enum"]
    assert phases == ["Pending", "Ready", "Reconfiguring", "Degraded", "Failed", "ScaledToZero"]


# --- examples

def test_the_examples_cover_both_kinds_and_every_policy() -> None:
    kinds = [doc["kind"] for _, doc in documents()]
    assert kinds.count("LLMPipeline") >= 3
    names = {doc["metadata"]["name"] for _, doc in documents() if doc["kind"] == "AutoscalingPolicy"}
    assert names == {p.stem for p in POLICIES}
    assert {"llmpipeline-pinned.yaml", "llmpipeline-autoscaled.yaml"} <= {p.name for p in EXAMPLES}


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_each_example_policy_body_is_its_policy_file(path: Path) -> None:
    example = yaml.safe_load((ROOT / "examples" / f"autoscalingpolicy-{path.stem}.yaml").read_text())
    assert example["apiVersion"] == "pipeshift.dev/v1alpha1" and example["metadata"]["name"] == path.stem
    assert example["spec"] == yaml.safe_load(path.read_text())


@pytest.mark.parametrize(("where", "doc"), list(documents()), ids=[w for w, _ in documents()])
def test_every_example_validates_against_the_schema_and_the_operator_checks(where: str, doc: dict[str, Any]) -> None:
    if doc["kind"] not in VALIDATORS:
        assert doc["kind"] == "ConfigMap", f"{where}: unexpected kind {doc['kind']}"
        return
    assert doc["apiVersion"] == "pipeshift.dev/v1alpha1"
    assert schema_errors(doc) == []
    name = doc["metadata"]["name"]
    if doc["kind"] == "AutoscalingPolicy":
        assert validate_policy(doc["spec"], name=name) == []
        return
    context = example_context(doc)
    assert validate_pipeline(doc["spec"], name=name, **context) == []


def example_context(doc: dict[str, Any]) -> dict[str, Any]:
    """What the operator would read from the cluster: the ConfigMap and the policy the pipeline names."""
    context: dict[str, Any] = {}
    ref = doc["spec"]["model"].get("configMapRef")
    if ref:
        maps = {d["metadata"]["name"]: d for _, d in documents() if d["kind"] == "ConfigMap"}
        assert ref["name"] in maps, f"no example ConfigMap {ref['name']}"
        context["model_config"] = yaml.safe_load(maps[ref["name"]]["data"][ref.get("key", "config.json")])
    if "policy" in doc["spec"]:
        context["policy"] = yaml.safe_load((ROOT / "policies" / f"{doc['spec']['policy']}.yaml").read_text())
    return context


PINNED = yaml.safe_load((ROOT / "examples/llmpipeline-pinned.yaml").read_text())
POLICY = yaml.safe_load((ROOT / "examples/autoscalingpolicy-latency-slo.yaml").read_text())


def changed(doc: dict[str, Any], path: list[str | int], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    node: Any = out
    for k in path[:-1]:
        node = node[k]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


@pytest.mark.parametrize(("doc", "message"), [
    (changed(PINNED, ["spec", "pools", 1, "gpu"], "A200"), "spec.pools[1].gpu: 'A200' is not one of"),
    (changed(PINNED, ["spec", "image"], KeyError), "spec: 'image' is a required property"),
    (changed(PINNED, ["spec", "replicas"], 2), "spec: Additional properties are not allowed ('replicas'"),
    (changed(PINNED, ["spec", "minStages"], 0), "spec.minStages: 0 is less than the minimum of 1"),
    (changed(PINNED, ["spec", "layout", "stages", 0, "layers"], [0]), "spec.layout.stages[0].layers: [0] is too short"),
    (changed(PINNED, ["spec", "dtype"], "fp8"), "spec.dtype: 'fp8' is not one of"),
    (changed(PINNED, ["spec", "pools", 0, "name"], "A100"), "spec.pools[0].name: 'A100' does not match"),
    (changed(PINNED, ["spec", "model", "path"], "tiny"), "spec.model.path: 'tiny' does not match '^/'"),
    (changed(PINNED, ["spec", "slo", "ttftP95Seconds"], 0), "spec.slo.ttftP95Seconds: 0 is less than or equal to"),
    (changed(PINNED, ["spec", "resources", "limits", "memory"], 1.5),
     "spec.resources.limits.memory: 1.5 is not of type 'integer', 'string'"),
    (changed(PINNED, ["metadata", "name"], "Tiny"), "metadata.name: 'Tiny' does not match"),
    (changed(POLICY, ["spec", "mode"], "fastest"), "spec.mode: 'fastest' is not one of ['latency', 'cost']"),
    (changed(POLICY, ["spec", "targets", "tpot_p95_seconds"], -1), "spec.targets.tpot_p95_seconds: -1 is less than"),
    (changed(POLICY, ["spec", "metrics"], KeyError), "spec: 'metrics' is a required property"),
    (changed(POLICY, ["spec", "stages", "max"], None), None),  # nullable in the policy model
])
def test_invalid_objects_are_rejected_by_the_schema_naming_the_field(doc: dict[str, Any], message: str | None) -> None:
    errors = schema_errors(doc)
    if message is None:
        assert errors == []
    else:
        assert any(e.startswith(message) for e in errors), errors


def test_typos_in_a_policy_pass_the_schema_and_are_caught_by_validation() -> None:
    """What 1.20 cannot do: the typo survives admission (kept, not pruned) and the operator names it."""
    doc = changed(POLICY, ["spec", "scale_up", "stabilisation_seconds"], 30)
    assert schema_errors(doc) == []
    assert [e.path for e in validate_policy(doc["spec"], name="latency-slo")] == ["spec.scale_up.stabilisation_seconds"]


def test_a_status_as_the_operator_writes_it_fits_the_schema() -> None:
    status = {
        "phase": "Ready", "observedGeneration": 2, "stageCount": 2, "layoutSummary": "a100:0-2,l40s:2-4",
        "conditions": [{"type": "Ready", "status": "True", "reason": "AllStagesReady", "message": "2 stages",
                        "lastTransitionTime": "2024-05-01T10:00:00Z", "observedGeneration": 2}],
        "layout": {"stages": [{"stageId": 0, "pool": "a100", "layers": [0, 2], "pod": "tiny-pinned-stage-0",
                               "podIP": "127.0.1.1"}]},
        "frontend": {"pod": "tiny-pinned-frontend-abc", "podIP": "127.0.1.3", "url": "http://127.0.1.3:8000"},
        "reconfiguration": {"id": "r1", "phase": "precopy", "started": "2024-05-01T10:00:00Z",
                            "from": {"stages": []}, "to": {"stages": []}, "round": 2},
        "lastReconfiguration": {"pauseMs": 12.5, "durationMs": 900, "kvBytesMoved": 4096, "outcome": "committed"},
    }
    assert schema_errors({**PINNED, "status": status}) == []
    wrong = {**status, "phase": "Running", "stageCount": "2"}
    assert schema_errors({**PINNED, "status": wrong}) == [
        "status.phase: 'Running' is not one of ['Pending', 'Ready', 'Reconfiguring', 'Degraded', 'Failed', "
        "'ScaledToZero']",
        "status.stageCount: '2' is not of type 'integer'"]
