"""Paged attention against attention written out by hand over a contiguous float64 copy of the cache.

Mixed batches of prefill and decode spans, MHA and GQA, lengths on and around block boundaries, and
sequences whose blocks are scattered over several slabs.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from pipeshift.runtime.kv import KVSpec, PagedKVCache, SeqSpan, paged_attention

BS, DIM, SCALE = 4, 8, 0.3
Written = dict[tuple[int, int], tuple[Tensor, Tensor]]


def reference(q: Tensor, k: Tensor, v: Tensor, start: int, scale: float) -> Tensor:
    """softmax(q k^T * scale + causal mask) v for one sequence, in float64; query i sits at start + i."""
    group = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    query_pos = torch.arange(start, start + q.shape[0])[:, None]
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > query_pos, float("-inf"))
    weights = scores.exp() / scores.exp().sum(-1, keepdim=True)
    return torch.einsum("hqk,khd->qhd", weights, v)


def scattered_cache(
    lengths: dict[int, int], kv_heads: int, layers: int, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[PagedKVCache, Written]:
    """Writes in small round-robin chunks with a filler sequence released in between, so every sequence's
    blocks are interleaved with the others' and spread over several 3-block slabs."""
    gen = torch.Generator().manual_seed(seed)
    spec = KVSpec(block_size=BS, num_kv_heads=kv_heads, head_dim=DIM, dtype=dtype)
    need = sum(-(-n // BS) for n in lengths.values()) * layers
    cache = PagedKVCache(spec, need + 8, slab_blocks=3)
    cache.reserve(-1, 8)
    data: Written = {}
    for seq, n in lengths.items():
        cache.reserve(seq, -(-n // BS) * layers)
        for layer in range(layers):
            data[(seq, layer)] = (
                torch.randn(n, kv_heads, DIM, generator=gen),
                torch.randn(n, kv_heads, DIM, generator=gen),
            )
    written = dict.fromkeys(data, 0)
    chunk = 0
    while any(written[key] < data[key][0].shape[0] for key in data):
        for key, (k, v) in data.items():
            lo = written[key]
            hi = min(k.shape[0], lo + 1 + chunk % 3)
            if lo < hi:
                cache.write(*key, lo, k[lo:hi], v[lo:hi])
                written[key] = hi
        if chunk == 1:
            cache.write(-1, 0, 0, torch.zeros(8 * BS, kv_heads, DIM), torch.zeros(8 * BS, kv_heads, DIM))
        if chunk == 2:
            cache.release(-1)
        chunk += 1
    return cache, data


def check(cache: PagedKVCache, data: Written, spans: list[SeqSpan], heads: int, layer: int, seed: int) -> None:
    q = torch.randn(sum(s.n for s in spans), heads, DIM, generator=torch.Generator().manual_seed(seed))
    out = paged_attention(q, cache, layer, spans, SCALE)
    assert out.shape == q.shape and out.dtype == q.dtype
    row = 0
    for span in spans:
        k, v = data[(span.seq_id, layer)]
        want = reference(q[row : row + span.n], k[: span.end], v[: span.end], span.start, SCALE)
        torch.testing.assert_close(out[row : row + span.n].double(), want, atol=1e-5, rtol=1e-5)
        row += span.n


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2), (6, 1)], ids=["mha", "gqa4", "mqa"])
def test_mixed_prefill_and_decode_batch_matches_contiguous_attention(heads: int, kv_heads: int) -> None:
    lengths = {0: 1, 1: BS - 1, 2: BS, 3: BS + 1, 4: 2 * BS, 5: 2 * BS + 1, 6: 3 * BS + 2, 7: 5}
    cache, data = scattered_cache(lengths, kv_heads, layers=2, seed=1)
    assert len({block // 3 for block in cache.block_table(6, 1)}) > 1, "sequence 6 should span slabs"
    spans = [
        SeqSpan(0, 0, 1),  # decode of the very first token
        SeqSpan(6, 0, 3 * BS + 2),  # whole prefill over four blocks
        SeqSpan(1, BS - 2, 1),
        SeqSpan(2, BS - 1, 1),  # decode at the last slot of a block
        SeqSpan(5, BS - 1, BS + 2),  # chunked prefill that starts mid-sequence and crosses blocks
        SeqSpan(3, BS, 1),  # decode at the first slot of a new block
        SeqSpan(4, 2 * BS - 1, 1),
        SeqSpan(7, 3, 2),
    ]
    for layer in range(2):
        check(cache, data, spans, heads, layer, seed=layer)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 3 * BS + 1), min_size=1, max_size=6),
    decode=st.lists(st.booleans(), min_size=6, max_size=6),
    starts=st.lists(st.floats(0, 1), min_size=6, max_size=6),
    gqa=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**16),
)
def test_any_batch_of_spans_matches_contiguous_attention(
    lengths: list[int], decode: list[bool], starts: list[float], gqa: int, seed: int
) -> None:
    cache, data = scattered_cache(dict(enumerate(lengths)), kv_heads=2, layers=1, seed=seed)
    spans = []
    for seq, length in enumerate(lengths):
        if decode[seq] or length == 1:
            spans.append(SeqSpan(seq, length - 1, 1))
        else:
            start = int(starts[seq] * (length - 2))
            spans.append(SeqSpan(seq, start, length - start))
    check(cache, data, spans, heads=2 * gqa, layer=0, seed=seed)


def test_low_precision_cache_returns_the_query_dtype() -> None:
    cache, data = scattered_cache({0: BS + 3, 1: 2 * BS}, kv_heads=2, layers=1, seed=3, dtype=torch.bfloat16)
    spans = [SeqSpan(0, BS + 2, 1), SeqSpan(1, 1, 2 * BS - 1)]
    q = torch.randn(sum(s.n for s in spans), 4, DIM, generator=torch.Generator().manual_seed(4))
    out = paged_attention(q.bfloat16(), cache, 0, spans, SCALE)
    assert out.dtype == torch.bfloat16
    row = 0
    for span in spans:
        k, v = (t.bfloat16() for t in data[(span.seq_id, 0)])
        want = reference(q[row : row + span.n].bfloat16(), k[: span.end], v[: span.end], span.start, SCALE)
        torch.testing.assert_close(out[row : row + span.n].double(), want, atol=3e-2, rtol=3e-2)
        row += span.n


def test_a_span_beyond_what_the_cache_holds_is_refused() -> None:
    cache, _ = scattered_cache({0: 5}, kv_heads=2, layers=1, seed=0)
    with pytest.raises(ValueError, match="cannot read 7 positions of sequence 0 layer 0: it holds 5"):
        paged_attention(torch.zeros(2, 2, DIM), cache, 0, [SeqSpan(0, 5, 2)], SCALE)


def test_query_heads_that_do_not_fit_the_kv_heads_are_refused() -> None:
    cache, _ = scattered_cache({0: 5}, kv_heads=2, layers=1, seed=0)
    with pytest.raises(ValueError, match=r"q must be \[1, a multiple of 2 heads, 8\]"):
        paged_attention(torch.zeros(1, 3, DIM), cache, 0, [SeqSpan(0, 4, 1)], SCALE)
