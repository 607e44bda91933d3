"""The paged KV cache against a plain dict-of-tensors model: no lost, leaked or shared blocks, ever.

Random interleavings of reserve / write / release / grow / shrink / drop_layer / migrate run on both.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import Tensor

from pipeshift.runtime.kv import KVCapacityError, KVSpec, PagedKVCache

BS, HEADS, DIM, SLAB = 4, 2, 3, 2
SPEC = KVSpec(block_size=BS, num_kv_heads=HEADS, head_dim=DIM)
SEQS = st.integers(0, 3)
LAYERS = st.integers(0, 2)


def blocks_of(tokens: int) -> int:
    return -(-tokens // BS)


class CacheVersusReference(RuleBasedStateMachine):
    """The reference holds, per (seq, layer), the exact K/V written and the versions last seen."""

    def __init__(self) -> None:
        super().__init__()
        self.cache = PagedKVCache(SPEC, 12, slab_blocks=SLAB)
        self.total = 12
        self.reserved: dict[int, int] = {}
        self.kv: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self.versions: dict[tuple[int, int], list[int]] = {}
        self.newest_version = 0
        self.next_value = 0

    def fresh(self, n: int) -> tuple[Tensor, Tensor]:
        """Every value ever written is distinct, so a block read through the wrong owner shows."""
        count = 2 * n * HEADS * DIM
        values = torch.arange(self.next_value, self.next_value + count, dtype=torch.float32)
        self.next_value += count
        k, v = values.view(2, n, HEADS, DIM)
        return k, v

    def allocated(self, seq: int) -> int:
        return sum(blocks_of(k.shape[0]) for (s, _), (k, _) in self.kv.items() if s == seq)

    def length(self, key: tuple[int, int]) -> int:
        return self.kv[key][0].shape[0] if key in self.kv else 0

    @initialize(blocks=st.lists(st.integers(0, 4), min_size=4, max_size=4))
    def admit(self, blocks: list[int]) -> None:
        """Start with reservations in place, so early writes have something to draw on."""
        for seq, count in enumerate(blocks):
            self.reserve(seq, count)

    @rule(seq=SEQS, blocks=st.integers(0, 8))
    def reserve(self, seq: int, blocks: int) -> None:
        if sum(self.reserved.values()) + blocks <= self.total:
            self.cache.reserve(seq, blocks)
            self.reserved[seq] = self.reserved.get(seq, 0) + blocks
        else:
            with pytest.raises(KVCapacityError, match=f"cannot reserve {blocks} blocks"):
                self.cache.reserve(seq, blocks)

    @rule(seq=SEQS, layer=LAYERS, n=st.integers(1, 9), back=st.integers(0, 6))
    def write(self, seq: int, layer: int, n: int, back: int) -> None:
        key = (seq, layer)
        length = self.length(key)
        start = max(0, length - back)
        new_length = max(length, start + n)
        needed = blocks_of(new_length) - blocks_of(length)
        k, v = self.fresh(n)
        if self.allocated(seq) + needed > self.reserved.get(seq, 0):
            with pytest.raises(KVCapacityError, match=f"sequence {seq} needs {needed} more blocks"):
                self.cache.write(seq, layer, start, k, v)
            return
        self.cache.write(seq, layer, start, k, v)
        old_k, old_v = self.kv.get(key, (k[:0], v[:0]))
        self.kv[key] = (
            torch.cat([old_k[:start], k, old_k[start + n :]]),
            torch.cat([old_v[:start], v, old_v[start + n :]]),
        )
        touched = range(start // BS, (start + n - 1) // BS + 1)
        got = self.cache.versions(seq, layer)
        stamp = got[touched[0]]
        assert stamp > self.newest_version, "a write must be newer than everything before it"
        expected = self.versions.get(key, []) + [0] * (blocks_of(new_length) - blocks_of(length))
        for lb in touched:
            expected[lb] = stamp
        assert got == expected
        self.versions[key] = expected
        self.newest_version = stamp

    @rule(seq=SEQS, layer=LAYERS, n=st.integers(1, 6))
    def admit_and_append(self, seq: int, layer: int, n: int) -> None:
        """The common case: a scheduler reserves what an append needs (if the pool has it), then writes."""
        length = self.length((seq, layer))
        shortfall = self.allocated(seq) + blocks_of(length + n) - blocks_of(length) - self.reserved.get(seq, 0)
        if shortfall > 0 and sum(self.reserved.values()) + shortfall <= self.total:
            self.reserve(seq, shortfall)
        self.write(seq, layer, n, 0)

    @rule(seq=SEQS)
    def release(self, seq: int) -> None:
        self.cache.release(seq)
        self.reserved.pop(seq, None)
        for key in [key for key in self.kv if key[0] == seq]:
            del self.kv[key], self.versions[key]

    @rule(seq=SEQS, blocks=st.integers(0, 4))
    def unreserve(self, seq: int, blocks: int) -> None:
        if blocks <= self.reserved.get(seq, 0) - self.allocated(seq):
            self.cache.unreserve(seq, blocks)
            if seq in self.reserved:
                self.reserved[seq] -= blocks
        else:
            with pytest.raises(ValueError, match=f"cannot unreserve {blocks} blocks of sequence {seq}"):
                self.cache.unreserve(seq, blocks)

    @rule(layer=LAYERS)
    def drop_layer(self, layer: int) -> None:
        keys = [key for key in self.kv if key[1] == layer]
        assert self.cache.drop_layer(layer) == sum(blocks_of(self.length(key)) for key in keys)
        for key in keys:
            del self.kv[key], self.versions[key]

    @rule(blocks=st.integers(0, 6))
    def grow(self, blocks: int) -> None:
        self.cache.grow(blocks)
        self.total += math.ceil(blocks / SLAB) * SLAB

    @rule(blocks=st.integers(0, 8))
    def shrink(self, blocks: int) -> None:
        new_total = self.total - min(blocks // SLAB, self.total // SLAB) * SLAB
        if new_total < sum(self.reserved.values()):
            with pytest.raises(KVCapacityError, match="blocks are reserved"):
                self.cache.shrink(blocks)
        else:
            self.cache.shrink(blocks)
            self.total = new_total

    @precondition(lambda self: bool(self.kv))
    @rule(data=st.data())
    def finish_one_and_compact(self, data: st.DataObject) -> None:
        """A sequence finishes, the others give back unused reservations and the pool shrinks to fit:
        blocks that other sequences took after it (higher ids) must move down into the room it left."""
        self.release(data.draw(st.sampled_from(sorted({seq for seq, _ in self.kv}))))
        for seq in list(self.reserved):
            self.unreserve(seq, self.reserved[seq] - self.allocated(seq))
        self.shrink(self.total - sum(self.reserved.values()))

    @precondition(lambda self: bool(self.kv))
    @rule(data=st.data(), dst_seq=SEQS, dst_layer=LAYERS)
    def migrate(self, data: st.DataObject, dst_seq: int, dst_layer: int) -> None:
        """Export every block of one (seq, layer) and import them, shuffled, as another."""
        src = data.draw(st.sampled_from(sorted(self.kv)))
        dst = (dst_seq, dst_layer)
        if dst in self.kv:
            return
        length = self.length(src)
        logical = data.draw(st.permutations(range(blocks_of(length))))
        blocks, versions = self.cache.export_blocks(*src, logical)
        assert versions == [self.versions[src][lb] for lb in logical]
        if self.allocated(dst_seq) + len(logical) > self.reserved.get(dst_seq, -1):
            with pytest.raises(KVCapacityError, match=f"sequence {dst_seq}"):
                self.cache.import_blocks(*dst, logical, blocks, versions, length)
            return
        self.cache.import_blocks(*dst, logical, blocks, versions, length)
        self.kv[dst] = (self.kv[src][0].clone(), self.kv[src][1].clone())
        self.versions[dst] = list(self.versions[src])

    @invariant()
    def accounting_matches(self) -> None:
        cache = self.cache
        used = sum(blocks_of(k.shape[0]) for k, _ in self.kv.values())
        assert (cache.total_blocks, cache.used_blocks, cache.free_blocks) == (self.total, used, self.total - used)
        assert cache.reserved_blocks == sum(self.reserved.values()) <= self.total
        assert cache.sequences() == sorted(self.reserved)
        for seq, reserved in self.reserved.items():
            assert cache.reserved_for(seq) == reserved
            assert cache.allocated_for(seq) == self.allocated(seq) <= reserved

    @invariant()
    def every_block_has_one_owner(self) -> None:
        owned = [block for key in self.kv for block in self.cache.block_table(*key)]
        assert len(owned) == len(set(owned)) == self.cache.used_blocks
        assert all(0 <= block < self.total for block in owned)

    @invariant()
    def reads_return_what_was_written(self) -> None:
        for seq in self.reserved:
            assert self.cache.layers_of(seq) == sorted(layer for s, layer in self.kv if s == seq)
        for key, (k, v) in self.kv.items():
            assert self.cache.length(*key) == k.shape[0]
            got_k, got_v = self.cache.read(*key)
            assert torch.equal(got_k, k) and torch.equal(got_v, v)
            assert self.cache.versions(*key) == self.versions[key]

    def teardown(self) -> None:
        """A leaked or double-listed free block shows up when the whole pool is handed to one sequence."""
        for seq in list(self.reserved):
            self.cache.release(seq)
        total = self.cache.total_blocks
        self.cache.reserve(99, total)
        k, v = self.fresh(total * BS)
        self.cache.write(99, 0, 0, k, v)
        got_k, got_v = self.cache.read(99, 0)
        assert torch.equal(got_k, k) and torch.equal(got_v, v)
        assert sorted(self.cache.block_table(99, 0)) == list(range(total))


CacheVersusReference.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
test_cache_matches_reference_model = CacheVersusReference.TestCase


@settings(max_examples=100, deadline=None)
@given(
    appends=st.lists(st.tuples(SEQS, LAYERS, st.integers(1, 2 * BS + 1)), min_size=1, max_size=16),
    finished=st.sets(SEQS, min_size=1),
)
def test_compaction_keeps_surviving_blocks_readable_with_their_versions(
    appends: list[tuple[int, int, int]], finished: set[int]
) -> None:
    """Interleaved appends scatter sequences over the pool; finishing some and shrinking to fit then
    has to move the survivors' higher blocks down into the holes."""
    cache = PagedKVCache(SPEC, 64, slab_blocks=SLAB)
    written: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
    for step, (seq, layer, n) in enumerate(appends):
        old_k, old_v = written.get((seq, layer), (tokens(0), tokens(0)))
        cache.reserve(seq, blocks_of(old_k.shape[0] + n) - blocks_of(old_k.shape[0]))
        k, v = tokens(n, 1000.0 * step), tokens(n, -1000.0 * step)
        cache.write(seq, layer, old_k.shape[0], k, v)
        written[(seq, layer)] = (torch.cat([old_k, k]), torch.cat([old_v, v]))
    survivors = {key: kv for key, kv in written.items() if key[0] not in finished}
    versions = {key: cache.versions(*key) for key in survivors}
    for seq in finished:
        cache.release(seq)
    for seq in cache.sequences():
        cache.unreserve(seq, cache.reserved_for(seq) - cache.allocated_for(seq))
    cache.shrink(cache.total_blocks - cache.reserved_blocks)

    used = sum(blocks_of(k.shape[0]) for k, _ in survivors.values())
    assert cache.used_blocks == used and cache.total_blocks == math.ceil(used / SLAB) * SLAB
    owned = [block for key in survivors for block in cache.block_table(*key)]
    assert len(set(owned)) == used and all(0 <= block < cache.total_blocks for block in owned)
    for key, (k, v) in survivors.items():
        got_k, got_v = cache.read(*key)
        assert torch.equal(got_k, k) and torch.equal(got_v, v)
        assert cache.versions(*key) == versions[key]


