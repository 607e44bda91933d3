"""A Hugging Face-format model directory, read lazily: tensors are fetched by name, per shard.

Only the index (or the single file's header) is read up front, so a stage holding a few layers
opens only the shards that hold them; shards of other layers may be absent altogether.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from pipeshift.errors import UserError
from pipeshift.runtime.model.config import LlamaConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
EMBED_KEY = "model.embed_tokens.weight"
NORM_KEY = "model.norm.weight"
HEAD_KEY = "lm_head.weight"
LAYER_PARTS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)


def layer_key(layer: int, part: str) -> str:
    return f"model.layers.{layer}.{part}"


def layer_keys(layer: int) -> list[str]:
    return [layer_key(layer, part) for part in LAYER_PARTS]


def head_key(config: LlamaConfig) -> str:
    """HF omits `lm_head.weight` when embeddings are tied; the head is then the embedding matrix."""
    return EMBED_KEY if config.tie_word_embeddings else HEAD_KEY


def expected_shape(config: LlamaConfig, key: str) -> tuple[int, ...]:
    c = config
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    if key in (EMBED_KEY, HEAD_KEY):
        return (c.vocab_size, c.hidden_size)
    if key == NORM_KEY:
        return (c.hidden_size,)
    part = key.split(".", 3)[3]
    return {
        "self_attn.q_proj.weight": (q_out, c.hidden_size),
        "self_attn.k_proj.weight": (kv_out, c.hidden_size),
        "self_attn.v_proj.weight": (kv_out, c.hidden_size),
        "self_attn.o_proj.weight": (c.hidden_size, q_out),
        "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
        "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
        "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
        "input_layernorm.weight": (c.hidden_size,),
        "post_attention_layernorm.weight": (c.hidden_size,),
    }[part]


class ModelDir:
    """`config.json` plus a name -> shard map; `read` loads named tensors, converted to a dtype."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"{self.path}: not a model directory (no such directory)")
        self.config = LlamaConfig.from_file(self.path / "config.json")
        self.weight_map, self.map_source = self._weight_map()
        self.keys_read: list[str] = []  # every tensor fetched, in order: what lazy loading is judged by

    def _weight_map(self) -> tuple[dict[str, str], Path]:
        index = self.path / INDEX_FILE
        single = self.path / SINGLE_FILE
        if index.is_file():
            try:
                data = json.loads(index.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"{index}: not valid JSON ({e.msg} at line {e.lineno})") from None
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise UserError(f"{index}: key 'weight_map' must map tensor names to shard file names")
            return weight_map, index
        if single.is_file():
            with self._open(single) as f:
                return dict.fromkeys(f.keys(), SINGLE_FILE), single
        raise UserError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE} (the weights of the model)")

    @staticmethod
    def _open(file: Path):
        try:
            return safe_open(str(file), framework="pt", device="cpu")
        except FileNotFoundError:
            raise UserError(f"{file}: not found") from None
        except (SafetensorError, OSError) as e:
            raise UserError(f"{file}: not a readable safetensors file ({e})") from None

    def read(self, keys: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Exactly the named tensors, shape-checked against the config; other shards stay unopened."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            if key not in self.weight_map:
                raise UserError(f"{self.map_source}: no tensor {key!r}")
            by_file[self.weight_map[key]].append(key)
        out: dict[str, torch.Tensor] = {}
        for name, file_keys in by_file.items():
            file = self.path / name
            if not file.is_file():
                raise UserError(f"{file}: not found ({self.map_source.name} maps {file_keys[0]!r} to it)")
            with self._open(file) as f:
                present = set(f.keys())
                for key in file_keys:
                    if key not in present:
                        raise UserError(f"{file}: no tensor {key!r} (though {self.map_source.name} lists it)")
                    tensor = f.get_tensor(key)
                    want = expected_shape(self.config, key)
                    if tuple(tensor.shape) != want:
                        raise UserError(f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                                        f"config.json implies {want}")
                    out[key] = tensor.to(dtype)
                    self.keys_read.append(key)
        return out
