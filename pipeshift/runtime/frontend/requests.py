"""The bodies of `/v1/completions` and `/v1/chat/completions`, validated with the field named on error.

Options that would silently change outputs if ignored (n > 1, logprobs, penalties, logit bias, echo)
are refused by name; unknown extra fields are ignored, as OpenAI clients send many optional ones.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeshift.runtime.frontend.sampling import SamplingParams

# A bound far above any context length, so absurd values fail here with a clear message instead of
# overflowing later arithmetic; the real bound (context minus prompt) is checked once the prompt is tokenized.
MAX_TOKENS_CEILING = 1 << 20
MAX_STOP_STRINGS = 4
INT64_MIN, UINT64_MAX = -(1 << 63), (1 << 64) - 1

Body = TypeVar("Body", bound=BaseModel)


class RequestError(ValueError):
    """A client mistake: HTTP 400 (or `status`) with the offending field named in `param`."""

    def __init__(self, param: str | None, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.message = message
        self.status = status


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class GenerationFields(BaseModel):
    """What completions and chat completions share: model, length, sampling, stops, streaming.

    Strict: a JSON string where a number belongs is an error, not a silent conversion.
    """

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_CEILING)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = 0
    seed: Annotated[int, Field(ge=INT64_MIN, le=UINT64_MAX)] | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False
    n: Literal[1] = 1
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0), seed=self.seed
        )

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(GenerationFields):
    """`prompt` is text or token ids; one prompt per request (a list holding exactly one is accepted)."""

    prompt: str | list[int]
    echo: Literal[False] = False
    logprobs: None = None
    best_of: Literal[1] | None = None
    suffix: None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> str | list[int]:
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
            value = value[0]
        if isinstance(value, str) or (isinstance(value, list) and all(_is_int(t) for t in value)):
            if not value:
                raise ValueError("must not be empty")
            return value
        raise ValueError("must be a string or a list of token ids (one prompt per request)")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, value: str | list[dict[str, Any]] | None) -> str:
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        texts = []
        for part in value:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(
                    f"only text parts {{'type': 'text', 'text': ...}} are supported, got {part!r}"
                )
            texts.append(part["text"])
        return "".join(texts)


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessage]
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_CEILING)] | None = None
    logprobs: Literal[False] | None = None

    @field_validator("messages")
    @classmethod
    def _some_messages(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("must hold at least one message")
        return value

    @model_validator(mode="after")
    def _one_length(self) -> ChatCompletionRequest:
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self


def parse_body(raw: bytes, model: type[Body]) -> Body:
    """The validated body, or a RequestError naming the first bad field (or the body, for bad JSON)."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(None, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(None, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        field = _field_name(first["loc"])
        got = "" if first["type"] == "missing" else f" (got {first['input']!r:.80})"
        raise RequestError(field, f"{field}: {_message(first['msg'])}{got}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field_name(loc: tuple[int | str, ...]) -> str | None:
    """`messages[0].role` from pydantic's location tuple."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif not _is_type_tag(part):
            name += f".{part}" if name else part
    return name or None


def _is_type_tag(part: Any) -> bool:
    """Union members appear in pydantic's error path as type tags (`str`, `list[int]`); they name no field."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "function-after"))


def _message(msg: str) -> str:
    return msg.removeprefix("Value error, ")
