"""Fault injection into live reconfiguration: every (phase, action) of `PIPESHIFT_FAULT`, each on a `4,4`
pipeline of real agent processes behind the frontend, with greedy requests streaming through the change
(the default switch, epoch; the drain switch's own calls separately).

The rules proved, case by case: a fault before the point of no return aborts — the old layout serves on
untouched, an added stage is stopped, targets drop what they prepared and pools return to their size; a
fault at or after it rolls the new layout forward (calls retried with the same request id). A stage
process that dies while it serves is started again (in its old range before the point of no return, in
its new one after it) and the live requests are prefilled again: the only case that recomputes anything,
and the report says so (`restarted`, `requests_reprefilled`; the agents' counters show the recomputation).
In every case every request ends with `stop` or `length` and exactly the tokens of the in-process engine
(float64).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from _streaming import Result, assert_all_match, eos_oracle, stream_tokens

from pipeshift.api import Layout, ReconfigPlan, StagePlan, plan_moves
from pipeshift.control import ReconfigReport, SwitchBudget, reconfigure, tokens_recomputed
from pipeshift.errors import UserError
from pipeshift.local.processes import LocalAgents, http_json, start_agents
from pipeshift.runtime.faults import (
    ACTIONS,
    CRASH_EXIT_CODE,
    DELAY_ENV,
    FAULT_ENV,
    PHASES,
    Fault,
    FaultInjector,
    fault_from_env,
)
from pipeshift.runtime.frontend.background import BackgroundFrontend
from pipeshift.runtime.frontend.config import FrontendConfig

VOCAB = 300
LAYERS = 8
KV_BYTES = 8 << 20
# The orchestrator's per-call timeout here: a hung call costs this much of a test.
TIMEOUT_S = 2.0
# A slow call that stays within the timeout (the change completes) and one that does not.
SLOW_S = 0.4
TOO_SLOW_S = TIMEOUT_S + 1.5
BUDGET = SwitchBudget(call_timeout_s=TIMEOUT_S, hold_timeout_s=TIMEOUT_S)
# Requests kept in flight while a change runs.
STREAMING = 6
ADDED = "added"
FRONTEND = "frontend"


@dataclass(frozen=True)
class Case:
    """Where the fault goes (`victim`: an old stage id, the stage the change adds, or the frontend), which
    change it hits, and what must come of it."""

    phase: str
    action: str
    to: str
    victim: int | str
    outcome: str
    delay_s: float = SLOW_S

    @property
    def fault(self) -> str:
        return f"{self.phase}:{self.action}"


C, A = "committed", "aborted"
CASES = [
    # prepare runs on targets: the stage `4,4 → 3,3,2` adds, or the serving stage 1 of `4,4 → 3,5`.
    Case("prepare", "crash", "3,3,2", ADDED, A),
    Case("prepare", "hang", "3,5", 1, A),
    Case("prepare", "slow", "3,3,2", ADDED, C),
    Case("prepare", "refuse", "3,5", 1, A),
    # precopy runs on sources, which serve.
    Case("precopy", "crash", "3,5", 0, A),
    Case("precopy", "hang", "3,3,2", 1, A),
    Case("precopy", "slow", "3,3,2", 0, C),
    Case("precopy", "refuse", "3,5", 0, A),
    # switch: arming every stage of either layout, before the point of no return (the frontend's arm).
    Case("switch", "crash", "3,3,2", ADDED, A),
    Case("switch", "hang", "3,5", 0, A),
    Case("switch", "slow", "3,3,2", 1, C),
    Case("switch", "refuse", "3,3,2", ADDED, A),
    # commit: after the point of no return, the sources confirm their final deltas (flush).
    Case("commit", "crash", "3,3,2", 1, C),
    Case("commit", "hang", "3,5", 0, C),
    Case("commit", "slow", "3,3,2", 1, C),
    Case("commit", "refuse", "3,3,2", 0, C),
    # cleanup: every stage of the new layout retires the old epoch (drops what left, resizes its pool).
    Case("cleanup", "crash", "3,3,2", ADDED, C),
    Case("cleanup", "hang", "3,5", 1, C),
    Case("cleanup", "slow", "3,3,2", ADDED, C),
    Case("cleanup", "refuse", "3,3,2", 0, C),
]


@pytest.fixture(scope="module")
def model_dir(model_factory: Callable[..., Path]) -> Path:
    return model_factory(layers=LAYERS, hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=VOCAB, seed=13,
                         tie_embeddings=True)


@pytest.fixture(scope="module")
def oracle(model_dir: Path) -> Callable[[list[int], int], list[int]]:
    return eos_oracle(model_dir)


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in (FAULT_ENV, DELAY_ENV)}


class FaultyPipeline:
    """`4,4` agent processes behind an in-process frontend, with `case`'s fault in its victim's environment:
    an old stage's first process, the first process of the stage the change adds, or the frontend. A stage
    the orchestrator starts again after a crash is a fresh process without the fault."""

    def __init__(self, model_dir: Path, case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
        self.model_dir, self.case = model_dir, case
        self.faulty = clean_env() | {FAULT_ENV: case.fault, DELAY_ENV: str(case.delay_s)}
        self.groups: dict[int, LocalAgents] = {}
        self.logs: dict[int, list[Path]] = {}
        self.exits: list[tuple[int, int | None]] = []  # (stage id, exit status) of every process stopped
        self.frontend: BackgroundFrontend | None = None
        self.urls: dict[int, str] = {}
        try:
            with ThreadPoolExecutor() as pool:  # agents start in parallel: most of a case's time is start-up
                list(pool.map(lambda s: self._start(s, self.faulty if case.victim == s.stage_id else clean_env()),
                              Layout.parse("4,4")))
            config = FrontendConfig(model_dir=model_dir, port=0, step_timeout_s=20.0,
                                    stages=tuple(self.urls[sid].split("://")[1] for sid in sorted(self.urls)))
            with monkeypatch.context() as env:
                if case.victim == FRONTEND:
                    env.setenv(FAULT_ENV, case.fault)
                    env.setenv(DELAY_ENV, str(case.delay_s))
                self.frontend = BackgroundFrontend(config)
        except BaseException:
            self.close()
            raise
        self.old_pools = {sid: self.info(sid)["kv"]["total_blocks"] for sid in self.urls}

    @property
    def url(self) -> str:
        assert self.frontend is not None
        return self.frontend.url

    def _start(self, stage: StagePlan, env: dict[str, str]) -> str:
        group = start_agents(self.model_dir, [stage], dtype="float64", kv_bytes=KV_BYTES, threads=1, env=env)
        self.groups[stage.stage_id] = group
        self.logs.setdefault(stage.stage_id, []).append(group.logs[stage.stage_id])
        self.urls[stage.stage_id] = group.agents[0].control_url
        return self.urls[stage.stage_id]

    def start_stage(self, stage: StagePlan) -> str:
        """The orchestrator's callback for a stage it adds, or starts again after a crash."""
        first_added = stage.stage_id not in self.logs
        return self._start(stage, self.faulty if first_added and self.case.victim == ADDED else clean_env())

    def stop_stage(self, stage_id: int) -> None:
        group = self.groups.pop(stage_id)
        self.urls.pop(stage_id)
        group.stop()
        self.exits.append((stage_id, group.process(stage_id).returncode))

    def crashed(self, stage_id: int) -> bool:
        """Whether a process of the stage exited with the injected crash's status."""
        running = self.groups.get(stage_id)
        now = [] if running is None else [running.process(stage_id).poll()]
        return CRASH_EXIT_CODE in [code for sid, code in self.exits if sid == stage_id] + now

    def log(self, stage_id: int) -> str:
        return "".join(path.read_text(errors="replace") for path in self.logs[stage_id])

    def info(self, stage_id: int) -> dict[str, Any]:
        return http_json(self.urls[stage_id] + "/info")[1]

    def stats(self, stage_id: int) -> dict[str, Any]:
        return http_json(self.urls[stage_id] + "/stats")[1]

    def close(self) -> None:
        if self.frontend is not None:
            self.frontend.stop()
        for sid, group in self.groups.items():  # all stop at once rather than one after the other
            if group.process(sid).poll() is None:
                group.process(sid).terminate()
        for group in self.groups.values():
            group.stop()


