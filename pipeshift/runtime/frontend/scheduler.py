"""Continuous batching over a pipeline of stages: which sequences go into the next micro-batch, and what
happens when its logits come back.

Sequences are spread over K micro-batch slots (K >= the number of stages, so every stage has work);
each slot has at most one batch in the pipeline, which is what lets a sequence's decode step use the
token sampled from the previous one. Admission (`reserve`) and frees (`release`) travel inside the
batches so every stage applies them in the same order as the computation. The scheduler does no I/O:
it hands finished batches to `send` and is fed returned ones through `on_result`, all on one event loop.

Two ways to switch layouts. Drain: the gate closes (`hold`): no new micro-batch starts, in-flight ones
finish and the pending releases still go out, so the stages hold exactly the live sequences when the gate
reports HELD. Epoch: `arm` makes every batch built from then on carry the next layout epoch (each sequence
moves at its next step) while batches of the old epoch finish on the old chain; `old_in_flight` counts
them down to the epoch's retirement. Nothing ever stops starting batches.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pipeshift.runtime.frontend.admission import KVMirror, StageBudget
from pipeshift.runtime.frontend.sampling import sample_batch
from pipeshift.runtime.frontend.sequence import Failure, Sequence, State
from pipeshift.runtime.kv.span import SeqSpan
from pipeshift.runtime.metrics import FrontendMetrics
from pipeshift.runtime.microbatch import MAX_RELEASES, MAX_RESERVES, MicroBatch

logger = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the client should retry later (HTTP 429)."""


class Unavailable(RuntimeError):
    """The pipeline is down; new requests fail fast (HTTP 503) instead of waiting for it."""


class SwitchError(RuntimeError):
    """A hold or resume of a layout switch could not be done; the message says why."""


class Gate(enum.Enum):
    OPEN = "open"
    DRAINING = "draining"
    HELD = "held"


@dataclass(frozen=True)
class SchedulerConfig:
    slots: int
    max_batch_tokens: int = 2048
    max_queue: int = 256
    step_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.slots < 1 or self.max_batch_tokens < 1 or self.max_queue < 0 or self.step_timeout_s <= 0:
            raise ValueError(f"invalid scheduler settings: {self}")


@dataclass
class Slot:
    index: int
    running: list[Sequence] = field(default_factory=list)
    in_flight: int | None = None


