"""A pipeline without `spec.layout` starts on the layout its policy plans, over its pools' GPUs.

Driven through the same `World` as the reconcile tests (the pass is pure: Node capacity arrives in
`Observed.pool_gpus`); the planner itself runs for real.
"""

from __future__ import annotations

import copy
from typing import Any

from test_operator_reconcile import PINNED, World, body_of, condition, kinds, reasons, serve

from pipeshift.operator.reconcile import current_layout

TARGETS = {"ttft_p95_seconds": 0.5, "tpot_p95_seconds": 0.04, "max_queue": 4}
METRICS = {"scrape": {"url": "http://tiny-frontend:8000/metrics"}}


def policy_of(**spec: Any) -> dict[str, Any]:
    """An AutoscalingPolicy object as the API server returns it (`Observed.policy`)."""
    return {"apiVersion": "pipeshift.dev/v1alpha1", "kind": "AutoscalingPolicy", "metadata": {"name": "two-l40s"},
            "spec": {"targets": TARGETS, "metrics": METRICS, **spec}}


def unpinned(**extra: Any) -> dict[str, Any]:
    spec = copy.deepcopy(PINNED["spec"])
    del spec["layout"]
    spec.update(extra)
    return spec


TWO_ON_L40S = policy_of(pools=[{"name": "l40s"}], stages={"min": 2, "max": 2})


def test_the_first_layout_is_planned_from_the_policy_then_served_like_a_pinned_one() -> None:
    world = World(body_of(unpinned(policy="two-l40s")), policy=TWO_ON_L40S, pool_gpus={"a100": 8, "l40s": 8})
    out = world.step()
    assert kinds(out) == [("Create", "Secret", "tiny-control-token"), ("Create", "Service", "tiny-frontend"),
                          ("Create", "Pod", "tiny-stage-0"), ("Create", "Pod", "tiny-stage-1")]
    pods = [a.manifest for a in out.actions if a.kind == "Pod"]
    assert [p["spec"]["nodeSelector"] for p in pods] == [{"pipeshift.dev/pool": "l40s"}] * 2
    stages = out.status["layout"]["stages"]
    assert [s["pool"] for s in stages] == ["l40s", "l40s"]
    assert stages[0]["layers"][0] == 0 and stages[0]["layers"][1] == stages[1]["layers"][0] \
        and stages[1]["layers"][1] == 4
    assert (out.status["phase"], condition(out, "Ready")["reason"]) == ("Pending", "StagesStarting")
    (initial,) = [e for e in out.events if e.reason == "InitialLayout"]
    assert initial.type == "Normal"
    assert f"starting {out.status['layoutSummary']}, planned by policy two-l40s" in initial.message
    assert "at zero load over l40s (8x l40s), stages 2..2: 2 stages" in initial.message
    assert reasons(out) == ["InitialLayout", "CreatedStagePod", "CreatedStagePod"]

    again = world.step()  # kept from status: not planned again, not announced again
    assert again.actions == [] and again.events == []
    assert again.status["layout"] == out.status["layout"]

    ready = serve(world)
    assert (ready.status["phase"], ready.status["stageCount"]) == ("Ready", 2)
    assert current_layout(world.body["status"]) is not None, "the autoscaling loop takes it from here"
    assert "InitialLayout" not in reasons(ready)


def test_an_inline_policy_plans_too_and_a_pin_in_it_is_taken_as_is() -> None:
    inline = {"targets": TARGETS, "metrics": METRICS, "mode": "latency"}
    out = World(body_of(unpinned(inlinePolicy=inline)), pool_gpus={"a100": 2, "l40s": 2}).step()
    assert out.status["layoutSummary"] == "a100:0-4"  # one stage on the fastest pool: nothing to split at zero load
    pin = {"stages": [{"pool": "a100", "layers": [0, 1]}, {"pool": "a100", "layers": [1, 4]}]}
    world = World(body_of(unpinned(inlinePolicy=dict(inline, pin=pin))), pool_gpus={"a100": 2, "l40s": 0})
    out = world.step()
    assert out.status["layoutSummary"] == "a100:0-1,a100:1-4"
    assert "planned by policy tiny, which pins 2 stages" in next(e.message for e in out.events
                                                                   if e.reason == "InitialLayout")
    short = World(body_of(unpinned(inlinePolicy=dict(inline, pin=pin))), pool_gpus={"a100": 1, "l40s": 4}).step()
    ready = condition(short, "Ready")
    assert (ready["reason"], short.actions) == ("Unschedulable", [])
    assert ready["message"] == ("policy tiny pins a100:0-1,a100:1-4, but its pools lack allocatable nvidia.com/gpu: "
                                "a100 (2 stages, 1 GPUs)")


