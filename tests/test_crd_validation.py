"""`pipeshift.operator.validation`: every invalid LLMPipeline or policy is reported at its field path.

These are the checks the CRD schema cannot make on Kubernetes 1.20 (cross-field rules, typos inside the
policy body, which the API server keeps), plus the schema's own checks repeated for bodies that never
went through an API server. Each case asserts the exact path and a message that says what is valid.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeshift.operator.validation import FieldError, check_policy, describe, join, validate_pipeline, validate_policy

ROOT = Path(__file__).parent.parent
PINNED = yaml.safe_load((ROOT / "examples" / "llmpipeline-pinned.yaml").read_text())
POLICY = yaml.safe_load((ROOT / "policies" / "latency-slo.yaml").read_text())
INLINE = {"targets": {"ttft_p95_seconds": 1.0, "tpot_p95_seconds": 0.05, "max_queue": 4},
          "metrics": {"scrape": {"url": "http://tiny-frontend:8000/metrics"}}}


def spec(change: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
    """The pinned example's spec (valid), changed in place by `change`."""
    body = copy.deepcopy(PINNED["spec"])
    if change is not None:
        change(body)
    return body


def paths(errors: list[FieldError]) -> list[str]:
    return [e.path for e in errors]


def test_the_pinned_example_is_valid() -> None:
    assert validate_pipeline(spec(), name=PINNED["metadata"]["name"]) == []


def _set(*keys: str | int, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        node: Any = body
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return change


def _drop(*keys: str | int) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        node: Any = body
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]
    return change