class CounterWatch:
    """The last `layer_tokens_computed` a stage reported before its process died (polled while a change runs):
    a lower bound of what the dead process computed, so that the recomputation it caused can be counted."""

    def __init__(self, url: str) -> None:
        self.url, self.last = url, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.last = int(http_json(self.url + "/stats", timeout_s=1.0)[1]["layer_tokens_computed"])
            except (OSError, KeyError):
                return  # the process is gone

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.last


@dataclass
class Run:
    report: ReconfigReport
    requests: list[tuple[list[int], int]]
    results: list[Result]
    started: float
    ended: float

    def spanning(self) -> tuple[int, int]:
        """Requests that were streaming when the change started, and when it ended."""
        at_start = sum(1 for _, _, t in self.results if t and t[0] < self.started < t[-1])
        at_end = sum(1 for _, _, t in self.results if t and t[0] < self.ended < t[-1])
        return at_start, at_end


def change_under_load(url: str, change: Callable[[], ReconfigReport], seed: int) -> Run:
    """Long requests stream before the change starts; shorter ones keep arriving while it runs, so that
    `STREAMING` are in flight at any time."""
    rng = random.Random(seed)

    def draw(shortest: int, longest: int) -> tuple[list[int], int]:
        return [rng.randrange(2, VOCAB) for _ in range(rng.randint(3, 20))], rng.randint(shortest, longest)

    requests = [draw(80, 140) for _ in range(4)]

    async def scenario() -> Run:
        async with aiohttp.ClientSession() as session:
            streams = [asyncio.create_task(stream_tokens(session, url, p, n, clock=time.monotonic))
                       for p, n in requests]
            while (await asyncio.to_thread(http_json, url + "/control/state"))[1]["running"] < len(streams):
                assert not any(t.done() for t in streams)
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)
            started = time.monotonic()
            changing = asyncio.create_task(asyncio.to_thread(change))
            while not changing.done():  # keep a few requests streaming however long the change takes
                await asyncio.sleep(0.1)
                if sum(not t.done() for t in streams) < STREAMING:
                    requests.append(draw(40, 100))
                    streams.append(asyncio.create_task(stream_tokens(session, url, *requests[-1],
                                                                     clock=time.monotonic)))
            report = await changing
            ended = time.monotonic()
            return Run(report, requests, list(await asyncio.gather(*streams)), started, ended)

    return asyncio.run(scenario())