def test_a_missing_policy_is_the_pending_reason_said_once_until_it_appears() -> None:
    world = World(body_of(unpinned(policy="two-l40s")), policy=None, pool_gpus={"a100": 8, "l40s": 8})
    out = world.step()
    assert out.actions == [] and out.recheck and out.status["phase"] == "Pending"
    ready = condition(out, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "PolicyNotFound")
    assert ready["message"] == ("spec.policy: no AutoscalingPolicy 'two-l40s' in this namespace; without "
                                "spec.layout the policy plans the first layout")
    assert [(e.type, e.reason, e.message) for e in out.events] == [("Warning", "PolicyNotFound", ready["message"])]
    assert world.step().events == [], "said once, not on every re-check"

    world.extra["policy"] = TWO_ON_L40S
    out = world.step()
    assert [a.kind for a in out.actions].count("Pod") == 2 and "InitialLayout" in reasons(out)


def test_pools_that_cannot_hold_the_model_leave_it_unschedulable_saying_why() -> None:
    world = World(body_of(unpinned(policy="two-l40s")), policy=TWO_ON_L40S, pool_gpus={"a100": 8, "l40s": 0})
    out = world.step()
    ready = condition(out, "Ready")
    assert (out.actions, out.status["phase"], ready["reason"]) == ([], "Pending", "Unschedulable")
    assert ready["message"] == ("no pool that policy two-l40s allows has an allocatable nvidia.com/gpu on a Node "
                                "matching its nodeSelector (l40s: 0)")
    assert [(e.type, e.reason) for e in out.events] == [("Warning", "Unschedulable")]

    world.extra["pool_gpus"] = None  # the Nodes could not be read
    out = world.step()
    assert (out.actions, condition(out, "Ready")["reason"]) == ([], "Unschedulable")
    assert "GPUs of the Nodes of spec.pools could not be read" in condition(out, "Ready")["message"]

    world.extra["pool_gpus"] = {"a100": 8, "l40s": 1}  # one GPU, two stages wanted
    out = world.step()
    assert "stages 2..2: no stage count fits the bounds" in condition(out, "Ready")["message"]

    big = unpinned(inlinePolicy={"targets": TARGETS, "metrics": METRICS})
    big["model"]["config"] = dict(big["model"]["config"], num_hidden_layers=80, hidden_size=8192,
                                  intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                                  head_dim=128, vocab_size=128256, torch_dtype="bfloat16")
    out = World(body_of(big), pool_gpus={"a100": 1, "l40s": 1}).step()
    ready = condition(out, "Ready")
    assert (out.actions, ready["reason"]) == ([], "Unschedulable")
    assert "GB of weights; pools offer 128 GB (a100 (1x a100-80gb, 80 GB), l40s (1x l40s, 48 GB))" \
        in ready["message"]


def test_a_started_layout_is_planned_again_only_when_its_pools_lost_the_gpus() -> None:
    world = World(body_of(unpinned(policy="two-l40s")), policy=TWO_ON_L40S, pool_gpus={"a100": 8, "l40s": 8})
    first = world.step()
    world.extra["pool_gpus"] = {"a100": 8, "l40s": 2}  # still room for both stages: kept
    assert world.step().actions == []
    world.extra["pool_gpus"] = {"a100": 8, "l40s": 1}
    out = world.step()
    assert condition(out, "Ready")["reason"] == "Unschedulable" and out.status["layout"] is None
    world.extra["pool_gpus"] = {"a100": 8, "l40s": 8}
    again = world.step()
    assert again.status["layout"] == first.status["layout"] and "InitialLayout" in reasons(again)


def test_removing_the_layout_of_a_serving_pipeline_keeps_it_serving_without_a_restart() -> None:
    world = World(body_of(), policy=policy_of(pools=[{"name": "l40s"}], stages={"min": 3}),
                  pool_gpus={"a100": 8, "l40s": 8})
    serve(world)
    objects = copy.deepcopy(world.objects)
    spec = world.body["spec"]
    del spec["layout"]
    spec["policy"] = "two-l40s"  # a policy that would plan something else entirely
    world.body["metadata"]["generation"] = 2
    out = world.step()
    assert out.actions == [] and out.change is None
    assert (out.status["phase"], out.status["layoutSummary"], out.status["observedGeneration"]) == \
        ("Ready", "a100:0-2,l40s:2-4", 2)
    assert "InitialLayout" not in reasons(out) and world.objects == objects
    assert world.step().actions == []


def test_woken_from_zero_without_a_layout_it_brings_back_the_layout_it_released() -> None:
    world = World(body_of(), policy=TWO_ON_L40S, pool_gpus={"a100": 8, "l40s": 8})
    serve(world)
    released = copy.deepcopy(world.body["status"]["layout"])
    del world.body["spec"]["layout"]
    world.body["spec"]["policy"] = "two-l40s"
    world.objects = {k: v for k, v in world.objects.items() if k[0] != "Pod"}  # every pod gone at zero
    world.body["status"]["phase"] = "Pending"  # what zero.py's wake-up writes
    out = world.step()
    assert [a.name for a in out.actions if a.kind == "Pod"] == ["tiny-stage-0", "tiny-stage-1"]
    assert out.status["layoutSummary"] == "a100:0-2,l40s:2-4" and "InitialLayout" not in reasons(out)
    assert [s["layers"] for s in out.status["layout"]["stages"]] == [s["layers"] for s in released["stages"]]