def _both(*changes: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        for c in changes:
            c(body)
    return change


INVALID: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    # --- pools
    ("gpu not in catalogue", _set("pools", 1, "gpu", value="A200"), "spec.pools[1].gpu",
     "'A200' is not in the GPU catalogue; use one of a100-40gb, a100-80gb"),
    ("gpu in the wrong case", _set("pools", 0, "gpu", value="A100-80GB"), "spec.pools[0].gpu",
     "did you mean 'a100-80gb'?"),
    ("duplicate pool", _set("pools", 1, "name", value="a100"), "spec.pools[1].name",
     "'a100' is already the name of spec.pools[0]"),
    ("pool name not a DNS label", _set("pools", 0, "name", value="A100"), "spec.pools[0].name",
     "'A100' does not match"),
    ("negative price", _set("pools", 0, "costPerHour", value=-1), "spec.pools[0].costPerHour",
     "must be at least 0 (got -1)"),
    ("node selector value not a string", _set("pools", 0, "nodeSelector", value={"pool": 1}),
     "spec.pools[0].nodeSelector.pool", "must be a string, got int"),
    ("pools not a list", _set("pools", value={"name": "a100"}), "spec.pools", "must be an array, got dict"),
    ("no pools", _set("pools", value=[]), "spec.pools", "needs at least 1 item(s), has 0"),
    # --- layout
    ("gap", _set("layout", "stages", 1, "layers", value=[3, 4]), "spec.layout.stages[1].layers",
     "starts at layer 3, expected 2 (a gap"),
    ("overlap", _set("layout", "stages", 1, "layers", value=[1, 4]), "spec.layout.stages[1].layers",
     "starts at layer 1, expected 2 (an overlap"),
    ("first stage not at 0", _set("layout", "stages", 0, "layers", value=[1, 2]), "spec.layout.stages[0].layers",
     "starts at layer 1, expected 0"),
    ("empty range", _set("layout", "stages", 1, "layers", value=[2, 2]), "spec.layout.stages[1].layers",
     "[2, 2) is empty"),
    ("short of the model", _set("layout", "stages", 1, "layers", value=[2, 3]), "spec.layout.stages[1].layers",
     "the layout ends at layer 3; the model has 4"),
    ("past the model", _set("layout", "stages", 1, "layers", value=[2, 6]), "spec.layout.stages[1].layers",
     "the layout ends at layer 6; the model has 4"),
    ("unknown pool", _set("layout", "stages", 0, "pool", value="h100"), "spec.layout.stages[0].pool",
     "'h100' is not a pool of spec.pools; use one of a100, l40s"),
    ("three layer bounds", _set("layout", "stages", 0, "layers", value=[0, 1, 2]), "spec.layout.stages[0].layers",
     "takes at most 2 item(s), has 3"),
    ("layer not an integer", _set("layout", "stages", 0, "layers", value=[0, "2"]),
     "spec.layout.stages[0].layers[1]", "must be an integer, got str"),
    ("stage ids repeated", _both(_set("layout", "stages", 0, "stageId", value=3),
                                 _set("layout", "stages", 1, "stageId", value=3)),
     "spec.layout", "stage id 3 is used twice"),
    ("more stages than maxStages", _set("maxStages", value=1), "spec.layout.stages", "2 stages; spec.maxStages is 1"),
    ("fewer stages than minStages", _both(_set("minStages", value=3), _set("maxStages", value=4)),
     "spec.layout.stages", "2 stage(s); spec.minStages is 3"),
    ("layout without stages", _set("layout", value={}), "spec.layout.stages", "required but missing"),
    # --- bounds
    ("min above max", _both(_drop("layout"), _set("policy", value="latency-slo"), _set("minStages", value=3),
                            _set("maxStages", value=2)), "spec.maxStages", "2 is less than spec.minStages (3)"),
    ("zero stages", _set("minStages", value=0), "spec.minStages", "must be at least 1 (got 0)"),
    # --- policy choice and inline policy
    ("policy and inline policy", _both(_set("policy", value="latency-slo"), _set("inlinePolicy", value=INLINE)),
     "spec.inlinePolicy", "set spec.policy or spec.inlinePolicy, not both"),
    ("neither layout nor policy", _drop("layout"), "spec.policy", "required unless spec.layout pins the layout"),
    ("scale to zero without a policy", _set("scaleToZero", value=True), "spec.scaleToZero",
     "needs spec.policy or spec.inlinePolicy"),
    ("typo inside the inline policy",
     _set("inlinePolicy", value={**INLINE, "scale_up": {"stabilisation_seconds": 5}}),
     "spec.inlinePolicy.scale_up.stabilisation_seconds",
     "unknown key 'stabilisation_seconds'; valid keys here: stabilization_seconds, cooldown_seconds"),
    ("inline policy allows an undefined pool", _set("inlinePolicy", value={**INLINE, "pools": [{"name": "h100"}]}),
     "spec.inlinePolicy.pools[0].name", "'h100' is not a pool of spec.pools; use one of a100, l40s"),
    ("inline policy pins to an undefined pool",
     _set("inlinePolicy", value={**INLINE, "pin": {"stages": [{"pool": "l4", "layers": [0, 4]}]}}),
     "spec.inlinePolicy.pin.stages[0].pool", "'l4' is not a pool of spec.pools"),
    ("inline policy with two metric sources",
     _set("inlinePolicy", value={**INLINE, "metrics": {"scrape": {"url": "http://a/metrics"},
                                                       "prometheus": {"url": "http://p:9090"}}}),
     "spec.inlinePolicy.metrics", "set exactly one metric source"),
    ("inline policy with a bad enum", _set("inlinePolicy", value={**INLINE, "mode": "fastest"}),
     "spec.inlinePolicy.mode", "Input should be 'latency' or 'cost' (got 'fastest')"),
    ("inline policy missing targets", _set("inlinePolicy", value={"metrics": INLINE["metrics"]}),
     "spec.inlinePolicy.targets", "required but missing"),
    ("inline policy named differently", _set("inlinePolicy", value={**INLINE, "name": "other"}),
     "spec.inlinePolicy.name", "'other' differs from the resource's name 'tiny-pinned'"),
    ("inline policy not an object", _set("inlinePolicy", value=["latency"]), "spec.inlinePolicy",
     "must be an object, got list"),
    ("policy name not a DNS name", _set("policy", value="Latency SLO"), "spec.policy", "does not match"),
    # --- model
    ("config and configMapRef", _set("model", "configMapRef", value={"name": "tiny-config"}),
     "spec.model.configMapRef", "set spec.model.config or spec.model.configMapRef, not both"),
    ("config without hidden_size", _drop("model", "config", "hidden_size"), "spec.model.config",
     "hidden_size is missing; expected a positive integer"),
    ("config with zero layers", _set("model", "config", "num_hidden_layers", value=0), "spec.model.config",
     "num_hidden_layers is 0; expected a positive integer"),
    ("path outside the mount", _set("model", "path", value="/data/tiny"), "spec.model.path",
     "'/data/tiny' is outside spec.model.mountPath '/models'"),
    ("path outside the default mount", _both(_drop("model", "mountPath"), _set("model", "path", value="/srv/tiny")),
     "spec.model.path", "is outside spec.model.mountPath '/models'"),
    ("relative path", _set("model", "path", value="models/tiny"), "spec.model.path", "does not match ^/"),
    ("two volume sources", _set("model", "volume", "emptyDir", value={}), "spec.model.volume",
     "needs exactly one volume source"),
    ("misspelt volume source", _set("model", "volume", value={"hostpath": {"path": "/models"}}),
     "spec.model.volume.hostpath", "'hostpath' is not a volume source"),
    ("volume with a name", _set("model", "volume", "name", value="weights"), "spec.model.volume.name",
     "the operator names the volume"),
    ("mountPath without a volume", _drop("model", "volume"), "spec.model.mountPath",
     "has no effect without spec.model.volume"),
    ("configMapRef without a name", _both(_drop("model", "config"), _set("model", "configMapRef", value={})),
     "spec.model.configMapRef.name", "required but missing"),
    ("no model path", _drop("model", "path"), "spec.model.path", "required but missing"),
    # --- the rest of the spec
    ("gpu count in resources", _set("resources", "limits", "nvidia.com/gpu", value=2),
     "spec.resources.limits['nvidia.com/gpu']", "a stage uses one GPU"),
    ("resource quantity not a quantity", _set("resources", "requests", "cpu", value=1.5),
     "spec.resources.requests.cpu", "must be an integer or string, got float"),
    ("unknown dtype", _set("dtype", value="fp8"), "spec.dtype",
     "'fp8' is not one of float32, float64, bfloat16, float16"),
    ("unknown spec key", _set("replicas", value=2), "spec.replicas", "unknown key 'replicas'; valid keys here: model"),
    ("misspelt nested key", _set("slo", "ttftP95", value=1), "spec.slo.ttftP95",
     "unknown key 'ttftP95'; valid keys here: ttftP95Seconds, tpotP95Seconds"),
    ("zero SLO", _set("slo", "tpotP95Seconds", value=0), "spec.slo.tpotP95Seconds", "must be greater than 0 (got 0)"),
    ("no image", _drop("image"), "spec.image", "required but missing"),
    ("empty image", _set("image", value=""), "spec.image", "must not be empty"),
    ("scaleToZero not a boolean", _set("scaleToZero", value="yes"), "spec.scaleToZero", "must be a boolean, got str"),
]


