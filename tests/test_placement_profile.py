"""The model profile's byte and FLOP counts agree with Hugging Face transformers running the same config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from pipeshift.errors import UserError
from pipeshift.placement import ModelProfile

CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 96, "hidden_size": 64, "intermediate_size": 160,
          "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
          "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


@pytest.fixture(scope="module")
def hf_model() -> transformers.LlamaForCausalLM:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{k: v for k, v in CONFIG.items() if k != "architectures"},
                                      attn_implementation="eager")
    return transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()


@pytest.fixture
def profile(tmp_path: Path) -> ModelProfile:
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    return ModelProfile.from_path(tmp_path)


def test_weight_bytes_match_the_parameters_transformers_allocates(hf_model, profile: ModelProfile) -> None:
    layer = sum(p.numel() * p.element_size() for p in hf_model.model.layers[0].parameters())
    total = sum(p.numel() * p.element_size() for p in hf_model.parameters())
    embedding = hf_model.model.embed_tokens.weight
    assert profile.layer_weight_bytes == layer
    assert profile.embedding_bytes == embedding.numel() * embedding.element_size()
    assert profile.total_weight_bytes == total
    assert profile.num_layers * profile.layer_weight_bytes + profile.embedding_bytes + profile.head_bytes == total


def test_kv_bytes_per_token_match_the_cache_transformers_fills(hf_model, profile: ModelProfile) -> None:
    with torch.no_grad():
        cache = hf_model(torch.randint(0, 96, (1, 7)), use_cache=True).past_key_values
    keys, values = cache.layers[0].keys, cache.layers[0].values
    per_token = (keys.numel() * keys.element_size() + values.numel() * values.element_size()) / 7
    assert profile.kv_bytes_per_token_per_layer == per_token


def test_decode_and_prefill_flops_match_the_flop_counter(hf_model, profile: ModelProfile) -> None:
    prompt = 10
    with torch.no_grad():
        with FlopCounterMode(display=False) as prefill:
            cache = hf_model(torch.randint(0, 96, (1, prompt)), use_cache=True).past_key_values
        with FlopCounterMode(display=False) as decode:
            hf_model(torch.randint(0, 96, (1, 1)), past_key_values=cache, use_cache=True)

    def layer_flops(counter: FlopCounterMode) -> tuple[int, int]:
        ops = {str(op): n for op, n in counter.get_flop_counts()["LlamaForCausalLM.model.layers.0"].items()}
        return ops["aten.mm"], ops["aten.bmm"]

    mm, bmm = layer_flops(decode)
    assert profile.decode_flops_per_layer(context=prompt + 1) == mm + bmm
    mm, bmm = layer_flops(prefill)
    # Eager attention computes the whole square and masks it; a causal kernel does half.
    assert profile.prefill_flops_per_layer(prompt) == mm + bmm / 2


def test_a_tied_head_is_counted_once_in_the_total(tmp_path: Path) -> None:
    tied = ModelProfile.from_config({**CONFIG, "tie_word_embeddings": True})
    untied = ModelProfile.from_config(CONFIG)
    assert untied.total_weight_bytes - tied.total_weight_bytes == untied.embedding_bytes


def test_a_config_file_path_works_like_its_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    from_dir, from_file = ModelProfile.from_path(tmp_path), ModelProfile.from_path(tmp_path / "config.json")
    assert from_dir == from_file and from_dir.dtype == "bfloat16" and from_dir.name == tmp_path.name


@pytest.mark.parametrize(("change", "message"), [
    ({"num_hidden_layers": None}, "num_hidden_layers is missing"),
    ({"hidden_size": 0}, "hidden_size is 0; expected a positive integer"),
    ({"torch_dtype": "int4"}, "dtype 'int4' is not one of float32, float16, bfloat16"),
])
def test_bad_configs_name_the_key_and_what_is_valid(change: dict, message: str) -> None:
    data = {**CONFIG, **change}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(UserError, match=message):
        ModelProfile.from_config(data, source="m/config.json")


def test_a_missing_config_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        ModelProfile.from_path(tmp_path / "nope")