def assert_exact(run: Run, oracle: Callable[[list[int], int], list[int]]) -> None:
    assert_all_match(run.requests, run.results, oracle)


def assert_holds_exactly(pipeline: FaultyPipeline, layout: Layout, epoch: int) -> None:
    """Each stage computes exactly its range, holds KV of no other layer, has nothing prepared or reserved."""
    for stage in layout:
        stats, info = pipeline.stats(stage.stage_id), pipeline.info(stage.stage_id)
        assert stats["loaded_layers"] == list(stage.layers()), (stage, stats["loaded_layers"])
        assert set(stats["kv_layers"]) <= set(stage.layers()), (stage, stats["kv_layers"])
        assert info["layers"] == [stage.start, stage.end] and info["reconfig"] is None, (stage, info)
        assert info["kv"]["reserved_blocks"] == 0, (stage, info["kv"])
        assert info["epoch"] == epoch, (stage, info["epoch"])


def recomputed(pipeline: FaultyPipeline, run: Run, stage_ids: list[int], dead: int = 0) -> int:
    """`tokens_recomputed` by the agents' counters; `dead`: what processes that died had counted (at least)."""
    counted = [pipeline.stats(sid)["layer_tokens_computed"] for sid in stage_ids]
    counted += [stats["layer_tokens_computed"] for stats in run.report.departed_stats.values()] + [dead]
    lengths = [(len(prompt), len(tokens)) for (prompt, _), (tokens, _, _) in zip(run.requests, run.results,
                                                                                  strict=True)]
    return tokens_recomputed(counted, lengths, LAYERS)


