"""The objects the operator creates: stage pods, the token Secret, the frontend Deployment and Service.

The env contract is checked end to end without a cluster: the variables of a stage pod, with the
downward-API and secret references filled in as a kubelet would, configure `pipeshift agent`
(its own `resolve`) for exactly that stage; the frontend's configure `pipeshift frontend` with the
stage addresses in layout order. Every manifest also parses as the Kubernetes client's model type.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from pipeshift.api import StagePlan
from pipeshift.operator import manifests as m
from pipeshift.operator.spec import PipelineRef, PipelineSpec, SpecError, parse_spec
from pipeshift.runtime.agent import config as agent_config
from pipeshift.runtime.frontend import main as frontend_main

ROOT = Path(__file__).parent.parent
PINNED = yaml.safe_load((ROOT / "examples" / "llmpipeline-pinned.yaml").read_text())
REF = PipelineRef(name="tiny", namespace="serving", uid="0b7c-uid", generation=3)


def pinned_spec(**changes: Any) -> PipelineSpec:
    raw = copy.deepcopy(PINNED["spec"])
    raw.update(changes)
    return parse_spec(raw)


def kubelet_env(container: dict[str, Any], pod_ip: str, secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """The environment a kubelet would give the container: plain values, pod IP, secret keys."""
    env = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "fieldRef" in var["valueFrom"]:
            assert var["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
            env[var["name"]] = pod_ip
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[(ref["name"], ref["key"])]
    return env


def test_stage_pod_runs_the_agent_on_its_pool_with_one_gpu_and_an_owner() -> None:
    spec = pinned_spec()
    stage = StagePlan(1, "l40s", 2, 4)
    pod = m.stage_pod(REF, spec, stage, spec.pool("l40s"))
    meta, pod_spec = pod["metadata"], pod["spec"]
    assert meta["name"] == "tiny-stage-1" and meta["namespace"] == "serving"
    assert meta["labels"] == {"app.kubernetes.io/managed-by": "pipeshift", "pipeshift.dev/pipeline": "tiny",
                              "pipeshift.dev/role": "stage", "pipeshift.dev/stage": "1", "pipeshift.dev/pool": "l40s"}
    assert meta["ownerReferences"] == [{"apiVersion": "pipeshift.dev/v1alpha1", "kind": "LLMPipeline",
                                        "name": "tiny", "uid": "0b7c-uid", "controller": True,
                                        "blockOwnerDeletion": True}]
    assert pod_spec["nodeSelector"] == {"pipeshift.dev/pool": "l40s"}
    assert pod_spec["restartPolicy"] == "Never"
    (container,) = pod_spec["containers"]
    assert container["command"] == ["pipeshift", "agent"]
    assert container["image"] == PINNED["spec"]["image"]
    # The example's requests and limits are kept; one GPU is added as a limit (quantities are strings).
    assert container["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"},
                                      "limits": {"memory": "4Gi", "nvidia.com/gpu": "1"}}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": m.AGENT_CONTROL_PORT}
    assert pod_spec["volumes"] == [{"name": "model", "hostPath": {"path": "/models", "type": "Directory"}}]
    assert container["volumeMounts"] == [{"name": "model", "mountPath": "/models", "readOnly": True}]


def test_stage_pod_env_configures_the_agent_for_exactly_that_stage() -> None:
    spec = pinned_spec(dtype="float64")
    pod = m.stage_pod(REF, spec, StagePlan(1, "l40s", 2, 4), spec.pool("l40s"))
    (container,) = pod["spec"]["containers"]
    env = kubelet_env(container, "127.0.3.7", {("tiny-control-token", "token"): "s3cret"})
    args = argparse.Namespace()
    cfg = agent_config.resolve(args, env)
    assert (cfg.start, cfg.end, cfg.stage_id) == (2, 4, 1)
    assert cfg.host == "127.0.3.7"
    assert (cfg.control_port, cfg.data_port) == (m.AGENT_CONTROL_PORT, m.AGENT_DATA_PORT)
    assert str(cfg.model) == "/models/tiny" and cfg.dtype == "float64"
    assert cfg.warm, "a stage a live change adds joins a running pipeline: it warms its workspaces at start"
    assert env["PIPESHIFT_CONTROL_TOKEN"] == "s3cret"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"control": cfg.control_port, "data": cfg.data_port}


def test_gpu_request_is_forced_to_one_when_the_spec_requests_gpus() -> None:
    spec = pinned_spec(resources={"requests": {"nvidia.com/gpu": 1, "cpu": 2}})
    res = m.stage_resources(spec)
    assert res == {"requests": {"nvidia.com/gpu": "1", "cpu": "2"}, "limits": {"nvidia.com/gpu": "1"}}


def test_frontend_deployment_is_one_recreated_replica_pointed_at_the_stages_in_order() -> None:
    spec = pinned_spec()
    addresses = [m.stage_address("127.0.1.5"), m.stage_address("127.0.2.9")]
    dep = m.frontend_deployment(REF, spec, addresses)
    assert dep["metadata"]["name"] == "tiny-frontend"
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    template = dep["spec"]["template"]
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items()
    assert selector["pipeshift.dev/role"] == "frontend"
    assert template["metadata"]["annotations"] == dep["metadata"]["annotations"]
    (container,) = template["spec"]["containers"]
    assert container["command"] == ["pipeshift", "frontend"]
    env = kubelet_env(container, "127.0.9.1", {("tiny-control-token", "token"): "s3cret"})
    cfg = frontend_main.config_from(argparse.Namespace(), env)
    assert cfg.stages == ("127.0.1.5:9000", "127.0.2.9:9000")
    assert (cfg.host, cfg.port) == ("127.0.9.1", m.FRONTEND_PORT)
    assert cfg.model_name == "tiny" and str(cfg.model_dir) == "/models/tiny"
    assert cfg.control_token == "s3cret"
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": m.FRONTEND_PORT}
    assert "resources" not in container, "the frontend needs no GPU"


def test_frontend_without_stage_addresses_is_refused() -> None:
    with pytest.raises(ValueError, match="every stage"):
        m.frontend_deployment(REF, pinned_spec(), [])


def test_service_selects_the_frontend_pods() -> None:
    svc = m.frontend_service(REF)
    dep = m.frontend_deployment(REF, pinned_spec(), ["127.0.0.2:9000"])
    assert svc["metadata"]["name"] == "tiny-frontend"
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]


def test_control_token_secret_is_owned_and_refuses_an_empty_token() -> None:
    secret = m.control_token_secret(REF, "abc")
    assert secret["metadata"]["name"] == "tiny-control-token"
    assert secret["stringData"] == {"token": "abc"}
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "0b7c-uid"
    with pytest.raises(ValueError, match="empty"):
        m.control_token_secret(REF, "")


def test_spec_hash_is_stable_and_follows_what_the_pod_runs() -> None:
    spec = pinned_spec()
    pool = spec.pool("a100")
    first = m.stage_pod(REF, spec, StagePlan(0, "a100", 0, 2), pool)
    again = m.stage_pod(REF, pinned_spec(), StagePlan(0, "a100", 0, 2), pool)
    moved = m.stage_pod(REF, spec, StagePlan(0, "a100", 0, 3), pool)
    new_image = m.stage_pod(REF, pinned_spec(image="ghcr.io/pipeshift/runtime:0.2.0"), StagePlan(0, "a100", 0, 2),
                            pool)
    h = m.HASH_ANNOTATION
    assert first["metadata"]["annotations"][h] == again["metadata"]["annotations"][h]
    assert first["metadata"]["annotations"][h] != moved["metadata"]["annotations"][h]
    assert first["metadata"]["annotations"][h] != new_image["metadata"]["annotations"][h]
    assert m.digest({"a": 1, "b": [1, 2]}) == m.digest({"b": [1, 2], "a": 1})


def test_a_model_baked_into_the_image_needs_no_volume() -> None:
    raw = copy.deepcopy(PINNED["spec"])
    raw["model"] = {"path": "/opt/model"}
    spec = parse_spec(raw)
    pod = m.stage_pod(REF, spec, StagePlan(0, "a100", 0, 2), spec.pool("a100"))
    assert "volumes" not in pod["spec"] and "volumeMounts" not in pod["spec"]["containers"][0]


def test_ipv6_stage_addresses_are_bracketed() -> None:
    assert m.stage_address("fd00::5") == "[fd00::5]:9000"
    assert m.stage_address("10.1.2.3") == "10.1.2.3:9000"


@pytest.mark.parametrize("kind", ["pod", "secret", "deployment", "service"])
def test_manifests_are_valid_kubernetes_objects(kind: str) -> None:
    """Parsing through the client's own model types catches a misspelt field or a wrong value type."""
    spec = pinned_spec()
    made = {
        "pod": (client.V1Pod, m.stage_pod(REF, spec, StagePlan(0, "a100", 0, 2), spec.pool("a100"))),
        "secret": (client.V1Secret, m.control_token_secret(REF, "t")),
        "deployment": (client.V1Deployment, m.frontend_deployment(REF, spec, ["127.0.0.2:9000"])),
        "service": (client.V1Service, m.frontend_service(REF)),
    }
    model, manifest = made[kind]
    parsed = model.model_validate(manifest)
    assert client.ApiClient().sanitize_for_serialization(parsed) == manifest


def test_parse_spec_names_the_fields_it_cannot_type() -> None:
    raw = copy.deepcopy(PINNED["spec"])
    raw["layout"]["stages"][1]["pool"] = "h100"
    raw["pools"][0]["gpu"] = "A100"
    del raw["image"]
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    joined = "\n".join(info.value.errors)
    assert "spec.layout.stages[1].pool: 'h100' is not one of spec.pools" in joined
    assert "spec.pools[0].gpu: 'A100' is not a known GPU" in joined
    assert "spec.image: is required" in joined
