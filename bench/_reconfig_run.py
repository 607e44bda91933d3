"""One run of the reconfiguration benchmark: a fresh `4,4` pipeline (agent processes + frontend), the long
requests and probes of `_reconfig_client`, one layout change by one strategy, and the figures of the run.

Each run starts from fresh processes so that no strategy inherits another's pools, caches or layout.
"""

from __future__ import annotations

import contextlib
import inspect
import multiprocessing
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _linkspeed
from _reconfig_client import ClientPlan, client_process
from _reconfig_measure import Record, measure

from pipeshift.api import Layout, plan_moves
from pipeshift.control import ReconfigReport, reconfigure, stage_layer_tokens, tokens_recomputed
from pipeshift.control.reconfigure import ReconfigFailed, SwitchBudget
from pipeshift.local.demo_change import StandbyPipeline
from pipeshift.local.processes import http_json, start_agents
from pipeshift.runtime.frontend import BackgroundFrontend, FrontendConfig

# Benchmark name -> (control strategy, switch mode). None: a strategy that holds by definition (it is given
# "drain" where `reconfigure` takes a switch); "default": whatever switch `reconfigure` uses by default.
STRATEGIES: dict[str, tuple[str, str | None]] = {
    "restart": ("restart", None),
    "stop-copy": ("stop-copy", None),
    "live-drain": ("live", "drain"),
    "live-epoch": ("live", "epoch"),
    "live-no-resize": ("live-no-resize", "default"),
    "live-default": ("live", "default"),
    "live-epoch-paced": ("live", "epoch"),
}
# Strategies whose pre-copy is capped (`SwitchBudget.precopy_bytes_per_s`, bytes/s for all pairs together): the
# same switch, trading a longer pre-copy for less slowdown of the decode steps it overlaps.
PRECOPY_CAPS: dict[str, float] = {"live-epoch-paced": 64e6}
CLIENT_TIMEOUT_S = 1800.0
# Serving's default step timeout (30 s) fails every request when one micro-batch is that slow, which a host
# shared with other work can cause during a 2000-token prefill; the benchmark measures the switch, not the
# failure detector, so it allows more.
STEP_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Workload:
    """`long` requests of `long_prompt` tokens each, all sent at once, decode for `long_max_tokens`; probes of
    `probe_prompt` tokens arrive every 1 / `probe_rate` s. The switch starts `settle_s + steady_s` after the last
    long request's first token; probes keep coming for `tail_s` after it. `kv_bytes`: each stage's KV pool."""

    old: str = "4,4"
    new: str = "3,3,2"
    long: int = 24
    long_prompt: int = 1000
    long_max_tokens: int = 256
    probe_rate: float = 4.0
    probe_prompt: int = 32
    probe_max_tokens: int = 16
    settle_s: float = 1.0
    steady_s: float = 5.0
    tail_s: float = 2.0
    kv_bytes: int = 768 * 2**20
    seed: int = 0


def switch_support() -> tuple[str, ...]:
    """The switch modes `control.reconfigure` offers: ("drain",) until it takes a `switch` argument."""
    parameter = inspect.signature(reconfigure).parameters.get("switch")
    return ("drain",) if parameter is None else ("drain", "epoch")


def default_switch() -> str:
    parameter = inspect.signature(reconfigure).parameters.get("switch")
    return "drain" if parameter is None else str(parameter.default)


def unavailable(name: str) -> str | None:
    """Why benchmark strategy `name` cannot run with this pipeshift, or None."""
    _, switch = STRATEGIES[name]
    if switch not in (None, "default") and switch not in switch_support():
        return f"control.reconfigure takes no switch={switch!r} yet (the epoch cutover has not landed)"
    return None


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Running:
    pipeline: StandbyPipeline
    frontend: BackgroundFrontend
    token: str | None
    block_size: int
    block_bytes: int
    stage_start_ms: float | None = None


@contextlib.contextmanager
def running_pipeline(model_dir: Path, layout: str, *, kv_bytes: int | None = None, memory_bytes: int | None = None,
                     prestart_for: str | None = None) -> Iterator[Running]:
    """A fresh pipeline at `layout`, every stage with a pool of `kv_bytes` or a memory budget of `memory_bytes`.
    With `prestart_for`, the stages a change to that layout adds are started now, before any load, as an
    operator creates new stage pods and waits for them Ready before it changes anything: their start-up (a
    process loading torch and its weights) is reported as `stage_start_ms` and stays out of the measured
    windows, where on a small host its CPU alone would slow serving."""
    agents = start_agents(model_dir, layout, dtype="float32", kv_bytes=kv_bytes, memory_bytes=memory_bytes, threads=1)
    pipeline: StandbyPipeline | None = None
    try:
        config = FrontendConfig(model_dir=model_dir, port=0, max_queue=4096, step_timeout_s=STEP_TIMEOUT_S,
                                stages=tuple(f"{a.host}:{a.control_port}" for a in agents.agents)).with_secrets_from()
        with BackgroundFrontend(config) as frontend:
            pipeline = StandbyPipeline(model_dir, agents, Layout.parse(layout), dtype="float32", kv_bytes=kv_bytes,
                                       memory_bytes=memory_bytes, token=config.control_token)
            stage_start_ms = None
            if prestart_for is not None:
                plan = plan_moves(pipeline.layout, Layout.parse(prestart_for, num_layers=pipeline.layout.num_layers))
                added = [plan.new.stage(sid) for sid in plan.added]
                stage_start_ms = pipeline.prestart(added) if added else None
            info = http_json(agents.agents[0].control_url + "/info", token=config.control_token)[1]
            yield Running(pipeline, frontend, config.control_token, int(info["block_size"]),
                          int(info["kv"]["block_bytes"]), stage_start_ms)
    finally:
        if pipeline is not None:
            pipeline.stop()
        agents.stop()


