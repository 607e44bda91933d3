"""The continuous-batching scheduler against real stages run in this process, batch by batch.

`StageRing` executes each micro-batch the way an agent chain does (release, reserve, forward on every
stage, in send order), so any interleaving of arrivals, returns and cancellations can be replayed
deterministically. Oracles: the in-process engine's greedy generation per request, and the stages'
own KV caches for the admission mirror.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeshift.api import Layout
from pipeshift.runtime.frontend.admission import KVMirror, StageBudget
from pipeshift.runtime.frontend.sampling import SamplingParams
from pipeshift.runtime.frontend.scheduler import QueueFull, Scheduler, SchedulerConfig, Unavailable
from pipeshift.runtime.frontend.sequence import Delta, Failure, GenerationParams, Sequence, State
from pipeshift.runtime.frontend.served_model import ServedModel
from pipeshift.runtime.metrics import FrontendMetrics
from pipeshift.runtime.microbatch import MicroBatch, last_token_spans
from pipeshift.runtime.model.checkpoint import ModelDir
from pipeshift.runtime.pipeline import Pipeline
from pipeshift.runtime.stage import Stage

VOCAB = 300
BLOCK = 4
LAYOUT = "2,1"
SEQ_IDS = itertools.count()
Oracle = Callable[[list[int], int], list[int]]


@pytest.fixture(scope="module")
def model_dir(model_factory: Callable[..., Path]) -> Path:
    return model_factory(layers=3, hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=VOCAB, seed=11)


@pytest.fixture(scope="module")
def served(model_dir: Path) -> ServedModel:
    return ServedModel.load(model_dir)


@pytest.fixture(scope="module")
def stages(model_dir: Path) -> list[Stage]:
    """Small pools (room for a few requests at a time) so admission has to queue."""
    model = ModelDir(model_dir)
    return [
        Stage(model, p.start, p.end, dtype=torch.float64, kv_blocks=24, block_size=BLOCK, slab_blocks=4)
        for p in Layout.parse(LAYOUT)
    ]


@pytest.fixture(scope="module")
def oracle(model_dir: Path, served: ServedModel) -> Oracle:
    engine = Pipeline(ModelDir(model_dir), Layout.parse(LAYOUT), dtype=torch.float64, block_size=BLOCK)
    eos = served.config.eos_token_ids
    cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def generate(prompt: list[int], max_tokens: int) -> list[int]:
        key = (tuple(prompt), max_tokens)
        if key not in cache:
            cache[key] = engine.generate([prompt], max_tokens, stop_ids=eos)[0]
        return cache[key]

    return generate


class StageRing:
    """The agents' compute loop in one process: batches run in the order they were sent."""

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = stages
        self.queue: deque[MicroBatch] = deque()
        self.sent: list[MicroBatch] = []

    def send(self, batch: MicroBatch) -> None:
        self.queue.append(batch)
        self.sent.append(batch)

    def run_one(self) -> MicroBatch:
        batch = self.queue.popleft()
        x = batch.data
        for stage in self.stages:
            for seq_id in batch.release:
                stage.release(seq_id)
            for span, tokens in zip(batch.spans, batch.reserve, strict=True):
                if tokens:
                    stage.reserve(span.seq_id, tokens)
            if batch.spans:
                x = stage.forward(batch.spans, x)
        if not batch.spans:
            return batch
        return replace(batch, spans=last_token_spans(batch.spans), reserve=(0,) * len(batch.spans), data=x)


def make_scheduler(stages: list[Stage], ring: StageRing, **config: object) -> Scheduler:
    mirror = KVMirror(
        [
            StageBudget(i, s.end - s.start, BLOCK, s.cache.total_blocks, s.cache.reserved_blocks)
            for i, s in enumerate(stages)
        ]
    )
    settings = {"slots": 2, "max_batch_tokens": 24, "max_queue": 64} | config
    return Scheduler(SchedulerConfig(**settings), mirror, ring.send, FrontendMetrics())  # type: ignore[arg-type]


