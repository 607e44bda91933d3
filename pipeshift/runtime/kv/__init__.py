"""The paged KV cache of a pipeline stage and attention over it.

One block pool per stage, owned by no layer, so a stage that gains or loses layers only edits tables.
"""

from pipeshift.runtime.kv.attention import paged_attention
from pipeshift.runtime.kv.budget import MemoryBudget
from pipeshift.runtime.kv.cache import PagedKVCache
from pipeshift.runtime.kv.span import SeqSpan
from pipeshift.runtime.kv.spec import KVCapacityError, KVSpec

__all__ = ["KVCapacityError", "KVSpec", "MemoryBudget", "PagedKVCache", "SeqSpan", "paged_attention"]
