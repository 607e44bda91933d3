"""The `restart` baseline under streaming load: every old stage is stopped and the new layout started empty,
the frontend prefills each live request again, and still no request is lost and no greedy token changes
(float64 oracle); the recomputation that makes it the baseline shows in the agents' own counters.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from test_control_reconfigure import (  # the shared harness: fixtures and helpers of the live strategies
    Pipeline4x4,
    assert_all_match,
    assert_holds_exactly,
    change_under_load,
    model_dir,
    oracle,
    pipeline,
    recomputed,
)

from pipeshift.api import Layout, plan_moves
from pipeshift.control import reconfigure
from pipeshift.local.processes import http_json

__all__ = ["model_dir", "oracle", "pipeline"]


@pytest.mark.parametrize("target", ["3,3,2", "3,5"])
def test_a_restart_under_streaming_load_loses_nothing_changes_no_token_but_recomputes(
    pipeline: Pipeline4x4, oracle: Callable[[list[int], int], list[int]], target: str
) -> None:
    plan = plan_moves(Layout.parse("4,4"), Layout.parse(target))
    report, requests, results = change_under_load(
        pipeline,
        lambda: reconfigure(pipeline.frontend.url, dict(pipeline.urls), plan, start_stage=pipeline.start_stage,
                            stop_stage=pipeline.stop_stage, strategy="restart"),
        seed=len(target),
    )
    assert report.outcome == "committed", report.error
    assert report.strategy == "restart"
    assert_all_match(requests, results, oracle)
    assert report.epoch == 1 and pipeline.frontend.frontend.scheduler.epoch == 1
    assert 0 < report.pause_ms < report.switch_duration_ms
    assert report.kv_bytes_moved == 0 and not report.rounds
    assert sorted(report.departed_stats) == [s.stage_id for s in plan.old]
    assert sorted(pipeline.extra) == sorted(s.stage_id for s in plan.new)
    assert_holds_exactly(pipeline, plan.new)
    state = http_json(pipeline.frontend.url + "/control/state")[1]
    assert state["reserved_blocks"] == [0] * len(plan.new) and state["gate"] == "open"
    assert recomputed(pipeline, report, requests, results, [s.stage_id for s in plan.new]) > 0
