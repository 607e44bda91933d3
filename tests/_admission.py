"""Admission by the pools the stages hold now: the largest request every idle stage can reserve for is
served, and one token more is refused naming the binding stage and its pool (shared by the KV-budget tests)."""

from __future__ import annotations

import math
import random

from pipeshift.api import Layout
from pipeshift.local.processes import http_json


def largest_request(capacity: dict[int, int], layout: Layout, block_size: int) -> int:
    """Tokens (prompt + max_tokens) of the largest sequence every idle stage can reserve for."""
    return min(capacity[s.stage_id] // s.num_layers for s in layout) * block_size


def admission(url: str, tokens: int, vocab: int) -> tuple[int, dict]:
    """A request of `tokens` positions in all (prompt of tokens - 4, 4 new tokens), not streamed."""
    rng = random.Random(tokens)
    body = {"prompt": [rng.randrange(2, vocab) for _ in range(tokens - 4)], "max_tokens": 4, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    return http_json(url + "/v1/completions", "POST", body, timeout_s=120)


def assert_admits_exactly(url: str, capacity: dict[int, int], layout: Layout, *, block_size: int,
                          vocab: int) -> None:
    largest = largest_request(capacity, layout, block_size)
    status, answer = admission(url, largest, vocab)
    assert status == 200 and answer["choices"][0]["finish_reason"] == "length", answer
    binding = min(layout, key=lambda s: capacity[s.stage_id] // s.num_layers)
    need = binding.num_layers * math.ceil((largest + 1) / block_size)
    status, answer = admission(url, largest + 1, vocab)
    assert status == 400, answer
    assert (f"{largest + 1} tokens need {need} KV blocks on stage {binding.stage_id}, "
            f"whose pool holds {capacity[binding.stage_id]}") in answer["error"]["message"], answer
