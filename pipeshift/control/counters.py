"""Recomputation measured from the agents' own counters: the (position, layer) forward computations they
ran against the minimum that the finished requests needed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pipeshift.control.http import ControlClient


def stage_layer_tokens(urls: Iterable[str], token: str | None = None) -> dict[str, int]:
    """`layer_tokens_computed` from each agent's `/stats`, by control URL (read stages before stopping them)."""
    return {url: int(ControlClient(url, token).get("/stats")["layer_tokens_computed"]) for url in urls}


def needed_layer_tokens(requests: Iterable[tuple[int, int]], num_layers: int) -> int:
    """What `(prompt tokens, generated tokens)` requests need at least: every position but the last generated
    token's (never fed back) once through every layer."""
    total = 0
    for prompt, generated in requests:
        if prompt < 1 or generated < 0:
            raise ValueError(f"a request needs a prompt of >= 1 token and >= 0 generated, got ({prompt}, {generated})")
        total += (prompt + max(generated, 1) - 1) * num_layers
    return total


def tokens_recomputed(
    counted: Mapping[Any, int] | Iterable[int], requests: Iterable[tuple[int, int]], num_layers: int
) -> int:
    """Σ over agents of (position, layer) computations − Σ over requests of (prompt + generated − 1) × layers:
    0 when no position of any request was computed twice in any layer, in token·layer units."""
    values = counted.values() if isinstance(counted, Mapping) else counted
    return sum(values) - needed_layer_tokens(requests, num_layers)