def make_cache(num_blocks: int = 8, slab_blocks: int = 4) -> PagedKVCache:
    return PagedKVCache(SPEC, num_blocks, slab_blocks=slab_blocks)


def accounting(cache: PagedKVCache) -> tuple[int, int, int, int]:
    return cache.total_blocks, cache.used_blocks, cache.reserved_blocks, cache.free_blocks


def tokens(n: int, offset: float = 0.0) -> Tensor:
    return torch.arange(n * HEADS * DIM, dtype=torch.float32).view(n, HEADS, DIM) + offset


def test_reserving_beyond_capacity_names_the_numbers() -> None:
    cache = make_cache()
    cache.reserve(0, 6)
    with pytest.raises(KVCapacityError, match=r"3 blocks for sequence 1: 6 of 8 blocks .* at most 2 more"):
        cache.reserve(1, 3)
    assert cache.reserved_blocks == 6 and not cache.can_reserve(3) and cache.can_reserve(2)


def test_writing_past_the_reservation_names_the_numbers_and_writes_nothing() -> None:
    cache = make_cache()
    cache.reserve(0, 1)
    with pytest.raises(KVCapacityError, match=r"sequence 0 needs 2 more blocks for layer 3 but only 1 of its"):
        cache.write(0, 3, 0, tokens(BS + 1), tokens(BS + 1))
    assert cache.used_blocks == 0 and cache.length(0, 3) == 0 and cache.layers_of(0) == []