def sequence(served: ServedModel, prompt: list[int], max_tokens: int, seed: int | None = None) -> Sequence:
    sampling = SamplingParams(temperature=0.0) if seed is None else SamplingParams(temperature=0.9, seed=seed)
    return Sequence(
        seq_id=next(SEQ_IDS),
        prompt=prompt,
        params=GenerationParams(max_tokens, sampling),
        decoder=served,
        eos_ids=frozenset(served.config.eos_token_ids),
    )


def drain(seq: Sequence) -> list[Delta | Failure]:
    events = []
    while not seq.events.empty():
        events.append(seq.events.get_nowait())
    return events


requests = st.lists(
    st.tuples(st.lists(st.integers(2, VOCAB - 1), min_size=1, max_size=14), st.integers(1, 10)),
    min_size=1,
    max_size=9,
)
# Each action: 0 submits the next request, 1 returns the oldest batch, 2 cancels a live request.
actions = st.lists(st.integers(0, 2), max_size=60)


@settings(max_examples=25, deadline=None)
@given(requests, actions, st.integers(1, 3))
def test_any_interleaving_gives_the_engines_greedy_outputs_and_frees_every_block(
    served: ServedModel,
    stages: list[Stage],
    oracle: Oracle,
    reqs: list[tuple[list[int], int]],
    plan: list[int],
    slots: int,
) -> None:
    ring = StageRing(stages)
    sched = make_scheduler(stages, ring, slots=slots)
    seqs: list[Sequence] = []
    outputs: dict[int, list[Delta | Failure]] = {}
    cancelled: set[int] = set()
    pending = deque(reqs)

    def step(action: int) -> None:
        if action == 0 and pending:
            prompt, max_tokens = pending.popleft()
            seqs.append(sequence(served, prompt, max_tokens))
            sched.submit(seqs[-1])
        elif action == 1 and ring.queue:
            sched.on_result(ring.run_one())
        elif action == 2:
            live = [s for s in seqs if s.state is not State.DONE]
            if live:
                sched.cancel(live[0])
                cancelled.add(live[0].seq_id)
        if not ring.queue:
            # Whatever was sent has been applied: the mirror must agree with the caches exactly.
            assert sched.mirror.reserved_blocks == [s.cache.reserved_blocks for s in stages]

    for action in plan:
        step(action)
    while pending or ring.queue:
        step(0 if pending else 1)
    for seq in seqs:
        outputs[seq.seq_id] = drain(seq)
        assert seq.state is State.DONE
    for batch in ring.sent:
        prefill = [s.n for s, r in zip(batch.spans, batch.reserve, strict=True) if r]
        assert sum(s.n for s in batch.spans) <= 24 or len(prefill) == 1, "batch token cap exceeded"
    assert all(s.cache.reserved_blocks == 0 and s.cache.used_blocks == 0 for s in stages)
    assert sched.mirror.reserved_blocks == [0] * len(stages)
    for seq in seqs:
        events = outputs[seq.seq_id]
        tokens = [t for e in events if isinstance(e, Delta) for t in e.token_ids]
        expected = oracle(seq.prompt, seq.params.max_tokens)
        if seq.seq_id in cancelled:
            assert expected[: len(tokens)] == tokens
        else:
            assert tokens == expected
            assert events[-1].finish_reason is not None  # type: ignore[union-attr]


def run_until_idle(sched: Scheduler, ring: StageRing) -> None:
    while ring.queue:
        sched.on_result(ring.run_one())


def test_seeded_sampling_repeats_whatever_runs_beside_it(served: ServedModel, stages: list[Stage]) -> None:
    ring = StageRing(stages)
    sched = make_scheduler(stages, ring)
    first = sequence(served, [5, 6, 7], 8, seed=99)
    sched.submit(first)
    run_until_idle(sched, ring)
    crowd = [sequence(served, [9, 10 + i], 6) for i in range(3)]
    again = sequence(served, [5, 6, 7], 8, seed=99)
    for seq in [*crowd[:2], again, crowd[2]]:
        sched.submit(seq)
    run_until_idle(sched, ring)
    tokens = [[t for e in drain(s) for t in e.token_ids] for s in (first, again)]  # type: ignore[union-attr]
    assert len(tokens[0]) > 0 and tokens[0] == tokens[1]


