"""`pipeshift demo --plot`: the phase spans come from the report's phase durations pinned to a wall-clock time
at which a phase began (the hold for a drain, the frontend's arm for an epoch switch), grouped as prepare /
pre-copy / switch / clean-up, and each is drawn as a shaded band."""

from __future__ import annotations

import sys

import pytest

from pipeshift.errors import UserError
from pipeshift.local.plot import Panel, PhaseSpan, figure, phase_spans, require_matplotlib, token_gaps

# A drain change as the orchestrator reports it: durations in ms, in the order the phases ran.
DRAIN = {"planned": 1.0, "starting": 40.0, "preparing": 10.0, "precopying": 100.0, "holding": 20.0,
         "final_copy": 10.0, "committing": 10.0, "resuming": 10.0, "cleaning": 5.0}


def test_phases_are_grouped_and_pinned_to_the_moment_serving_was_held() -> None:
    # The hold began 1000.5 s (wall clock); the change started 151 ms of phases earlier; the plot's zero is 1000 s.
    spans = phase_spans(DRAIN, anchors={"holding": 1000.5, "committing": 1000.53}, change_start_unix=999.0,
                        zero_unix=1000.0)
    expected = [("prepare", 0.5 - 0.150, 0.5 - 0.100), ("pre-copy", 0.5 - 0.100, 0.5),
                ("switch", 0.5, 0.55), ("clean-up", 0.55, 0.555)]
    assert [s.label for s in spans] == [label for label, _, _ in expected]
    for span, (_, start, end) in zip(spans, expected, strict=True):
        assert span.start == pytest.approx(start) and span.end == pytest.approx(end)


def test_without_a_hold_time_the_phases_start_when_the_change_did() -> None:
    aborted = {"planned": 2.0, "starting": 30.0, "preparing": 8.0}
    spans = phase_spans(aborted, anchors={"holding": None, "committing": None}, change_start_unix=10.0,
                        zero_unix=9.0)
    assert spans == [PhaseSpan("prepare", pytest.approx(1.002), pytest.approx(1.040))]


def test_an_epoch_switch_is_pinned_where_the_frontend_armed_and_unknown_phases_keep_their_name() -> None:
    epoch = {"planned": 0.0, "starting": 5.0, "precopying": 20.0, "arming": 4.0, "committing": 0.5,
             "retiring": 30.0, "settling": 2.0, "cleaning": 1.0}
    # No hold ran; `committing` began at 50.0 s, so `arming` (agents, then the frontend) began 4 ms before.
    spans = phase_spans(epoch, anchors={"holding": 48.0, "committing": 50.0}, change_start_unix=0.0,
                        zero_unix=49.0)
    assert [s.label for s in spans] == ["prepare", "pre-copy", "switch", "settling", "clean-up"]
    assert spans[2].start == pytest.approx(0.996) and spans[2].end == pytest.approx(1.0305)


def test_token_gaps_start_with_the_time_to_first_token() -> None:
    assert token_gaps(10.0, [10.05, 10.07, 10.12], zero=9.0) == [
        (pytest.approx(1.05), pytest.approx(50.0)), (pytest.approx(1.07), pytest.approx(20.0)),
        (pytest.approx(1.12), pytest.approx(50.0))]


def test_every_span_is_drawn_as_a_band_over_the_token_latencies() -> None:
    spans = phase_spans(DRAIN, anchors={"holding": 1000.5}, change_start_unix=999.0, zero_unix=1000.0)
    series = [token_gaps(1000.0, [1000.1, 1000.2, 1000.7], 1000.0), token_gaps(1000.3, [1000.4, 1000.9], 1000.0)]
    ax = figure([Panel(series, spans, "test")], "test").axes[0]
    bands = [(p.get_x(), p.get_x() + p.get_width()) for p in ax.patches]
    assert bands == [(pytest.approx(s.start), pytest.approx(s.end)) for s in spans]
    assert [c.get_offsets().shape[0] for c in ax.collections] == [3, 2]  # one scatter series per request
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["prepare", "pre-copy", "switch", "clean-up"]


def test_a_missing_matplotlib_is_named_with_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """matplotlib is installed here; hiding it from the import system is how its absence is simulated."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match=r"--plot needs matplotlib: pip install 'pipeshift\[plot\]'"):
        require_matplotlib()


def test_two_panels_put_the_epoch_switch_next_to_the_drain_switch_on_one_latency_axis() -> None:
    drain = phase_spans(DRAIN, anchors={"holding": 1000.5}, change_start_unix=999.0, zero_unix=1000.0)
    epoch = [PhaseSpan("pre-copy", 0.2, 0.4), PhaseSpan("switch", 0.4, 0.41)]
    fig = figure([Panel([token_gaps(1000.0, [1000.1, 1000.2], 1000.0)], epoch, "epoch"),
                  Panel([token_gaps(1000.0, [1000.1, 1000.9], 1000.0)], drain, "drain")], "both")
    first, second = fig.axes
    assert (first.get_title(), second.get_title()) == ("epoch", "drain")
    assert len(first.patches) == len(epoch) and len(second.patches) == len(drain)
    assert first.get_shared_y_axes().joined(first, second)  # the same latency scale, so the stall compares
