"""The paged-cache accessor against vLLM's real CPU cache-write op (no engine start needed)."""

from __future__ import annotations

import pytest
import torch

from cachegen.connector.paged import PagedKV, layer_order, slots_for
from cachegen.spec import KVLayout

LAYOUT = KVLayout(num_layers=3, num_kv_heads=3, head_dim=64, dtype="bfloat16", tokens_per_chunk=256)
BLOCK = 128


def _cpu_writer():
    """vLLM's CPU backend write, as its attention impl calls it (`CPUAttentionBackendImpl.do_kv_cache_update`)."""
    ops = pytest.importorskip("vllm._custom_ops", reason="needs vllm (installed by make setup)")
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(torch.bfloat16, BLOCK, LAYOUT.head_dim)

    def write(key, value, cache, slots):
        num_blocks, heads, block, _ = cache.shape
        view = cache.view(num_blocks, heads, block * 2, -1)
        key_cache, value_cache = view.chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)

    return write


def _caches(num_blocks: int = 8) -> list[torch.Tensor]:
    shape = (num_blocks, LAYOUT.num_kv_heads, BLOCK, 2 * LAYOUT.head_dim)
    return [torch.zeros(shape, dtype=torch.bfloat16) for _ in range(LAYOUT.num_layers)]


def test_write_then_read_round_trips_any_blocks():
    torch.manual_seed(0)
    writer = _cpu_writer()
    paged = PagedKV(LAYOUT, _caches(), [writer] * LAYOUT.num_layers, BLOCK)
    kv = torch.randn(LAYOUT.shape(256)).to(torch.bfloat16)
    blocks = [5, 2]  # non-adjacent, out of order, like the engine hands them out
    paged.write(kv, slots_for(blocks, BLOCK))
    assert torch.equal(paged.read(blocks), kv)


def test_partial_write_leaves_the_prefix_alone():
    writer = _cpu_writer()
    caches = _caches()
    paged = PagedKV(LAYOUT, caches, [writer] * LAYOUT.num_layers, BLOCK)
    kv = torch.ones(LAYOUT.shape(256), dtype=torch.bfloat16)
    paged.write(kv[:, :, :, 128:], slots_for([3, 4], BLOCK, first_token=128))
    read = paged.read([3, 4])
    assert torch.all(read[:, :, :, :128] == 0) and torch.all(read[:, :, :, 128:] == 1)


def test_layer_order_is_numeric():
    names = ["model.layers.10.self_attn.attn", "model.layers.2.self_attn.attn", "model.layers.0.self_attn.attn"]
    assert layer_order(names) == [names[2], names[1], names[0]]
