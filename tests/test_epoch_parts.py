"""The parts of the epoch switch, in one process and deterministic: the scheduler arms and retires epochs and
rebuilds its admission mirror honestly; a stage's fence waits for exactly the KV a span reads; imports only
move forward; a batch that overtakes waiting ones carries their releases; real `StageWorker`s compute each
epoch's range and hold a new-epoch batch until the source's final delta is imported, then match the
single-stage engine bit for bit (float64).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeshift.runtime.agent.config import AgentConfig
from pipeshift.runtime.agent.dataplane import _carrying, _fits, _Held
from pipeshift.runtime.agent.transition import Transition, missing_kv
from pipeshift.runtime.agent.worker import StageWorker
from pipeshift.runtime.frontend.admission import KVMirror, StageBudget
from pipeshift.runtime.frontend.epoch_switch import budgets as epoch_budgets
from pipeshift.runtime.frontend.sampling import SamplingParams
from pipeshift.runtime.frontend.scheduler import Scheduler, SchedulerConfig, SwitchError
from pipeshift.runtime.frontend.sequence import GenerationParams, Sequence, State
from pipeshift.runtime.frontend.served_model import ServedModel
from pipeshift.runtime.frontend.stages import DataPlane, StageInfo
from pipeshift.runtime.kv import SeqSpan
from pipeshift.runtime.metrics import AgentMetrics, FrontendMetrics
from pipeshift.runtime.microbatch import (
    MAX_RELEASES,
    MicroBatch,
    MicroBatchReader,
    data_limits,
    empty_data,
    last_token_spans,
)
from pipeshift.runtime.migrate import DirtyTracker, KVChunk, PlannedChunk, import_chunk
from pipeshift.runtime.model.checkpoint import ModelDir
from pipeshift.runtime.stage import Stage
from pipeshift.runtime.transport import Frame, FrameServer, Peer

VOCAB = 300
BLOCK = 4
SEQ_IDS = itertools.count(1000)


@pytest.fixture(scope="module")
def model_dir(model_factory: Callable[..., Path]) -> Path:
    return model_factory(layers=8, hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=VOCAB, seed=17)


def stage(model_dir: Path, start: int, end: int, blocks: int = 256) -> Stage:
    return Stage(ModelDir(model_dir), start, end, dtype=torch.float64, kv_blocks=blocks, block_size=BLOCK,
                 slab_blocks=8)


# ---- the scheduler ------------------------------------------------------------------------------


class Ring:
    """One in-process stage running batches in the order sent; the scheduler's epoch is only carried."""

    def __init__(self, s: Stage) -> None:
        self.stage, self.queue, self.sent = s, deque[MicroBatch](), list[MicroBatch]()

    def send(self, batch: MicroBatch) -> None:
        self.queue.append(batch)
        self.sent.append(batch)

    def run_one(self) -> MicroBatch:
        batch = self.queue.popleft()
        for seq_id in batch.release:
            self.stage.release(seq_id)
        for span, tokens in zip(batch.spans, batch.reserve, strict=True):
            if tokens:
                self.stage.reserve(span.seq_id, tokens)
        if not batch.spans:
            return batch
        out = self.stage.forward(batch.spans, batch.data)
        return replace(batch, spans=last_token_spans(batch.spans), reserve=(0,) * len(batch.spans), data=out)


def budget(s: Stage) -> StageBudget:
    return StageBudget(0, s.end - s.start, BLOCK, s.cache.total_blocks, s.cache.reserved_blocks)


def sequence(served: ServedModel, prompt: list[int], max_tokens: int) -> Sequence:
    return Sequence(next(SEQ_IDS), prompt, GenerationParams(max_tokens, SamplingParams(temperature=0.0)), served,
                    frozenset(served.config.eos_token_ids))


