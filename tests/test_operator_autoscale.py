"""The operator's autoscaling loop: metrics → policy → planner → a target layout the reconcile pass moves to.

The metrics come over real HTTP from a small exposition server bound where the frontend pod's IP would be
(127.0.77.1:8000: the loop scrapes pods by IP and the frontend's fixed port); its counts grow between reads the
way a loaded frontend's do. The clock is the test's, so stabilization and intervals are exact. The Nodes'
allocatable GPUs per pool come from a plain function (there is no API server here; the e2e test reads Nodes).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_operator_reconcile import World, body_of, serve

from pipeshift.operator import manifests as m
from pipeshift.operator import zero as z
from pipeshift.operator.autoscale import AutoscaleLoop
from pipeshift.operator.change import precopy_cap
from pipeshift.operator.reconcile import Observed, PodView
from pipeshift.operator.spec import parse_spec

ROOT = Path(__file__).parent.parent
PINNED = yaml.safe_load((ROOT / "examples" / "llmpipeline-pinned.yaml").read_text())
FRONTEND_IP = "127.0.77.1"


class Exposition:
    """Serves a frontend's /metrics; `loaded` makes every read show 10 more requests with a 2 s TTFT."""

    def __init__(self) -> None:
        self.reads = 0
        self.loaded = False
        self.requests = 0

    def text(self) -> str:
        self.reads += 1
        if self.loaded:
            self.requests += 10
        slow = self.requests  # every request's TTFT fell in the (1, 5] bucket
        return "\n".join([
            "# TYPE pipeshift_ttft_seconds histogram",
            'pipeshift_ttft_seconds_bucket{le="0.1"} 0', 'pipeshift_ttft_seconds_bucket{le="1"} 0',
            f'pipeshift_ttft_seconds_bucket{{le="5"}} {slow}', f'pipeshift_ttft_seconds_bucket{{le="+Inf"}} {slow}',
            f"pipeshift_ttft_seconds_sum {2.0 * slow}", f"pipeshift_ttft_seconds_count {slow}",
            "# TYPE pipeshift_requests_total counter", f"pipeshift_requests_total {self.requests}",
            "# TYPE pipeshift_requests_running gauge", f"pipeshift_requests_running {4 if self.loaded else 0}",
            "# TYPE pipeshift_requests_queued gauge", "pipeshift_requests_queued 0", ""])


