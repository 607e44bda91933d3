"""One sequence's slice of a batch of query tokens, as the attention kernel and batched writes see it.

A batch concatenates the spans' tokens in order; a span with `n == 1` is a decode step.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SeqSpan:
    """Query tokens at positions `start .. start + n - 1` of sequence `seq_id`."""

    seq_id: int
    start: int
    n: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.n < 1:
            raise ValueError(f"SeqSpan needs start >= 0 and n >= 1, got start={self.start}, n={self.n}")

    @property
    def end(self) -> int:
        return self.start + self.n
