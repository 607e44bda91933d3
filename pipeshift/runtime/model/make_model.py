"""`pipeshift make-model`: writes a random Llama checkpoint in Hugging Face format, with a real
byte-level BPE tokenizer, so every test and demo runs offline on a model of any shape.

Initial scales are unlike a training init: at the usual 0.02 a random model collapses to repeating
one token. Here sharp attention (large q/k), layer outputs that outweigh a small embedding (so a
tied head does not just echo the current token) keep greedy continuations varied.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeshift.errors import UserError
from pipeshift.runtime.model.bpe import BOS_TOKEN, CHAT_TEMPLATE, EOS_TOKEN, train_tokenizer
from pipeshift.runtime.model.checkpoint import (
    EMBED_KEY,
    HEAD_KEY,
    INDEX_FILE,
    NORM_KEY,
    SINGLE_FILE,
    expected_shape,
    layer_keys,
)
from pipeshift.runtime.model.config import LlamaConfig

HELP = "write a random Llama checkpoint (config, safetensors, tokenizer) for tests and demos"
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, help="output directory (created; must be new or empty)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tie-embeddings", action="store_true", help="share the embedding matrix as the head")
    parser.add_argument("--shards", type=int, default=1,
                        help="split the layers over N safetensors files with an index (default 1: one file)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="stored weight dtype")


def run(args: argparse.Namespace) -> int:
    make_model(args.dir, layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
               intermediate=args.intermediate, vocab=args.vocab, seed=args.seed,
               tie_embeddings=args.tie_embeddings, shards=args.shards, dtype=DTYPES[args.dtype])
    print(args.dir)
    return 0


def model_config(*, layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
                 tie_embeddings: bool, dtype: torch.dtype) -> dict[str, object]:
    """config.json as `transformers` writes it for LlamaForCausalLM (bos 0 and eos 1, the tokenizer's)."""
    if heads <= 0 or hidden % heads:
        raise UserError(f"--heads {heads} must be positive and divide --hidden {hidden}")
    if kv_heads <= 0 or heads % kv_heads:
        raise UserError(f"--kv-heads {kv_heads} must be positive and divide --heads {heads}")
    if (hidden // heads) % 2:
        raise UserError(f"--hidden {hidden} / --heads {heads} gives an odd head size; RoPE needs an even one")
    for flag, value in (("--layers", layers), ("--intermediate", intermediate)):
        if value <= 0:
            raise UserError(f"{flag} {value} must be positive")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": tie_embeddings,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def random_weights(config: LlamaConfig, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor drawn in a fixed order from one seeded generator, in float32."""
    gen = torch.Generator().manual_seed(seed)
    c = config

    def normal(key: str, std: float) -> torch.Tensor:
        return torch.randn(expected_shape(c, key), generator=gen) * std

    def norm_scale(key: str) -> torch.Tensor:
        # Not all ones, so an engine that ignored the norm weights would be caught.
        return 0.5 + torch.rand(expected_shape(c, key), generator=gen)

    tensors = {EMBED_KEY: normal(EMBED_KEY, 0.1)}
    for i in range(c.num_layers):
        q, k, v, o, gate, up, down, ln_in, ln_post = layer_keys(i)
        tensors |= {
            q: normal(q, 8.0 / math.sqrt(c.hidden_size)),
            k: normal(k, 8.0 / math.sqrt(c.hidden_size)),
            v: normal(v, 1.0 / math.sqrt(c.hidden_size)),
            o: normal(o, 3.0 / math.sqrt(c.num_heads * c.head_dim)),
            gate: normal(gate, 1.0 / math.sqrt(c.hidden_size)),
            up: normal(up, 1.0 / math.sqrt(c.hidden_size)),
            down: normal(down, 3.0 / math.sqrt(c.intermediate_size)),
            ln_in: norm_scale(ln_in),
            ln_post: norm_scale(ln_post),
        }
    tensors[NORM_KEY] = norm_scale(NORM_KEY)
    if not c.tie_word_embeddings:
        tensors[HEAD_KEY] = normal(HEAD_KEY, 1.0 / math.sqrt(c.hidden_size))
    return tensors


def _shard_of(key: str, layers: int, shards: int) -> int:
    """Contiguous layer blocks per shard; embeddings go with the first, final norm and head with the last."""
    if key.startswith("model.layers."):
        return int(key.split(".")[2]) * shards // layers
    return 0 if key == EMBED_KEY else shards - 1


def make_model(out: str | Path, *, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 128, vocab: int = 512, seed: int = 0, tie_embeddings: bool = False,
               shards: int = 1, dtype: torch.dtype = torch.float32) -> Path:
    """Write config.json, weights, tokenizer.json and tokenizer_config.json to `out`; returns it."""
    out = Path(out)
    raw = model_config(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, intermediate=intermediate,
                       vocab=vocab, tie_embeddings=tie_embeddings, dtype=dtype)
    config = LlamaConfig.from_dict(raw)
    if not 1 <= shards <= layers:
        raise UserError(f"--shards {shards} must be between 1 and --layers ({layers})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not an empty directory; choose a new one")
    tokenizer = train_tokenizer(vocab)
    tensors = {k: v.to(dtype).contiguous() for k, v in random_weights(config, seed).items()}

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    if shards == 1:
        save_file(tensors, str(out / SINGLE_FILE), metadata={"format": "pt"})
    else:
        names = [f"model-{s + 1:05d}-of-{shards:05d}.safetensors" for s in range(shards)]
        weight_map = {key: names[_shard_of(key, layers, shards)] for key in tensors}
        for s, name in enumerate(names):
            part = {k: v for k, v in tensors.items() if weight_map[k] == names[s]}
            save_file(part, str(out / name), metadata={"format": "pt"})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "add_bos_token": True,
        "model_max_length": raw["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return out