def victim_id(case: Case, plan: ReconfigPlan) -> int | str:
    return plan.added[0] if case.victim == ADDED else case.victim


def run_case(model_dir: Path, case: Case, monkeypatch: pytest.MonkeyPatch, switch: str | None = None,
             ) -> tuple[FaultyPipeline, ReconfigPlan, Run, int]:
    """The case's change under load; also what the victim had computed if it crashed (a lower bound)."""
    plan = plan_moves(Layout.parse("4,4"), Layout.parse(case.to))
    pipeline = FaultyPipeline(model_dir, case, monkeypatch)
    try:
        watch = CounterWatch(pipeline.urls[case.victim]) if case.action == "crash" and case.victim in (0, 1) else None
        options = {} if switch is None else {"switch": switch}
        run = change_under_load(
            pipeline.url,
            lambda: reconfigure(pipeline.url, dict(pipeline.urls), plan, start_stage=pipeline.start_stage,
                                stop_stage=pipeline.stop_stage, budget=BUDGET, **options),
            seed=PHASES.index(case.phase) * 10 + ACTIONS.index(case.action),
        )
        return pipeline, plan, run, 0 if watch is None else watch.stop()
    except BaseException:
        pipeline.close()
        raise


def assert_outcome(pipeline: FaultyPipeline, plan: ReconfigPlan, run: Run, case: Case, dead: int) -> None:
    """The rules: aborted → the old layout untouched; committed → exactly the new one; nothing left reserved
    or held; recomputation only where a stage process died, and then counted and reported."""
    report = run.report
    if case.outcome == "aborted":
        assert not set(plan.added) & set(pipeline.urls)  # the added stage was stopped
        assert_holds_exactly(pipeline, plan.old, epoch=0)
        assert {sid: pipeline.info(sid)["kv"]["total_blocks"] for sid in pipeline.urls} == pipeline.old_pools
    else:
        assert_holds_exactly(pipeline, plan.new, epoch=1)
        assert not set(plan.removed) & set(pipeline.urls)  # removed stages were stopped
    state = http_json(pipeline.url + "/control/state")[1]
    assert state["gate"] == "open" and state["suspended"] is None, state
    assert state["reserved_blocks"] == [0] * len(pipeline.urls), state
    assert state["epoch"] == (1 if case.outcome == "committed" else 0)
    layout = plan.new if case.outcome == "committed" else plan.old
    extra = recomputed(pipeline, run, [s.stage_id for s in layout], dead)
    if report.restarted:
        assert report.requests_reprefilled > 0 and extra > 0, (report.to_json(), extra)
    else:
        assert report.requests_reprefilled == 0 and extra == 0, (report.to_json(), extra)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.phase}-{c.action}" for c in CASES])
