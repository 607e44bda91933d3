"""The text side of a model directory: `tokenizer.json`, loaded with the `tokenizers` library only.

Encoding adds the special tokens the tokenizer's post-processor declares (bos for Llama), as HF does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from pipeshift.errors import UserError

TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    def __init__(self, inner: _HFTokenizer) -> None:
        self.inner = inner

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        path = Path(model_dir) / TOKENIZER_FILE
        if not path.is_file():
            raise UserError(f"{path}: not found (a model directory needs {TOKENIZER_FILE} for text)")
        try:
            return cls(_HFTokenizer.from_file(str(path)))
        except Exception as e:  # the tokenizers library raises bare Exceptions for unreadable files
            raise UserError(f"{path}: not a valid tokenizer ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size()

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.inner.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.inner.decode(list(ids), skip_special_tokens=skip_special_tokens)
