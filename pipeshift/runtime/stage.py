"""A pipeline stage: a contiguous range of decoder layers, their weights and one paged KV cache.

The first stage also holds the embeddings, the last the final norm and head. Layer ranges can grow
or shrink at either end while the stage runs, which is how live reconfiguration moves layers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeshift.runtime.kv import KVCapacityError, KVSpec, PagedKVCache, SeqSpan
from pipeshift.runtime.model.checkpoint import EMBED_KEY, NORM_KEY, ModelDir, head_key, layer_keys
from pipeshift.runtime.model.layers import DecoderLayer, LayerWeights, rms_norm
from pipeshift.runtime.model.rope import RopeTable

DEFAULT_KV_BYTES = 64 * 2**20
logger = logging.getLogger(__name__)


class Stage:
    """Layers `[start, end)` of a model. Sequence ids are the caller's; KV is kept per (seq, layer).

    The KV pool holds `kv_blocks` blocks (or as many as fit in `kv_bytes`, default 64 MiB) in slabs
    of `slab_blocks`: smaller slabs let the pool shrink finely, one slab makes gathers cheapest.
    """

    def __init__(self, model: ModelDir | str | Path, start: int, end: int, *, dtype: torch.dtype = torch.float32,
                 kv_blocks: int | None = None, kv_bytes: int | None = None, block_size: int = 16,
                 slab_blocks: int = 64) -> None:
        self.model = model if isinstance(model, ModelDir) else ModelDir(model)
        self.config = c = self.model.config
        if not 0 <= start < end <= c.num_layers:
            raise ValueError(f"layer range [{start}, {end}) is not within the model's {c.num_layers} layers")
        if kv_blocks is not None and kv_bytes is not None:
            raise ValueError("give kv_blocks or kv_bytes, not both")
        self.dtype = dtype
        self.spec = KVSpec(block_size=block_size, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=dtype)
        if kv_blocks is None:
            kv_blocks = (DEFAULT_KV_BYTES if kv_bytes is None else kv_bytes) // self.spec.bytes_per_block
        self.cache = PagedKVCache(self.spec, kv_blocks, slab_blocks=slab_blocks)
        self.rope = RopeTable(c, dtype)
        self.layers: dict[int, DecoderLayer] = {}
        self.embed: torch.Tensor | None = None
        self.norm: torch.Tensor | None = None
        self.head: torch.Tensor | None = None
        self._tokens: dict[int, int] = {}  # the positions each sequence reserved for
        self.start = self.end = start
        self.load_layers(start, end)

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

    def blocks_for(self, tokens: int) -> int:
        return self.spec.blocks_for(tokens, self.end - self.start)

    def can_reserve(self, tokens: int) -> bool:
        return self.cache.can_reserve(self.blocks_for(tokens))

    def reserve(self, seq_id: int, tokens: int) -> None:
        """Make sure `seq_id` can hold `tokens` positions in every layer here (KVCapacityError if not)."""
        needed = self.blocks_for(tokens) - self.cache.reserved_for(seq_id)
        if needed > 0:
            self.cache.reserve(seq_id, needed)
        self._tokens[seq_id] = max(tokens, self._tokens.get(seq_id, 0))

    def release(self, seq_id: int) -> None:
        self.cache.release(seq_id)
        self._tokens.pop(seq_id, None)

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
        if not self.cache.can_reserve(sum(b for b in top_up.values() if b > 0)):
            raise KVCapacityError(f"loading layers [{start}, {end}) needs {sum(top_up.values())} more KV blocks "
                                  f"for {len(top_up)} live sequences; the pool has {self.cache.free_blocks} free")
        want_embed = new_start == 0 and self.embed is None
        want_head = new_end == c.num_layers and self.head is None
        reuse_embed = c.tie_word_embeddings and (self.embed is not None or want_embed)
        keys = [k for i in range(start, end) for k in layer_keys(i)]
        read_embed = want_embed and not (c.tie_word_embeddings and self.head is not None)
        keys += [EMBED_KEY] * read_embed + [NORM_KEY] * want_head + [head_key(c)] * (want_head and not reuse_embed)
        tensors = self.model.read(list(dict.fromkeys(keys)), self.dtype)
        for i in range(start, end):
            self.layers[i] = DecoderLayer(i, LayerWeights.from_checkpoint(i, tensors), c)
        if want_embed:
            self.embed = tensors[EMBED_KEY] if read_embed else self.head
        if want_head:
            self.norm = tensors[NORM_KEY]
            self.head = self.embed if reuse_embed else tensors[head_key(c)]
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
        for seq, tokens in self._tokens.items():
            spare = self.cache.reserved_for(seq) - max(self.blocks_for(tokens), self.cache.allocated_for(seq))
            if spare > 0:
                self.cache.unreserve(seq, spare)
        logger.debug("stage now holds layers [%d, %d)", self.start, self.end)

    def weight_bytes(self) -> int:
        extras = {id(t): t for t in (self.embed, self.norm, self.head) if t is not None}
        return (sum(layer.w.nbytes() for layer in self.layers.values())
                + sum(t.numel() * t.element_size() for t in extras.values()))

    # ---- compute ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, spans: Sequence[SeqSpan], inputs: torch.Tensor, *, all_logits: bool = False) -> torch.Tensor:
        """Run one micro-batch whose spans may mix prefill (n > 1) and decode (n == 1).

        First stage: `inputs` are token ids [T]; others: hidden states [T, hidden]. Returns hidden
        states [T, hidden], or on the last stage logits of each span's last token [len(spans), vocab]
        (every token's, [T, vocab], with `all_logits`).
        """
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
        if self.embed is not None:
            if inputs.dim() != 1:
                raise ValueError(f"the first stage takes token ids [T], got shape {list(inputs.shape)}")
            vocab = self.config.vocab_size
            if not 0 <= int(inputs.min()) <= int(inputs.max()) < vocab:
                raise ValueError(f"token ids must be in 0..{vocab - 1}, got {inputs.min()}..{inputs.max()}")
            h = F.embedding(inputs, self.embed)
        else:
            if inputs.shape[1:] != (self.config.hidden_size,):
                raise ValueError(f"stage {self.start}..{self.end} takes hidden states [T, {self.config.hidden_size}], "
                                 f"got shape {list(inputs.shape)}")
            h = inputs.to(self.dtype)
        for layer in self.layers.values():
            h = layer.forward(h, cos, sin, self.cache, spans)
        if self.head is None:
            return h
        if not (all_logits or decode_only):
            last = torch.tensor([span.n for span in spans]).cumsum(0) - 1
            h = h[last]
        return F.linear(rms_norm(h, self.norm, self.config.rms_norm_eps), self.head)