def test_a_fault_aborts_before_the_point_of_no_return_and_rolls_forward_after_it_losing_nothing(
    model_dir: Path, oracle: Callable[[list[int], int], list[int]], case: Case, monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipeline, plan, run, dead = run_case(model_dir, case, monkeypatch)
    try:
        report, victim = run.report, victim_id(case, plan)
        assert report.outcome == case.outcome, report.error
        assert_exact(run, oracle)
        at_start, at_end = run.spanning()
        assert at_start >= 1 and at_end >= 1, (at_start, at_end)
        assert isinstance(victim, int)
        # The fault fired where it was put; a stage that died while it served was started again.
        if case.action == "crash":
            assert pipeline.crashed(victim)
            serving = victim in [s.stage_id for s in (plan.new if case.outcome == "committed" else plan.old)]
            assert report.restarted == ([victim] if serving else []), report.to_json()
        else:
            assert f"injecting fault {case.fault}" in pipeline.log(victim)
            assert report.restarted == []
        if case.outcome == "aborted":
            # Why: the step, the stage and the call that failed, and how.
            assert report.error and case.phase in report.error and f"stage {victim}" in report.error, report.error
            how = {"crash": "no answer", "hang": "timed out", "refuse": "answered 503"}[case.action]
            assert how in report.error, report.error
        else:
            assert (report.error is None) != bool(report.restarted), report.error  # rolled forward, past a crash
        assert_outcome(pipeline, plan, run, case, dead)
    finally:
        pipeline.close()


def test_a_call_slower_than_the_timeout_aborts_before_the_point_of_no_return(
    model_dir: Path, oracle: Callable[[list[int], int], list[int]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The slowness `prepare:slow` survives, made longer than the orchestrator's call timeout."""
    case = Case("prepare", "slow", "3,3,2", ADDED, A, delay_s=TOO_SLOW_S)
    pipeline, plan, run, dead = run_case(model_dir, case, monkeypatch)
    try:
        assert run.report.outcome == "aborted"
        assert "prepare" in (run.report.error or "") and "timed out after 2s" in (run.report.error or "")
        assert_exact(run, oracle)
        assert_outcome(pipeline, plan, run, case, dead)
    finally:
        pipeline.close()


def test_a_stage_that_dies_at_a_drain_commit_is_started_again_and_its_requests_prefilled_again(
    model_dir: Path, oracle: Callable[[list[int], int], list[int]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Drain switch: the crash comes while the frontend is held, after other stages committed; the stage
    comes back in its new range and the held requests are prefilled again when serving resumes."""
    case = Case("commit", "crash", "3,3,2", 1, C)
    pipeline, plan, run, dead = run_case(model_dir, case, monkeypatch, switch="drain")
    try:
        assert run.report.outcome == "committed" and run.report.switch == "drain", run.report.error
        assert run.report.restarted == [1] and pipeline.crashed(1)
        assert "/reconfig/commit" in (run.report.error or ""), run.report.error
        assert_exact(run, oracle)
        assert_outcome(pipeline, plan, run, case, dead)
    finally:
        pipeline.close()


FRONTEND_CASES = [Case("switch", "hang", "3,3,2", FRONTEND, C), Case("switch", "slow", "3,5", FRONTEND, C),
                  Case("switch", "refuse", "3,3,2", FRONTEND, C)]


@pytest.mark.parametrize("case", FRONTEND_CASES, ids=[c.action for c in FRONTEND_CASES])
def test_a_fault_in_the_frontends_arm_is_retried_past_the_point_of_no_return(
    model_dir: Path, oracle: Callable[[list[int], int], list[int]], case: Case, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The frontend arming the new epoch is the point of no return: a call that hangs, is slow or is
    refused is sent again with its request id, and the change commits without recomputing anything."""
    caplog.set_level(logging.WARNING, logger="pipeshift.runtime.faults")
    pipeline, plan, run, dead = run_case(model_dir, case, monkeypatch, switch="epoch")
    try:
        assert run.report.outcome == "committed" and run.report.error is None, run.report.error
        assert f"frontend POST /control/arm: injecting fault {case.fault}" in caplog.text
        assert_exact(run, oracle)
        assert_outcome(pipeline, plan, run, case, dead)
    finally:
        pipeline.close()


@pytest.mark.parametrize("delay_s", [TIMEOUT_S * 2 + 1.0], ids=["slower-than-the-hold-call"])
def test_a_drain_whose_hold_answers_too_late_aborts_and_the_late_hold_holds_nothing(
    model_dir: Path, oracle: Callable[[list[int], int], list[int]], delay_s: float, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Drain switch: the frontend's hold is the switch. One that does not answer within the call's time aborts
    the change, and when it finally arrives it finds itself cancelled by the abort's resume instead of
    holding serving for good."""
    case = Case("switch", "slow", "3,5", FRONTEND, A, delay_s=delay_s)
    pipeline, plan, run, dead = run_case(model_dir, case, monkeypatch, switch="drain")
    try:
        assert run.report.outcome == "aborted" and "switch" in (run.report.error or ""), run.report.error
        assert "frontend: POST" in (run.report.error or "") and "/control/hold" in (run.report.error or "")
        assert run.report.held_unix is not None
        time.sleep(max(0.0, run.report.held_unix + delay_s + 0.5 - time.time()))  # the late hold came and went
        assert_exact(run, oracle)
        assert_outcome(pipeline, plan, run, case, dead)
        after = change_under_load(pipeline.url, lambda: run.report, seed=7)  # serving goes on
        assert_exact(after, oracle)
    finally:
        pipeline.close()


@pytest.mark.parametrize(
    ("value", "named"),
    [("prepare", "<phase>:<action>"), ("commit:explode", "refuse"), ("teardown:crash", "cleanup"),
     ("commit:hang:now", "<phase>:<action>")],
)
def test_a_malformed_fault_is_refused_naming_the_variable_and_the_valid_values(value: str, named: str) -> None:
    with pytest.raises(UserError, match=FAULT_ENV) as refused:
        fault_from_env({FAULT_ENV: value})
    assert repr(value) in str(refused.value) and named in str(refused.value)


def test_a_malformed_delay_is_refused_naming_its_variable() -> None:
    for raw in ("soon", "-1", "nan", "inf"):
        with pytest.raises(UserError, match=DELAY_ENV):
            fault_from_env({FAULT_ENV: "commit:slow", DELAY_ENV: raw})
    assert fault_from_env({FAULT_ENV: " Commit:Slow ", DELAY_ENV: "0.25"}) == Fault("commit", "slow", 0.25)
    assert fault_from_env({FAULT_ENV: ""}) is None and fault_from_env({}) is None


def test_an_agent_with_a_malformed_fault_does_not_start_and_says_why(model_dir: Path) -> None:
    with pytest.raises(UserError, match=FAULT_ENV):
        start_agents(model_dir, "8", dtype="float64", kv_bytes=KV_BYTES, threads=1,
                     env=clean_env() | {FAULT_ENV: "commit:explode"})


def test_a_fault_fires_once_and_only_at_its_phase() -> None:
    """The hook itself, on a live event loop: a refusal is an HTTP 503 raised once, other phases pass."""
    from aiohttp import web

    injector = FaultInjector(Fault("precopy", "refuse"), "stage 7")
    calls: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        calls.append(request.path)
        return web.json_response({})

    assert injector.wrap("commit", handler) is handler
    wrapped = injector.wrap("precopy", handler)
    assert wrapped is not handler

    async def drive() -> list[int]:
        app = web.Application()
        app.router.add_post("/reconfig/precopy", wrapped)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        statuses = []
        async with aiohttp.ClientSession() as session:
            for _ in range(2):
                async with session.post(f"http://127.0.0.1:{port}/reconfig/precopy") as resp:
                    statuses.append(resp.status)
                    if resp.status != 200:
                        assert "stage 7" in (await resp.json())["error"]
        await runner.cleanup()
        return statuses

    assert asyncio.run(drive()) == [503, 200]
    assert calls == ["/reconfig/precopy"] and injector.fired
    with pytest.raises(ValueError, match="cleanup"):
        injector.wrap("teardown", handler)


@pytest.fixture(autouse=True)
def _no_leftover_fault(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Agents inherit this process's environment: never let a fault leak into another test."""
    monkeypatch.delenv(FAULT_ENV, raising=False)
    monkeypatch.delenv(DELAY_ENV, raising=False)
    yield


def test_reconfigure_timeout_bounds_each_call_and_the_report_names_the_call_that_hung(
    model_dir: Path, tmp_path: Path
) -> None:
    """`pipeshift serve` whose agents all hang their prepare call; `pipeshift reconfigure --timeout 1` aborts
    after that second, says which call timed out, and the pipeline serves on in its old layout."""
    env = clean_env() | {"PIPESHIFT_THREADS": "1", FAULT_ENV: "prepare:hang"}
    cli = [sys.executable, "-m", "pipeshift.cli"]
    serve = subprocess.Popen([*cli, "serve", "--model", str(model_dir), "--layout", "4,4", "--port", "0",
                              "--dtype", "float64", "--kv-bytes", str(KV_BYTES)],
                             stdout=subprocess.PIPE, stderr=(tmp_path / "serve.log").open("w"), text=True, env=env)
    try:
        assert serve.stdout is not None
        serving = serve.stdout.readline()
        assert serving.startswith("serving "), (tmp_path / "serve.log").read_text()
        url = serving.split(" on ", 1)[1].strip()
        refused = subprocess.run([*cli, "reconfigure", "--frontend", url, "--to", "3,5", "--timeout", "0"],
                                 capture_output=True, text=True, env=env, timeout=60)
        assert refused.returncode == 2 and "--timeout '0'" in refused.stderr, refused.stderr
        done = subprocess.run([*cli, "reconfigure", "--frontend", url, "--to", "3,5", "--timeout", "1", "--json"],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 1, done.stdout + done.stderr
        answer = json.loads(done.stdout)
        error = answer["report"]["error"]
        assert answer["report"]["outcome"] == "aborted" and answer["layout"] == "4,4", answer
        assert "prepare failed" in error and "stage 1" in error and "/reconfig/prepare" in error, error
        assert "timed out after 1s" in error, error
        assert http_json(url + "/health")[1]["status"] == "ok"
    finally:
        serve.terminate()
        serve.wait(timeout=60)


def test_requests_of_a_chain_that_broke_fail_once_the_recovery_window_ends_unrecovered(model_dir: Path) -> None:
    """The window a change opens on the frontend is a bound: if nobody replaces a stage that died, its
    requests wait that long (instead of failing at once) and then fail naming why."""
    window_s = 1.5
    with start_agents(model_dir, "4,4", dtype="float64", kv_bytes=KV_BYTES, threads=1, env=clean_env()) as agents:
        config = FrontendConfig(model_dir=model_dir, port=0, stages=tuple(
            f"{a.host}:{a.control_port}" for a in agents.agents))
        with BackgroundFrontend(config) as frontend:
            status, answer = http_json(frontend.url + "/control/guard", "POST",
                                       {"request_id": "guard-1", "recover_timeout_s": window_s})
            assert status == 200 and answer["recover_timeout_s"] == window_s

            async def scenario() -> tuple[float, list[str]]:
                async with aiohttp.ClientSession() as session:
                    async def one() -> str:
                        body = {"prompt": [5, 6, 7], "max_tokens": 1500, "ignore_eos": True, "stream": True}
                        async with session.post(frontend.url + "/v1/completions", json=body) as resp:
                            return (await resp.read()).decode()
                    streams = [asyncio.create_task(one()) for _ in range(3)]
                    while (await asyncio.to_thread(http_json, frontend.url + "/control/state"))[1]["running"] < 3:
                        await asyncio.sleep(0.02)
                    agents.process(1).kill()
                    killed = time.monotonic()
                    results = await asyncio.gather(*streams)
                    return time.monotonic() - killed, results

            waited, results = asyncio.run(scenario())
            assert waited >= window_s, waited
            for text in results:
                assert f"was not recovered within {window_s:g}s" in text, text[-500:]
            state = http_json(frontend.url + "/control/state")[1]
            assert state["suspended"] is None and state["down"], state
