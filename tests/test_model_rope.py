"""RoPE and RMSNorm against the `transformers` Llama implementation: the same frequencies (plain and
llama3-scaled) bit for bit, and the same rotated vectors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig as HFLlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from pipeshift.runtime.model.config import LlamaConfig
from pipeshift.runtime.model.layers import rms_norm
from pipeshift.runtime.model.rope import RopeTable, apply_rope, inverse_frequencies

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def configs(head_dim: int, theta: float, scaling: dict | None) -> tuple[LlamaConfig, HFLlamaConfig]:
    def raw() -> dict:  # fresh each time: transformers writes defaults into the rope dict it is given
        return {"vocab_size": 50, "hidden_size": 2 * head_dim, "intermediate_size": 8, "num_hidden_layers": 1,
                "num_attention_heads": 2, "rope_theta": theta, "rope_scaling": scaling and dict(scaling),
                "max_position_embeddings": 128}

    return LlamaConfig.from_dict(raw()), HFLlamaConfig(**raw())


@pytest.mark.parametrize("scaling", [None, LLAMA3], ids=["default", "llama3"])
@pytest.mark.parametrize(("head_dim", "theta"), [(8, 10000.0), (64, 500000.0), (128, 10000.0)])
def test_inverse_frequencies_are_bit_identical_to_transformers(head_dim: int, theta: float,
                                                               scaling: dict | None) -> None:
    ours, hf = configs(head_dim, theta, scaling)
    if scaling is None:
        reference, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    else:
        reference, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    assert torch.equal(inverse_frequencies(ours), reference)


def test_llama3_scaling_changes_low_frequencies_only() -> None:
    plain, _ = configs(64, 500000.0, None)
    scaled, _ = configs(64, 500000.0, LLAMA3)
    a, b = inverse_frequencies(plain), inverse_frequencies(scaled)
    assert torch.equal(a[:3], b[:3])  # wavelengths under 64 / high_freq_factor: untouched
    assert torch.allclose(a[-4:] / 8, b[-4:])  # wavelengths over 64 / low_freq_factor: slowed by `factor`


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=25, deadline=None)
@given(positions=st.lists(st.integers(0, 2000), min_size=1, max_size=12), heads=st.integers(1, 4))
def test_rotation_matches_transformers_at_any_position(dtype: torch.dtype, positions: list[int], heads: int) -> None:
    ours, hf = configs(16, 10000.0, LLAMA3)
    table = RopeTable(ours, dtype, capacity=8)  # small, so lookups must grow it
    pos = torch.tensor(positions)
    cos, sin = table.lookup(pos, max(positions))
    x = torch.randn(len(positions), heads, 16, dtype=dtype, generator=torch.Generator().manual_seed(len(positions)))
    hf_cos, hf_sin = LlamaRotaryEmbedding(hf)(x, pos[None])
    # transformers rotates [batch, heads, T, head_dim]
    expected, _ = apply_rotary_pos_emb(x.transpose(0, 1)[None], x.transpose(0, 1)[None], hf_cos, hf_sin)
    assert torch.equal(apply_rope(x, cos, sin), expected[0].transpose(0, 1))


@pytest.mark.parametrize(("dtype", "exact"), [(torch.float32, False), (torch.float64, True), (torch.bfloat16, True)])
def test_rms_norm_matches_transformers(dtype: torch.dtype, exact: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 48, generator=gen) * 3).to(dtype)
    weight = (0.5 + torch.rand(48, generator=gen)).to(dtype)
    reference = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        reference.weight.copy_(weight)
        expected = reference(x)
    ours = rms_norm(x, weight, 1e-5)
    assert ours.dtype == dtype
    if exact:
        assert torch.equal(ours, expected)
    else:
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
