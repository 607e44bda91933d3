"""The architecture of a Llama-family checkpoint, read from its `config.json` and checked.

Anything the engine would silently compute differently from the reference (biases, activations,
RoPE variants) is rejected here, naming the key, its value and what is supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeshift.errors import UserError
from pipeshift.jsonfile import read_json_object

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
DEFAULT_ROPE_THETA = 10_000.0


@dataclass(frozen=True)
class Llama3RopeScaling:
    """HF's `rope_type: llama3` frequency scaling (Llama 3.1 long context)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Llama3RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_file(cls, path: Path) -> LlamaConfig:
        data = read_json_object(path, "a model directory needs config.json")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config.json") -> LlamaConfig:
        r = _Reader(data, source)
        _check_architecture(r)
        r.require_value("hidden_act", "silu", default="silu")
        r.require_value("attention_bias", False, default=False)
        r.require_value("mlp_bias", False, default=False)
        hidden = r.positive_int("hidden_size")
        heads = r.positive_int("num_attention_heads")
        kv_heads = r.positive_int("num_key_value_heads", default=heads)
        if heads % kv_heads:
            raise r.error("num_key_value_heads", kv_heads,
                          f"a divisor of num_attention_heads ({heads}) for grouped-query attention")
        head_dim = r.positive_int("head_dim", default=None)
        if head_dim is None:
            if hidden % heads:
                raise r.error("num_attention_heads", heads, f"a divisor of hidden_size ({hidden})")
            head_dim = hidden // heads
        if head_dim % 2:
            raise r.error("head_dim", head_dim, "an even number (RoPE rotates pairs of dimensions)")
        max_pos = r.positive_int("max_position_embeddings", default=2048)
        theta, scaling = _rope(r, max_pos)
        vocab = r.positive_int("vocab_size")
        bos = r.token_id("bos_token_id", vocab)
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=r.positive_int("intermediate_size"),
            num_layers=r.positive_int("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=r.positive_float("rms_norm_eps", default=1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=r.boolean("tie_word_embeddings", default=False),
            bos_token_id=bos,
            eos_token_ids=r.token_ids("eos_token_id", vocab),
        )


def _check_architecture(r: _Reader) -> None:
    archs = r.get("architectures", None)
    if archs is not None:
        if not isinstance(archs, list) or not archs:
            raise r.error("architectures", archs, f"a list such as {list(SUPPORTED_ARCHITECTURES)}")
        for arch in archs:
            if arch not in SUPPORTED_ARCHITECTURES:
                raise r.error("architectures", arch, f"one of {', '.join(SUPPORTED_ARCHITECTURES)}")
    model_type = r.get("model_type", "llama")
    if model_type != "llama":
        raise r.error("model_type", model_type, "'llama'")


def _rope(r: _Reader, max_pos: int) -> tuple[float, Llama3RopeScaling | None]:
    """Read RoPE settings in either the classic (`rope_theta` + `rope_scaling`) or the newer
    (`rope_parameters`) layout; both name the scaling type under `rope_type` or legacy `type`."""
    key = "rope_parameters" if r.get("rope_parameters", None) is not None else "rope_scaling"
    params = r.get(key, None) or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise r.error(key, params, "one object with rope_type (per-layer-type RoPE is not supported), or null")
    theta = params.get("rope_theta", r.get("rope_theta", DEFAULT_ROPE_THETA))
    if isinstance(theta, bool) or not isinstance(theta, int | float) or theta <= 0:
        raise r.error("rope_theta", theta, "a positive number")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise r.error(f"{key}.rope_type", rope_type, "'default' or 'llama3' (other RoPE variants are not supported)")
    sub = _Reader(params, f"{r.source} {key}")
    scaling = Llama3RopeScaling(
        factor=sub.positive_float("factor"),
        low_freq_factor=sub.positive_float("low_freq_factor"),
        high_freq_factor=sub.positive_float("high_freq_factor"),
        original_max_position_embeddings=sub.positive_int("original_max_position_embeddings", default=max_pos),
    )
    if scaling.high_freq_factor <= scaling.low_freq_factor:
        raise sub.error("high_freq_factor", scaling.high_freq_factor,
                        f"greater than low_freq_factor ({scaling.low_freq_factor})")
    return float(theta), scaling


_MISSING = object()


class _Reader:
    """Typed access to a JSON object whose errors name the file, the key and the valid values."""

    def __init__(self, data: dict[str, Any], source: str) -> None:
        self.data = data
        self.source = source

    def error(self, key: str, value: object, valid: str) -> UserError:
        return UserError(f"{self.source}: unsupported {key} = {value!r}; expected {valid}")

    def get(self, key: str, default: Any = _MISSING) -> Any:
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            raise UserError(f"{self.source}: missing required key {key!r}")
        return default

    def positive_int(self, key: str, default: Any = _MISSING) -> Any:
        value = self.get(key, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.error(key, value, "a positive integer")
        return value

    def positive_float(self, key: str, default: Any = _MISSING) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise self.error(key, value, "a positive number")
        return float(value)

    def boolean(self, key: str, default: Any = _MISSING) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, value, "true or false")
        return value

    def require_value(self, key: str, expected: object, default: object) -> None:
        value = self.get(key, default)
        if value != expected or type(value) is not type(expected):
            raise self.error(key, value, f"{expected!r} (the only value this engine implements)")

    def token_id(self, key: str, vocab: int) -> int | None:
        value = self.get(key, None)
        if value is not None and not _is_token(value, vocab):
            raise self.error(key, value, f"a token id in 0..{vocab - 1}")
        return value

    def token_ids(self, key: str, vocab: int) -> tuple[int, ...]:
        """One id or a list of them (several stop tokens), as HF allows for eos."""
        value = self.get(key, None)
        values = [] if value is None else value if isinstance(value, list) else [value]
        if not all(_is_token(v, vocab) for v in values):
            raise self.error(key, value, f"a token id in 0..{vocab - 1}, or a list of them")
        return tuple(values)


def _is_token(value: object, vocab: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab
