"""The JSON shapes of OpenAI's completion and chat completion replies, whole and as stream chunks.

`return_token_ids` (an extension) adds the generated token ids to each choice and chunk.
"""

from __future__ import annotations

import abc
import time
import uuid
from typing import Any

from pipeshift.runtime.frontend.sequence import Delta


class ResponseFormat(abc.ABC):
    """The JSON shapes of one endpoint, for whole replies and for stream chunks."""

    prefix = ""
    object_whole = ""
    object_chunk = ""

    def __init__(self, model: str, token_ids: bool) -> None:
        self.model = model
        self.token_ids = token_ids
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def whole(self, deltas: list[Delta], usage: dict[str, int]) -> dict[str, Any]:
        text = "".join(d.text for d in deltas)
        choice = self.whole_choice(text, deltas[-1].finish_reason)
        if self.token_ids:
            choice["token_ids"] = [t for d in deltas for t in d.token_ids]
        return self._envelope(self.object_whole, [choice]) | {"usage": usage}

    def chunk(self, delta: Delta) -> dict[str, Any]:
        choice = self.chunk_choice(delta)
        if self.token_ids:
            choice["token_ids"] = list(delta.token_ids)
        return self._envelope(self.object_chunk, [choice])

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return self._envelope(self.object_chunk, []) | {"usage": usage}

    def opening(self) -> dict[str, Any] | None:
        return None

    @abc.abstractmethod
    def whole_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]: ...

    @abc.abstractmethod
    def chunk_choice(self, delta: Delta) -> dict[str, Any]: ...


class CompletionFormat(ResponseFormat):
    prefix, object_whole, object_chunk = "cmpl", "text_completion", "text_completion"

    def whole_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def chunk_choice(self, delta: Delta) -> dict[str, Any]:
        return {"index": 0, "text": delta.text, "logprobs": None, "finish_reason": delta.finish_reason}


class ChatFormat(ResponseFormat):
    prefix, object_whole, object_chunk = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def whole_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }

    def chunk_choice(self, delta: Delta) -> dict[str, Any]:
        content = {"content": delta.text} if delta.text or delta.finish_reason is None else {}
        return {"index": 0, "delta": content, "logprobs": None, "finish_reason": delta.finish_reason}

    def opening(self) -> dict[str, Any]:
        return self._envelope(
            self.object_chunk,
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        )