def test_after_arming_every_batch_carries_the_new_epoch_and_the_old_one_retires_with_its_last_batch(
    model_dir: Path,
) -> None:
    served = ServedModel.load(model_dir)
    s = stage(model_dir, 0, 8)
    ring = Ring(s)
    sched = Scheduler(SchedulerConfig(slots=3, max_batch_tokens=64), KVMirror([budget(s)]), ring.send,
                      FrontendMetrics())
    retired: list[int] = []
    sched.on_retired = lambda: retired.append(sched.old_in_flight())
    seqs = [sequence(served, [5 + i, 9, 17, 3 + i], 6 + i) for i in range(5)]
    for seq in seqs:
        sched.submit(seq)
    sched.on_result(ring.run_one())
    in_flight_at_arm = len(sched.in_flight)
    assert in_flight_at_arm >= 1 and all(b.epoch == 0 for b in ring.sent)
    sent_before = len(ring.sent)
    with pytest.raises(SwitchError, match="epoch 0 is already served"):
        sched.arm(0, sched.mirror)
    sched.watch()
    sched.rebuild_mirror([budget(s)], [{q: s.cache.reserved_for(q) for q in s.cache.sequences()}])
    sched.arm(1, sched.mirror)
    assert sched.old_in_flight() == in_flight_at_arm
    while ring.queue:
        sched.on_result(ring.run_one())
    new = ring.sent[sent_before:]
    assert new and all(b.epoch == 1 for b in new)
    # Called once, when the last epoch-0 batch came back; never again for epoch-1 batches.
    assert retired == [0] and sched.old_in_flight() == 0
    assert all(seq.state is State.DONE for seq in seqs)
    assert sched.mirror.reserved_blocks == [0] and s.cache.reserved_blocks == 0


def test_a_rebuilt_mirror_counts_unknown_reservations_and_holds_in_flight_releases_until_they_return(
    model_dir: Path,
) -> None:
    served = ServedModel.load(model_dir)
    s = stage(model_dir, 0, 8)
    ring = Ring(s)
    sched = Scheduler(SchedulerConfig(slots=1, max_batch_tokens=64), KVMirror([budget(s)]), ring.send,
                      FrontendMetrics())
    first, second = sequence(served, [4, 5, 6], 1), sequence(served, [7, 8, 9, 10], 30)
    sched.submit(first)
    sched.on_result(ring.run_one())  # `first` is done: a release-only batch frees it
    sched.submit(second)  # waits for the slot
    assert ring.queue[0].release == (first.seq_id,) and second.state is State.WAITING
    s.adopt(424242, 40)  # a sequence the frontend never knew (e.g. reserved for a change, since finished)
    foreign = s.cache.reserved_for(424242)
    sched.watch()
    sched.rebuild_mirror([budget(s)], [{q: s.cache.reserved_for(q) for q in s.cache.sequences()}])
    per = budget(s).blocks_for
    # first's release is in flight: the stage may not have applied it yet, so it still counts
    assert sched.mirror.reserved_blocks == [foreign + per(first.reserve_tokens)]
    sched.on_result(ring.run_one())  # applied everywhere now; second is admitted
    assert sched.mirror.reserved_blocks == [foreign + per(second.reserve_tokens)]
    while ring.queue:
        sched.on_result(ring.run_one())
    assert second.state is State.DONE and sched.mirror.reserved_blocks == [foreign]


def test_stage_info_describes_an_armed_stage_by_its_new_range_and_admission_budget() -> None:
    body = {"stage_id": 2, "layers": [4, 8], "hidden_size": 32, "vocab_size": VOCAB, "dtype": "float64",
            "block_size": 4, "epoch": 3, "data": {"host": "127.0.0.1", "port": 9},
            "kv": {"total_blocks": 100, "reserved_blocks": 12, "reservations": {"7": 12}},
            "armed": {"epoch": 4, "layers": [3, 8]}, "admission": {"layers": 5, "blocks": 90}}
    armed = StageInfo.from_json(body, armed=True)
    assert (armed.start, armed.end, armed.admission_layers, armed.admission_blocks) == (3, 8, 5, 90)
    assert armed.reservations == {7: 12}
    plain = StageInfo.from_json({**body, "armed": None, "admission": None})
    assert (plain.start, plain.end, plain.admission_layers, plain.admission_blocks) == (4, 8, 4, 100)


