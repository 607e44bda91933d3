"""The near-tie rule, in one place for the oracle tests and the demo: where the top two logits of a position are
closer than float rounding can move them, greedy decoding may pick either depending on summation order or batch
composition, so a different token there is not an error.

The threshold: `NEAR_TIE_STD_FRACTION` of the logits' standard deviation (the oracle tests' rule), or, when the
rounding error at that position is measured, `ROUNDING_FACTOR` times it, whichever is larger. The measured error
is the largest difference from the float64 logits of the logits computed in the served dtype two ways (the whole
sequence in one prefill, and token by token as decoding does: rounding depends on the order of the sums); the
factor is 2 because the two runs being compared each carry their own rounding. The measurement matters: on the
demo model float32 logits move by ~2e-3 of their standard deviation typically and by up to ~6e-2 at some
positions (transformers' float32 shows the same size), far above 1e-3.

The demo applies it to a request whose tokens differ from the reference run's: the divergence is accepted only if,
at the first differing position, the reference's top-2 margin is below the threshold and the other run's token is
within the threshold of the top (it is one of the tied tokens), with the logits recomputed teacher-forced in this
process. In float64 no divergence is accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeshift.api import Layout
from pipeshift.runtime.kv import SeqSpan
from pipeshift.runtime.model.checkpoint import ModelDir
from pipeshift.runtime.pipeline import Pipeline

NEAR_TIE_STD_FRACTION = 1e-3
ROUNDING_FACTOR = 2.0


def threshold(logits: torch.Tensor, error: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Per row of `logits` ([..., vocab]): how close two logits must be to count as tied (see the module)."""
    return torch.clamp(NEAR_TIE_STD_FRACTION * logits.std(dim=-1), min=ROUNDING_FACTOR * torch.as_tensor(error))


def near_tie(logits: torch.Tensor, error: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Per row of `logits` ([..., vocab]): whether its top-1/top-2 margin is a near-tie; `error` is the rounding
    error measured for those logits, if any."""
    top2 = logits.topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]) < threshold(logits, error)


def first_divergence(reference: Sequence[int], other: Sequence[int]) -> int | None:
    """The first position where the token lists differ (a missing token counts), or None if they are equal."""
    for i, (a, b) in enumerate(zip(reference, other, strict=False)):
        if a != b:
            return i
    return None if len(reference) == len(other) else min(len(reference), len(other))


@dataclass(frozen=True)
class Comparison:
    """`divergences`: requests whose tokens differ from the reference; `near_ties`: those accepted by the rule."""

    requests: int
    divergences: int
    near_ties: int

    @property
    def matches(self) -> bool:
        return self.divergences == self.near_ties


class ReferenceLogits:
    """The model in one process, to recompute a reference request's logits at one position (teacher-forced)."""

    def __init__(self, model: Path, dtype: str) -> None:
        directory = ModelDir(model)
        self.engine = Pipeline(directory, Layout.parse(str(directory.config.num_layers)), dtype=getattr(torch, dtype))

    def at(self, prompt: Sequence[int], tokens: Sequence[int], position: int) -> torch.Tensor:
        """Logits that chose `tokens[position]`: after the prompt and `tokens[:position]`, in one prefill."""
        ids = [*prompt, *tokens[:position]]
        self.engine.reserve(0, len(ids))
        try:
            return self.engine.forward([SeqSpan(0, 0, len(ids))], torch.tensor(ids))[0].double()
        finally:
            self.engine.release(0)

    def stepwise(self, prompt: Sequence[int], tokens: Sequence[int], position: int) -> torch.Tensor:
        """The same logits computed as decoding does: the prompt, then one token at a time."""
        ids = [*prompt, *tokens[:position]]
        self.engine.reserve(0, len(ids))
        try:
            out = self.engine.forward([SeqSpan(0, 0, len(prompt))], torch.tensor(list(prompt)))
            for i in range(len(prompt), len(ids)):
                out = self.engine.forward([SeqSpan(0, i, 1)], torch.tensor([ids[i]]))
            return out[0].double()
        finally:
            self.engine.release(0)


def accepted(served: torch.Tensor, exact: torch.Tensor, other: int, *more: torch.Tensor) -> bool:
    """The rule at one position: `served` logits (the run's dtype), `exact` the same in float64, `other` the token
    the diverging run chose there; `more`: the same logits computed other ways in the run's dtype."""
    error = max((logits - exact).abs().max() for logits in (served, *more))
    limit = threshold(served, error)
    return bool(near_tie(served, error)) and bool(served.max() - served[other] < limit)


def compare(model: Path, dtype: str, prompts: Sequence[Sequence[int]], reference: Sequence[Sequence[int]],
            outputs: Sequence[Sequence[int]]) -> Comparison:
    """Classify every request's output against its reference by the rule; float64 accepts no divergence."""
    engines: tuple[ReferenceLogits, ReferenceLogits] | None = None
    divergences = near_ties = 0
    for prompt, ref, out in zip(prompts, reference, outputs, strict=True):
        position = first_divergence(ref, out)
        if position is None:
            continue
        divergences += 1
        if dtype == "float64" or position >= min(len(ref), len(out)):
            continue  # float64 never ties by rounding; a token missing from one side is no tie either
        engines = engines or (ReferenceLogits(model, dtype), ReferenceLogits(model, "float64"))
        served, exact = (engine.at(prompt, ref, position) for engine in engines)
        stepwise = engines[0].stepwise(prompt, ref, position)
        near_ties += accepted(served, exact, out[position], stepwise)
    return Comparison(len(outputs), divergences, near_ties)
