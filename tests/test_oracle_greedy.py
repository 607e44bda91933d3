"""Float64 greedy decoding is token-for-token identical to `transformers` LlamaForCausalLM run per
request, unpadded, with do_sample=False: across layouts, attention kinds, tied and untied heads, odd
shapes, and with all requests decoding together in one batch. Any mismatch is a bug."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pipeshift.api import Layout
from pipeshift.runtime.model.checkpoint import ModelDir
from pipeshift.runtime.pipeline import Pipeline

ModelFactory = Callable[..., Path]
MAX_NEW = 12

# name -> (make_model arguments, layouts: one stage, two even-ish stages, three uneven stages)
MODELS = {
    "mha-untied": ({"layers": 4, "hidden": 64, "heads": 4, "kv_heads": 4, "vocab": 301}, ["4", "2,2", "1,2,1"]),
    "gqa-tied-odd": ({"layers": 5, "hidden": 48, "heads": 6, "kv_heads": 2, "intermediate": 80, "vocab": 333,
                      "tie_embeddings": True, "seed": 4}, ["5", "2,3", "3,1,1"]),
    "mqa-untied": ({"layers": 3, "hidden": 32, "heads": 4, "kv_heads": 1, "intermediate": 64, "vocab": 263,
                    "seed": 9}, ["3", "1,2", "1,1,1"]),
    "gqa-sharded": ({"layers": 6, "hidden": 64, "heads": 8, "kv_heads": 2, "intermediate": 112, "vocab": 509,
                     "shards": 4, "seed": 2}, ["6", "3,3", "1,4,1"]),
}


def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                         pad_token_id=model.config.eos_token_id)
    return out[0, len(prompt) :].tolist()


def random_prompts(vocab: int, count: int, max_len: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (count,), generator=gen).tolist()
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def cases(model_factory: ModelFactory, hf_model: Callable) -> dict[str, tuple[ModelDir, list, list]]:
    """Per model: the checkpoint, prompts and the reference continuations (computed once, used by every layout)."""
    out = {}
    for name, (args, _) in MODELS.items():
        path = model_factory(**{"intermediate": 96} | args)
        model = ModelDir(path)
        prompts = random_prompts(model.config.vocab_size, 6, 20, seed=len(name))
        reference = hf_model(path, torch.float64)
        out[name] = (model, prompts, [hf_greedy(reference, p, MAX_NEW) for p in prompts])
    return out


@pytest.mark.parametrize(("name", "layout"), [(n, lay) for n, (_, layouts) in MODELS.items() for lay in layouts])
def test_greedy_tokens_identical_to_transformers(cases: dict, name: str, layout: str) -> None:
    model, prompts, expected = cases[name]
    pipeline = Pipeline(model, Layout.parse(layout, model.config.num_layers), dtype=torch.float64)
    got = pipeline.generate(prompts, MAX_NEW, stop_ids=model.config.eos_token_ids)
    assert got == expected


def test_many_requests_of_different_lengths_decoding_in_one_batch(tiny_model: Path, hf_model: Callable) -> None:
    model = ModelDir(tiny_model)
    prompts = random_prompts(model.config.vocab_size, 24, 40, seed=99)
    reference = hf_model(tiny_model, torch.float64)
    expected = [hf_greedy(reference, p, 16) for p in prompts]
    pipeline = Pipeline(model, Layout.parse("2,1"), dtype=torch.float64)
    assert pipeline.generate(prompts, 16, stop_ids=model.config.eos_token_ids) == expected


def test_generation_stops_at_eos_like_transformers(tiny_model: Path, tmp_path: Path, hf_model: Callable) -> None:
    """Re-point eos at a token the model produces mid-continuation: both stop there, eos included."""
    prompts = random_prompts(300, 4, 10, seed=5)
    free_running = Pipeline(ModelDir(tiny_model), Layout.parse("3"), dtype=torch.float64).generate(prompts, 16)
    eos = free_running[0][5]
    shutil.copytree(tiny_model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(config | {"eos_token_id": eos}))
    model = ModelDir(tmp_path / "m")
    expected = [hf_greedy(hf_model(tmp_path / "m", torch.float64), p, 16) for p in prompts]
    got = Pipeline(model, Layout.parse("1,2"), dtype=torch.float64).generate(prompts, 16, stop_ids=[eos])
    assert got == expected
    assert got[0][-1] == eos and len(got[0]) <= 6
