"""Answers remembered by request id, so a retried control call is answered without acting twice.

Callers retry after timeouts they cannot interpret (did the resize happen?); replaying is always safe.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

Answer = tuple[int, dict[str, Any]]
CAPACITY = 4096


class IdempotencyCache:
    """The first answer per request id (kept for the last `capacity` ids), shared by concurrent repeats."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._capacity = capacity
        self._answers: OrderedDict[str, tuple[str, asyncio.Future[Answer]]] = OrderedDict()

    async def run(self, request_id: str, call: str, action: Callable[[], Awaitable[Answer]]) -> Answer:
        """`call` identifies what was asked (route and body); an id reused for another call is refused."""
        known = self._answers.get(request_id)
        if known is not None:
            first_call, answer = known
            if first_call != call:
                return 409, {
                    "error": f"request_id {request_id!r} was already used for a different call; "
                    "use a new id for a new call"
                }
            return await asyncio.shield(answer)
        answer = asyncio.get_running_loop().create_future()
        self._answers[request_id] = (call, answer)
        while len(self._answers) > self._capacity:
            self._answers.popitem(last=False)
        try:
            answer.set_result(await action())
        except BaseException:
            # Not an answer (a crash or a cancelled call): forget the id so that a retry acts.
            self._answers.pop(request_id, None)
            answer.cancel()
            raise
        return answer.result()
