"""Policy files: every example loads, bad ones fail naming file, field and what is valid, schemas export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeshift.errors import UserError
from pipeshift.policy import AutoscalingPolicy, crd_schema, json_schema, load_policy

EXAMPLES = sorted((Path(__file__).parent.parent / "policies").glob("*.yaml"))
MINIMAL = {"name": "p", "targets": {"ttft_p95_seconds": 1.0, "tpot_p95_seconds": 0.05, "max_queue": 4},
           "metrics": {"scrape": {"url": "http://frontend:8000/metrics"}}}


def test_the_required_examples_exist() -> None:
    assert {"latency-slo.yaml", "cost-saver.yaml", "scale-to-zero.yaml"} <= {p.name for p in EXAMPLES}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_loads_and_explains_itself(path: Path) -> None:
    policy = load_policy(path)
    assert policy.name == path.stem
    assert path.read_text().lstrip().startswith("#"), "each example opens with a comment explaining it"


def test_the_examples_differ_where_their_names_say() -> None:
    by_name = {p.stem: load_policy(p) for p in EXAMPLES}
    assert by_name["latency-slo"].mode == "latency" and by_name["cost-saver"].mode == "cost"
    assert by_name["scale-to-zero"].scale_to_zero.enabled
    assert not by_name["latency-slo"].scale_to_zero.enabled


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(("change", "message"), [
    ({"scale_up": {"cooldown_seconds": 30, "stabilisation_seconds": 60}},
     "scale_up.stabilisation_seconds: unknown key 'stabilisation_seconds'; valid keys here: "
     "stabilization_seconds, cooldown_seconds"),
    ({"surprise": True}, "surprise: unknown key 'surprise'; valid keys here: name, enabled, mode"),
    ({"mode": "fastest"}, "mode: Input should be 'latency' or 'cost' (got 'fastest')"),
    ({"targets": {"ttft_p95_seconds": 1.0, "tpot_p95_seconds": -1, "max_queue": 4}},
     "targets.tpot_p95_seconds: Input should be greater than 0 (got -1)"),
    ({"stages": {"min": 4, "max": 2}}, "stages: max (2) must be at least min (4)"),
    ({"metrics": {"scrape": {"url": "frontend:8000"}}}, "metrics.scrape.url: String should match pattern"),
    ({"metrics": {"interval_seconds": 10}}, "metrics: set exactly one metric source"),
    ({"pin": {"stages": [{"pool": "a", "layers": [0, 4]}, {"pool": "a", "layers": [5, 8]}]}},
     "pin: stage 1 starts at layer 5, expected 4"),
    ({"scale_to_zero": {"enabled": True, "cold_start": "warm"}},
     "scale_to_zero.cold_start: Input should be 'plan' or 'last'"),
    ({"pools": [{"name": "l4", "price": 1}]},
     "pools.0.price: unknown key 'price'; valid keys here: name, cost_per_hour"),
    ({"reconfiguration": {"precopy_bytes_per_second": 0}},
     "reconfiguration.precopy_bytes_per_second: Input should be greater than 0 (got 0)"),
])
def test_an_invalid_policy_names_the_file_the_field_and_what_is_valid(tmp_path: Path, change: dict,
                                                                      message: str) -> None:
    path = write(tmp_path, {**MINIMAL, **change})
    with pytest.raises(UserError) as raised:
        load_policy(path)
    assert str(raised.value).startswith(f"{path}: ")
    assert message in str(raised.value)


def test_a_missing_required_section_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, {k: v for k, v in MINIMAL.items() if k != "targets"})
    with pytest.raises(UserError, match="targets: required but missing"):
        load_policy(path)


def test_broken_yaml_reports_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: p\ntargets: {ttft_p95_seconds: 1\n")
    with pytest.raises(UserError, match=r"broken.yaml: not valid YAML at line 3"):
        load_policy(path)


def test_the_json_schema_rejects_unknown_keys_everywhere() -> None:
    schema = json_schema()
    objects = [schema, *schema["$defs"].values()]
    assert all(o.get("additionalProperties") is False for o in objects if o.get("type") == "object")
    assert set(schema["required"]) == {"name", "targets", "metrics"}
    json.dumps(schema)


def test_the_crd_schema_is_structural() -> None:
    text = json.dumps(crd_schema())
    assert "$ref" not in text and "anyOf" not in text and "prefixItems" not in text
    crd = crd_schema()
    assert crd["properties"]["targets"]["properties"]["tpot_p95_seconds"]["exclusiveMinimum"] == 0
    assert crd["properties"]["pin"]["nullable"] is True
    layers = crd["properties"]["pin"]["properties"]["stages"]["items"]["properties"]["layers"]
    assert (layers["minItems"], layers["maxItems"], layers["items"]["type"]) == (2, 2, "integer")


def test_a_pinned_layout_and_autoscaling_off_are_expressible() -> None:
    policy = AutoscalingPolicy.model_validate({**MINIMAL, "enabled": False, "pin": {
        "stages": [{"pool": "l4", "layers": [0, 16]}, {"pool": "l40s", "layers": [16, 32]}]}})
    assert not policy.enabled
    assert [(s.pool, s.start, s.end) for s in policy.pin.layout()] == [("l4", 0, 16), ("l40s", 16, 32)]
