"""Shared fixtures: tiny random checkpoints written by `make_model`, once per test session.

`model_factory(**shape)` returns the directory of a checkpoint with that shape (cached, so tests
asking for the same shape share it); the named fixtures are the shapes most tests want. Treat
the directories as read-only: copy one (`shutil.copytree`) before damaging it. `hf_model(path,
dtype)` loads a directory into `transformers` as the reference implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pipeshift.runtime.model.make_model import make_model

ModelFactory = Callable[..., Path]

# Small enough for a test to run a model dozens of times in well under a second.
TINY_SHAPE: dict[str, int] = {"layers": 3, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 96,
                              "vocab": 300, "seed": 0}


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """The test machine's cores are shared; one thread per test process avoids oversubscription."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory: pytest.TempPathFactory) -> ModelFactory:
    """`model_factory(layers=..., hidden=..., ..., tie_embeddings=..., shards=..., dtype=...)` -> model dir.

    Unspecified arguments take `TINY_SHAPE`'s values, then `make_model`'s defaults.
    """
    made: dict[tuple, Path] = {}

    def factory(**kwargs: object) -> Path:
        args = TINY_SHAPE | kwargs
        key = tuple(sorted((k, str(v)) for k, v in args.items()))
        if key not in made:
            made[key] = make_model(tmp_path_factory.mktemp("model") / "ckpt", **args)
        return made[key]

    return factory


@pytest.fixture(scope="session")
def tiny_model(model_factory: ModelFactory) -> Path:
    """3 layers, hidden 64, 4 heads over 2 KV heads (GQA), vocab 300, untied head, one safetensors file."""
    return model_factory()


@pytest.fixture(scope="session")
def tiny_tied_model(model_factory: ModelFactory) -> Path:
    """`tiny_model`'s shape with tied embeddings (no lm_head.weight in the checkpoint)."""
    return model_factory(tie_embeddings=True)


@pytest.fixture(scope="session")
def tiny_sharded_model(model_factory: ModelFactory) -> Path:
    """5 layers over 3 shards (`model.safetensors.index.json`): layers 0-1 | 2-3 | 4, embeddings in the
    first shard, final norm and head in the last."""
    return model_factory(layers=5, shards=3)


@pytest.fixture(scope="session")
def hf_model() -> Callable[[Path, torch.dtype], torch.nn.Module]:
    """`hf_model(path, dtype)`: the directory loaded by `transformers.LlamaForCausalLM` (eval mode,
    SDPA attention), the independent oracle for the engine. Cached per (path, dtype)."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    loaded: dict[tuple[Path, torch.dtype], torch.nn.Module] = {}

    def load(path: Path, dtype: torch.dtype) -> torch.nn.Module:
        if (path, dtype) not in loaded:
            loaded[path, dtype] = LlamaForCausalLM.from_pretrained(path, dtype=dtype,
                                                                   attn_implementation="sdpa").eval()
        return loaded[path, dtype]

    return load
