"""`zero`: the pure decisions of scale to zero and back (settings, the frontend's metrics, idleness)."""

from __future__ import annotations

from pipeshift.operator import zero as z

METRICS = """# HELP pipeshift_requests_running x
# TYPE pipeshift_requests_running gauge
pipeshift_requests_running 0.0
pipeshift_requests_queued 0.0
pipeshift_requests_total{outcome="ok"} 3.0
pipeshift_requests_total{outcome="error"} 1.0
pipeshift_requests_created{outcome="ok"} 1.7e9
pipeshift_requests_waiting_for_stages 2.0
"""


def test_only_opted_in_pipelines_scale_to_zero_with_the_policy_idle_period() -> None:
    assert z.settings({}, {"scale_to_zero": {"enabled": True, "idle_seconds": 5}}) is None
    assert z.settings({"scaleToZero": True}, {"scale_to_zero": {"idle_seconds": 5}}) == z.ZeroSettings(5.0)
    assert z.settings({"scaleToZero": True, "inlinePolicy": {"scale_to_zero": {"idle_seconds": 7}}},
                      {"scale_to_zero": {"idle_seconds": 5}}) == z.ZeroSettings(7.0)
    assert z.settings({"scaleToZero": True}, None) == z.ZeroSettings(z.DEFAULT_IDLE_SECONDS)
    assert z.settings({"scaleToZero": True}, {"scale_to_zero": {"idle_seconds": "soon"}}) \
        == z.ZeroSettings(z.DEFAULT_IDLE_SECONDS)


def test_the_frontend_metrics_are_summed_over_labels() -> None:
    sample = z.parse_metrics(METRICS)
    assert sample == z.FrontendSample(running=0.0, queued=0.0, finished=4.0, waiting_for_stages=2.0)
    assert z.parse_metrics("") == z.FrontendSample(0.0, 0.0, 0.0, 0.0)


def test_idleness_restarts_on_any_activity() -> None:
    tracker = z.IdleTracker()
    quiet = z.FrontendSample(0, 0, 4, 0)
    assert tracker.idle_for("a", quiet, 100.0) == 0.0
    assert tracker.idle_for("a", quiet, 103.0) == 3.0
    assert tracker.idle_for("a", z.FrontendSample(0, 0, 5, 0), 104.0) == 0.0  # a request finished meanwhile
    assert tracker.idle_for("a", z.FrontendSample(0, 0, 5, 0), 110.0) == 6.0
    assert tracker.idle_for("a", z.FrontendSample(1, 0, 5, 0), 111.0) == 0.0  # one running
    assert tracker.idle_for("b", quiet, 111.0) == 0.0  # per pipeline
    tracker.forget("a")
    assert tracker.idle_for("a", z.FrontendSample(0, 0, 5, 0), 120.0) == 0.0


def test_decisions() -> None:
    cfg = z.ZeroSettings(10.0)
    idle, demand = z.FrontendSample(0, 0, 4, 0), z.FrontendSample(0, 0, 4, 1)
    assert z.decide({"phase": "Ready"}, cfg, idle, 10.0) == "scale_to_zero"
    assert z.decide({"phase": "Ready"}, cfg, idle, 9.9) is None
    assert z.decide({"phase": "Ready"}, None, idle, 1e9) is None
    assert z.decide({"phase": "Ready", "reconfiguration": {"id": "x"}}, cfg, idle, 1e9) is None
    assert z.decide({"phase": "Degraded"}, cfg, idle, 1e9) is None
    assert z.decide({"phase": "Ready"}, cfg, None, 1e9) is None
    assert z.decide({"phase": "ScaledToZero"}, cfg, idle, 0.0) == "hold"
    assert z.decide({"phase": "ScaledToZero"}, cfg, None, 0.0) == "hold"
    assert z.decide({"phase": "ScaledToZero"}, cfg, demand, 0.0) == "wake"


def test_status_at_zero_and_while_waking() -> None:
    at_zero = z.zero_status({}, 12.0, "2026-01-01T00:00:00Z", 3)
    assert at_zero["phase"] == "ScaledToZero" and at_zero["stageCount"] == 0
    ready = next(c for c in at_zero["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ScaledToZero")
    waking = z.wake_status(at_zero, 2, "2026-01-01T00:01:00Z", 3, 1000.0)
    assert waking["phase"] == "Pending" and waking["zero"] == {"demandAt": 1000.0}
    assert z.cold_start_seconds(waking, 1004.25) == 4.25
    assert z.cold_start_seconds(at_zero, 1004.25) is None
