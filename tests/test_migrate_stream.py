"""The KV migration data path: blocks copied in one pass, sent from and received into reused memory, and
imported exactly, in order, in groups.

Real sockets, a real compute worker and a real stage; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import ctypes
from pathlib import Path

import pytest
import torch

from pipeshift.runtime.agent.config import AgentConfig
from pipeshift.runtime.agent.dataplane import IMPORT_GROUP_BYTES, DataPlane
from pipeshift.runtime.agent.worker import StageWorker
from pipeshift.runtime.kv import KVSpec
from pipeshift.runtime.kv.pool import BlockPool
from pipeshift.runtime.metrics import AgentMetrics
from pipeshift.runtime.migrate import MIGRATE_ROLE, Arena, KVChunk, PlannedChunk, Staging, stream_chunks
from pipeshift.runtime.model.checkpoint import ModelDir
from pipeshift.runtime.stage import Stage
from pipeshift.runtime.transport import FrameClient, FrameLimits, Kind

SPEC = KVSpec(block_size=4, num_kv_heads=2, head_dim=8)


def filled_pool(spec: KVSpec, slabs: int, slab_blocks: int, seed: int = 0) -> tuple[BlockPool, torch.Tensor]:
    """A pool whose every block holds distinct random data, and that data as `[blocks, 2, *block]`."""
    pool = BlockPool(spec, slab_blocks)
    pool.add_slabs(slabs)
    data = torch.randn((pool.total_blocks, *pool.block_shape()), generator=torch.Generator().manual_seed(seed))
    pool.write_whole(list(range(pool.total_blocks)), data)
    return pool, data


@pytest.mark.parametrize("ids", [[1, 2, 3, 5, 9, 10, 11], [11, 0, 5, 6, 2, 9], [7]],
                         ids=["ascending across slabs", "any order", "one block"])  # fmt: skip
def test_located_blocks_copy_into_a_reused_buffer_exactly_as_into_a_fresh_one(ids: list[int]) -> None:
    pool, data = filled_pool(SPEC, slabs=3, slab_blocks=4)
    where = pool.locate(ids)
    out = torch.full((len(ids), *pool.block_shape()), float("nan"))
    address = out.data_ptr()
    assert where.copy(out) is out and out.data_ptr() == address
    assert torch.equal(out, data[ids])
    assert torch.equal(where.copy(), data[ids])
    k, v = pool.read(ids)
    assert torch.equal(out[:, 0], k) and torch.equal(out[:, 1], v)


def test_a_copy_refuses_a_buffer_of_the_wrong_shape_naming_the_one_it_needs() -> None:
    pool, _ = filled_pool(SPEC, slabs=1, slab_blocks=4)
    with pytest.raises(ValueError, match=r"out of shape \[2, 2, 4, 2, 8\]"):
        pool.locate([0, 1]).copy(torch.empty(3, 2, 4, 2, 8))


@pytest.mark.parametrize("ids", [[4, 5, 6, 7, 8], [10, 3, 0, 7]], ids=["ascending", "any order"])
def test_whole_blocks_written_across_slabs_read_back_exactly_and_leave_the_rest(ids: list[int]) -> None:
    pool, before = filled_pool(SPEC, slabs=3, slab_blocks=4)
    new = torch.randn((len(ids), *pool.block_shape()), generator=torch.Generator().manual_seed(1))
    pool.write_whole(ids, new)
    everything = list(range(pool.total_blocks))
    expected = before.clone()
    expected[ids] = new
    assert torch.equal(pool.locate(everything).copy(), expected)


def planned(pool: BlockPool, ids: list[int], seq: int) -> PlannedChunk:
    return PlannedChunk(seq, 0, len(ids) * SPEC.block_size, len(ids) * SPEC.block_size, tuple(range(len(ids))),
                        tuple([1] * len(ids)), pool.locate(ids), len(ids) * SPEC.bytes_per_block)  # fmt: skip


def test_staging_hands_out_two_buffers_for_good_growing_only_for_a_larger_chunk() -> None:
    pool, _ = filled_pool(SPEC, slabs=2, slab_blocks=8)
    staging = Staging()
    small, large = planned(pool, [0, 1], 1), planned(pool, list(range(16)), 2)
    first = [staging.out(slot, small).data_ptr() for slot in (0, 1)]
    assert first[0] != first[1]
    assert [staging.out(slot, small).data_ptr() for slot in (0, 1)] == first
    grown = [staging.out(slot, large).data_ptr() for slot in (0, 1)]
    assert [staging.out(slot, small).data_ptr() for slot in (0, 1)] == grown, "a smaller chunk fits what grew"
    assert [staging.out(slot, large).data_ptr() for slot in (0, 1)] == grown
    assert list(staging.out(1, large).shape) == [16, *pool.block_shape()]


def address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def test_an_arena_reuses_its_memory_after_reset_and_keeps_outgrown_memory_until_then() -> None:
    arena = Arena()
    a = arena.take(1000)
    a[:] = b"a" * 1000
    grown = arena.take(3000)  # outgrows the buffer: `a` must stay intact until reset
    grown[:3] = b"xyz"
    assert bytes(a) == b"a" * 1000
    arena.reset()
    first, second = arena.take(2000), arena.take(1000)
    assert address(first) == address(grown), "after reset the largest buffer is reused"
    assert address(second) == address(first) + 2000, "consecutive takes share one buffer"


def test_a_round_through_a_target_imports_exactly_in_groups_received_into_reused_memory(tiny_model: Path) -> None:
    """A source streams 24 chunks of 1 MiB to a real target data plane: they are imported in order, exactly,
    in hops of `IMPORT_GROUP_BYTES`; once the arena has grown to a group, each group is received into the
    same memory as the one before."""
    stage = Stage(ModelDir(tiny_model), 0, 1, dtype=torch.float64, kv_blocks=16, block_size=16)
    config = AgentConfig(model=tiny_model, start=0, end=1, stage_id=1, dtype="float64", block_size=16)
    spec = stage.spec
    per_chunk = (1 << 20) // spec.bytes_per_block
    pool = BlockPool(spec, per_chunk)
    pool.add_slabs(1)
    ids = list(range(per_chunk))
    data = torch.randn((per_chunk, *pool.block_shape()), dtype=spec.dtype, generator=torch.Generator().manual_seed(2))
    pool.write_whole(ids, data)
    chunks = [PlannedChunk(seq, 0, per_chunk * 16, per_chunk * 16, tuple(ids), tuple([1] * per_chunk),
                           pool.locate(ids), per_chunk * spec.bytes_per_block) for seq in range(24)]  # fmt: skip
    imported: list[tuple[int, int, torch.Tensor]] = []  # (sequence, address received at, data)

    def kv_import(chunk: KVChunk) -> int:
        imported.append((chunk.seq_id, chunk.data.data_ptr(), chunk.data.clone()))
        return len(chunk.logical)

    async def scenario() -> dict[str, int]:
        worker = StageWorker(stage, config, ModelDir(tiny_model).config, AgentMetrics(stage="1"))
        plane = DataPlane(worker, AgentMetrics(stage="1"), host="127.0.0.1", port=0, token=None)
        plane.kv_import = kv_import
        await plane.start()
        client = await FrameClient.connect("127.0.0.1", plane.port, role=MIGRATE_ROLE, stage_id=0,
                                           replies=FrameLimits.messages(Kind.CONTROL))  # fmt: skip
        try:
            await stream_chunks(client, chunks)
            reply = (await asyncio.wait_for(client.recv(), 30.0)).body()
            return {**reply, "hops": plane.kv_import_hops, "received": plane.kv_bytes_received}
        finally:
            await client.close()
            await plane.close()
            worker.shutdown()

    result = asyncio.run(scenario())
    per_group = IMPORT_GROUP_BYTES >> 20
    assert result == {"imported": 24 * per_chunk, "hops": 24 // per_group, "received": 24 << 20}
    assert [seq for seq, _, _ in imported] == list(range(24))
    assert all(torch.equal(got, data) for _, _, got in imported)
    second, third = ([address for seq, address, _ in imported if seq // per_group == group] for group in (1, 2))
    assert second == third, "once grown, every group is received where the one before it was"
