"""Attention of a batch of query spans over the paged KV cache of one layer.

Decode spans share one padded gather and one SDPA call; each prefill span gets its own causal call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeshift.runtime.kv.cache import PagedKVCache
from pipeshift.runtime.kv.span import SeqSpan

__all__ = ["SeqSpan", "paged_attention"]


def paged_attention(q: Tensor, cache: PagedKVCache, layer: int, spans: Sequence[SeqSpan], scale: float) -> Tensor:
    """Causal attention: `q` is `[T, num_heads, head_dim]`, the spans' query tokens concatenated in order.

    The cache must already hold positions `0 .. start + n - 1` of every span (the caller writes the new
    K/V first). `num_heads` may be a multiple of the cache's kv heads (GQA). Returns `q`'s shape and dtype.
    """
    spec = cache.spec
    total = sum(span.n for span in spans)
    if q.dim() != 3 or q.shape[0] != total or q.shape[2] != spec.head_dim or q.shape[1] % spec.num_kv_heads:
        raise ValueError(
            f"q must be [{total}, a multiple of {spec.num_kv_heads} heads, {spec.head_dim}] for spans "
            f"totalling {total} tokens, got {list(q.shape)}"
        )
    gqa = q.shape[1] != spec.num_kv_heads
    out = torch.empty_like(q)
    decode_rows: list[int] = []
    decode: list[tuple[int, int]] = []
    row = 0
    for span in spans:
        if span.n == 1:
            decode_rows.append(row)
            decode.append((span.seq_id, span.end))
        else:
            out[row : row + span.n] = _prefill(q[row : row + span.n], cache, layer, span, scale, gqa)
        row += span.n
    if decode:
        _decode(q, out, decode_rows, cache, layer, decode, scale, gqa)
    return out


def _decode(
    q: Tensor,
    out: Tensor,
    rows: list[int],
    cache: PagedKVCache,
    layer: int,
    seq_lengths: list[tuple[int, int]],
    scale: float,
    gqa: bool,
) -> None:
    k, v = cache.read_batch(layer, seq_lengths, scratch=True)
    lengths = torch.tensor([length for _, length in seq_lengths], device=q.device)
    mask = torch.arange(k.shape[1], device=q.device) < lengths[:, None]
    all_rows = len(rows) == q.shape[0]
    index = None if all_rows else torch.tensor(rows, device=q.device)
    queries = q if index is None else q.index_select(0, index)
    attended = F.scaled_dot_product_attention(
        queries.unsqueeze(2),
        k.to(q.dtype).transpose(1, 2),
        v.to(q.dtype).transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=gqa,
    ).squeeze(2)
    if index is None:
        out.copy_(attended)
    else:
        out.index_copy_(0, index, attended)


def _prefill(q: Tensor, cache: PagedKVCache, layer: int, span: SeqSpan, scale: float, gqa: bool) -> Tensor:
    k, v = cache.read_batch(layer, [(span.seq_id, span.end)], scratch=True)
    keys = torch.arange(k.shape[1], device=q.device)
    positions = torch.arange(span.start, span.end, device=q.device)
    mask = keys[None, :] <= positions[:, None]
    attended = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.to(q.dtype).transpose(1, 2),
        v.to(q.dtype).transpose(1, 2),
        attn_mask=mask,
        scale=scale,
        enable_gqa=gqa,
    )
    return attended[0].transpose(0, 1)
