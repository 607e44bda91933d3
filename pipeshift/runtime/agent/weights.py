"""Weights streamed from the source stage during a reconfiguration, instead of read from the checkpoint.

The source serves the layers it computes as safetensors bytes under their checkpoint names (`GET
/reconfig/weights?layers=3,4`, behind the control token), split back from the fused projections, with the
embeddings if layer 0 is asked for and the final norm and head if the last layer is. A target that is told
`weights: "source"` fetches its incoming layers from the stages that hold them now and builds them exactly
as from the checkpoint, so a target needs no checkpoint for the layers it takes over. Tensors travel in the
source's dtype: stages of one pipeline share it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from pipeshift.runtime.agent.worker import StageWorker, StateConflict
from pipeshift.runtime.model.checkpoint import EMBED_KEY, NORM_KEY, expected_shape, head_key, layer_key
from pipeshift.runtime.model.config import LlamaConfig
from pipeshift.runtime.stage import Stage, TensorReader

FETCH_TIMEOUT_S = 300.0


def parse_layers(text: str | None) -> list[int]:
    """`3,4` → [3, 4]: the query parameter `layers` of `GET /reconfig/weights`."""
    try:
        layers = [int(part) for part in (text or "").split(",")]
    except ValueError:
        layers = []
    if not layers or min(layers) < 0:
        raise ValueError(f"query parameter 'layers': expected layer numbers like 3,4, got {text!r}")
    return sorted(set(layers))


def layer_tensors(stage: Stage, layers: list[int]) -> dict[str, Tensor]:
    """Worker side: checkpoint-named tensors of `layers` (all computed here now), sharing the stage's storage."""
    c = stage.config
    missing = [i for i in layers if i not in stage.layers]
    if missing:
        raise StateConflict(f"layers {missing} are not served here (this stage computes [{stage.start}, "
                            f"{stage.end})); ask the stage that holds them")
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    out: dict[str, Tensor] = {}
    for i in layers:
        w = stage.layers[i].w
        q, k, v = w.qkv.split([q_out, kv_out, kv_out])
        gate, up = w.gate_up.split([c.intermediate_size, c.intermediate_size])
        parts = {"self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v,
                 "self_attn.o_proj.weight": w.o, "mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up,
                 "mlp.down_proj.weight": w.down, "input_layernorm.weight": w.input_norm,
                 "post_attention_layernorm.weight": w.post_norm}
        out.update({layer_key(i, part): t for part, t in parts.items()})
    if 0 in layers and stage.embed is not None:
        out[EMBED_KEY] = stage.embed
    if c.num_layers - 1 in layers and stage.norm is not None and stage.head is not None:
        out[NORM_KEY] = stage.norm
        out[head_key(c)] = stage.head
    return out


async def serve_layers(worker: StageWorker, layers: list[int]) -> bytes:
    """The safetensors bytes of `layers`; only taking the references runs on the worker, between batches."""
    tensors = await worker.call(layer_tensors, worker.stage, layers)
    # Views into fused weights (and tied tensors) share storage, which safetensors refuses: copy each once.
    return await asyncio.to_thread(lambda: save_safetensors({k: t.contiguous().clone() for k, t in tensors.items()}))


async def fetch_layers(sources: Mapping[int, str], token: str | None) -> dict[str, Tensor]:
    """Every layer of `sources` (layer → the control URL of the stage computing it), one request per source."""
    by_source: dict[str, list[int]] = {}
    for layer, url in sorted(sources.items()):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"field 'weight_sources': {url!r} (layer {layer}) is not an http(s) control URL")
        by_source.setdefault(url.rstrip("/"), []).append(layer)
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    tensors: dict[str, Tensor] = {}
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
        for url, layers in by_source.items():
            query = {"layers": ",".join(map(str, layers))}
            try:
                async with session.get(f"{url}/reconfig/weights", params=query) as response:
                    payload = await response.read()
                    if response.status != 200:
                        raise StateConflict(f"weights of layers {layers} from {url}: HTTP {response.status}: "
                                            f"{payload[:300].decode(errors='replace')}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise StateConflict(f"weights of layers {layers} from {url}: {exc or type(exc).__name__}") from None
            tensors.update(await asyncio.to_thread(load_safetensors, payload))
    return tensors


def reader_of(tensors: Mapping[str, Tensor], config: LlamaConfig) -> TensorReader:
    """A `Stage` reader over streamed tensors, shape-checked like the checkpoint; a tensor that no source sent
    is an error rather than a silent fallback to the checkpoint."""

    def read(keys: list[str], dtype: torch.dtype) -> dict[str, Tensor]:
        out = {}
        for key in keys:
            if key not in tensors:
                raise ValueError(f"field 'weight_sources': no source sent tensor {key!r}; list the stage that "
                                 "holds each incoming layer")
            if tuple(tensors[key].shape) != expected_shape(config, key):
                raise ValueError(f"tensor {key!r} from the source has shape {tuple(tensors[key].shape)}, "
                                 f"config.json implies {expected_shape(config, key)}")
            out[key] = tensors[key].to(dtype)
        return out

    return read


async def source_reader(worker: StageWorker, layers: tuple[int, int], sources: Mapping[int, str],
                        token: str | None) -> TensorReader:
    """Fetch the layers of the new range `layers` not held here yet from their sources; a reader over them."""
    held = set(await worker.call(lambda: worker.stage.loaded_layers))
    wanted = {i: url for i, url in sources.items() if layers[0] <= i < layers[1] and i not in held}
    tensors = await fetch_layers(wanted, token) if wanted else {}
    return reader_of(tensors, worker.model)


def parse_sources(sources: Mapping[str, str]) -> dict[int, str]:
    """The prepare body's `weight_sources` (JSON keys are strings) with layer numbers as keys."""
    try:
        return {int(layer): url for layer, url in sources.items()}
    except ValueError:
        raise ValueError(f"field 'weight_sources': keys must be layer numbers, got {sorted(sources)}") from None


def weight_counters(stage: Stage) -> dict[str, int]:
    """For `/stats`: weight bytes loaded from the checkpoint (at start-up: `initial`, then by prepare) and
    received from source stages, so a change's weight traffic is measured rather than computed."""
    return {"weights_bytes_initial": stage.weights_bytes_initial, "weights_bytes_loaded": stage.weights_bytes_loaded,
            "weights_bytes_received": stage.weights_bytes_received}
