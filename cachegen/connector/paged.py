"""Read and write token chunks of an engine's paged KV cache in the engine-neutral layout of ``spec.KVLayout``.

Engines pack their paged cache differently (vLLM's CPU backend stores keys transposed inside a block; AMX CPUs
and CUDA backends pack otherwise), so nothing here hard-codes a layout. Writes go through the engine's own
cache-write op. Reads use a gather index learned once by writing probe values through that same op into a
scratch copy of the cache and finding where each (K|V, head, token, dim) element lands.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from cachegen.errors import LayoutMismatch
from cachegen.spec import KVLayout

CacheWriter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""(key [tokens, heads, dim], value [tokens, heads, dim], cache, slot_mapping [tokens] int64) -> None."""

_DIGIT_BASE = 256  # every integer 0..256 is exact in bf16, fp16 and fp32, so probes survive the cache dtype
_NUM_PROBE_BLOCKS = 3  # block 0 gives the offsets; blocks 1 and 2 prove the layout is affine in the block id


def layer_order(names: Sequence[str]) -> list[str]:
    """Attention layer names sorted by their layer number ("model.layers.12.self_attn.attn" -> 12)."""

    def number(name: str) -> int:
        found = re.findall(r"\.(\d+)\.", f".{name}.")
        if not found:
            raise LayoutMismatch(f"cannot tell the layer number of KV cache {name!r}")
        return int(found[0])

    return sorted(names, key=number)


@dataclass(frozen=True, slots=True)
class BlockGeometry:
    """Where one block's elements live in a flat view of a layer's cache."""

    offsets: torch.Tensor  # int64 [2, heads, block_size, head_dim]: flat offset of each element in block 0
    block_stride: int  # flat distance between the same element of block b and block b+1


def probe_geometry(cache: torch.Tensor, writer: CacheWriter, num_heads: int, head_dim: int, block_size: int):
    """Learn a cache's block geometry by writing numbered probes through the engine's own write op."""
    if not cache.is_contiguous():
        raise LayoutMismatch(f"paged KV cache must be contiguous, got strides {cache.stride()}")
    num_tokens = _NUM_PROBE_BLOCKS * block_size
    num_ids = 2 * num_heads * num_tokens * head_dim
    ids = torch.arange(num_ids, dtype=torch.int64).reshape(2, num_tokens, num_heads, head_dim)
    slots = torch.arange(num_tokens, dtype=torch.int64, device=cache.device)
    scratch = torch.empty_like(cache)
    found = torch.zeros(num_ids, dtype=torch.int64)
    positions = None
    for digit in range(max(1, math.ceil(math.log(num_ids, _DIGIT_BASE)))):
        scratch.fill_(-1)
        values = ((ids // _DIGIT_BASE**digit) % _DIGIT_BASE).to(cache.dtype).to(cache.device)
        writer(values[0].contiguous(), values[1].contiguous(), scratch, slots)
        flat = scratch.reshape(-1).float().cpu()
        if positions is None:
            positions = torch.nonzero(flat >= 0).flatten()
            if positions.numel() != num_ids:
                raise LayoutMismatch(f"probe wrote {positions.numel()} cache elements, expected {num_ids}")
        found += flat[positions].long() * _DIGIT_BASE**digit
    where = torch.empty(num_ids, dtype=torch.int64)
    where[found] = positions
    # where[id] = flat position of element id; ids run over [K|V, token, head, dim].
    where = where.reshape(2, _NUM_PROBE_BLOCKS, block_size, num_heads, head_dim).permute(1, 0, 3, 2, 4)
    stride = int(where[1, 0, 0, 0, 0] - where[0, 0, 0, 0, 0])
    for block in range(1, _NUM_PROBE_BLOCKS):
        if not torch.equal(where[block], where[0] + block * stride):
            raise LayoutMismatch("paged KV cache layout is not affine in the block id; cannot read it")
    return BlockGeometry(where[0].contiguous(), stride)


class PagedKV:
    """One engine's paged KV cache, all layers, seen as chunks of ``layout.shape(tokens)``."""

    def __init__(
        self, layout: KVLayout, caches: Sequence[torch.Tensor], writers: Sequence[CacheWriter], block_size: int
    ) -> None:
        if len(caches) != layout.num_layers or len(writers) != layout.num_layers:
            raise LayoutMismatch(f"engine has {len(caches)} KV layers, model layout says {layout.num_layers}")
        self.layout, self.block_size = layout, block_size
        self._caches, self._writers = list(caches), list(writers)
        self._geometry = probe_geometry(caches[0], writers[0], layout.num_kv_heads, layout.head_dim, block_size)

    def read(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Copy the KV of whole blocks out of the cache: ``layout.shape(len(block_ids) * block_size)``, on CPU."""
        geometry = self._geometry
        blocks = torch.tensor(block_ids, dtype=torch.int64)
        # [blocks, 2, heads, block, dim] -> [2, heads, blocks * block, dim]
        index = geometry.offsets.unsqueeze(0) + blocks.view(-1, 1, 1, 1, 1) * geometry.block_stride
        index = index.permute(1, 2, 0, 3, 4).reshape(2, self.layout.num_kv_heads, -1, self.layout.head_dim)
        index = index.to(self._caches[0].device)
        out = [cache.reshape(-1)[index].cpu() for cache in self._caches]
        return torch.stack(out)

    def write(self, kv: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write ``kv`` (``layout.shape(tokens)``) into the cache slots ``slot_mapping`` via the engine's op."""
        device = self._caches[0].device
        slots = slot_mapping.to(device=device, dtype=torch.int64)
        for layer, (cache, writer) in enumerate(zip(self._caches, self._writers)):
            key = kv[layer, 0].transpose(0, 1).to(device=device, dtype=cache.dtype).contiguous()
            value = kv[layer, 1].transpose(0, 1).to(device=device, dtype=cache.dtype).contiguous()
            writer(key, value, cache, slots)


def slots_for(block_ids: Sequence[int], block_size: int, first_token: int = 0) -> torch.Tensor:
    """Cache slot of every token of the given blocks, from ``first_token`` on (slot = block * size + offset)."""
    blocks = torch.tensor(block_ids, dtype=torch.int64)
    slots = (blocks.view(-1, 1) * block_size + torch.arange(block_size).view(1, -1)).reshape(-1)
    return slots[first_token:]
