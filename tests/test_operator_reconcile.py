"""The reconcile pass, driven through a pipeline's whole life without a cluster.

`World` keeps the objects the passes create and the status they write, the way the API server would;
pod IPs, readiness and exits are set by the test where a kubelet would set them (there is no kubelet
here; the e2e test runs the same code against a real API server with the process kubelet). Each step
asserts the actions, the status and the Events of one pass.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeshift.api import StagePlan
from pipeshift.operator import manifests as m
from pipeshift.operator import status as st
from pipeshift.operator.reconcile import (
    Create,
    Delete,
    Event,
    Observed,
    Outcome,
    PodView,
    Update,
    reconcile,
    spec_problems,
)
from pipeshift.operator.spec import PipelineRef, parse_spec


def PipelineRefFor(body: dict[str, Any]) -> PipelineRef:
    return PipelineRef.from_body(body)

ROOT = Path(__file__).parent.parent
PINNED = yaml.safe_load((ROOT / "examples" / "llmpipeline-pinned.yaml").read_text())
POLICY = yaml.safe_load((ROOT / "examples" / "autoscalingpolicy-latency-slo.yaml").read_text())


def body_of(spec: dict[str, Any] | None = None, name: str = "tiny", generation: int = 1) -> dict[str, Any]:
    return {"apiVersion": "pipeshift.dev/v1alpha1", "kind": "LLMPipeline",
            "metadata": {"name": name, "namespace": "serving", "uid": "uid-1", "generation": generation},
            "spec": copy.deepcopy(PINNED["spec"]) if spec is None else spec}


class World:
    """The pipeline object, its children and their pod status, updated by each pass's outcome."""

    def __init__(self, body: dict[str, Any], **observed: Any) -> None:
        self.body = body
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.pod_status: dict[str, dict[str, Any]] = {}
        self.deleting: set[str] = set()
        self.extra = observed
        self.clock = itertools.count()
        self.tokens = itertools.count()

    def observed(self) -> Observed:
        pods = []
        for (kind, name), obj in self.objects.items():
            if kind != "Pod":
                continue
            pod = copy.deepcopy(obj)
            if name in self.deleting:
                pod["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
            pod["status"] = self.pod_status.get(name, {"phase": "Pending"})
            pods.append(PodView.from_pod(pod))
        dep = self.objects.get(("Deployment", "tiny-frontend"))
        return Observed(
            pods=tuple(pods), secret=("Secret", "tiny-control-token") in self.objects,
            service=("Service", "tiny-frontend") in self.objects, deployment=dep is not None,
            deployment_hash=None if dep is None else dep["metadata"]["annotations"][m.HASH_ANNOTATION],
            **self.extra,
        )

    def step(self) -> Outcome:
        now = f"2024-01-01T00:00:{next(self.clock):02d}Z"
        out = reconcile(self.body, self.observed(), now=now, make_token=lambda: f"token-{next(self.tokens)}")
        for action in out.actions:
            if isinstance(action, Create):
                self.objects.setdefault((action.kind, action.name), copy.deepcopy(dict(action.manifest)))
            elif isinstance(action, Update):
                self.objects[(action.kind, action.name)] = copy.deepcopy(dict(action.manifest))
            elif isinstance(action, Delete):
                self.deleting.add(action.name)
        status = self.body.setdefault("status", {})
        for key, value in out.status.items():
            if value is None:
                status.pop(key, None)
            else:
                status[key] = copy.deepcopy(value)
        return out

    def run_pod(self, name: str, ip: str, ready: bool = True, node: str = "node-a") -> None:
        """What a kubelet reports for a running pod."""
        self.pod_status[name] = {"phase": "Running", "podIP": ip,
                                 "conditions": [{"type": "PodScheduled", "status": "True"},
                                                {"type": "Ready", "status": "True" if ready else "False"}]}
        self.objects[("Pod", name)]["spec"]["nodeName"] = node

    def exit_pod(self, name: str) -> None:
        self.pod_status[name] = dict(self.pod_status[name], phase="Failed",
                                     conditions=[{"type": "Ready", "status": "False"}])

    def finish_deletions(self) -> None:
        for name in self.deleting:
            self.objects.pop(("Pod", name), None)
            self.pod_status.pop(name, None)
        self.deleting.clear()

    def frontend_pod(self, ip: str, name: str = "tiny-frontend-abc12") -> None:
        """What the Deployment controller and a kubelet make of the frontend Deployment."""
        template = self.objects[("Deployment", "tiny-frontend")]["spec"]["template"]
        self.objects = {k: v for k, v in self.objects.items()
                        if not (k[0] == "Pod" and v["metadata"]["labels"].get(m.LABEL_ROLE) == "frontend")}
        self.objects[("Pod", name)] = {"metadata": {"name": name, **copy.deepcopy(template["metadata"])},
                                       "spec": copy.deepcopy(template["spec"])}
        self.run_pod(name, ip)


def kinds(out: Outcome) -> list[tuple[str, str, str]]:
    return [(type(a).__name__, a.kind, a.name) for a in out.actions]


def condition(out: Outcome, kind: str) -> dict[str, Any]:
    return next(c for c in out.status["conditions"] if c["type"] == kind)


def reasons(out: Outcome) -> list[str]:
    return [e.reason for e in out.events] + [a.event.reason for a in out.actions if a.event is not None]


def serve(world: World) -> Outcome:
    """From nothing to Ready: create, run both stages, create the frontend, run it."""
    world.step()
    world.run_pod("tiny-stage-0", "127.0.1.1")
    world.run_pod("tiny-stage-1", "127.0.2.1")
    world.step()
    world.frontend_pod("127.0.9.1")
    return world.step()


def test_first_pass_creates_the_secret_service_and_one_pod_per_stage_but_no_frontend() -> None:
    world = World(body_of())
    out = world.step()
    assert kinds(out) == [("Create", "Secret", "tiny-control-token"), ("Create", "Service", "tiny-frontend"),
                          ("Create", "Pod", "tiny-stage-0"), ("Create", "Pod", "tiny-stage-1")]
    pods = [a.manifest for a in out.actions if a.kind == "Pod"]
    assert [p["spec"]["nodeSelector"] for p in pods] == [{"pipeshift.dev/pool": "a100"},
                                                         {"pipeshift.dev/pool": "l40s"}]
    assert [p["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] for p in pods] == ["1", "1"]
    assert out.actions[0].manifest["stringData"] == {"token": "token-0"}
    assert out.status["phase"] == "Pending" and out.status["observedGeneration"] == 1
    ready = condition(out, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "StagesStarting")
    assert out.status["layoutSummary"] == "a100:0-2,l40s:2-4" and out.status["stageCount"] == 0
    assert [s["pod"] for s in out.status["layout"]["stages"]] == ["tiny-stage-0", "tiny-stage-1"]
    assert reasons(out) == ["CreatedStagePod", "CreatedStagePod"]
    assert out.recheck


def test_a_repeated_pass_creates_nothing_twice() -> None:
    world = World(body_of())
    world.step()
    again = world.step()
    assert again.actions == [] and again.events == []
    assert "tiny-stage-0 not scheduled yet" in condition(again, "Ready")["message"]


def test_the_frontend_waits_until_every_stage_is_ready_with_an_ip() -> None:
    world = World(body_of())
    world.step()
    world.run_pod("tiny-stage-0", "127.0.1.1")
    world.run_pod("tiny-stage-1", "127.0.2.1", ready=False)
    out = world.step()
    assert out.actions == [], "no frontend while stage 1 is not Ready"
    assert out.status["stageCount"] == 1
    assert "1/2 stage pods Ready" in condition(out, "Ready")["message"]
    world.run_pod("tiny-stage-1", "127.0.2.1")
    out = world.step()
    (create,) = out.actions
    assert isinstance(create, Create) and create.kind == "Deployment"
    env = {e["name"]: e.get("value") for e in create.manifest["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PIPESHIFT_FRONTEND_STAGES"] == "127.0.1.1:9000,127.0.2.1:9000"
    assert condition(out, "Ready")["reason"] == "FrontendStarting"
    assert out.status["phase"] == "Pending"


def test_ready_once_the_frontend_pod_serves_then_quiet() -> None:
    world = World(body_of())
    out = serve(world)
    assert out.status["phase"] == "Ready" and out.result == "ready" and not out.recheck
    ready = condition(out, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "Serving")
    assert out.status["frontend"] == {"pod": "tiny-frontend-abc12", "podIP": "127.0.9.1",
                                      "url": "http://127.0.9.1:8000"}
    assert out.status["layout"]["stages"] == [
        {"stageId": 0, "pool": "a100", "layers": [0, 2], "pod": "tiny-stage-0", "podIP": "127.0.1.1"},
        {"stageId": 1, "pool": "l40s", "layers": [2, 4], "pod": "tiny-stage-1", "podIP": "127.0.2.1"}]
    assert out.status["stageCount"] == 2
    assert out.events == [Event("Normal", "Ready", ready["message"])]
    quiet = world.step()
    assert quiet.actions == [] and quiet.events == []
    assert condition(quiet, "Ready")["lastTransitionTime"] == ready["lastTransitionTime"]


def test_a_frontend_pod_of_an_older_template_does_not_count() -> None:
    world = World(body_of())
    serve(world)
    stale = world.objects[("Pod", "tiny-frontend-abc12")]
    stale["metadata"]["annotations"][m.HASH_ANNOTATION] = "0000"
    out = world.step()
    assert out.status["phase"] == "Degraded" and out.status["frontend"] is None
    assert condition(out, "Degraded")["reason"] == "FrontendLost"


def test_a_stage_that_exits_is_degraded_replaced_and_the_frontend_repointed() -> None:
    world = World(body_of())
    serve(world)
    world.exit_pod("tiny-stage-1")
    out = world.step()
    assert kinds(out) == [("Delete", "Pod", "tiny-stage-1")]
    assert out.status["phase"] == "Degraded"
    degraded = condition(out, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "StageLost")
    assert {(e.type, e.reason) for e in out.events} == {("Warning", "StageLost")}
    assert out.actions[0].event is not None and out.actions[0].event.type == "Warning"
    # While the old pod terminates nothing new is created under its name.
    assert world.step().actions == []
    world.finish_deletions()
    out = world.step()
    assert kinds(out) == [("Create", "Pod", "tiny-stage-1")]
    assert out.status["phase"] == "Degraded"
    world.run_pod("tiny-stage-1", "127.0.2.2")
    out = world.step()
    (update,) = out.actions
    assert isinstance(update, Update) and update.kind == "Deployment"
    env = {e["name"]: e.get("value") for e in update.manifest["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PIPESHIFT_FRONTEND_STAGES"] == "127.0.1.1:9000,127.0.2.2:9000"
    world.frontend_pod("127.0.9.2", name="tiny-frontend-def34")
    out = world.step()
    assert out.status["phase"] == "Ready"
    assert condition(out, "Degraded")["status"] == "False"
    assert {e.reason for e in out.events} == {"Ready", "Recovered"}


def test_a_changed_layout_replaces_the_pods_that_differ_and_is_pending_not_degraded() -> None:
    """Before the pipeline ever served there is nothing to move live: the pods that differ are replaced."""
    world = World(body_of())
    world.step()
    world.run_pod("tiny-stage-0", "127.0.1.1")
    world.run_pod("tiny-stage-1", "127.0.2.1")
    spec = world.body["spec"]
    spec["layout"] = {"stages": [{"pool": "a100", "layers": [0, 1]}, {"pool": "a100", "layers": [1, 3]},
                                 {"pool": "l40s", "layers": [3, 4]}]}
    world.body["metadata"]["generation"] = 2
    out = world.step()
    assert out.change is None
    assert sorted(kinds(out)) == [("Create", "Pod", "tiny-stage-2"), ("Delete", "Pod", "tiny-stage-0"),
                                  ("Delete", "Pod", "tiny-stage-1")]
    assert out.status["phase"] == "Pending" and out.status["observedGeneration"] == 2
    assert out.status["layoutSummary"] == "a100:0-1,a100:1-3,l40s:3-4"
    new_pod = next(a.manifest for a in out.actions if isinstance(a, Create))
    assert new_pod["spec"]["nodeSelector"] == {"pipeshift.dev/pool": "l40s"}
    world.finish_deletions()
    out = world.step()
    assert sorted(kinds(out)) == [("Create", "Pod", "tiny-stage-0"), ("Create", "Pod", "tiny-stage-1")]
    layers = {a.name: next(e["value"] for e in a.manifest["spec"]["containers"][0]["env"]
                           if e["name"] == "PIPESHIFT_LAYERS") for a in out.actions}
    assert layers == {"tiny-stage-0": "0:1", "tiny-stage-1": "1:3"}
    assert out.status["phase"] == "Pending"


def test_a_changed_layout_of_a_serving_pipeline_is_a_live_change_that_deletes_nothing() -> None:
    world = World(body_of())
    serve(world)
    world.body["spec"]["layout"] = {"stages": [{"pool": "a100", "layers": [0, 4]}]}
    world.body["metadata"]["generation"] = 2
    out = world.step()
    assert out.actions == [] and out.status["phase"] == "Ready"
    assert out.change is not None and out.change.running is None
    assert out.change.current.short() == "2,2" and out.change.desired.short() == "4"
    assert out.status["layoutSummary"] == "a100:0-2,l40s:2-4"  # the old layout serves on


def test_while_a_change_runs_its_new_pods_are_kept_and_the_frontend_is_not_restarted() -> None:
    world = World(body_of())
    serve(world)
    world.body["spec"]["layout"] = {"stages": [{"pool": "a100", "layers": [0, 1]}, {"pool": "a100", "layers": [1, 2]},
                                               {"pool": "l40s", "layers": [2, 4]}]}
    world.body["metadata"]["generation"] = 2
    world.body["status"]["reconfiguration"] = {
        "id": "tiny-1", "phase": "precopying",
        "from": {"stages": [{"stageId": 0, "pool": "a100", "layers": [0, 2]},
                            {"stageId": 1, "pool": "l40s", "layers": [2, 4]}]},
        "to": {"stages": [{"stageId": 0, "pool": "a100", "layers": [0, 1]},
                          {"stageId": 2, "pool": "a100", "layers": [1, 2]},
                          {"stageId": 1, "pool": "l40s", "layers": [2, 4]}]}}
    pod = m.stage_pod(PipelineRefFor(world.body), parse_spec(world.body["spec"]),
                      StagePlan(2, "a100", 1, 2), parse_spec(world.body["spec"]).pool("a100"))
    world.objects[("Pod", "tiny-stage-2")] = pod
    world.run_pod("tiny-stage-2", "127.0.1.2")
    out = world.step()
    assert out.actions == []
    assert out.status["phase"] == "Reconfiguring" and out.change is not None and out.change.running is not None
    reconfiguring = condition(out, "Reconfiguring")
    assert (reconfiguring["status"], reconfiguring["reason"]) == ("True", "Precopying")
    assert out.status["reconfiguration"]["id"] == "tiny-1"


def test_after_a_live_change_moved_layers_the_pods_are_kept_and_the_frontend_rewired_not_restarted() -> None:
    """A stage pod keeps the range it was created with in its env while a live change moved it; the frontend
    Deployment's annotation says the running frontend was re-wired, so its template is left alone."""
    world = World(body_of())
    serve(world)
    world.body["spec"]["layout"] = {"stages": [{"pool": "a100", "layers": [0, 3]}, {"pool": "l40s", "layers": [3, 4]}]}
    world.body["metadata"]["generation"] = 2
    world.body["status"]["layout"] = {"stages": [
        {"stageId": 0, "pool": "a100", "layers": [0, 3], "pod": "tiny-stage-0", "podIP": "127.0.1.1"},
        {"stageId": 1, "pool": "l40s", "layers": [3, 4], "pod": "tiny-stage-1", "podIP": "127.0.2.1"}]}
    dep = world.objects[("Deployment", "tiny-frontend")]
    stages = ",".join(["127.0.1.1:9000", "127.0.2.1:9000"])
    template = next(e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
                    if e["name"] == "PIPESHIFT_FRONTEND_STAGES")
    assert template == stages
    world.extra = {"deployment_template_stages": tuple(stages.split(",")), "deployment_stages": stages}
    out = world.step()
    assert out.actions == [] and out.change is None
    assert out.status["phase"] == "Ready" and out.status["layoutSummary"] == "a100:0-3,l40s:3-4"
    # Without the annotation (say, a stage pod was replaced) the template is updated as before.
    world.extra = {"deployment_template_stages": tuple(stages.split(",")), "deployment_stages": "elsewhere:9000"}
    out = world.step()
    assert out.change is None and all(a.kind != "Pod" for a in out.actions)


def test_an_invalid_spec_fails_with_the_field_path_and_creates_nothing() -> None:
    spec = copy.deepcopy(PINNED["spec"])
    spec["layout"]["stages"][1]["pool"] = "h100"
    out = World(body_of(spec)).step()
    assert out.actions == []
    assert out.status["phase"] == "Failed" and out.result == "invalid"
    ready = condition(out, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "spec.layout.stages[1].pool" in ready["message"]
    (event,) = out.events
    assert (event.type, event.reason) == ("Warning", "InvalidSpec") and "spec.layout.stages[1].pool" in event.message
    assert out.status["layout"] is None and out.status["layoutSummary"] is None


def test_many_problems_are_listed_up_to_ten_then_counted() -> None:
    spec = copy.deepcopy(PINNED["spec"])
    spec["pools"] = [{"name": f"p{i}", "gpu": "L4"} for i in range(12)]
    del spec["layout"]
    _, problems = spec_problems(body_of(spec), Observed())
    assert len(problems) > 12
    message = condition(World(body_of(spec)).step(), "Ready")["message"]
    assert message.count("is not in the GPU catalogue") == 10
    assert message.endswith(f" (and {len(problems) - 10} more)")


def test_a_layout_that_misses_the_models_layers_is_invalid() -> None:
    spec = copy.deepcopy(PINNED["spec"])
    spec["layout"]["stages"][1]["layers"] = [2, 3]
    ready = condition(World(body_of(spec)).step(), "Ready")
    assert ready["reason"] == "InvalidSpec" and "spec.layout.stages[1].layers" in ready["message"]


def test_a_name_too_long_for_the_derived_names_is_invalid() -> None:
    out = World(body_of(name="x" * 60)).step()
    assert "metadata.name" in condition(out, "Ready")["message"] and out.actions == []


def test_fixing_an_invalid_spec_starts_serving() -> None:
    spec = copy.deepcopy(PINNED["spec"])
    spec["image"] = ""
    world = World(body_of(spec))
    assert world.step().status["phase"] == "Failed"
    world.body["spec"]["image"] = PINNED["spec"]["image"]
    world.body["metadata"]["generation"] = 2
    out = world.step()
    assert out.status["phase"] == "Pending" and len(out.actions) == 4


def test_an_invalid_spec_message_changing_is_news_but_a_repeat_is_not() -> None:
    spec = copy.deepcopy(PINNED["spec"])
    spec["pools"][1]["gpu"] = "L40S"
    world = World(body_of(spec))
    assert [e.reason for e in world.step().events] == ["InvalidSpec"]
    assert world.step().events == []
    world.body["spec"]["pools"][1]["gpu"] = "l40s-48gb"
    (event,) = world.step().events
    assert "l40s-48gb" in event.message


def test_a_referenced_policy_is_validated_against_the_pipelines_pools() -> None:
    spec = copy.deepcopy(PINNED["spec"])
    spec["policy"] = "latency-slo"
    policy = copy.deepcopy(POLICY)  # it allows pools h100 and l40s; the pipeline has a100 and l40s
    out = World(body_of(spec), policy=policy).step()
    ready = condition(out, "Ready")
    assert ready["reason"] == "InvalidSpec" and "spec.policy" in ready["message"] and "h100" in ready["message"]
    policy["spec"]["pools"] = [{"name": "a100"}, {"name": "l40s"}]
    out = World(body_of(spec), policy=policy).step()
    assert out.status["phase"] == "Pending" and "PolicyNotFound" not in reasons(out)


def test_an_inline_policy_typo_is_named() -> None:
    spec = copy.deepcopy(PINNED["spec"])
    spec["inlinePolicy"] = {"targets": {"ttft_p95_seconds": 1.0, "tpot_p95_seconds": 0.05, "max_queue": 4},
                            "metrics": {"scrape": {"url": "http://tiny-frontend:8000/metrics"}},
                            "scale_upp": {}}
    ready = condition(World(body_of(spec)).step(), "Ready")
    assert ready["reason"] == "InvalidSpec" and "spec.inlinePolicy.scale_upp" in ready["message"]


def test_a_model_config_from_a_configmap_is_waited_for_then_checked() -> None:
    spec = copy.deepcopy(PINNED["spec"])
    config = spec["model"].pop("config")
    spec["model"]["configMapRef"] = {"name": "tiny-config"}
    missing = World(body_of(spec), model_config_error="ConfigMap 'tiny-config': not found").step()
    assert missing.actions == [] and missing.recheck
    ready = condition(missing, "Ready")
    assert (ready["reason"], ready["message"]) == ("ModelConfigUnavailable", "ConfigMap 'tiny-config': not found")
    out = World(body_of(spec), model_config=dict(config, num_hidden_layers=6)).step()
    assert condition(out, "Ready")["reason"] == "InvalidSpec"
    assert "the model has 6" in condition(out, "Ready")["message"]
    out = World(body_of(spec), model_config=config).step()
    assert len([a for a in out.actions if a.kind == "Pod"]) == 2


def test_an_unschedulable_stage_is_reported_with_the_schedulers_words() -> None:
    world = World(body_of())
    world.step()
    world.pod_status["tiny-stage-1"] = {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]}
    out = world.step()
    ready = condition(out, "Ready")
    assert ready["reason"] == "Unschedulable"
    assert ready["message"] == "stage 1 (pool l40s): 0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    assert [(e.type, e.reason) for e in out.events] == [("Warning", "Unschedulable")]


def test_an_existing_secret_is_kept() -> None:
    world = World(body_of())
    world.objects[("Secret", "tiny-control-token")] = {"kind": "Secret"}
    out = world.step()
    assert ("Create", "Secret", "tiny-control-token") not in kinds(out)


def test_a_foreign_stage_pod_name_under_our_labels_is_removed() -> None:
    """A pod labelled as stage 0 of this pipeline but named otherwise (left by an older operator)."""
    world = World(body_of())
    world.step()
    odd = copy.deepcopy(world.objects[("Pod", "tiny-stage-0")])
    odd["metadata"]["name"] = "tiny-stage-0-old"
    world.objects[("Pod", "tiny-stage-0-old")] = odd
    assert ("Delete", "Pod", "tiny-stage-0-old") in kinds(world.step())


@pytest.mark.parametrize(("invalid", "serving", "previous", "changed", "phase"), [
    (True, False, "Ready", False, "Failed"),
    (False, True, "Pending", True, "Ready"),
    (False, False, "Ready", False, "Degraded"),
    (False, False, "Degraded", False, "Degraded"),
    (False, False, "Ready", True, "Pending"),
    (False, False, None, True, "Pending"),
    (False, False, "Failed", False, "Pending"),
])
def test_phase_rules(invalid: bool, serving: bool, previous: str | None, changed: bool, phase: str) -> None:
    assert st.next_phase(invalid=invalid, serving=serving, previous_phase=previous, spec_changed=changed) == phase


def test_conditions_keep_their_transition_time_until_the_status_flips() -> None:
    first = st.merge_conditions([], [st.Condition("Ready", False, "StagesStarting", "0/2")], "T1", 1)
    same = st.merge_conditions(first, [st.Condition("Ready", False, "FrontendStarting", "2/2")], "T2", 1)
    flipped = st.merge_conditions(same, [st.Condition("Ready", True, "Serving", "ok")], "T3", 2)
    assert [c["lastTransitionTime"] for c in (first[0], same[0], flipped[0])] == ["T1", "T1", "T3"]
    assert same[0]["reason"] == "FrontendStarting" and flipped[0]["observedGeneration"] == 2
    with pytest.raises(ValueError, match="UpperCamelCase"):
        st.Condition("Ready", True, "not camel", "m")
    with pytest.raises(ValueError, match="condition type"):
        st.Condition("Happy", True, "Yes", "m")
    with pytest.raises(ValueError, match="needs a message"):
        st.Condition("Ready", True, "Serving", "")