@dataclass
class InFlight:
    """`released`: the sequences this batch frees on the stages. `recount`: a mirror rebuilt while the batch
    was in flight counted them as still held (the frontend cannot know which stages applied the releases
    yet), so they are freed in the mirror again when the batch returns."""

    batch_id: int
    slot: Slot
    seqs: list[Sequence]
    sent_at: float
    epoch: int = 0
    released: list[Sequence] = field(default_factory=list)
    recount: bool = False


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        mirror: KVMirror,
        send: Callable[[MicroBatch], None],
        metrics: FrontendMetrics,
        *,
        epoch: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.mirror = mirror
        self.metrics = metrics
        self.epoch = epoch
        self._send = send
        self._clock = clock
        self.slots = [Slot(i) for i in range(config.slots)]
        self.waiting: deque[Sequence] = deque()
        self.in_flight: dict[int, InFlight] = {}
        self.pending_release: list[Sequence] = []
        self.down_reason: str | None = None
        self.gate = Gate.OPEN
        # Called once when a hold has drained: nothing in flight, every pending release delivered.
        self.on_held: Callable[[], None] | None = None
        # Called when a returned batch leaves no batch of an epoch older than `epoch` in flight.
        self.on_retired: Callable[[], None] | None = None
        # While stages are read for a mirror rebuild: every sequence held or admitted since (see `watch`).
        self._watched: set[int] | None = None
        # Why the chain is broken while a replacement of a lost stage is awaited (see `suspend`), else None.
        self.suspended: str | None = None
        # KV positions of sequences re-queued by `suspend` since the last `recover` read it: the work redone.
        self.lost_tokens = 0
        self._next_batch_id = 0

    @property
    def running(self) -> int:
        return sum(len(s.running) for s in self.slots)

    def live_sequences(self) -> dict[int, int]:
        """The sequences holding KV on the stages, with the positions each reserved (prompt + max_tokens)."""
        return {seq.seq_id: seq.reserve_tokens for slot in self.slots for seq in slot.running}

    def submit(self, seq: Sequence) -> None:
        """Queue a validated sequence (it fits the stages' pools when they are idle)."""
        if self.down_reason is not None:
            raise Unavailable(self.down_reason)
        if len(self.waiting) >= self.config.max_queue:
            raise QueueFull(f"the waiting queue is full ({self.config.max_queue} requests)")
        self.waiting.append(seq)
        self.metrics.queued.inc()
        self.pump()

    def cancel(self, seq: Sequence) -> None:
        """The client went away: drop the sequence and free its blocks on every stage."""
        if seq.state is State.DONE:
            return
        self.metrics.requests.labels("cancelled").inc()
        if seq.state is State.WAITING:
            self.waiting.remove(seq)
            self.metrics.queued.dec()
            seq.state = State.DONE
        else:
            self._retire(seq)
        self.pump()

    def pump(self) -> None:
        """Send a batch on every idle slot that has something to do (while held: releases only)."""
        if self.down_reason is not None or self.suspended is not None or self.gate is Gate.HELD:
            return
        for slot in self.slots:
            if slot.in_flight is None:
                batch = self._build(slot)
                if batch is not None:
                    self._send(batch)
        if self.gate is Gate.DRAINING and not self.in_flight and not self.pending_release:
            self.gate = Gate.HELD
            if self.on_held is not None:
                self.on_held()

    def hold(self) -> None:
        """Start no more computation; the gate becomes HELD once the pipeline is empty."""
        if self.gate is Gate.OPEN:
            self.gate = Gate.DRAINING
        self.pump()

    def open(self) -> None:
        """Serve again after a hold (on whatever chain `send` now reaches)."""
        self.gate = Gate.OPEN
        self.pump()

    def arm(self, epoch: int, mirror: KVMirror) -> None:
        """Every batch built from now on carries `epoch` (the caller has pointed `send` at its chain) and is
        admitted against `mirror`; batches of older epochs still in flight finish where they are."""
        if epoch <= self.epoch:
            raise SwitchError(f"cannot arm epoch {epoch}: epoch {self.epoch} is already served")
        self.epoch = epoch
        self.mirror = mirror
        self.pump()

    def old_in_flight(self) -> int:
        """Batches in flight that carry an epoch older than the one being built: the old epoch is retired
        when this reaches 0."""
        return sum(1 for record in self.in_flight.values() if record.epoch < self.epoch)

    def holding(self) -> list[Sequence]:
        """Sequences the stages hold or will hold KV for: running, waiting for their release to be sent, or
        released by a batch still in flight."""
        sent = [seq for record in self.in_flight.values() for seq in record.released]
        return [*(seq for slot in self.slots for seq in slot.running), *self.pending_release, *sent]

    def watch(self) -> None:
        """Call before reading the stages for `rebuild_mirror`: sequences held now or admitted until the
        rebuild are ours even if they finish meanwhile (a stage may still report them)."""
        self._watched = {seq.seq_id for seq in self.holding()}

    def rebuild_mirror(self, budgets: list[StageBudget], reservations: list[dict[int, int]]) -> None:
        """Admission against new stages (a switch): each budget's reservations are what our sequences need
        there plus what the stage reports for sequences that were never ours while it was read (it held them
        from before, e.g. adopted for a change and since finished), which stay counted until the next
        rebuild. In-flight releases count as held until their batch returns (see `InFlight.recount`)."""
        holding = self.holding()
        known = {seq.seq_id for seq in holding} | (self._watched or set())
        self._watched = None
        for budget, held in zip(budgets, reservations, strict=True):
            foreign = sum(blocks for seq, blocks in held.items() if seq not in known)
            budget.reserved_blocks = foreign + sum(budget.blocks_for(seq.reserve_tokens) for seq in holding)
        for record in self.in_flight.values():
            record.recount = bool(record.released)
        self.mirror = KVMirror(budgets)

    def _build(self, slot: Slot) -> MicroBatch | None:
        computing = self.gate is Gate.OPEN
        running = slot.running if computing else []
        spans = [SeqSpan(s.seq_id, s.computed, 1) for s in running]
        inputs = [s.output[-1] for s in running]
        reserve = [0] * len(spans)
        members = list(running)
        released = self._take_releases()
        releases = [seq.seq_id for seq in released]
        share = math.ceil((self.running + len(self.waiting)) / len(self.slots))
        tokens, admitted = len(inputs), 0
        while computing and self.waiting and len(slot.running) < share and admitted < MAX_RESERVES:
            seq = self.waiting[0]
            if any(held is seq for held in self.pending_release):
                break  # re-prefilled after `suspend`: its old blocks must be freed by an earlier batch first
            # The first prompt of a batch may exceed the cap by the decode spans already in it: a long
            # prompt must not starve behind a slot that always has decodes.
            prefill = seq.prefill
            if admitted and tokens + len(prefill) > self.config.max_batch_tokens:
                break
            if not self.mirror.fits(seq.reserve_tokens):
                break
            self.waiting.popleft()
            self.mirror.reserve(seq.reserve_tokens)
            if self._watched is not None:
                self._watched.add(seq.seq_id)
            seq.state, seq.slot = State.RUNNING, slot.index
            slot.running.append(seq)
            spans.append(SeqSpan(seq.seq_id, 0, len(prefill)))
            inputs.extend(prefill)
            reserve.append(seq.reserve_tokens)
            members.append(seq)
            tokens += len(prefill)
            admitted += 1
            self.metrics.queued.dec()
            self.metrics.running.inc()
            if not seq.output:
                self.metrics.prompt_tokens.inc(len(seq.prompt))
        if not spans and not releases:
            return None
        batch_id = self._next_batch_id
        self._next_batch_id += 1
        slot.in_flight = batch_id
        self.in_flight[batch_id] = InFlight(batch_id, slot, members, self._clock(), self.epoch, released)
        return MicroBatch(
            batch_id=batch_id,
            epoch=self.epoch,
            spans=tuple(spans),
            reserve=tuple(reserve),
            release=tuple(releases),
            data=torch.tensor(inputs, dtype=torch.int64),
        )

    def _take_releases(self) -> list[Sequence]:
        """Sequences to free in the batch being built; the mirror frees them now because every stage applies
        a batch's releases before its reservations (stages that let a batch overtake one waiting at a fence
        carry the waiting one's releases along, see the agent's data plane)."""
        taken = self.pending_release[:MAX_RELEASES]
        del self.pending_release[:MAX_RELEASES]
        for seq in taken:
            self.mirror.release(seq.reserve_tokens)
        return taken

    def on_result(self, batch: MicroBatch) -> None:
        """Logits (or a stage's error) for a batch sent earlier; batches failed by a timeout are ignored."""
        record = self.in_flight.pop(batch.batch_id, None)
        if record is None:
            logger.warning("ignoring returned batch %d: not in flight (failed or timed out)", batch.batch_id)
            return
        record.slot.in_flight = None
        if record.recount:
            for seq in record.released:
                self.mirror.release(seq.reserve_tokens)
        live = [(row, seq) for row, seq in enumerate(record.seqs) if seq.state is State.RUNNING]
        error = batch.error or _shape_error(batch, len(record.seqs))
        if error:
            for _, seq in live:
                self._fail(seq, f"a stage failed micro-batch {batch.batch_id}: {error}", 500)
        elif live:
            self._advance(batch, live)
        self.pump()
        if record.epoch < self.epoch and self.on_retired is not None and not self.old_in_flight():
            self.on_retired()

    def _advance(self, batch: MicroBatch, live: list[tuple[int, Sequence]]) -> None:
        rows = torch.tensor([row for row, _ in live])
        logits = batch.data.index_select(0, rows) if len(live) < batch.data.shape[0] else batch.data
        tokens = sample_batch(logits, [seq.sampler for _, seq in live])
        now = self._clock()
        for (_, seq), token in zip(live, tokens, strict=True):
            seq.computed += len(seq.prefill) if seq.computed == 0 else 1
            if seq.last_token_at is None:
                self.metrics.ttft.observe(now - seq.arrival)
            else:
                self.metrics.tpot.observe(now - seq.last_token_at)
            seq.last_token_at = now
            self.metrics.generated_tokens.inc()
            delta = seq.append(token)
            seq.events.put_nowait(delta)
            if delta.finish_reason is not None:
                self.metrics.requests.labels("ok").inc()
                self.metrics.e2e.observe(now - seq.arrival)
                self._retire(seq)

    def _retire(self, seq: Sequence) -> None:
        """A running sequence leaves its slot; its blocks are freed by the next batch sent."""
        self.slots[seq.slot].running.remove(seq)
        seq.state = State.DONE
        self.metrics.running.dec()
        self.pending_release.append(seq)

    def _fail(self, seq: Sequence, message: str, status: int, retry_after: int | None = None) -> None:
        seq.events.put_nowait(Failure(message, status, retry_after))
        self.metrics.requests.labels("error").inc()
        if seq.state is State.WAITING:
            self.metrics.queued.dec()
            seq.state = State.DONE
        else:
            self._retire(seq)

    def expired(self) -> list[int]:
        """Batch ids that have been in the pipeline longer than the step timeout."""
        limit = self._clock() - self.config.step_timeout_s
        return [b for b, rec in self.in_flight.items() if rec.sent_at < limit]

    def fail_waiting(self, arrived_before: float, message: str, status: int, retry_after: int | None) -> int:
        """End the waiting requests that arrived before `arrived_before` (their wait for stages is over).
        Returns how many ended."""
        old = [seq for seq in self.waiting if seq.arrival < arrived_before]
        for seq in old:
            self.waiting.remove(seq)
            self._fail(seq, message, status, retry_after)
        return len(old)

    def fail_all(self, reason: str, status: int = 503) -> None:
        """The pipeline broke (timeout, lost connection, dead stage): end every request with `reason` and
        accept no new ones until `resume`. Their blocks are released once batches flow again."""
        self.down_reason = reason
        self.in_flight.clear()
        for slot in self.slots:
            slot.in_flight = None
            for seq in list(slot.running):
                self._fail(seq, reason, status)
        while self.waiting:
            self._fail(self.waiting.popleft(), reason, status)
        if self.on_retired is not None:
            self.on_retired()  # no batch of any epoch is in flight any more

    def resume(self) -> None:
        self.down_reason = None
        self.pump()

    def suspend(self, reason: str) -> int:
        """The chain lost a stage, and with it the KV of every live sequence, but the stage is being replaced
        (see the frontend's `recovery`): no batch in flight will return; every running sequence queues again
        ahead of the waiting ones, to be prefilled with its prompt and output so far, after its blocks (and
        those of releases lost in flight) are freed on the surviving stages. New requests queue meanwhile;
        nothing is sent until `unsuspend`. Returns how many sequences will be prefilled again."""
        self.suspended = self.suspended or reason
        lost = [seq for record in self.in_flight.values() for seq in record.released]
        self.in_flight.clear()
        requeued = [seq for slot in self.slots for seq in slot.running]
        for slot in self.slots:
            slot.running.clear()
            slot.in_flight = None
        self.lost_tokens += sum(seq.computed for seq in requeued)
        for seq in reversed(requeued):
            seq.state, seq.slot, seq.computed = State.WAITING, -1, 0
            self.waiting.appendleft(seq)
            self.metrics.running.dec()
            self.metrics.queued.inc()
        self.pending_release = [*lost, *requeued, *self.pending_release]
        if self.on_retired is not None:
            self.on_retired()  # no batch of any epoch is in flight any more
        return len(requeued)

    def unsuspend(self) -> None:
        """Serve again (the caller rewired the chain and rebuilt the mirror, which counts the pending releases)."""
        self.suspended = None
        self.pump()

    def readmit_all(self, mirror: KVMirror) -> list[int]:
        """The stages were replaced by fresh ones holding no KV (held, so nothing is in flight): every running
        sequence queues again ahead of the waiting ones, to be prefilled with its prompt and output so far
        and admitted against `mirror`, the new stages' pools. Releases not yet sent are moot: their KV went
        with the old stages. Returns the re-queued seq ids."""
        if self.gate is not Gate.HELD:
            raise SwitchError(f"re-prefilling needs a completed hold; the gate is {self.gate.value}")
        requeued = [seq for slot in self.slots for seq in slot.running]
        for slot in self.slots:
            slot.running.clear()
        for seq in reversed(requeued):
            seq.state, seq.slot, seq.computed = State.WAITING, -1, 0
            self.waiting.appendleft(seq)
            self.metrics.running.dec()
            self.metrics.queued.inc()
        self.pending_release.clear()
        self.mirror = mirror
        return [seq.seq_id for seq in requeued]


def _shape_error(batch: MicroBatch, rows: int) -> str:
    """Logits must come back as one row per span sent; anything else would be sampled from wrong rows."""
    shape = tuple(batch.data.shape)
    if len(shape) != 2 or shape[0] != rows or not batch.data.is_floating_point():
        return f"expected logits of shape [{rows}, vocab], got {batch.data.dtype}{list(shape)}"
    return ""