class Client:
    """The client process and its end of the pipe."""

    def __init__(self, plan: ClientPlan) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, theirs = ctx.Pipe()
        self.process = ctx.Process(target=client_process, args=(plan, theirs), daemon=True)
        self.process.start()

    def expect(self, kind: str, timeout_s: float = CLIENT_TIMEOUT_S) -> Any:
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"the benchmark client sent no {kind!r} within {timeout_s:.0f} s")
        got, value = self.conn.recv()
        if got != kind:
            raise RuntimeError(f"the benchmark client failed: {value}" if got == "error"
                               else f"the benchmark client sent {got!r}, expected {kind!r}")
        return value

    def finish(self) -> list[Record]:
        self.conn.send("stop")
        records: list[Record] = self.expect("results")
        self.process.join(30)
        return records

    def close(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


@contextlib.contextmanager
def client(plan: ClientPlan) -> Iterator[Client]:
    started = Client(plan)
    try:
        yield started
    finally:
        started.close()


def prompts(n: int, tokens: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(tokens)] for _ in range(n)]


def change(running: Running, to: str, name: str) -> tuple[dict[str, Any], float, float]:
    """Run the change by benchmark strategy `name`; the report (also of a failed change) and its start and end."""
    strategy, switch = STRATEGIES[name]
    pipeline = running.pipeline
    kwargs: dict[str, Any] = {}
    if len(switch_support()) > 1 and switch not in (None, "default"):
        kwargs["switch"] = switch
    elif len(switch_support()) > 1 and switch is None:
        kwargs["switch"] = "drain"  # restart and stop-copy hold by definition
    if name in PRECOPY_CAPS:
        kwargs["budget"] = SwitchBudget(precopy_bytes_per_s=PRECOPY_CAPS[name])
    plan = plan_moves(pipeline.layout, Layout.parse(to, num_layers=pipeline.layout.num_layers))
    start = time.time()
    try:
        report: ReconfigReport = reconfigure(running.frontend.url, dict(pipeline.urls), plan,
                                             start_stage=pipeline.start_stage, stop_stage=pipeline.stop_stage,
                                             token=running.token, strategy=strategy, **kwargs)
    except ReconfigFailed as failed:
        report = failed.report
    end = time.time()
    if report.outcome == "committed":
        pipeline.layout = plan.new
    answer = report.to_json()
    answer.setdefault("switch", kwargs.get("switch", default_switch()))
    return answer, start, end


def recomputed(running: Running, report: dict[str, Any], records: list[Record], num_layers: int) -> int:
    """The agents' (position, layer) counters (stages that left were read before they stopped) against what
    the served requests needed: 0 means no position was computed twice in any layer."""
    counted = list(stage_layer_tokens(running.pipeline.urls.values(), running.token).values())
    counted += [int(stats["layer_tokens_computed"]) for stats in report["departed_stats"].values()]
    return tokens_recomputed(counted, [(r["prompt_tokens"], r["tokens"]) for r in records], num_layers)


def run_once(model_dir: Path, name: str, workload: Workload, vocab: int, label: str,
             loaded_link_bytes: int | None = None) -> dict[str, Any]:
    """With `loaded_link_bytes`, the loopback link is also measured after the tail, while the long requests
    still stream (`link_loaded_bytes_per_s`): on a host whose cores serving keeps busy, the link is CPU too,
    and this is its speed under the same load the KV copy ran under."""
    w = workload
    moved = len(plan_moves(Layout.parse(w.old), Layout.parse(w.new)).moves)
    # restart starts every stage of the new layout by definition; the others adopt pre-started added stages.
    with running_pipeline(model_dir, w.old, kv_bytes=w.kv_bytes,
                          prestart_for=None if name == "restart" else w.new) as running:
        plan = ClientPlan(running.frontend.url, [(p, w.long_max_tokens) for p in prompts(w.long, w.long_prompt,
                          vocab, w.seed)], w.probe_rate, w.probe_prompt, w.probe_max_tokens, vocab, w.seed + 1)
        began = time.time()
        with client(plan) as c:
            prefilled = c.expect("prefilled")
            progress(f"  {label}: long requests prefilled in {prefilled - began:.1f} s; steady state ...")
            steady = (prefilled + w.settle_s, prefilled + w.settle_s + w.steady_s)
            time.sleep(max(0.0, steady[1] - time.time()))
            load = os.getloadavg()[0]  # how busy the shared host was: context for every figure of the run
            report, start, end = change(running, w.new, name)
            progress(f"  {label}: {report['outcome']} in {end - start:.2f} s; tail ...")
            time.sleep(w.tail_s)
            loaded_link = None if loaded_link_bytes is None else _linkspeed.measure_once(loaded_link_bytes)
            records = c.finish()
        figures = measure(records, report, steady=(steady[0], start), switch=(start, end),
                          block_size=running.block_size, block_bytes=running.block_bytes, moved_layers=moved)
        figures["tokens_recomputed"] = recomputed(running, report, records, Layout.parse(w.old).num_layers)
        figures["switch"] = report["switch"]
        figures["stage_start_ms"] = running.stage_start_ms
        figures["link_loaded_bytes_per_s"] = loaded_link
        figures["loadavg_1m_at_switch"] = load
        figures["run_s"] = time.time() - began
    return figures