def test_overwriting_earlier_positions_keeps_the_length_and_bumps_only_touched_blocks() -> None:
    cache = make_cache()
    cache.reserve(0, 3)
    cache.write(0, 0, 0, tokens(3 * BS), tokens(3 * BS))
    before = cache.versions(0, 0)
    cache.write(0, 0, BS + 1, tokens(2, 900.0), tokens(2, 800.0))
    assert cache.length(0, 0) == 3 * BS
    after = cache.versions(0, 0)
    assert after[0] == before[0] and after[2] == before[2] and after[1] > max(before)
    expected = tokens(3 * BS)
    expected[BS + 1 : BS + 3] = tokens(2, 900.0)
    assert torch.equal(cache.read(0, 0)[0], expected)


def test_a_write_that_would_leave_a_hole_is_refused() -> None:
    cache = make_cache()
    cache.reserve(0, 2)
    cache.write(0, 0, 0, tokens(2), tokens(2))
    with pytest.raises(ValueError, match="start must be <= 2"):
        cache.write(0, 0, 3, tokens(1), tokens(1))


def test_shrink_moves_live_blocks_out_of_the_tail_slab_with_their_versions() -> None:
    cache = make_cache(num_blocks=6, slab_blocks=2)
    cache.reserve(0, 4)
    cache.reserve(1, 2)
    cache.write(0, 0, 0, tokens(4 * BS), tokens(4 * BS))
    cache.write(1, 5, 0, tokens(2 * BS, 1000.0), tokens(2 * BS, 2000.0))
    cache.write(1, 5, 1, tokens(1, 3000.0), tokens(1, 4000.0))
    assert set(cache.block_table(1, 5)) == {4, 5}, "lowest-first allocation puts sequence 1 in the tail slab"
    k, v = cache.read(1, 5)
    versions = cache.versions(1, 5)
    cache.release(0)
    cache.shrink(4)
    assert cache.total_blocks == 2 and set(cache.block_table(1, 5)) == {0, 1}
    got_k, got_v = cache.read(1, 5)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    assert cache.versions(1, 5) == versions


