"""What the planner needs to know about a model, derived from a Hugging Face `config.json`.

Byte and FLOP counts follow the Llama layout (GQA attention, gated MLP, RMSNorm); other decoder-only
models with the same config keys get the same first-order estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeshift.errors import UserError
from pipeshift.jsonfile import read_json_object

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
DEFAULT_DTYPE = "bfloat16"


@dataclass(frozen=True)
class ModelProfile:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype: str = DEFAULT_DTYPE
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise UserError(f"model {self.name}: dtype {self.dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
        for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                    "intermediate_size", "vocab_size"):
            if getattr(self, key) < 1:
                raise UserError(f"model {self.name}: {key} must be a positive integer, got {getattr(self, key)}")

    @classmethod
    def from_path(cls, path: Path, dtype: str | None = None) -> ModelProfile:
        """Read a model directory (its `config.json`) or a `config.json` file."""
        file = path / "config.json" if path.is_dir() else path
        data = read_json_object(file, "give a model directory or its config.json")
        name = path.name if path.is_dir() else path.parent.name or file.stem
        return cls.from_config(data, name=name, source=str(file), dtype=dtype)

    @classmethod
    def from_config(cls, data: dict[str, Any], name: str = "model", source: str = "config.json",
                    dtype: str | None = None) -> ModelProfile:
        def positive(key: str, default: int | None = None) -> int:
            value = data.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                shown = "missing" if key not in data else repr(value)
                raise UserError(f"{source}: {key} is {shown}; expected a positive integer")
            return value

        heads = positive("num_attention_heads")
        hidden = positive("hidden_size")
        head_dim = data.get("head_dim") or hidden // heads
        chosen = dtype or data.get("torch_dtype") or data.get("dtype") or DEFAULT_DTYPE
        if chosen not in DTYPE_BYTES:
            raise UserError(f"{source}: dtype {chosen!r} is not one of {', '.join(DTYPE_BYTES)}")
        return cls(name=name, num_layers=positive("num_hidden_layers"), hidden_size=hidden, num_heads=heads,
                   num_kv_heads=positive("num_key_value_heads", heads), head_dim=int(head_dim),
                   intermediate_size=positive("intermediate_size"), vocab_size=positive("vocab_size"),
                   dtype=chosen, tie_word_embeddings=bool(data.get("tie_word_embeddings", False)))

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def layer_matmul_params(self) -> int:
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size

    @property
    def layer_weight_bytes(self) -> int:
        return (self.layer_matmul_params + 2 * self.hidden_size) * self.dtype_bytes

    @property
    def embedding_bytes(self) -> int:
        return self.vocab_size * self.hidden_size * self.dtype_bytes

    @property
    def head_bytes(self) -> int:
        """The final norm and the LM head; a tied head is still a separate copy on a separate stage."""
        return self.embedding_bytes + self.hidden_size * self.dtype_bytes

    @property
    def total_weight_bytes(self) -> int:
        """Weights of one copy of the model (a tied head counted once)."""
        head = self.hidden_size * self.dtype_bytes if self.tie_word_embeddings else self.head_bytes
        return self.num_layers * self.layer_weight_bytes + self.embedding_bytes + head

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def activation_bytes_per_token(self) -> int:
        """Transient activations of one token inside a layer (residual, q/k/v/o, gate/up), live at once."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return (2 * self.hidden_size + q + 2 * kv + 2 * self.intermediate_size) * self.dtype_bytes

    def decode_flops_per_layer(self, context: float) -> float:
        """One new token attending to `context` earlier ones (QK^T and AV: 2 FLOPs per MAC each)."""
        return 2.0 * self.layer_matmul_params + 4.0 * self.num_heads * self.head_dim * context

    def prefill_flops_per_layer(self, prompt: float) -> float:
        """A whole prompt, causal attention counted as half of the full square."""
        return 2.0 * self.layer_matmul_params * prompt + 2.0 * self.num_heads * self.head_dim * prompt * prompt

    @property
    def head_flops_per_token(self) -> float:
        return 2.0 * self.vocab_size * self.hidden_size
