"""One Llama decoder layer as plain tensor code: RMSNorm, grouped-query attention with RoPE over
the paged KV cache, and a SwiGLU MLP.

Projections are fused at load time (q|k|v and gate|up) so a layer is four matmuls, which keeps the
per-token Python and dispatch overhead of a decode step small.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeshift.runtime.kv import PagedKVCache, SeqSpan, paged_attention
from pipeshift.runtime.model.checkpoint import layer_key
from pipeshift.runtime.model.config import LlamaConfig
from pipeshift.runtime.model.rope import apply_rope


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Statistics in float32 whatever the dtype, then scaled in the model dtype, as the reference
    implementation does: bf16 is too coarse for them, and a float64 engine that kept them in float64
    would drift from the reference by ~1e-7 and could flip near-tied greedy tokens."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)  # one fused kernel on the common path
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@dataclass(frozen=True)
class LayerWeights:
    qkv: torch.Tensor
    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    input_norm: torch.Tensor
    post_norm: torch.Tensor

    @classmethod
    def from_checkpoint(cls, layer: int, tensors: dict[str, torch.Tensor]) -> LayerWeights:
        def t(part: str) -> torch.Tensor:
            return tensors[layer_key(layer, part)]

        return cls(
            qkv=torch.cat([t("self_attn.q_proj.weight"), t("self_attn.k_proj.weight"),
                           t("self_attn.v_proj.weight")]),
            o=t("self_attn.o_proj.weight").contiguous(),
            gate_up=torch.cat([t("mlp.gate_proj.weight"), t("mlp.up_proj.weight")]),
            down=t("mlp.down_proj.weight").contiguous(),
            input_norm=t("input_layernorm.weight").contiguous(),
            post_norm=t("post_attention_layernorm.weight").contiguous(),
        )

    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size()
                   for w in (self.qkv, self.o, self.gate_up, self.down, self.input_norm, self.post_norm))


class DecoderLayer:
    """Layer `index` of the model; its KV lives in the stage's cache under that global index."""

    def __init__(self, index: int, weights: LayerWeights, config: LlamaConfig) -> None:
        self.index = index
        self.w = weights
        self.eps = config.rms_norm_eps
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.intermediate = config.intermediate_size
        self.scale = config.head_dim**-0.5

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: PagedKVCache, spans: Sequence[SeqSpan]) -> torch.Tensor:
        """`h` [T, hidden] holds the spans' tokens back to back; their new K/V enter the cache first."""
        w = self.w
        tokens = h.shape[0]
        qkv = F.linear(rms_norm(h, w.input_norm, self.eps), w.qkv)
        # q and k heads sit side by side in the fused output, so one rotation covers both.
        qk = qkv[:, : self.q_size + self.kv_size].view(tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        qk = apply_rope(qk, cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, self.q_size + self.kv_size :].view(tokens, self.num_kv_heads, self.head_dim)
        cache.write_spans(self.index, spans, k, v)
        attn = paged_attention(q, cache, self.index, spans, self.scale)
        h = h + F.linear(attn.reshape(tokens, self.q_size), w.o)
        gate, up = F.linear(rms_norm(h, w.post_norm, self.eps), w.gate_up).split(self.intermediate, dim=-1)
        return h + F.linear(F.silu(gate) * up, w.down)
