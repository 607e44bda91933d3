"""`make-model` writes a Hugging Face-format checkpoint that transformers reads, deterministically,
with a real tokenizer of exactly the requested size and weights that do not collapse."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig as HFLlamaConfig
from transformers import PreTrainedTokenizerFast

from pipeshift.api import Layout
from pipeshift.errors import UserError
from pipeshift.runtime.kv import SeqSpan
from pipeshift.runtime.model.checkpoint import ModelDir
from pipeshift.runtime.model.make_model import make_model
from pipeshift.runtime.pipeline import Pipeline

ModelFactory = Callable[..., Path]


def test_config_is_read_by_transformers_with_the_requested_shape(model_factory: ModelFactory) -> None:
    path = model_factory(layers=3, hidden=48, heads=6, kv_heads=2, intermediate=80, vocab=301, tie_embeddings=True)
    raw = json.loads((path / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"]
    assert raw["model_type"] == "llama"
    hf = HFLlamaConfig.from_pretrained(path)
    assert (hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads,
            hf.intermediate_size, hf.vocab_size, hf.tie_word_embeddings) == (3, 48, 6, 2, 80, 301, True)
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    assert (hf.bos_token_id, hf.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)


def test_tokenizer_has_exactly_the_requested_vocab_and_round_trips_text(model_factory: ModelFactory) -> None:
    path = model_factory(vocab=777)
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    assert len(tok) == 777
    text = "Return the sum of two numbers, as described in the docs.\n\tÜnïcode ✓"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert len(ids) < len(text.encode())  # merges were learned, not just bytes
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_chat_template_renders_with_transformers(tiny_model: Path) -> None:
    tok = PreTrainedTokenizerFast.from_pretrained(tiny_model)
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi there"}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered.startswith(tok.bos_token)
    assert "hi there" in rendered
    assert rendered.endswith("<|assistant|>\n")


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_same_arguments_give_identical_files_across_processes(tmp_path: Path) -> None:
    args = {"layers": 2, "hidden": 32, "heads": 2, "kv_heads": 1, "intermediate": 48, "vocab": 400, "seed": 5}
    make_model(tmp_path / "a", **args)
    subprocess.run([sys.executable, "-m", "pipeshift.cli", "make-model", str(tmp_path / "b"),
                    *[f"--{k.replace('_', '-')}={v}" for k, v in args.items()]], check=True, capture_output=True)
    make_model(tmp_path / "c", **args | {"seed": 6})
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    a, c = _files(tmp_path / "a"), _files(tmp_path / "c")
    assert a["model.safetensors"] != c["model.safetensors"]
    assert a["tokenizer.json"] == c["tokenizer.json"]  # the seed draws weights, not the tokenizer


def test_shards_split_layers_contiguously_with_an_index(tiny_sharded_model: Path) -> None:
    index = json.loads((tiny_sharded_model / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) == 3
    assert not (tiny_sharded_model / "model.safetensors").exists()
    shard_of_layer = [weight_map[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(5)]
    assert shard_of_layer == sorted(shard_of_layer)  # contiguous, in order
    assert weight_map["model.embed_tokens.weight"] == shards[0]
    assert weight_map["lm_head.weight"] == weight_map["model.norm.weight"] == shards[-1]
    total = 0
    for shard in shards:
        with safe_open(str(tiny_sharded_model / shard), "pt") as f:
            assert sorted(f.keys()) == sorted(k for k, v in weight_map.items() if v == shard)
            total += sum(f.get_tensor(k).numel() * 4 for k in f.keys())  # noqa: SIM118 - not a dict
    assert index["metadata"]["total_size"] == total


def test_tied_checkpoint_has_no_head_tensor(tiny_tied_model: Path) -> None:
    with safe_open(str(tiny_tied_model / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118 - not a dict
        assert "model.embed_tokens.weight" in f.keys()  # noqa: SIM118 - not a dict


@pytest.mark.parametrize("kwargs", [
    {"vocab": 100},
    {"hidden": 64, "heads": 5},
    {"heads": 4, "kv_heads": 3},
    {"hidden": 36, "heads": 4},
    {"layers": 2, "shards": 3},
])
def test_impossible_shapes_are_user_errors(tmp_path: Path, kwargs: dict[str, int]) -> None:
    with pytest.raises(UserError):
        make_model(tmp_path / "m", **kwargs)
    assert not (tmp_path / "m").exists()


def test_refuses_to_write_into_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not an empty directory"):
        make_model(tmp_path, layers=1, hidden=16, heads=2, kv_heads=1, intermediate=16, vocab=300)
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_random_weights_give_lively_greedy_continuations(tmp_path: Path, tie: bool) -> None:
    """Make-model's default shape: over 32 random prompts, at least 28 distinct 16-token greedy
    continuations, no token more than half of any, median top-1/top-2 margin >= 1e-2 of the logits' std."""
    model = ModelDir(make_model(tmp_path / "m", seed=11, tie_embeddings=tie))
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (int(n),), generator=gen).tolist()
               for n in torch.randint(2, 12, (32,), generator=gen)]
    pipeline = Pipeline(model, Layout.from_sizes([model.config.num_layers]))
    continuations = pipeline.generate(prompts, 16)  # no stop ids: always 16 tokens
    assert all(len(c) == 16 for c in continuations)
    assert len({tuple(c) for c in continuations}) >= 28
    assert max(max(c.count(t) for t in c) for c in continuations) <= 8
    margins = []
    for seq_id, (prompt, cont) in enumerate(zip(prompts, continuations, strict=True)):
        tokens = prompt + cont[:-1]
        pipeline.reserve(seq_id, len(tokens))
        logits = pipeline.forward([SeqSpan(seq_id, 0, len(tokens))], torch.tensor(tokens), all_logits=True)
        pipeline.release(seq_id)
        top2 = logits[len(prompt) - 1 :].topk(2, dim=-1).values
        margins += ((top2[:, 0] - top2[:, 1]) / logits[len(prompt) - 1 :].std(dim=-1)).tolist()
    assert statistics.median(margins) >= 1e-2