def test_shrinking_below_the_reservations_fails_and_changes_nothing() -> None:
    cache = make_cache(num_blocks=8, slab_blocks=2)
    cache.reserve(0, 5)
    cache.write(0, 1, 0, tokens(5 * BS), tokens(5 * BS))
    before = (accounting(cache), cache.block_table(0, 1), cache.read(0, 1))
    with pytest.raises(KVCapacityError, match=r"to 4: 5 blocks are reserved, so at most 2 blocks"):
        cache.shrink(4)
    after = (accounting(cache), cache.block_table(0, 1), cache.read(0, 1))
    assert before[:2] == after[:2]
    assert all(torch.equal(a, b) for a, b in zip(before[2], after[2], strict=True))


def test_import_out_of_order_leaves_holes_that_read_refuses_until_filled() -> None:
    source = make_cache()
    source.reserve(0, 3)
    k, v = tokens(2 * BS + 1), tokens(2 * BS + 1, 500.0)
    source.write(0, 0, 0, k, v)
    blocks, versions = source.export_blocks(0, 0, [2, 1, 0])
    target = make_cache()
    target.reserve(7, 3)
    target.import_blocks(7, 2, [2], blocks[:1], versions[:1], 2 * BS + 1)
    with pytest.raises(ValueError, match=r"logical blocks \[0, 1\] have not been imported"):
        target.read(7, 2)
    target.import_blocks(7, 2, [1, 0], blocks[1:], versions[1:], 2 * BS + 1)
    got_k, got_v = target.read(7, 2)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    assert target.versions(7, 2) == source.versions(0, 0)


