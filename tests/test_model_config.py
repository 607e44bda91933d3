"""config.json parsing: the architecture the engine computes, and every unsupported setting rejected
with its key, value and what is supported."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import LlamaConfig as HFLlamaConfig

from pipeshift.errors import UserError
from pipeshift.runtime.model.config import Llama3RopeScaling, LlamaConfig

BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 8}


def test_defaults_match_transformers_llama_defaults() -> None:
    ours = LlamaConfig.from_dict(BASE)
    hf = HFLlamaConfig(**{k: v for k, v in BASE.items() if k not in ("architectures", "model_type")})
    assert ours.num_kv_heads == hf.num_key_value_heads == 8
    assert ours.head_dim == hf.head_dim == 8
    assert ours.rms_norm_eps == hf.rms_norm_eps
    assert ours.max_position_embeddings == hf.max_position_embeddings
    assert ours.tie_word_embeddings == hf.tie_word_embeddings
    assert ours.rope_theta == hf.rope_parameters["rope_theta"]
    assert ours.rope_scaling is None


def test_explicit_head_dim_and_gqa_are_kept() -> None:
    c = LlamaConfig.from_dict(BASE | {"num_key_value_heads": 2, "head_dim": 16, "eos_token_id": [1, 7]})
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.eos_token_ids) == (8, 2, 16, (1, 7))


@pytest.mark.parametrize("layout", ["classic", "rope_parameters", "legacy_type_key"])
def test_llama3_rope_scaling_is_read_from_every_config_layout(layout: str) -> None:
    params = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    extra = {
        "classic": {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **params}},
        "rope_parameters": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **params}},
        "legacy_type_key": {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **params}},
    }[layout]
    c = LlamaConfig.from_dict(BASE | extra)
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 64)


@pytest.mark.parametrize(("change", "message"), [
    ({"hidden_act": "gelu"}, "hidden_act = 'gelu'; expected 'silu'"),
    ({"attention_bias": True}, "attention_bias = True; expected False"),
    ({"mlp_bias": True}, "mlp_bias = True"),
    ({"architectures": ["MistralForCausalLM"]},
     "architectures = 'MistralForCausalLM'; expected one of LlamaForCausalLM"),
    ({"model_type": "gemma"}, "model_type = 'gemma'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "rope_scaling.rope_type = 'yarn'; expected 'default' or 'llama3'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type = 'linear'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "missing required key 'low_freq_factor'"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "per-layer-type RoPE is not supported"),
    ({"num_key_value_heads": 3}, "num_key_value_heads = 3; expected a divisor of num_attention_heads (8)"),
    ({"num_attention_heads": 6}, "num_attention_heads = 6; expected a divisor of hidden_size (64)"),
    ({"hidden_size": "64"}, "hidden_size = '64'; expected a positive integer"),
    ({"vocab_size": 0}, "vocab_size = 0"),
    ({"eos_token_id": 100}, "eos_token_id = 100; expected a token id in 0..99"),
    ({"rope_theta": -1}, "rope_theta = -1"),
])
def test_unsupported_values_are_named(change: dict, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)) as error:
        LlamaConfig.from_dict(BASE | change, source="cfg.json")
    assert str(error.value).startswith("cfg.json")


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"])
def test_missing_required_key_is_named_with_the_file(tmp_path: Path, key: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in BASE.items() if k != key}))
    with pytest.raises(UserError, match=f"^{path}: missing required key '{key}'$"):
        LlamaConfig.from_file(path)


def test_malformed_json_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{\n  "hidden_size": 64,\n  oops\n}')
    with pytest.raises(UserError, match=f"^{path}: not valid JSON .* line 3"):
        LlamaConfig.from_file(path)
