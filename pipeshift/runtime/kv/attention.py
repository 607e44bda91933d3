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
    if spans and total == len(spans):  # a pure decode batch, the common case: no scatter into `out`
        return _decode(q, cache, layer, spans, scale, gqa)
    out = torch.empty_like(q)
    decode_rows: list[int] = []
    decode: list[SeqSpan] = []
    row = 0
    for span in spans:
        if span.n == 1:
            decode_rows.append(row)
            decode.append(span)
        else:
            out[row : row + span.n] = _prefill(q[row : row + span.n], cache, layer, span, scale, gqa)
        row += span.n
    if decode:
        index = torch.tensor(decode_rows, device=q.device)
        out.index_copy_(0, index, _decode(q.index_select(0, index), cache, layer, decode, scale, gqa))
    return out


def _decode(q: Tensor, cache: PagedKVCache, layer: int, spans: Sequence[SeqSpan], scale: float, gqa: bool) -> Tensor:
    """One query token per span (`q` is `[len(spans), heads, head_dim]`), all in one padded SDPA call.

    The gather is cut to the longest span; when all spans are equally long (a batch that started
    together) nothing is padding, and SDPA without a mask takes about a quarter less time.
    """
    seq_lengths = [(span.seq_id, span.end) for span in spans]
    lengths = [length for _, length in seq_lengths]
    k, v = cache.read_batch(layer, seq_lengths, scratch=True)
    longest = max(lengths)
    if longest < k.shape[1]:
        k, v = k[:, :longest], v[:, :longest]
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    mask = None
    if min(lengths) != longest:
        mask = torch.arange(longest, device=q.device) < torch.tensor(lengths, device=q.device)[:, None]
        mask = mask[:, None, None, :]
    return F.scaled_dot_product_attention(
        q.unsqueeze(2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        scale=scale,
        enable_gqa=gqa,
    ).squeeze(2)


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