@pytest.mark.parametrize(("case", "change", "path", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_an_invalid_spec_is_reported_at_its_field(case: str, change: Callable[[dict[str, Any]], None],
                                                  path: str, message: str) -> None:
    errors = validate_pipeline(spec(change), name="tiny-pinned")
    matching = [e for e in errors if e.path == path]
    assert matching, f"{case}: no error at {path}; got {[str(e) for e in errors]}"
    assert any(message in e.message for e in matching), f"{case}: {[str(e) for e in matching]}"


def test_every_problem_is_reported_at_once() -> None:
    body = spec(_both(_set("pools", 1, "gpu", value="A200"), _set("dtype", value="fp8"),
                      _set("layout", "stages", 1, "layers", value=[3, 4])))
    assert sorted(paths(validate_pipeline(body))) == ["spec.dtype", "spec.layout.stages[1].layers",
                                                      "spec.pools[1].gpu"]


@pytest.mark.parametrize(("name", "message"), [
    ("Tiny", "must be lower-case letters"),
    ("9tiny", "starting with a letter"),
    ("t" * 55, "is longer than 54 characters"),
])
def test_the_pipeline_name_must_fit_the_names_derived_from_it(name: str, message: str) -> None:
    errors = validate_pipeline(spec(), name=name)
    assert paths(errors) == ["metadata.name"] and message in errors[0].message


def test_an_inline_policy_needs_no_name_even_without_the_pipeline_s() -> None:
    body = spec(_set("inlinePolicy", value=INLINE))
    assert validate_pipeline(body) == [] and validate_pipeline(body, name="tiny-pinned") == []
    named = spec(_set("inlinePolicy", value={**INLINE, "name": "mine"}))
    assert validate_pipeline(named) == []
    assert paths(validate_pipeline(named, name="tiny-pinned")) == ["spec.inlinePolicy.name"]


def test_a_spec_that_is_not_an_object_is_named() -> None:
    assert [str(e) for e in validate_pipeline(["model"])] == ["spec: must be an object, got list"]


def test_the_layer_count_can_come_from_a_configmap() -> None:
    """With configMapRef the caller passes the config.json it read; the layout is checked against it."""
    body = spec(_both(_drop("model", "config"), _set("model", "configMapRef", value={"name": "tiny-config"})))
    assert validate_pipeline(body) == []
    config = {**PINNED["spec"]["model"]["config"], "num_hidden_layers": 6}
    errors = validate_pipeline(body, model_config=config)
    assert [str(e) for e in errors] == [
        "spec.layout.stages[1].layers: the layout ends at layer 4; the model has 6 "
        "(num_hidden_layers of its config.json)"]
    broken = validate_pipeline(body, model_config={"num_hidden_layers": 4})
    assert paths(broken) == ["spec.model.configMapRef"] and "num_attention_heads is missing" in broken[0].message


def test_a_referenced_policy_must_only_allow_pools_of_the_pipeline() -> None:
    """latency-slo allows h100 and l40s; the pinned example defines a100 and l40s."""
    body = spec(_set("policy", value="latency-slo"))
    assert validate_pipeline(body) == [], "without the policy's body only the name is checked"
    errors = validate_pipeline(body, policy=POLICY)
    assert [str(e) for e in errors] == [
        "spec.policy: AutoscalingPolicy 'latency-slo': pools[0].name: 'h100' is not a pool of spec.pools; "
        "use one of a100, l40s"]
    broken = validate_pipeline(body, policy={**POLICY, "mode": "fast"})
    assert paths(broken) == ["spec.policy"]
    assert "AutoscalingPolicy 'latency-slo' is invalid: spec.mode: Input should be 'latency' or 'cost'" in \
        broken[0].message


@pytest.mark.parametrize("path", sorted((ROOT / "policies").glob("*.yaml")), ids=lambda p: p.name)
def test_every_policy_file_is_a_valid_policy_body(path: Path) -> None:
    body = yaml.safe_load(path.read_text())
    assert validate_policy(body, name=path.stem) == []
    model, errors = check_policy({k: v for k, v in body.items() if k != "name"}, name=path.stem)
    assert errors == [] and model is not None and model.name == path.stem


@pytest.mark.parametrize(("change", "path", "message"), [
    ({"scale_down": {"below_fraction": 1.5}}, "spec.scale_down.below_fraction", "Input should be less than 1"),
    ({"pools": [{"name": "l4", "price": 1}]}, "spec.pools[0].price",
     "unknown key 'price'; valid keys here: name, cost_per_hour"),
    ({"stages": {"min": 4, "max": 2}}, "spec.stages", "max (2) must be at least min (4)"),
    ({"metrics": {"scrape": {"url": "frontend:8000"}}}, "spec.metrics.scrape.url", "String should match pattern"),
    ({"targets": {"ttft_p95_seconds": 1}}, "spec.targets.tpot_p95_seconds", "required but missing"),
    ({"pin": {"stages": [{"pool": "a", "layers": [0, 4]}, {"pool": "a", "layers": [5, 8]}]}},
     "spec.pin", "stage 1 starts at layer 5, expected 4"),
    ({"name": "cost-saver"}, "spec.name", "'cost-saver' differs from the resource's name 'latency-slo'"),
])
def test_an_invalid_policy_is_reported_at_its_field(change: dict[str, Any], path: str, message: str) -> None:
    errors = validate_policy({**POLICY, **change}, name="latency-slo")
    assert any(e.path == path and message in e.message for e in errors), [str(e) for e in errors]


def test_a_policy_reports_every_problem_and_unknown_keys_first() -> None:
    errors = validate_policy({**POLICY, "mode": "fast", "surprise": 1}, name="latency-slo")
    assert paths(errors) == ["spec.surprise", "spec.mode"]


def test_a_policy_body_needs_a_name_from_somewhere() -> None:
    body = {k: v for k, v in POLICY.items() if k != "name"}
    assert [str(e) for e in validate_policy(body)] == ["spec.name: required but missing"]
    assert validate_policy(body, name="latency-slo") == []
    assert [str(e) for e in validate_policy("mode: latency")] == ["spec: must be an object (a policy body), got str"]


def test_paths_and_summaries_read_like_kubectl() -> None:
    assert join("spec", "pools", 1, "gpu") == "spec.pools[1].gpu"
    assert join("spec.resources", "limits", "nvidia.com/gpu") == "spec.resources.limits['nvidia.com/gpu']"
    assert join("", "pools", 0) == "pools[0]"
    errors = [FieldError(f"spec.f{i}", "bad") for i in range(7)]
    assert describe(errors, limit=2) == "spec.f0: bad; spec.f1: bad (and 5 more)"
    assert describe(errors[:1]) == "spec.f0: bad"


def test_validation_needs_neither_torch_nor_a_kubernetes_client() -> None:
    """The operator image has no torch; validation also serves callers without the Kubernetes client."""
    code = ("import sys, pipeshift.operator.validation, pipeshift.crds; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'kubernetes', 'kopf') "
            "or m.startswith('pipeshift.runtime')); print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