@pytest.fixture
def frontend_metrics() -> Iterator[Exposition]:
    exposition = Exposition()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = exposition.text().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer((FRONTEND_IP, m.FRONTEND_PORT), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield exposition
    finally:
        server.shutdown()
        server.server_close()


def policy(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "burst", "mode": "latency",
        "targets": {"ttft_p95_seconds": 0.5, "tpot_p95_seconds": 10, "max_queue": 100},
        "stages": {"min": 3, "max": 3}, "pools": [{"name": "a100"}, {"name": "l40s"}],
        "scale_up": {"stabilization_seconds": 2, "cooldown_seconds": 0}, "scale_down": {"enabled": False},
        "metrics": {"interval_seconds": 1, "window_seconds": 10, "scrape": {"url": "http://ignored:1/metrics"}}}
    body.update(overrides)
    return body


def serving_body() -> dict[str, Any]:
    """A pipeline that serves 2 stages and whose spec.layout was removed (the policy decides now)."""
    spec = copy.deepcopy(PINNED["spec"])
    del spec["layout"]
    return {"apiVersion": "pipeshift.dev/v1alpha1", "kind": "LLMPipeline",
            "metadata": {"name": "tiny", "namespace": "serving", "uid": "uid-1", "generation": 2},
            "spec": spec,
            "status": {"phase": "Ready", "observedGeneration": 1, "layout": {"stages": [
                {"stageId": 0, "pool": "a100", "layers": [0, 2], "pod": "tiny-stage-0", "podIP": "127.0.1.1"},
                {"stageId": 1, "pool": "l40s", "layers": [2, 4], "pod": "tiny-stage-1", "podIP": "127.0.2.1"}]}}}


def frontend_only() -> Observed:
    pod = {"metadata": {"name": "tiny-frontend-x", "labels": {m.LABEL_ROLE: m.ROLE_FRONTEND}},
           "status": {"phase": "Running", "podIP": FRONTEND_IP, "conditions": [{"type": "Ready", "status": "True"}]}}
    return Observed(pods=(PodView.from_pod(pod),))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_sustained_breach_proposes_three_stages_once_with_its_reason_and_holds_it_until_the_move_starts(
    frontend_metrics: Exposition,
) -> None:
    clock, kinds = Clock(), []
    loop = AutoscaleLoop(clock=clock, decided=kinds.append)
    body = serving_body()
    spec = parse_spec(body["spec"])

    def ask() -> tuple[Any, list[Any]]:
        return loop.desired("serving/tiny", body, spec, policy(), frontend_only(), lambda selector: 8)

    assert ask() == (None, [])  # the first read has no window yet: nothing to judge
    clock.now += 1
    assert ask() == (None, [])  # no load: no latency, nothing proposed
    frontend_metrics.loaded = True
    clock.now += 1
    assert ask() == (None, [])  # the breach starts; it must last 2 s
    reads = frontend_metrics.reads
    clock.now += 0.5
    assert ask() == (None, []) and frontend_metrics.reads == reads  # within the interval: no read at all
    clock.now += 1.5
    layout, events = ask()
    assert layout is not None and len(layout) == 3 and {s.pool for s in layout} <= {"a100", "l40s"}
    (event,) = events
    assert event.reason == "ScaleUp" and "TTFT p95" in event.message and "2 → 3 stages" in event.message
    assert loop.reason("serving/tiny") == event.message
    assert kinds == ["hold", "hold", "hold", "scale_up"]  # one per read, none for the skipped one
    # Level-triggered: the target stays until the change to it starts, with no second decision.
    clock.now += 1
    again, events = ask()
    assert again == layout and events == [] and kinds.count("scale_up") == 1
    body["status"]["reconfiguration"] = {"id": "tiny-1", "phase": "starting"}
    clock.now += 1
    assert ask()[0] is None and loop.reason("serving/tiny") is None


def test_the_pass_moves_live_to_the_policys_layout_and_without_a_policy_keeps_the_current_one(
    frontend_metrics: Exposition,
) -> None:
    clock = Clock()
    loop = AutoscaleLoop(clock=clock)
    body = serving_body()
    spec = parse_spec(body["spec"])
    frontend_metrics.loaded = True
    for _ in range(4):
        layout, _ = loop.desired("serving/tiny", body, spec, policy(), frontend_only(), lambda selector: 8)
        clock.now += 1.5
    assert layout is not None
    # The pass: a served pipeline whose layout the policy now decides moves live to the target...
    world = World(body_of())
    serve(world)
    del world.body["spec"]["layout"]
    world.body["spec"].pop("policy", None)
    world.body["spec"]["inlinePolicy"] = {k: v for k, v in policy().items() if k != "name"}
    world.body["metadata"]["generation"] = 2
    world.extra = {"autoscale_layout": layout}
    out = world.step()
    assert out.actions == [] and out.change is not None and out.change.desired == layout
    assert out.status["layoutSummary"] == "a100:0-2,l40s:2-4"  # the old layout serves until the move
    # ...and without a target (the policy holds) keeps serving what it serves.
    world.extra = {}
    out = world.step()
    assert out.actions == [] and out.change is None and out.status["phase"] == "Ready"
    assert out.status["layoutSummary"] == "a100:0-2,l40s:2-4"


def test_a_pool_without_gpus_on_its_nodes_is_left_out_of_the_plan(frontend_metrics: Exposition) -> None:
    clock = Clock()
    loop = AutoscaleLoop(clock=clock)
    body = serving_body()
    spec = parse_spec(body["spec"])
    frontend_metrics.loaded = True
    layout = None
    for _ in range(4):
        layout, _ = loop.desired("serving/tiny", body, spec, policy(), frontend_only(),
                                 lambda selector: 8 if selector == {"pipeshift.dev/pool": "a100"} else 0)
        clock.now += 1.5
    assert layout is not None and {s.pool for s in layout} == {"a100"}


def test_without_a_running_frontend_the_loop_holds(frontend_metrics: Exposition) -> None:
    kinds: list[str] = []
    loop = AutoscaleLoop(clock=Clock(), decided=kinds.append)
    body = serving_body()
    assert loop.desired("serving/tiny", body, parse_spec(body["spec"]), policy(), Observed(),
                        lambda selector: 8) == (None, [])
    assert kinds == ["hold"] and frontend_metrics.reads == 0


KEY = "serving/tiny"


def test_the_stabilization_window_and_the_target_survive_an_operator_restart(frontend_metrics: Exposition) -> None:
    clock = Clock()
    body = serving_body()
    spec = parse_spec(body["spec"])
    slow = policy(scale_up={"stabilization_seconds": 4, "cooldown_seconds": 0})

    def ask(loop: AutoscaleLoop, status: dict[str, Any] | None = None, rules: dict[str, Any] = slow) -> Any:
        seen = dict(body, status=status if status is not None else body["status"])
        return loop.desired(KEY, seen, spec, rules, frontend_only(), lambda selector: 8)

    first = AutoscaleLoop(clock=clock)
    ask(first)  # the first read has no window yet
    frontend_metrics.loaded = True
    clock.now += 1
    assert ask(first) == (None, [])  # the breach starts at 1001
    saved = first.status_patch(KEY, body["status"])
    assert saved is not None and saved["autoscaling"]["pendingSince"] == {"breach": 1001.0, "calm": None, "idle": None}
    assert saved["autoscaling"]["target"] is None and saved["autoscaling"]["switches"] == []
    without_nulls = {"pendingSince": {"breach": 1001.0}, **{k: v for k, v in saved["autoscaling"].items()
                                                            if v is not None and k != "pendingSince"}}
    assert first.status_patch(KEY, {**body["status"], "autoscaling": without_nulls}) is None  # as the server keeps it
    remembered = {**body["status"], **saved}
    # The operator restarts: a new loop, the status its predecessor wrote, and one without it.
    second, amnesiac = AutoscaleLoop(clock=clock), AutoscaleLoop(clock=clock)
    for at in (1002.0, 1003.5):  # the scrape's first read primes it; then 2.5 s of a 4 s window have passed
        clock.now = at
        assert ask(second, remembered) == (None, []) and ask(amnesiac) == (None, [])
    clock.now = 1005.0
    layout, events = ask(second, remembered)
    assert layout is not None and len(layout) == 3
    (event,) = events
    assert event.reason == "ScaleUp" and "for 4 s" in event.message  # counted from 1001, before the restart
    assert ask(amnesiac) == (None, [])  # its window started at 1003.5 and has not lasted 4 s
    # The target, too: a third process moves to it without deciding again.
    decided = second.status_patch(KEY, remembered)
    assert decided is not None and decided["autoscaling"]["target"]["reason"] == event.message
    assert decided["autoscaling"]["switches"] == [1005.0]
    third = AutoscaleLoop(clock=clock)
    clock.now += 1
    again, events = ask(third, {**body["status"], **decided})
    assert again == layout and events == [] and third.reason(KEY) == event.message
    # What was remembered for another policy is not used: its windows start afresh.
    other = AutoscaleLoop(clock=clock)
    assert ask(other, {**body["status"], **decided}, policy(scale_up={"stabilization_seconds": 5})) == (None, [])
    assert other.reason(KEY) is None


def test_scale_to_zero_is_decided_by_zero_alone_while_the_autoscaler_only_holds(frontend_metrics: Exposition) -> None:
    """Both look at the same idle pipeline every second, with a policy that enables scale to zero after 2 s:
    exactly one release, by `zero`; the loop proposes nothing, posts nothing and spends no switch."""
    clock, kinds = Clock(), []
    loop = AutoscaleLoop(clock=clock, decided=kinds.append)
    body = serving_body()
    body["spec"]["scaleToZero"] = True
    spec = parse_spec(body["spec"])
    idle_policy = policy(scale_to_zero={"enabled": True, "idle_seconds": 2})
    settings, tracker = z.settings(body["spec"], idle_policy), z.IdleTracker()
    released = []
    for _ in range(8):
        layout, events = loop.desired(KEY, body, spec, idle_policy, frontend_only(), lambda selector: 8)
        assert layout is None and events == []
        sample = z.scrape(f"http://{FRONTEND_IP}:{m.FRONTEND_PORT}")
        assert sample is not None
        if z.decide(body["status"], settings, sample, tracker.idle_for(KEY, sample, clock.now)) == "scale_to_zero":
            released.append(clock.now)
            body["status"]["phase"] = "ScaledToZero"  # what the lifecycle hook writes after releasing
        clock.now += 1
    assert released == [1002.0]
    assert kinds and set(kinds) == {"hold"}
    state = loop.status_patch(KEY, body["status"])
    assert state is not None and state["autoscaling"]["switches"] == [] and state["autoscaling"]["target"] is None


def test_a_change_takes_its_pre_copy_cap_from_the_pipelines_policy() -> None:
    """`reconfiguration.precopy_bytes_per_second` of the policy `spec.policy` names (or of the inline one)
    becomes the change's `SwitchBudget.precopy_bytes_per_s`; no policy, no cap, or an invalid policy: uncapped."""
    body = serving_body()
    capped = policy(reconfiguration={"precopy_bytes_per_second": 64e6})
    named = parse_spec({**body["spec"], "policy": "burst"})
    assert precopy_cap(named, Observed(policy={"spec": capped})) == 64e6
    assert precopy_cap(named, Observed(policy={"spec": policy()})) is None
    assert precopy_cap(named, Observed()) is None  # the named policy does not exist (yet)
    assert precopy_cap(named, Observed(policy={"spec": {**capped, "mode": "fastest"}})) is None
    inline = {k: v for k, v in capped.items() if k != "name"}
    unnamed = {k: v for k, v in body["spec"].items() if k != "policy"}
    assert precopy_cap(parse_spec({**unnamed, "inlinePolicy": inline}), Observed()) == 64e6
    assert precopy_cap(None, Observed(policy={"spec": capped})) is None
