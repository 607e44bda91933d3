"""A pipeline stage: a contiguous range of decoder layers, their weights and one paged KV cache.

The first stage also holds the embeddings, the last the final norm and head. Layer ranges can grow
or shrink at either end while the stage runs, which is how live reconfiguration moves layers: directly
(`load_layers`/`unload_layers`), or in two phases, where `prepare` loads incoming layers inactive (they
receive KV but compute nothing) and `activate` switches to the new range at once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeshift.runtime.kv import KVCapacityError, KVSpec, MemoryBudget, PagedKVCache, SeqSpan
from pipeshift.runtime.model.checkpoint import (
    EMBED_KEY,
    NORM_KEY,
    ModelDir,
    expected_shape,
    head_key,
    layer_keys,
)
from pipeshift.runtime.model.layers import DecoderLayer, LayerWeights, rms_norm
from pipeshift.runtime.model.rope import RopeTable

DEFAULT_KV_BYTES = 64 * 2**20
logger = logging.getLogger(__name__)
# Reads checkpoint-named tensors in a dtype: `ModelDir.read`, or tensors another stage streamed here.
TensorReader = Callable[[list[str], torch.dtype], dict[str, Tensor]]


class Stage:
    """Layers `[start, end)` of a model. Sequence ids are the caller's; KV is kept per (seq, layer).

    The KV pool holds `kv_blocks` blocks (or as many as fit in `kv_bytes`, default 64 MiB) in slabs
    of `slab_blocks`: smaller slabs let the pool shrink finely, one slab makes gathers cheapest.
    With `memory_bytes` instead, the stage has that much memory for weights and KV together (`memory`):
    the pool gets the whole slabs that fit beside the weights it loaded (KVCapacityError if not one does).
    """

    def __init__(self, model: ModelDir | str | Path, start: int, end: int, *, dtype: torch.dtype = torch.float32,
                 kv_blocks: int | None = None, kv_bytes: int | None = None, block_size: int = 16,
                 slab_blocks: int = 64, memory_bytes: int | None = None) -> None:
        self.model = model if isinstance(model, ModelDir) else ModelDir(model)
        self.config = c = self.model.config
        if not 0 <= start < end <= c.num_layers:
            raise ValueError(f"layer range [{start}, {end}) is not within the model's {c.num_layers} layers")
        if sum(x is not None for x in (kv_blocks, kv_bytes, memory_bytes)) > 1:
            raise ValueError("give one of kv_blocks, kv_bytes or memory_bytes, not several")
        self.dtype = dtype
        self.spec = KVSpec(block_size=block_size, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=dtype)
        self.memory = None if memory_bytes is None else MemoryBudget(memory_bytes, self.spec.bytes_per_block,
                                                                      slab_blocks)
        if kv_blocks is None:
            kv_blocks = 0 if memory_bytes is not None else (
                (DEFAULT_KV_BYTES if kv_bytes is None else kv_bytes) // self.spec.bytes_per_block)
        self.cache = PagedKVCache(self.spec, kv_blocks, slab_blocks=slab_blocks)
        self.rope = RopeTable(c, dtype)
        self.layers: dict[int, DecoderLayer] = {}
        self.embed: torch.Tensor | None = None
        self.norm: torch.Tensor | None = None
        self.head: torch.Tensor | None = None
        self._tokens: dict[int, int] = {}  # the positions each sequence reserved for
        # Loaded but not computing until `activate`: layers and the embeddings/norm/head a new range needs.
        self.inactive: dict[int, DecoderLayer] = {}
        self._pending: dict[str, Tensor] = {}
        # Sequences this stage holds only because KV was imported or reserved for a reconfiguration
        # (not admitted in-band): `discard_prepared` releases them.
        self._adopted: set[int] = set()
        # (position, layer) forward computations ever run here, counted per layer as it runs, so a batch
        # that fails half-way still counts the work it did: the honest base for measuring recomputation.
        self.layer_tokens_computed = 0
        # Weight bytes this stage took in, by where they came from; `initial` is what the constructor loaded.
        self.weights_bytes_loaded = self.weights_bytes_received = 0
        self.start = self.end = start
        self.load_layers(start, end)
        self.weights_bytes_initial = self.weights_bytes_loaded
        if self.memory is not None:
            self._size_pool_to_memory(self.memory)

    def _size_pool_to_memory(self, memory: MemoryBudget) -> None:
        """The launch pool: whatever whole slabs the memory holds beside the weights just loaded."""
        weights = self.weight_bytes()
        blocks = memory.pool_blocks(weights)
        if blocks == 0:
            raise KVCapacityError(f"layers [{self.start}, {self.end}) leave no room for a KV pool: "
                                  f"{memory.describe(weights)}, and a pool needs at least one slab")
        self.cache.grow(blocks)

    @property
    def layer_range(self) -> range:
        return range(self.start, self.end)

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.config.num_layers

    # ---- KV capacity -----------------------------------------------------------------------------

    @property
    def loaded_layers(self) -> list[int]:
        """Active and inactive layers: what this stage holds weights (and may hold KV) for."""
        return sorted([*self.layers, *self.inactive])

    def blocks_for(self, tokens: int) -> int:
        """Inactive layers count too: a sequence admitted while they wait must fit them after the switch."""
        return self.spec.blocks_for(tokens, self.end - self.start + len(self.inactive))

    def can_reserve(self, tokens: int) -> bool:
        return self.cache.can_reserve(self.blocks_for(tokens))

    def reserve(self, seq_id: int, tokens: int) -> None:
        """Make sure `seq_id` can hold `tokens` positions in every layer here (KVCapacityError if not)."""
        self._adopted.discard(seq_id)
        self._reserve(seq_id, tokens)

    def adopt(self, seq_id: int, tokens: int) -> None:
        """Reserve like `reserve` for a sequence announced by a reconfiguration rather than a batch."""
        if seq_id not in self._tokens:
            self._adopted.add(seq_id)
        self._reserve(seq_id, tokens)

    def _reserve(self, seq_id: int, tokens: int) -> None:
        needed = self.blocks_for(tokens) - self.cache.reserved_for(seq_id)
        if needed > 0:
            self.cache.reserve(seq_id, needed)
        self._tokens[seq_id] = max(tokens, self._tokens.get(seq_id, 0))

    def release(self, seq_id: int) -> None:
        self.cache.release(seq_id)
        self._tokens.pop(seq_id, None)
        self._adopted.discard(seq_id)

    def sequences(self) -> list[int]:
        return sorted(self._tokens)

    def reserved_tokens(self, seq_id: int) -> int:
        """The positions `seq_id` reserved for here (0 if unknown): what a target must reserve for it too."""
        return self._tokens.get(seq_id, 0)

    def kv_layers(self) -> list[int]:
        """Layers any sequence holds KV blocks of (after a clean switch: exactly the held range, or none)."""
        return sorted({layer for seq in self.cache.sequences() for layer in self.cache.layers_of(seq)})

    # ---- layers ----------------------------------------------------------------------------------

    def load_layers(self, start: int, end: int) -> None:
        """Load layers `[start, end)`, which must border the held range, and the embeddings or head if
        the stage becomes first or last; live sequences' reservations grow to cover the new layers."""
        c = self.config
        held = self.end > self.start
        if not 0 <= start < end <= c.num_layers or (held and start != self.end and end != self.start):
            raise ValueError(f"cannot load layers [{start}, {end}) into a stage holding [{self.start}, {self.end}) "
                             f"of {c.num_layers}: the range must be non-empty and border the held one")
        new_start, new_end = (min(start, self.start), max(end, self.end)) if held else (start, end)
        top_up = {seq: self.spec.blocks_for(tokens, new_end - new_start) - self.cache.reserved_for(seq)
                  for seq, tokens in self._tokens.items()}
        if self.inactive:
            raise ValueError(f"cannot load layers [{start}, {end}) while layers {sorted(self.inactive)} are "
                             "prepared for a reconfiguration; activate or discard them first")
        if not self.cache.can_reserve(sum(b for b in top_up.values() if b > 0)):
            raise KVCapacityError(f"loading layers [{start}, {end}) needs {sum(top_up.values())} more KV blocks "
                                  f"for {len(top_up)} live sequences; the pool has {self.cache.free_blocks} free")
        layers, extras = self._read(range(start, end), new_start, new_end)
        self.layers.update(layers)
        self.embed = extras.get("embed", self.embed)
        self.norm = extras.get("norm", self.norm)
        self.head = extras.get("head", self.head)
        self.start, self.end = new_start, new_end
        self.layers = dict(sorted(self.layers.items()))
        for seq, blocks in top_up.items():
            if blocks > 0:
                self.cache.reserve(seq, blocks)
        logger.debug("stage now holds layers [%d, %d)", self.start, self.end)

    def unload_layers(self, start: int, end: int) -> None:
        """Drop layers `[start, end)` (a prefix or suffix of the held range, never all of it) with their KV."""
        if not (self.start <= start < end <= self.end) or (start, end) == (self.start, self.end) or (
                start != self.start and end != self.end):
            raise ValueError(f"cannot unload layers [{start}, {end}) from [{self.start}, {self.end}): "
                             "only a proper prefix or suffix of the held range")
        for i in range(start, end):
            del self.layers[i]
            self.cache.drop_layer(i)
        if start == self.start:
            self.start = end
        else:
            self.end = start
        if not self.is_first:
            self.embed = None
        if not self.is_last:
            self.norm = self.head = None
        self._trim_reservations()
        logger.debug("stage now holds layers [%d, %d)", self.start, self.end)

    def _read(self, indices: Sequence[int], new_start: int, new_end: int,
              read: TensorReader | None = None) -> tuple[dict[int, DecoderLayer], dict[str, Tensor]]:
        """Layers `indices` from the checkpoint (or from `read`), plus the embeddings, norm and head that the
        range `[new_start, new_end)` needs and this stage lacks (shared when the model ties them)."""
        c = self.config
        want_embed = new_start == 0 and self.embed is None
        want_head = new_end == c.num_layers and self.head is None
        reuse_embed = c.tie_word_embeddings and (self.embed is not None or want_embed)
        keys = [k for i in indices for k in layer_keys(i)]
        read_embed = want_embed and not (c.tie_word_embeddings and self.head is not None)
        keys += [EMBED_KEY] * read_embed + [NORM_KEY] * want_head + [head_key(c)] * (want_head and not reuse_embed)
        tensors = (read or self.model.read)(list(dict.fromkeys(keys)), self.dtype)
        taken = sum(t.numel() * t.element_size() for t in tensors.values())
        if read is None:
            self.weights_bytes_loaded += taken
        else:
            self.weights_bytes_received += taken
        layers = {i: DecoderLayer(i, LayerWeights.from_checkpoint(i, tensors), c) for i in indices}
        extras: dict[str, Tensor] = {}
        if want_embed:
            extras["embed"] = tensors[EMBED_KEY] if read_embed else self.head  # type: ignore[assignment]
        if want_head:
            extras["norm"] = tensors[NORM_KEY]
            extras["head"] = extras.get("embed", self.embed) if reuse_embed else tensors[head_key(c)]  # type: ignore[assignment]
        return layers, extras

    def _trim_reservations(self) -> None:
        """Give back reserved blocks that the layers now held no longer need (never below what is written)."""
        for seq, tokens in self._tokens.items():
            spare = self.cache.reserved_for(seq) - max(self.blocks_for(tokens), self.cache.allocated_for(seq))
            if spare > 0:
                self.cache.unreserve(seq, spare)

    # ---- two-phase range change (live reconfiguration) --------------------------------------------

    def prepare(self, start: int, end: int, read: TensorReader | None = None) -> list[int]:
        """Load the layers of the new range `[start, end)` that this stage lacks, inactive; returns them.
        `read` supplies their tensors instead of the checkpoint (weights streamed from the source stage).

        The new range must overlap the held one (or equal it), so incoming layers border it. Forward keeps
        computing the held range; reservations of live sequences grow to cover the incoming layers.
        """
        c = self.config
        if not 0 <= start < end <= c.num_layers or end <= self.start or start >= self.end:
            raise ValueError(f"cannot prepare layers [{start}, {end}) on a stage holding [{self.start}, {self.end}) "
                             f"of {c.num_layers}: the new range must be non-empty and overlap the held one")
        incoming = [i for i in range(start, end) if i not in self.layers and i not in self.inactive]
        top_up = {seq: self.spec.blocks_for(tokens, self.end - self.start + len(self.inactive) + len(incoming))
                  - self.cache.reserved_for(seq) for seq, tokens in self._tokens.items()}
        needed = sum(b for b in top_up.values() if b > 0)
        if incoming and not self.cache.can_reserve(needed):
            unreserved = self.cache.total_blocks - self.cache.reserved_blocks
            raise KVCapacityError(f"preparing layers {incoming} needs {needed} more KV blocks for "
                                  f"{len(top_up)} live sequences; {unreserved} are unreserved")
        if incoming:
            layers, extras = self._read(incoming, start, end, read)
            self.inactive.update(layers)
            self._pending.update(extras)
        self.inactive = dict(sorted(self.inactive.items()))
        for seq, blocks in top_up.items():
            if blocks > 0:
                self.cache.reserve(seq, blocks)
        logger.debug("stage holds layers [%d, %d), prepared %s", self.start, self.end, incoming)
        return incoming

    def activate(self, start: int, end: int) -> list[int]:
        """Switch to computing `[start, end)`: prepared layers join, layers outside it leave with their KV.

        Returns the layers that left. Every layer of the new range must be held or prepared.
        """
        missing = [i for i in range(start, end) if i not in self.layers and i not in self.inactive]
        if missing or not 0 <= start < end <= self.config.num_layers:
            raise ValueError(f"cannot activate layers [{start}, {end}): layers {missing} are neither held nor "
                             f"prepared (held [{self.start}, {self.end}), prepared {sorted(self.inactive)})")
        stray = [i for i in self.inactive if not start <= i < end]
        outgoing = [i for i in self.layers if not start <= i < end]
        for i in stray:
            del self.inactive[i]
            self.cache.drop_layer(i)
        for i in outgoing:
            del self.layers[i]
            self.cache.drop_layer(i)
        self.layers = dict(sorted({**self.layers, **self.inactive}.items()))
        self.inactive = {}
        self.embed = self._pending.get("embed", self.embed) if start == 0 else None
        last = end == self.config.num_layers
        self.norm = self._pending.get("norm", self.norm) if last else None
        self.head = self._pending.get("head", self.head) if last else None
        self._pending = {}
        self._adopted.clear()
        self.start, self.end = start, end
        self._trim_reservations()
        logger.debug("stage activated layers [%d, %d); %s left", start, end, outgoing)
        return outgoing

    def discard_prepared(self) -> list[int]:
        """Undo `prepare` and any KV imported since: drop inactive layers and adopted sequences."""
        dropped = sorted(self.inactive)
        for i in dropped:
            self.cache.drop_layer(i)
        self.inactive = {}
        self._pending = {}
        for seq in sorted(self._adopted):
            self.release(seq)
        self._trim_reservations()
        return dropped

    def weight_bytes(self) -> int:
        """Active and prepared weights alike: both occupy memory."""
        tensors = (self.embed, self.norm, self.head, *self._pending.values())
        extras = {id(t): t for t in tensors if t is not None}
        return (sum(layer.w.nbytes() for layer in (*self.layers.values(), *self.inactive.values()))
                + sum(t.numel() * t.element_size() for t in extras.values()))

    def planned_weight_bytes(self, start: int, end: int) -> int:
        """Weights of a stage holding `[start, end)` of this model in this dtype, from the tensors' shapes (which
        the loader checks, so this equals `weight_bytes` once that range is loaded): for sizing before a load."""
        c = self.config
        keys = [k for i in range(start, end) for k in layer_keys(i)]
        if end == c.num_layers:
            keys += [NORM_KEY, head_key(c)]
        if start == 0:
            keys.append(EMBED_KEY)  # a tied head is the embedding: the set below counts it once
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return sum(math.prod(expected_shape(c, k)) for k in set(keys)) * itemsize

    # ---- compute ---------------------------------------------------------------------------------

    def _computing(self, layer_range: tuple[int, int] | None) -> tuple[list[DecoderLayer], Tensor | None,
                                                                       Tensor | None, Tensor | None]:
        """Layers, embeddings, norm and head that compute `layer_range` (default: the active range).

        During an epoch switch a stage computes its old range for old-epoch batches and its new range,
        prepared layers included, for new-epoch ones; both must be loaded.
        """
        if layer_range is None:
            return list(self.layers.values()), self.embed, self.norm, self.head
        start, end = layer_range
        chosen = [self.layers.get(i) or self.inactive.get(i) for i in range(start, end)]
        missing = [i for i, layer in zip(range(start, end), chosen, strict=True) if layer is None]
        if missing or not 0 <= start < end <= self.config.num_layers:
            raise ValueError(f"cannot compute layers [{start}, {end}): layers {missing} are not loaded here")
        embed = (self.embed if self.embed is not None else self._pending.get("embed")) if start == 0 else None
        last = end == self.config.num_layers
        norm = (self.norm if self.norm is not None else self._pending.get("norm")) if last else None
        head = (self.head if self.head is not None else self._pending.get("head")) if last else None
        if (start == 0 and embed is None) or (last and (norm is None or head is None)):
            raise ValueError(f"cannot compute layers [{start}, {end}): the embeddings or head are not loaded")
        return chosen, embed, norm, head  # type: ignore[return-value]

    @torch.inference_mode()
    def forward(self, spans: Sequence[SeqSpan], inputs: torch.Tensor, *, all_logits: bool = False,
                layer_range: tuple[int, int] | None = None) -> torch.Tensor:
        """Run one micro-batch whose spans may mix prefill (n > 1) and decode (n == 1).

        First stage: `inputs` are token ids [T]; others: hidden states [T, hidden]. Returns hidden
        states [T, hidden], or on the last stage logits of each span's last token [len(spans), vocab]
        (every token's, [T, vocab], with `all_logits`). `layer_range`: compute that range of loaded
        layers instead of the active one (see `_computing`).
        """
        layers, embed, norm, head = self._computing(layer_range)
        if not spans:
            raise ValueError("a micro-batch needs at least one span")
        tokens = sum(span.n for span in spans)
        if inputs.shape[0] != tokens:
            raise ValueError(f"inputs have {inputs.shape[0]} rows but the {len(spans)} spans hold {tokens} tokens")
        decode_only = tokens == len(spans)
        if decode_only:
            positions = torch.tensor([span.start for span in spans])
        else:
            positions = torch.cat([torch.arange(span.start, span.end) for span in spans])
        cos, sin = self.rope.lookup(positions, max(span.end for span in spans) - 1)
        if embed is not None:
            if inputs.dim() != 1:
                raise ValueError(f"the first stage takes token ids [T], got shape {list(inputs.shape)}")
            vocab = self.config.vocab_size
            if not 0 <= int(inputs.min()) <= int(inputs.max()) < vocab:
                raise ValueError(f"token ids must be in 0..{vocab - 1}, got {inputs.min()}..{inputs.max()}")
            h = F.embedding(inputs, embed)
        else:
            if inputs.shape[1:] != (self.config.hidden_size,):
                raise ValueError(f"stage {self.start}..{self.end} takes hidden states [T, {self.config.hidden_size}], "
                                 f"got shape {list(inputs.shape)}")
            h = inputs.to(self.dtype)
        for layer in layers:
            h = layer.forward(h, cos, sin, self.cache, spans)
            self.layer_tokens_computed += tokens
        if head is None:
            return h
        if not (all_logits or decode_only):
            last = torch.tensor([span.n for span in spans]).cumsum(0) - 1
            h = h[last]
        return F.linear(rms_norm(h, norm, self.config.rms_norm_eps), head)
