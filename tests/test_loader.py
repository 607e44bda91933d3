"""Lazy, per-layer checkpoint loading: a stage reads exactly its tensors, opening only the shards
that hold them, and a damaged directory fails with an error naming the file and the tensor."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeshift.errors import UserError
from pipeshift.runtime.kv import SeqSpan
from pipeshift.runtime.model.checkpoint import ModelDir
from pipeshift.runtime.stage import Stage

ModelFactory = Callable[..., Path]
LAYER_PARTS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"]


def expected_keys(start: int, end: int, layers: int, tied: bool) -> set[str]:
    """Written out from the HF Llama naming scheme, independently of the loader's own key lists."""
    keys = {f"model.layers.{i}.{part}.weight" for i in range(start, end) for part in LAYER_PARTS}
    if start == 0:
        keys.add("model.embed_tokens.weight")
    if end == layers:
        keys |= {"model.norm.weight", "model.embed_tokens.weight" if tied else "lm_head.weight"}
    return keys


def only_shards_for(src: Path, dst: Path, keep_layers: range, *, embed: bool, head: bool) -> None:
    """Copy a sharded checkpoint, deleting every shard that holds none of the wanted tensors."""
    shutil.copytree(src, dst)
    weight_map = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    wanted = {v for k, v in weight_map.items()
              if any(k.startswith(f"model.layers.{i}.") for i in keep_layers)
              or (embed and k == "model.embed_tokens.weight")
              or (head and k in ("model.norm.weight", "lm_head.weight"))}
    for shard in set(weight_map.values()) - wanted:
        (dst / shard).unlink()


@pytest.mark.parametrize(("start", "end"), [(0, 2), (2, 4), (4, 5), (2, 3), (0, 5)])
def test_stage_loads_with_other_layers_shards_deleted_and_reads_exactly_its_keys(
        tiny_sharded_model: Path, tmp_path: Path, start: int, end: int) -> None:
    only_shards_for(tiny_sharded_model, tmp_path / "m", range(start, end), embed=start == 0, head=end == 5)
    assert len(list((tmp_path / "m").glob("*.safetensors"))) < 3 or (start, end) == (0, 5)
    model = ModelDir(tmp_path / "m")
    stage = Stage(model, start, end)
    assert len(model.keys_read) == len(set(model.keys_read))  # nothing read twice
    assert set(model.keys_read) == expected_keys(start, end, 5, tied=False)
    assert (stage.is_first, stage.is_last) == (start == 0, end == 5)


def test_tied_last_stage_reads_the_embedding_as_its_head(model_factory: ModelFactory) -> None:
    model = ModelDir(model_factory(layers=4, tie_embeddings=True))
    stage = Stage(model, 2, 4)
    assert set(model.keys_read) == expected_keys(2, 4, 4, tied=True)
    assert stage.embed is None  # a middle-or-last stage takes hidden states, not token ids
    reference = load_file(str(model.path / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(stage.head, reference)


def test_missing_shard_is_named_with_the_tensor_that_needed_it(tiny_sharded_model: Path, tmp_path: Path) -> None:
    only_shards_for(tiny_sharded_model, tmp_path / "m", range(0, 2), embed=True, head=False)
    model = ModelDir(tmp_path / "m")
    with pytest.raises(UserError, match=r"model-00002-of-00003\.safetensors: not found .*model\.layers\.2\."):
        Stage(model, 0, 3)


def test_tensor_absent_from_the_index_is_named(tiny_sharded_model: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_sharded_model, tmp_path / "m")
    index_path = tmp_path / "m" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"index\.json: no tensor 'model\.layers\.1\.mlp\.down_proj\.weight'"):
        Stage(ModelDir(tmp_path / "m"), 0, 2)


def test_tensor_with_the_wrong_shape_is_named(tiny_model: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_model, tmp_path / "m")
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(UserError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(3, 64\), "
                                        r"config\.json implies \(32, 64\)"):
        Stage(ModelDir(tmp_path / "m"), 0, 1)


def test_corrupt_safetensors_file_is_named(tiny_model: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_model, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match=r"model\.safetensors: not a readable safetensors file"):
        ModelDir(tmp_path / "m")


def test_bf16_checkpoint_is_upcast_exactly(model_factory: ModelFactory) -> None:
    model = ModelDir(model_factory(dtype=torch.bfloat16, shards=2))
    stored = {}
    for shard in sorted(model.path.glob("*.safetensors")):
        stored |= load_file(str(shard))
    assert stored["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    stage = Stage(model, 0, model.config.num_layers)
    assert stage.embed.dtype == torch.float32
    assert torch.equal(stage.embed, stored["model.embed_tokens.weight"].float())
    assert torch.equal(stage.head, stored["lm_head.weight"].float())
    stage.reserve(0, 4)
    logits = stage.forward([SeqSpan(0, 0, 4)], torch.tensor([0, 5, 6, 7]))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