def test_an_armed_stage_admits_new_requests_against_its_pool_now_and_the_pool_it_shrinks_to() -> None:
    """A stage going from layers 4–7 to 6–7 reserves for all four until the old epoch retires, then for two
    in a pool resized to half: requests keep being admitted while the switch is armed as long as they fit
    both (before, admission counted four layers against the smaller pool and stopped for the whole switch)."""
    body = {"stage_id": 1, "layers": [4, 8], "hidden_size": 32, "vocab_size": VOCAB, "dtype": "float64",
            "block_size": 4, "epoch": 0, "data": {"host": "127.0.0.1", "port": 9},
            "kv": {"total_blocks": 100, "reserved_blocks": 64, "reservations": {"7": 64}},
            "armed": {"epoch": 1, "layers": [6, 8]},
            "admission": {"layers": 4, "blocks": 100, "after": {"layers": 2, "blocks": 50}}}
    info = StageInfo.from_json(body, armed=True)
    assert (info.after_layers, info.after_blocks) == (2, 50)
    budgets, held = epoch_budgets([info])
    assert [(b.stage_id, b.num_layers, b.total_blocks) for b in budgets] == [(1, 4, 100), (1, 2, 50)]
    assert held == [{7: 64}, {7: 64}]
    mirror = KVMirror(budgets)
    mirror.reserve(64)  # sequence 7: 16 blocks per layer, 64 now, 32 after
    assert mirror.reserved_blocks == [64, 32]
    assert mirror.fits(32)  # 32 more blocks now (36 free), 16 after (18 free)
    assert not mirror.fits(40)  # 40 more now: the pool it has is too small
    shrinking = KVMirror([StageBudget(1, 4, 4, 100), StageBudget(1, 2, 4, 40)])
    shrinking.reserve(64)
    assert shrinking.fits(12) and not shrinking.fits(20)  # 10 blocks after, 8 free: the pool it shrinks to
    plain = StageInfo.from_json({**body, "armed": None, "admission": None})
    assert epoch_budgets([plain])[0] == [StageBudget(1, 4, 4, 100)]


# ---- KV: the fence and imports ------------------------------------------------------------------


def collect(source: Stage, layer: int) -> list[KVChunk]:
    """Every block of `layer` as chunks with their data, as a source's first round sends them."""
    return [c.load() for c in DirtyTracker().plan(source, "t", [layer])]


def chunks_of(source: Stage, seq: int, layer: int) -> list[KVChunk]:
    """One chunk per logical block, so a test can deliver them in any order."""
    return [KVChunk(c.seq_id, c.layer, c.length, c.reserve, (lb,), (v,), c.data[i : i + 1])
            for c in collect(source, layer)
            if c.seq_id == seq
            for i, (lb, v) in enumerate(zip(c.logical, c.versions, strict=True))]


def test_the_fence_waits_for_the_kv_up_to_the_span_start_with_no_unfilled_block(model_dir: Path) -> None:
    source, target = stage(model_dir, 0, 4), stage(model_dir, 4, 8)
    target.prepare(3, 8)
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3], dtype=torch.int64)
    source.reserve(1, 20)
    source.forward([SeqSpan(1, 0, 10)], ids)
    span = SeqSpan(1, 10, 1)  # the next step reads positions 0..9 of layer 3
    assert missing_kv(target, [span], [3]) == ["sequence 1 layer 3 holds 0 of 10 positions"]
    first, second, third = chunks_of(source, 1, 3)
    for chunk in (third, first):  # out of order: block 1 is still a hole
        import_chunk(target, chunk, {3})
    assert target.cache.length(1, 3) == 10 and missing_kv(target, [span], [3]) != []
    import_chunk(target, second, {3})
    assert missing_kv(target, [span], [3]) == []
    assert missing_kv(target, [SeqSpan(2, 0, 5)], [3]) == []  # admitted in the new epoch: nothing to wait for


