"""What the frontend needs of the served model: name, context length, eos ids, tokenizer, chat template.

The frontend never loads weights; it reads only config.json, tokenizer.json and tokenizer_config.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from pipeshift.errors import UserError
from pipeshift.runtime.frontend.chat import ChatTemplate
from pipeshift.runtime.model.config import LlamaConfig

TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class ServedModel:
    name: str
    config: LlamaConfig
    tokenizer: Tokenizer
    chat: ChatTemplate

    @classmethod
    def load(cls, model_dir: Path, name: str | None = None) -> ServedModel:
        path = model_dir / TOKENIZER_FILE
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception for missing or bad files
            raise UserError(f"{path}: cannot load the tokenizer ({e})") from None
        return cls(
            name=name or model_dir.resolve().name,
            config=LlamaConfig.from_file(model_dir / "config.json"),
            tokenizer=tokenizer,
            chat=ChatTemplate.from_model_dir(model_dir),
        )

    @property
    def context(self) -> int:
        return self.config.max_position_embeddings

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
