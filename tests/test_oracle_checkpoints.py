"""Checkpoint variants against `transformers`: llama3 RoPE scaling (float64 logits), and a sharded
bf16 checkpoint computed upcast to float32 or in bfloat16."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from pipeshift.api import Layout
from pipeshift.runtime.kv import SeqSpan
from pipeshift.runtime.model.checkpoint import ModelDir
from pipeshift.runtime.pipeline import Pipeline

ModelFactory = Callable[..., Path]
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def all_logits(model: ModelDir, layout: str, tokens: list[int], dtype: torch.dtype) -> torch.Tensor:
    pipeline = Pipeline(model, Layout.parse(layout, model.config.num_layers), dtype=dtype)
    pipeline.reserve(0, len(tokens))
    return pipeline.forward([SeqSpan(0, 0, len(tokens))], torch.tensor(tokens), all_logits=True)


def hf_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


def test_llama3_rope_scaling_logits_match_transformers(tiny_model: Path, tmp_path: Path,
                                                       hf_model: Callable) -> None:
    shutil.copytree(tiny_model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    # A short original context, so 48 positions reach the scaled and the blended frequency bands.
    config |= {"rope_theta": 500000.0, "rope_scaling": LLAMA3}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    tokens = torch.randint(0, 300, (48,), generator=torch.Generator().manual_seed(1)).tolist()

    ours = all_logits(ModelDir(tmp_path / "m"), "2,1", tokens, torch.float64)
    expected = hf_logits(hf_model(tmp_path / "m", torch.float64), tokens)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)
    unscaled = hf_logits(hf_model(tiny_model, torch.float64), tokens)
    assert (ours - unscaled).abs().max() > 1e-3  # the scaling mattered


def test_sharded_bf16_checkpoint_upcasts_to_float32_like_transformers(model_factory: ModelFactory,
                                                                       hf_model: Callable) -> None:
    path = model_factory(dtype=torch.bfloat16, shards=3, seed=8)
    tokens = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    ours = all_logits(ModelDir(path), "1,2", tokens, torch.float32)
    torch.testing.assert_close(ours, hf_logits(hf_model(path, torch.float32), tokens), rtol=1e-4, atol=1e-4)


def test_bfloat16_compute_tracks_transformers(model_factory: ModelFactory, hf_model: Callable) -> None:
    path = model_factory(dtype=torch.bfloat16, shards=3, seed=8)
    tokens = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    ours = all_logits(ModelDir(path), "3", tokens, torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    exact = hf_logits(hf_model(path, torch.float32), tokens)
    theirs = hf_logits(hf_model(path, torch.bfloat16), tokens).float()
    # Both round differently in bf16; each must stay as close to the float32 result as the other.
    our_error = (ours.float() - exact).norm() / exact.norm()
    their_error = (theirs - exact).norm() / exact.norm()
    assert our_error < max(2 * their_error, 0.02), (our_error, their_error)