def test_imports_only_move_forward_and_drop_sequences_released_meanwhile(model_dir: Path) -> None:
    source, target = stage(model_dir, 0, 4), stage(model_dir, 4, 8)
    target.prepare(3, 8)
    source.reserve(1, 20)
    source.forward([SeqSpan(1, 0, 3)], torch.tensor([3, 1, 4]))
    old = collect(source, 3)
    source.forward([SeqSpan(1, 3, 1)], torch.tensor([1]))
    new = collect(source, 3)
    for chunk in (*new, *old):  # the newer snapshot first, then a stale one
        import_chunk(target, chunk, {3})
    assert target.cache.length(1, 3) == 4
    assert target.cache.versions(1, 3) == source.cache.versions(1, 3)
    k_src, v_src = source.cache.read(1, 3)
    k_dst, v_dst = target.cache.read(1, 3)
    assert torch.equal(k_src, k_dst) and torch.equal(v_src, v_dst)
    source.reserve(2, 8)
    source.forward([SeqSpan(2, 0, 2)], torch.tensor([7, 7]))
    late = [c for c in collect(source, 3) if c.seq_id == 2]
    assert import_chunk(target, late[0], {3}, gone={2}) == len(late[0].logical)
    assert 2 not in target.sequences()
    with pytest.raises(ValueError, match="layer 3 is not one this stage receives"):
        import_chunk(target, late[0], {5})


# ---- the data plane's release carrying ------------------------------------------------------------


def control(batch_id: int, epoch: int, release: tuple[int, ...]) -> MicroBatch:
    return MicroBatch(batch_id, epoch, (), (), release, empty_data())


def test_a_batch_passing_held_ones_carries_their_releases_of_its_epoch_and_only_if_they_fit() -> None:
    held = [_Held(control(1, 1, (5, 6)), 0.0), _Held(control(2, 0, (7,)), 0.0)]
    passing = control(3, 1, (8, 5))
    assert _fits(passing, held) and _carrying(passing, held).release == (8, 5, 6)
    assert _carrying(control(4, 0, ()), held).release == (7,)  # another epoch's route: only its own
    crowded = [_Held(control(9, 1, tuple(range(100, 100 + MAX_RELEASES))), 0.0)]
    assert not _fits(passing, crowded) and _fits(control(10, 1, ()), crowded)


# ---- real workers: each epoch's range, and the fence ------------------------------------------


def worker(model_dir: Path, s: Stage, stage_id: int) -> StageWorker:
    config = AgentConfig(model=model_dir, start=s.start, end=s.end, stage_id=stage_id, dtype="float64",
                         block_size=BLOCK)
    return StageWorker(s, config, ModelDir(model_dir).config, AgentMetrics(stage=str(stage_id)))


def run(workers: list[StageWorker], mb: MicroBatch) -> MicroBatch:
    for w in workers:
        out, _ = w.step(mb)
        assert out is not None and not out.error, out
        mb = out
    return mb