def test_requests_beyond_the_queue_bound_are_refused(served: ServedModel, stages: list[Stage]) -> None:
    ring = StageRing(stages)
    sched = make_scheduler(stages, ring, max_queue=2)
    # Each takes 8 of stage 0's 24 blocks; two are admitted at once (one per idle slot), two wait.
    big = [sequence(served, [3] * 8, 8) for _ in range(5)]
    admitted = []
    with pytest.raises(QueueFull, match="2 requests"):
        for seq in big:
            sched.submit(seq)
            admitted.append(seq)
    assert len(sched.waiting) == 2
    for seq in admitted:
        sched.cancel(seq)
    run_until_idle(sched, ring)
    sched.pump()
    run_until_idle(sched, ring)
    assert [s.cache.reserved_blocks for s in stages] == [0, 0]


def test_a_stuck_batch_fails_every_request_and_new_ones_until_resumed(
    served: ServedModel, stages: list[Stage]
) -> None:
    now = [0.0]
    ring = StageRing(stages)
    mirror = KVMirror(
        [StageBudget(i, s.end - s.start, BLOCK, s.cache.total_blocks) for i, s in enumerate(stages)]
    )
    sched = Scheduler(
        SchedulerConfig(slots=2, step_timeout_s=5.0),
        mirror,
        ring.send,
        FrontendMetrics(),
        clock=lambda: now[0],
    )
    # `waiting` needs all 24 blocks of stage 0, so it waits behind `running`.
    running, waiting = sequence(served, [4, 5], 5), sequence(served, [4, 6] * 20, 8)
    sched.submit(running)
    sched.submit(waiting)
    assert sched.expired() == []
    now[0] = 6.0
    assert sched.expired() == [b.batch_id for b in ring.queue]
    sched.fail_all("stage 1 is down")
    for seq in (running, waiting):
        events = drain(seq)
        assert events == [Failure("stage 1 is down", 503)]
    with pytest.raises(Unavailable, match="stage 1 is down"):
        sched.submit(sequence(served, [4], 2))
    # The lost batch never comes back; once resumed, the next batch releases what it had reserved.
    ring.queue.clear()
    for stage in stages:
        stage.release(running.seq_id)
    sched.resume()
    assert [b.release for b in ring.queue] == [(running.seq_id,)]
    run_until_idle(sched, ring)
    assert sched.mirror.reserved_blocks == [0, 0]


def test_a_batch_a_stage_failed_ends_its_requests_with_the_stages_message(
    served: ServedModel, stages: list[Stage]
) -> None:
    ring = StageRing(stages)
    sched = make_scheduler(stages, ring)
    seq = sequence(served, [7, 8, 9], 4)
    sched.submit(seq)
    batch = ring.run_one()
    sched.on_result(replace(batch, error="reservation refused on stage 1"))
    events = drain(seq)
    assert len(events) == 1 and isinstance(events[0], Failure)
    assert events[0].status == 500 and "reservation refused on stage 1" in events[0].message
    run_until_idle(sched, ring)
    assert [s.cache.reserved_blocks for s in stages] == [0, 0]


def test_requests_spread_over_the_slots_so_every_stage_has_a_batch(
    served: ServedModel, stages: list[Stage]
) -> None:
    ring = StageRing(stages)
    sched = make_scheduler(stages, ring, slots=3)
    seqs = [sequence(served, [20 + i, 30], 6) for i in range(6)]
    for seq in seqs:
        sched.submit(seq)
    # Slot 0 takes the first arrival; slots 1 and 2 are still idle and take the next two, so three batches
    # are in the pipeline at once; later arrivals wait for a slot to come back.
    assert len(ring.queue) == 3
    run_until_idle(sched, ring)
    slots_used = {seq.slot for seq in seqs}
    assert slots_used == {0, 1, 2}
    assert all(len(drain(seq)) > 0 for seq in seqs)
