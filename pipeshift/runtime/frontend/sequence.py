"""One request as the scheduler tracks it, and the events it streams back to its HTTP handler.

The handler only reads `events`; everything else is mutated by the scheduler on the event loop.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

from pipeshift.runtime.frontend.detokenize import Decoder, IncrementalDetokenizer
from pipeshift.runtime.frontend.sampling import Sampler, SamplingParams
from pipeshift.runtime.frontend.stops import StopMatcher

GREEDY = SamplingParams(temperature=0.0)


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    sampling: SamplingParams = GREEDY
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class Delta:
    """New text and the tokens behind it; `finish_reason` ("stop" or "length") marks the last delta."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None


@dataclass(frozen=True)
class Failure:
    """The request ended without finishing: `status` is the HTTP status a non-streaming reply gets."""

    message: str
    status: int
    # Seconds the client should wait before retrying (the Retry-After header), when retrying makes sense.
    retry_after: int | None = None


Event = Delta | Failure


class State(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    prompt: list[int]
    params: GenerationParams
    decoder: Decoder
    eos_ids: frozenset[int]
    arrival: float = field(default_factory=time.monotonic)
    state: State = State.WAITING
    slot: int = -1
    output: list[int] = field(default_factory=list)
    computed: int = 0
    last_token_at: float | None = None
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.params.sampling)
        self._detok = IncrementalDetokenizer(self.decoder, self.prompt)
        self._stops = StopMatcher(self.params.stop)
        if self.params.ignore_eos:
            self.eos_ids = frozenset()

    @property
    def reserve_tokens(self) -> int:
        """KV positions reserved up front: the prompt plus every token it may generate."""
        return len(self.prompt) + self.params.max_tokens

    @property
    def prefill(self) -> list[int]:
        """What its next admission computes: the prompt, and after a restart of the stages (which lost its KV)
        also every token generated so far, so decoding continues exactly where it stopped."""
        return self.prompt + self.output

    def append(self, token: int) -> Delta:
        """Record a generated token; the Delta says what text it releases and whether the request is done."""
        self.output.append(token)
        if token in self.eos_ids:
            return self._finish(token, "", "stop")
        text, hit = self._stops.feed(self._detok.push(token))
        if hit:
            return Delta(text, (token,), "stop")
        if len(self.output) >= self.params.max_tokens:
            return self._finish(token, text, "length")
        return Delta(text, (token,))

    def _finish(self, token: int, text: str, reason: str) -> Delta:
        tail, hit = self._stops.feed(self._detok.flush())
        text += tail
        if hit:
            return Delta(text, (token,), "stop")
        return Delta(text + self._stops.flush(), (token,), reason)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": len(self.prompt),
            "completion_tokens": len(self.output),
            "total_tokens": len(self.prompt) + len(self.output),
        }