def test_workers_compute_each_epochs_range_and_hold_the_new_epoch_until_the_final_delta_is_imported(
    model_dir: Path,
) -> None:
    """`4,4 → 3,5` on two real workers: stage 0 sends layer 3 to stage 1. Logits equal one 8-layer stage's."""
    reference = stage(model_dir, 0, 8)
    source_stage, target_stage = stage(model_dir, 0, 4), stage(model_dir, 4, 8)
    w0, w1 = worker(model_dir, source_stage, 0), worker(model_dir, target_stage, 1)
    prompt = torch.tensor([11, 22, 33, 44, 55, 66], dtype=torch.int64)
    reference.reserve(1, 12)
    expected = reference.forward([SeqSpan(1, 0, 6)], prompt)
    got = run([w0, w1], MicroBatch(1, 0, (SeqSpan(1, 0, 6),), (12,), (), prompt))
    assert torch.equal(got.data, expected)

    target_stage.prepare(3, 8)
    tracker, sent = DirtyTracker(), deque[PlannedChunk]()

    def owed(s: Stage, seqs: list[int]) -> list[tuple[str, list[PlannedChunk]]]:
        chunks = tracker.plan(s, "stage1", [3], seqs or None)
        tracker.mark_sent("stage1", chunks)
        return [("stage1", chunks)]

    w0.transition = Transition(1, (0, 4), (0, 3), (), owed)
    w1.transition = Transition(1, (4, 8), (3, 8), (3,))
    token = int(expected[0].argmax())
    step = MicroBatch(2, 1, (SeqSpan(1, 6, 1),), (0,), (), torch.tensor([token]))
    hidden, pushes = w0.step(step)  # the new epoch: stage 0 computes layers 0-2 only
    assert hidden is not None and pushes == [] and hidden.data.shape == (1, 32)
    held, _ = w1.step(hidden)
    assert held is None and w1.fenced(hidden) == ["sequence 1 layer 3 holds 0 of 6 positions"]
    sent.extend(owed(source_stage, [])[0][1])  # what arming pushes: layer 3 of sequence 1, final
    for chunk in sent:
        import_chunk(target_stage, chunk.load(), {3})
    out, _ = w1.compute(hidden, 0.25)
    reference_step = reference.forward([SeqSpan(1, 6, 1)], torch.tensor([token]))
    assert out is not None and torch.equal(out.data, reference_step)
    assert w1.stats.fence_waits == 1 and w1.stats.fence_wait_ms_max == pytest.approx(250.0)
    # An old-epoch batch still computes the old ranges (and stage 0 owes its final delta right after it).
    reference.reserve(2, 8)
    expected2 = reference.forward([SeqSpan(2, 0, 3)], torch.tensor([9, 8, 7]))
    first, pushes = w0.step(MicroBatch(3, 0, (SeqSpan(2, 0, 3),), (8,), (), torch.tensor([9, 8, 7])))
    assert first is not None and [(t, [c.seq_id for c in cs]) for t, cs in pushes] == [("stage1", [2])]
    old, _ = w1.step(first)
    assert old is not None and torch.equal(old.data, expected2)
    with pytest.raises(ValueError, match="serves epochs"):
        w1.transition.range_for(2)


# ---- the frontend's first stage changing at the arm ---------------------------------------------


class FirstStage:
    """A stand-in first stage: a real frame server that records the micro-batches it receives."""

    def __init__(self) -> None:
        self.got: asyncio.Queue[MicroBatch] = asyncio.Queue()
        self._reader = MicroBatchReader()
        limits = data_limits(width=None, dtypes=[torch.int64], max_tokens=64, max_seqs=64)
        self.server = FrameServer(self._on_frame, limits)

    async def _on_frame(self, frame: Frame, peer: Peer) -> None:
        mb = self._reader.feed(frame)
        if mb is not None:
            self.got.put_nowait(mb)


def ids(batch_id: int, epoch: int) -> MicroBatch:
    return MicroBatch(batch_id, epoch, (SeqSpan(batch_id, 0, 2),), (4,), (), torch.tensor([3, 4]))


def test_batches_queued_before_a_redial_reach_the_old_first_stage_and_later_ones_the_new() -> None:
    """And the old first stage going away afterwards is no failure of the pipeline."""
    broken: list[str] = []

    async def scenario() -> None:
        old, new = FirstStage(), FirstStage()
        async with old.server, new.server:
            plane = DataPlane(host="127.0.0.1", token=None, vocab_size=VOCAB, dtype=torch.float64, max_rows=64,
                              on_result=lambda _: None, on_broken=broken.append)
            await plane.start()
            await plane.connect("127.0.0.1", old.server.port)
            plane.send(ids(1, 0))
            await plane.redial("127.0.0.1", new.server.port)
            plane.send(ids(2, 1))
            first = await asyncio.wait_for(old.got.get(), 10)
            second = await asyncio.wait_for(new.got.get(), 10)
            assert (first.batch_id, first.epoch, second.batch_id, second.epoch) == (1, 0, 2, 1)
            await old.server.close()
            await asyncio.sleep(0.2)
            plane.send(ids(3, 1))
            third = await asyncio.wait_for(new.got.get(), 10)
            assert third.batch_id == 3 and old.got.empty()
            await plane.close()

    asyncio.run(scenario())
    assert broken == []
