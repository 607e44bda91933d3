"""The fixed-size records that say which KV blocks a KV_BLOCKS frame carries (for live migration).

Layout, little-endian: seq_id u64, layer u32, count u32, then count block indices (u32), then count
versions (u64). The receiver knows the record's exact size from the tensor's first dimension.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pipeshift.runtime.transport.errors import FrameError

_HEAD = struct.Struct("<QII")
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1


def kv_meta_size(num_blocks: int) -> int:
    return _HEAD.size + num_blocks * (4 + 8)


@dataclass(frozen=True)
class KVBlocksMeta:
    """Logical blocks `block_indices` of sequence `seq_id` at `layer`, each at the version it was copied.

    Versions let the receiver tell a stale copy from a block that was rewritten during migration.
    """

    seq_id: int
    layer: int
    block_indices: tuple[int, ...]
    versions: tuple[int, ...]

    def __post_init__(self) -> None:
        if not 0 <= self.seq_id <= U64_MAX:
            raise FrameError(f"KV seq id {self.seq_id} is outside 0..{U64_MAX}")
        if not 0 <= self.layer <= U32_MAX:
            raise FrameError(f"KV layer {self.layer} is outside 0..{U32_MAX}")
        if not self.block_indices:
            raise FrameError("a KV_BLOCKS frame needs at least one block index")
        if len(self.versions) != len(self.block_indices):
            raise FrameError(
                f"{len(self.block_indices)} block indices but {len(self.versions)} versions; need one per block"
            )
        if len(set(self.block_indices)) != len(self.block_indices):
            raise FrameError(f"duplicate logical block index in {list(self.block_indices)}")
        if not all(0 <= i <= U32_MAX for i in self.block_indices):
            raise FrameError(f"a block index in {list(self.block_indices)} is outside 0..{U32_MAX}")
        if not all(0 <= v <= U64_MAX for v in self.versions):
            raise FrameError(f"a version in {list(self.versions)} is outside 0..{U64_MAX}")

    def encode(self) -> bytes:
        n = len(self.block_indices)
        return _HEAD.pack(self.seq_id, self.layer, n) + struct.pack(
            f"<{n}I{n}Q", *self.block_indices, *self.versions
        )

    @classmethod
    def decode(cls, meta: bytes | bytearray | memoryview) -> KVBlocksMeta:
        if len(meta) < _HEAD.size:
            raise FrameError(f"KV meta is {len(meta)} bytes, shorter than its {_HEAD.size}-byte head")
        seq_id, layer, n = _HEAD.unpack_from(meta)
        if len(meta) != kv_meta_size(n):
            raise FrameError(f"KV meta claims {n} blocks, which needs {kv_meta_size(n)} bytes, got {len(meta)}")
        fields = struct.unpack_from(f"<{n}I{n}Q", meta, _HEAD.size)
        return cls(seq_id, layer, tuple(fields[:n]), tuple(fields[n:]))
