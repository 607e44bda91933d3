"""Rotary position embeddings: inverse frequencies (plain or llama3-scaled) and cos/sin tables.

Angles are computed in float32 whatever the model dtype, exactly as the reference implementation
does, so a float64 engine rotates by the very same angles and greedy outputs stay identical.
"""

from __future__ import annotations

import math

import torch

from pipeshift.runtime.model.config import Llama3RopeScaling, LlamaConfig


def inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    """One frequency per rotated pair, float32, following HF's `_compute_llama3_parameters`."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if config.rope_scaling is not None:
        inv_freq = _llama3_scale(inv_freq, config.rope_scaling)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, s: Llama3RopeScaling) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, and the band between them blended
    # smoothly; operation order matches the reference so the float32 results are bit-identical.
    old_context_len = s.original_max_position_embeddings
    low_freq_wavelen = old_context_len / s.low_freq_factor
    high_freq_wavelen = old_context_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_context_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RopeTable:
    """cos and signed sin for positions 0..capacity-1 in the model dtype, extended by doubling on
    demand, so a decode step gathers rows instead of evaluating trigonometry.

    The sin table carries rotate-half's sign (-sin on the first half), which turns the rotation
    into roll, multiply, add: bit-identical to the reference's slice-negate-concatenate, fewer ops.
    """

    def __init__(self, config: LlamaConfig, dtype: torch.dtype, capacity: int = 256) -> None:
        self.inv_freq = inverse_frequencies(config)
        self.dtype = dtype
        self.cos = torch.empty(0, config.head_dim, dtype=dtype)
        self.sin = torch.empty(0, config.head_dim, dtype=dtype)
        self._extend(capacity)

    def _extend(self, capacity: int) -> None:
        freqs = torch.arange(capacity, dtype=torch.int64).float()[:, None] * self.inv_freq
        self.cos = torch.cat((freqs, freqs), dim=-1).cos().to(self.dtype)
        sin = freqs.sin().to(self.dtype)
        self.sin = torch.cat((-sin, sin), dim=-1)

    def lookup(self, positions: torch.Tensor, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin rows for `positions` ([T] int64), [T, 1, head_dim] to broadcast over heads."""
        if max_position >= self.cos.shape[0]:
            self._extend(max(2 * self.cos.shape[0], max_position + 1))
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [T, heads, head_dim] in the rotate-half convention of HF checkpoints."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin
