"""The micro-batch message survives the wire exactly, and a receiver refuses anything out of shape."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeshift.runtime.kv.span import SeqSpan
from pipeshift.runtime.microbatch import (
    MAX_RELEASES,
    MAX_RESERVES,
    MicroBatch,
    MicroBatchReader,
    data_limits,
    empty_data,
    from_frames,
    last_token_spans,
    to_frames,
)
from pipeshift.runtime.transport import Frame, FrameError, Kind, decode_frame, encode_frame

HIDDEN = 8
LIMITS = data_limits(width=HIDDEN, dtypes=[torch.float32, torch.float64], max_tokens=64, max_seqs=64)
TOKEN_LIMITS = data_limits(width=None, dtypes=[torch.int64], max_tokens=64, max_seqs=16)


def over_wire(mb: MicroBatch, limits=LIMITS) -> MicroBatch:
    """Each frame encoded to bytes and parsed back, as a receiving stage would."""
    return from_frames([decode_frame(encode_frame(f), limits) for f in to_frames(mb)])


@st.composite
def batches(draw: st.DrawFn) -> MicroBatch:
    n_spans = draw(st.integers(0, 6))
    seq_ids = draw(st.lists(st.integers(0, 2**63 - 1), min_size=n_spans, max_size=n_spans, unique=True))
    spans = tuple(SeqSpan(s, draw(st.integers(0, 2**31)), draw(st.integers(1, 5))) for s in seq_ids)
    reserve = tuple(draw(st.sampled_from([0, 1, 17, 2**32 - 1])) for _ in spans)
    release = tuple(draw(st.lists(st.integers(0, 2**63 - 1), max_size=MAX_RELEASES)))
    rows = sum(s.n for s in spans)
    data = torch.randn(rows, HIDDEN, dtype=torch.float64) if spans else empty_data()
    error = draw(st.text(max_size=40)) if spans else ""
    return MicroBatch(draw(st.integers(0, 2**64 - 1)), draw(st.integers(0, 2**32 - 1)), spans, reserve,
                      release, data, error)  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(batches())
def test_every_field_survives_the_wire_bit_for_bit(mb: MicroBatch) -> None:
    got = over_wire(mb)
    assert (got.batch_id, got.epoch, got.spans, got.reserve, got.release, got.error) == (
        mb.batch_id, mb.epoch, mb.spans, mb.reserve, mb.release, mb.error)  # fmt: skip
    if mb.spans:
        assert got.data.dtype == mb.data.dtype and torch.equal(got.data, mb.data)
    else:
        assert got.data.numel() == 0


def test_token_ids_into_the_first_stage_travel_as_one_dimension() -> None:
    mb = MicroBatch(3, 0, (SeqSpan(1, 0, 4), SeqSpan(2, 9, 1)), (20, 0), (), torch.tensor([5, 6, 7, 8, 9]))
    got = over_wire(mb, TOKEN_LIMITS)
    assert torch.equal(got.data, mb.data) and got.reserve == (20, 0)


def test_logits_rows_match_last_token_spans() -> None:
    spans = (SeqSpan(1, 0, 4), SeqSpan(2, 9, 1))
    out = last_token_spans(spans)
    assert out == (SeqSpan(1, 3, 1), SeqSpan(2, 9, 1))
    logits = torch.randn(2, HIDDEN)
    got = over_wire(MicroBatch(3, 0, out, (0, 0), (), logits))
    assert got.spans == out and torch.equal(got.data, logits)


def test_a_failed_batch_keeps_its_sequences_and_a_placeholder_of_the_next_hops_width() -> None:
    mb = MicroBatch(3, 0, (SeqSpan(1, 0, 4), SeqSpan(2, 9, 1)), (20, 0), (7,), torch.arange(5))
    failed = mb.failed("reservation refused", HIDDEN, torch.float32)
    got = over_wire(failed)
    assert [s.seq_id for s in got.spans] == [1, 2]
    assert got.error == "reservation refused" and got.release == (7,)
    assert got.data.shape == (2, HIDDEN)


def test_the_header_fits_the_transports_json_cap_at_every_bound() -> None:
    spans = tuple(SeqSpan(2**63 - 1 - i, 2**32 - 2, 1) for i in range(MAX_RESERVES))
    mb = MicroBatch(2**64 - 1, 2**32 - 1, spans, (2**32 - 1,) * len(spans),
                    tuple(range(2**63 - MAX_RELEASES, 2**63)), torch.zeros(len(spans), HIDDEN),
                    "\u00e9" * 1000)  # fmt: skip
    got = over_wire(mb)
    assert got.release == mb.release and got.reserve == mb.reserve
    # The error is the one unbounded part: it is shortened to fit, not dropped.
    assert got.error.startswith("\u00e9" * 100) and got.error.endswith("...")


def test_limits_refuse_hidden_states_of_the_wrong_width_before_reading_them() -> None:
    mb = MicroBatch(1, 0, (SeqSpan(1, 0, 2),), (0,), (), torch.zeros(2, HIDDEN + 1))
    _, data = to_frames(mb)
    with pytest.raises(FrameError, match="does not end in the expected"):
        decode_frame(encode_frame(data), LIMITS)


def test_limits_refuse_hidden_states_where_token_ids_are_expected() -> None:
    _, data = to_frames(MicroBatch(1, 0, (SeqSpan(1, 0, 2),), (0,), (), torch.zeros(2, HIDDEN)))
    with pytest.raises(FrameError):
        decode_frame(encode_frame(data), TOKEN_LIMITS)


def _header(body: object, batch_id: int = 1) -> Frame:
    return Frame(Kind.CONTROL, 0, batch_id, (), json.dumps(body).encode(), None)


GOOD = {"reserve": [], "release": [], "error": "", "data": True}


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"hello": 1}, "micro-batch header"),
        ({"mb": {**GOOD, "extra": 1}}, "micro-batch header"),
        ({"mb": {**GOOD, "release": [-1]}}, "released sequence id"),
        ({"mb": {**GOOD, "release": [True]}}, "released sequence id"),
        ({"mb": {**GOOD, "release": list(range(MAX_RELEASES + 1))}}, "release must be a list"),
        ({"mb": {**GOOD, "reserve": [[0, 0]]}}, "reserve token count"),
        ({"mb": {**GOOD, "reserve": [[0]]}}, "not \\[index, tokens\\]"),
        ({"mb": {**GOOD, "error": 5}}, "error must be a string"),
        ({"mb": {**GOOD, "data": 1}}, "data must be true or false"),
        ({"mb": {**GOOD, "data": False, "reserve": [[0, 3]]}}, "cannot reserve"),
    ],
)
def test_a_malformed_header_is_refused_with_the_field_named(body: object, match: str) -> None:
    with pytest.raises(FrameError, match=match):
        MicroBatchReader().feed(_header(body))


def test_a_reservation_for_a_span_the_data_does_not_have_is_refused() -> None:
    reader = MicroBatchReader()
    assert reader.feed(_header({"mb": {**GOOD, "reserve": [[3, 10]]}})) is None
    data = Frame.activations(torch.zeros(1, HIDDEN), [SeqSpan(1, 0, 1)], batch_id=1)
    with pytest.raises(FrameError, match="reserves for span 3 of 1"):
        reader.feed(data)


def test_frames_out_of_order_are_refused() -> None:
    data = Frame.activations(torch.zeros(1, HIDDEN), [SeqSpan(1, 0, 1)], batch_id=1)
    with pytest.raises(FrameError, match="without its header"):
        MicroBatchReader().feed(data)
    reader = MicroBatchReader()
    reader.feed(_header({"mb": GOOD}))
    with pytest.raises(FrameError, match="followed by another header"):
        reader.feed(_header({"mb": GOOD}))
    reader = MicroBatchReader()
    reader.feed(_header({"mb": GOOD}, batch_id=2))
    with pytest.raises(FrameError, match="does not follow its header"):
        reader.feed(data)


def test_a_batch_that_claims_rows_it_does_not_have_cannot_be_built() -> None:
    with pytest.raises(ValueError, match="needs 3 rows"):
        MicroBatch(1, 0, (SeqSpan(1, 0, 3),), (0,), (), torch.zeros(2, HIDDEN))
    with pytest.raises(ValueError, match="one per span"):
        MicroBatch(1, 0, (SeqSpan(1, 0, 2),), (), (), torch.zeros(2, HIDDEN))