def test_writes_after_an_import_are_newer_than_the_imported_versions() -> None:
    source = make_cache()
    source.reserve(0, 1)
    for position in range(BS):
        source.write(0, 0, position, tokens(1), tokens(1))
    blocks, versions = source.export_blocks(0, 0, [0])
    target = make_cache()
    target.reserve(1, 2)
    target.import_blocks(1, 0, [0], blocks, versions, BS)
    target.write(1, 1, 0, tokens(1), tokens(1))
    assert target.versions(1, 1)[0] > versions[0]


def test_import_without_a_reservation_is_refused() -> None:
    cache = make_cache()
    with pytest.raises(KVCapacityError, match="sequence 4 has no reservation"):
        cache.import_blocks(4, 0, [0], torch.zeros(1, 2, BS, HEADS, DIM), [1], 1)


def test_drop_layer_frees_that_layer_only_and_keeps_reservations() -> None:
    cache = make_cache()
    cache.reserve(0, 5)
    cache.write(0, 0, 0, tokens(BS + 1), tokens(BS + 1))
    cache.write(0, 1, 0, tokens(BS), tokens(BS))
    assert cache.drop_layer(0) == 2
    assert cache.layers_of(0) == [1] and cache.used_blocks == 1 and cache.reserved_for(0) == 5
    assert torch.equal(cache.read(0, 1)[0], tokens(BS))


def test_release_is_idempotent_and_returns_everything() -> None:
    cache = make_cache()
    cache.reserve(0, 3)
    cache.write(0, 0, 0, tokens(3 * BS), tokens(3 * BS))
    cache.release(0)
    cache.release(0)
    assert (cache.used_blocks, cache.reserved_blocks, cache.sequences()) == (0, 0, [])


def test_spec_sizes_follow_block_geometry() -> None:
    spec = KVSpec(num_kv_heads=8, head_dim=64, dtype=torch.float16)
    itemsize = torch.finfo(torch.float16).bits // 8
    assert spec.block_size == 16
    assert spec.bytes_per_block == 2 * 16 * 8 * 64 * itemsize
    assert spec.blocks_for(17, 3) == 6 and spec.blocks_for(16, 3) == 3 and spec.blocks_for(0, 3) == 0
    cache = PagedKVCache(spec, 10, slab_blocks=4)
    assert cache.stats()["total_bytes"] == 12 * spec.bytes_per_block


def test_located_blocks_copy_on_another_thread_even_after_a_shrink_moved_them() -> None:
    """A pre-copy round takes a block table on the stage's thread and copies the data on another one; a
    shrink that compacts the pool in between must not redirect the read (`BlockCopy` holds the slabs)."""
    cache = make_cache(num_blocks=6, slab_blocks=2)
    cache.reserve(0, 4)
    cache.reserve(1, 2)
    cache.write(0, 0, 0, tokens(4 * BS), tokens(4 * BS))
    cache.write(1, 5, 0, tokens(2 * BS, 1000.0), tokens(2 * BS, 2000.0))
    assert set(cache.block_table(1, 5)) == {4, 5}
    expected, versions = cache.export_blocks(1, 5, [1, 0])
    where, located_versions = cache.locate_blocks(1, 5, [1, 0])
    assert where is not None and located_versions == versions
    cache.release(0)
    cache.shrink(4)
    assert set(cache.block_table(1, 5)) == {0, 1}, "the shrink moved the blocks"
    with ThreadPoolExecutor(1) as pool:
        copied = pool.submit(where.copy).result()
    assert torch.equal(copied, expected)
    k, v = cache.read(1, 5)
    assert torch.equal(copied[[1, 0], 0].reshape(-1, HEADS, DIM), k)
    assert torch.equal(copied[[1, 0], 1].reshape(-1, HEADS, DIM), v)


