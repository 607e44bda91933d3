"""Chat messages to prompt text: the model's own `chat_template` (tokenizer_config.json) when it has one.

Without one, DEFAULT_CHAT_TEMPLATE renders each message as `<|role|>\\ncontent` followed by the eos token
and a newline, then opens the assistant turn with `<|assistant|>\\n`; the text starts with the bos token.
Templates run in jinja2's immutable sandbox, with the variables and helpers Hugging Face provides.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pipeshift.errors import UserError

TOKENIZER_CONFIG = "tokenizer_config.json"
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ChatTemplateError(ValueError):
    """The template refused the conversation (its `raise_exception`) or failed to render."""


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str
    eos_token: str
    from_model: bool

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> ChatTemplate:
        path = model_dir / TOKENIZER_CONFIG
        data: dict[str, Any] = {}
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{path}: cannot read it as JSON ({e})") from None
        template = _named_template(data.get("chat_template"), path)
        return cls(
            source=template or DEFAULT_CHAT_TEMPLATE,
            bos_token=_token_text(data.get("bos_token")),
            eos_token=_token_text(data.get("eos_token")),
            from_model=template is not None,
        )

    @functools.cached_property
    def _compiled(self) -> Template:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
        try:
            return env.from_string(self.source)
        except TemplateError as e:
            raise UserError(f"the chat template does not compile: {e}") from None

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt text for `messages`, with the assistant's turn opened for generation."""
        try:
            return self._compiled.render(
                messages=list(messages),
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template failed on these messages: {e}") from None


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _named_template(value: Any, path: Path) -> str | None:
    """HF allows one template string or a list of named ones; the one named "default" is the chat one."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        chosen = named.get("default")
        if isinstance(chosen, str):
            return chosen
    raise UserError(
        f"{path}: chat_template must be a string or a list with a template named 'default', got {value!r:.80}"
    )


def _token_text(value: Any) -> str:
    """Special tokens appear as plain strings or as AddedToken dicts `{"content": ...}`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""
