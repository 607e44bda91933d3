"""`pipeshift demo --plot FILE.png`: every token's latency (the gap since the request's previous token, TTFT for
the first) against time, one series per request, with the change's phases shaded.

The phases come from the report: `phases_ms` holds each phase's duration in the order they ran, and one
wall-clock time known to start a phase pins that sequence to the clients' clock (`anchors`: with the drain
switch `held_unix` starts `holding`; with the epoch switch `resumed_unix` is taken as `committing` begins).
Phases are grouped as a reader thinks of them: prepare (starting stages, loading weights), pre-copy, switch
(hold or arm, final copy, commit, resume, retire) and clean-up. matplotlib is an optional extra
(`pipeshift[plot]`). With a live strategy the demo draws two panels side by side: the change under the
epoch switch and the same change under the drain switch, so the drain's stall shows next to its absence.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeshift.errors import UserError

# Orchestrator phase -> the span it is drawn in; phases not listed here are drawn under their own name.
GROUPS = {
    "starting": "prepare", "preparing": "prepare",
    "precopying": "pre-copy",
    "arming": "switch", "holding": "switch", "final_copy": "switch", "committing": "switch", "resuming": "switch",
    "retiring": "switch",
    "cleaning": "clean-up",
}
COLOURS = {"prepare": "tab:blue", "pre-copy": "tab:green", "switch": "tab:red", "clean-up": "tab:purple"}
SKIPPED = frozenset({"planned", "done", "aborted", "failed"})


@dataclass(frozen=True)
class Panel:
    """One run's token latencies and phase spans, drawn as one subplot."""

    series: Sequence[Sequence[tuple[float, float]]]
    spans: Sequence[PhaseSpan]
    title: str


@dataclass(frozen=True)
class PhaseSpan:
    label: str
    start: float  # seconds on the plot's time axis
    end: float


def phase_spans(phases_ms: Mapping[str, float], *, anchors: Mapping[str, float | None], change_start_unix: float,
                zero_unix: float) -> list[PhaseSpan]:
    """Spans of grouped phases, in seconds since `zero_unix`. The phases are laid end to end from the change's
    start, or placed so that the first phase of `anchors` that ran begins at its wall-clock time."""
    offsets, at = {}, 0.0
    for name, ms in phases_ms.items():
        offsets[name] = at
        at += ms / 1e3
    start = change_start_unix
    pinned = [(name, unix) for name, unix in anchors.items() if unix is not None and name in offsets]
    if pinned:
        name, unix = pinned[0]
        start = unix - offsets[name]
    spans: list[PhaseSpan] = []
    for name, ms in phases_ms.items():
        if name in SKIPPED or ms <= 0:
            continue
        label = GROUPS.get(name, name)
        begin, end = start + offsets[name] - zero_unix, start + offsets[name] + ms / 1e3 - zero_unix
        if spans and spans[-1].label == label:
            spans[-1] = PhaseSpan(label, spans[-1].start, end)
        else:
            spans.append(PhaseSpan(label, begin, end))
    return spans


def token_gaps(sent: float, token_times: Sequence[float], zero: float) -> list[tuple[float, float]]:
    """(time since `zero` in s, gap in ms) for every token of one request; the first gap is its TTFT."""
    times = [sent, *token_times]
    return [(b - zero, (b - a) * 1e3) for a, b in itertools.pairwise(times)]


def require_matplotlib() -> None:
    """Checked before the demo starts, so a missing extra costs nothing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'pipeshift[plot]'") from None


def figure(panels: Sequence[Panel], title: str) -> Any:
    """The figure (not saved): one subplot per panel, side by side with a shared latency axis; in each, one
    scatter series per request and one shaded band per phase span."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10 * len(panels), 5), dpi=110)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        for points in panel.series:
            if points:
                xs, ys = zip(*points, strict=True)
                ax.scatter(xs, ys, s=6, alpha=0.6)
        drawn = set()
        for span in panel.spans:
            ax.axvspan(span.start, span.end, color=COLOURS.get(span.label, "tab:gray"), alpha=0.2,
                       label=None if span.label in drawn else span.label)
            drawn.add(span.label)
        ax.set_yscale("log")
        ax.set_xlabel("time since the first request (s)")
        ax.set_title(panel.title)
        if drawn:
            ax.legend(loc="upper right")
    axes[0].set_ylabel("token latency: gap since the previous token (ms)")
    fig.suptitle(title)
    return fig


def save(path: Path, panels: Sequence[Panel], title: str) -> None:
    try:
        figure(panels, title).savefig(path, format="png")
    except OSError as error:
        raise UserError(f"--plot {path}: {error.strerror or error}") from None