def test_a_bounded_shrink_moves_at_most_its_budget_per_step_and_ends_where_one_shrink_would() -> None:
    """Shrinking in steps (between micro-batches) must reach the same pool and keep every block readable."""
    slab = 2
    stepped, whole = make_cache(num_blocks=12, slab_blocks=slab), make_cache(num_blocks=12, slab_blocks=slab)
    for cache in (stepped, whole):
        for seq in range(3):
            cache.reserve(seq, 3)
        for seq in range(3):  # interleaved writes spread every sequence over the slabs
            for pos in range(3 * BS):
                cache.write(seq, 0, pos, tokens(1, 100.0 * seq + pos), tokens(1, -100.0 * seq - pos))
        cache.release(1)
    before = {seq: whole.read(seq, 0) for seq in (0, 2)}
    steps = []
    while stepped.total_blocks > 6:
        live_before = {seq: list(stepped.block_table(seq, 0)) for seq in (0, 2)}
        released = stepped.shrink(stepped.total_blocks - 6, max_moved=1)
        after = {seq: stepped.block_table(seq, 0) for seq in (0, 2)}
        moved = sum(a != b for seq in (0, 2) for a, b in zip(live_before[seq], after[seq], strict=True))
        steps.append((released, moved))
        assert released >= slab and (moved <= 1 or released == slab), steps
    whole.shrink(whole.total_blocks - 6)
    assert len(steps) > 1 and stepped.total_blocks == whole.total_blocks == 6
    for seq in (0, 2):
        for cache in (stepped, whole):
            k, v = cache.read(seq, 0)
            assert torch.equal(k, before[seq][0]) and torch.equal(v, before[seq][1])


def test_prefaulted_read_workspaces_hold_any_gather_that_fits_without_growing() -> None:
    """A stage joining a running pipeline touches its read workspaces at prepare (`prefault_reads`), so its
    first steps reuse them instead of growing (and page-faulting) them while every sequence waits."""
    cache = make_cache(num_blocks=8, slab_blocks=2)
    cache.reserve(0, 3)
    cache.reserve(1, 2)
    cache.write(0, 0, 0, tokens(3 * BS), tokens(3 * BS, 500.0))
    cache.write(1, 0, 0, tokens(2 * BS - 1, 1000.0), tokens(2 * BS - 1, 2000.0))
    expected = cache.read_batch(0, [(0, 3 * BS), (1, 2 * BS - 1)])  # a fresh copy each
    assert cache.stats()["workspace_bytes"] < 2 * (2 * 6 * BS * HEADS * DIM * 4)
    cache.prefault_reads(6)  # two sequences, three blocks wide
    block_bytes = BS * HEADS * DIM * 4
    prefaulted = cache.stats()["workspace_bytes"]
    assert prefaulted == 2 * (2 * 6 * block_bytes)  # K and V of six blocks, in each of the two workspaces
    got = cache.read_batch(0, [(0, 3 * BS), (1, 2 * BS - 1)], scratch=True)
    assert cache.stats()["workspace_bytes"] == prefaulted, "a gather that fits must not grow the workspaces"
    assert torch.equal(got[0][0], expected[0][0]) and torch.equal(got[1][0], expected[1][0])
    assert torch.equal(got[0][1, : 2 * BS - 1], expected[0][1, : 2 * BS - 1])
    cache.prefault_reads(2)  # never shrinks
    assert cache.stats()["workspace_bytes"] == prefaulted
