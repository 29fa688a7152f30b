"""Build per-model probability tables from real KV samples (FORMAT.md §8); ``cachegen calibrate`` drives it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cachegen.codec import cross_layer, quant, token_classes
from cachegen.codec.coded import table_ids
from cachegen.codec.levels import SCHEME_BY_LEVEL
from cachegen.codec.rans import Tables
from cachegen.codec.tables import CodecTables, LevelTables, freq_from_counts
from cachegen.codec.tensors import check_kv, kv_bits, kv_values
from cachegen.codec.transform import Transform, coefficients, quantize, to_vectors
from cachegen.spec import KVLayout

PSEUDO_COUNT = 0.05
"""Added to every symbol a level can emit: an unseen symbol then costs ~log2(samples/0.05) bits, not 24."""


def lossless_map(layout: KVLayout) -> np.ndarray:
    """High byte of each channel gets its own table; the near-uniform low bytes share one per (layer, K|V, head)."""
    groups = layout.num_layers * 2 * layout.num_kv_heads
    dim = layout.head_dim
    table_map = np.empty((groups, 2 * dim), np.uint32)
    table_map[:, 0::2] = np.arange(groups * dim, dtype=np.uint32).reshape(groups, dim)
    table_map[:, 1::2] = (groups * dim + np.arange(groups, dtype=np.uint32))[:, None]
    return table_map.reshape(layout.num_layers, 2, layout.num_kv_heads, 2 * dim)


def symbols_of(kv: torch.Tensor, bins: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Symbols (L, 2, H, T, P) of one KV tensor under (layers, 2) ``bins`` (None: lossless), and the bf16 token
    scales (None if lossless). The bins of a level are its tables' (``LevelTables.bins``)."""
    if bins is None:
        return quant.split_bytes(kv_bits(kv)), None
    values = kv_values(kv)
    scales = quant.token_scales(values)
    return quant.quantize(values, scales, bins), scales


def level_symbols(
    kv: torch.Tensor, level: int, bins: np.ndarray | None, transform: Transform | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Symbols (L, 2, H, T, P) of ``kv`` at ``level`` as its frames code them (context position 0), and the
    token-adaptive level's (L, T) table shifts (None on other levels)."""
    scheme = SCHEME_BY_LEVEL[level]
    if transform is not None and scheme.cross_layer:
        return cross_layer.quantize(kv, transform, level, 0)[0], None
    if transform is not None and scheme.is_transform:
        symbols, _, classes = quantize(kv, transform, level, 0, scheme.token_adaptive)
        return symbols, None if classes is None else token_classes.SHIFTS[classes]
    return symbols_of(kv, bins)[0], None


def ladder_table_map(samples: Sequence[torch.Tensor], transform: Transform, level: int, layout: KVLayout):
    """(L, 2, H, D) ladder rows of a transform level: each coefficient's mean |value| over the samples (sinks
    left out) against its step."""
    if level in transform.cross_layer:  # its coefficients come out of the closed loop, already over their steps
        record = transform.cross_layer[level]
        ratios = [cross_layer.code_vectors(to_vectors(kv, transform.inv_freq, 0), record)[0] for kv in samples]
        mean_ratio = torch.cat([r[:, :, transform.num_sinks :] for r in ratios], 2).abs().mean(2).numpy()
        rows = token_classes.ladder_map(mean_ratio, np.ones_like(record.steps))
        return rows.reshape(layout.num_layers, 2, layout.num_kv_heads, layout.head_dim)
    coefs = torch.cat([coefficients(to_vectors(kv, transform.inv_freq, 0), transform)[:, :, transform.num_sinks :]
                       for kv in samples], 2)  # fmt: skip
    rows = token_classes.ladder_map(coefs.abs().mean(2).numpy(), transform.steps[level])
    return rows.reshape(layout.num_layers, 2, layout.num_kv_heads, layout.head_dim)


def _level_tables(
    samples: Sequence[torch.Tensor],
    level: int,
    layout: KVLayout,
    sensitivity: np.ndarray | None,
    transform: Transform | None = None,
) -> LevelTables:
    scheme = SCHEME_BY_LEVEL[level]
    bins = scheme.bins(layout.num_layers, sensitivity)
    if scheme.is_lossless:
        table_map, alphabet, allowed = lossless_map(layout), 256, None
    elif scheme.is_transform:
        # Every transform level shares tables by scale (token_classes' ladder), not one per coefficient. Measured
        # on SmolLM2 at 2K tokens against one table per coefficient: +0.002 bits/value on pca3 and pca2, 23 MB
        # less tables file, and 1.1x symbol decode speed (the 96 rows stay in cache). Level 8 needs the ladder.
        assert transform is not None
        table_map, alphabet = ladder_table_map(samples, transform, level, layout), 255
        allowed = np.full(token_classes.LADDER_TABLES, 255)
    else:
        shape = (layout.num_layers, 2, layout.num_kv_heads, layout.head_dim)
        table_map = np.arange(int(np.prod(shape)), dtype=np.uint32).reshape(shape)
        alphabet = int(bins.max()) - 1
        allowed = np.broadcast_to((bins.astype(np.int64) - 1)[:, :, None, None], shape).ravel()
    num_tables = token_classes.LADDER_TABLES if scheme.is_transform else int(table_map.max()) + 1
    counts = np.zeros(num_tables * alphabet, np.float64)
    for kv in samples:
        symbols, shift = level_symbols(kv, level, None if scheme.is_lossless else bins, transform)
        ids = table_ids(table_map, shift, symbols.shape)
        counts += np.bincount((ids * alphabet + symbols).ravel(), minlength=counts.size)
    counts = counts.reshape(num_tables, alphabet)
    if allowed is None:
        counts += PSEUDO_COUNT
    else:
        counts += PSEUDO_COUNT * (np.arange(alphabet)[None, :] < allowed[:, None])
    return LevelTables(level, bins, table_map, Tables(freq_from_counts(counts)))


def calibrate(
    samples: Sequence[torch.Tensor],
    layout: KVLayout,
    model_id: bytes,
    sensitivity: np.ndarray | None = None,
    transform: Transform | None = None,
) -> CodecTables:
    """Tables for every coded level from KV samples of shape ``layout.shape(tokens)`` (any token counts).

    ``sensitivity`` (layers, 2): how much each (layer, K|V) group's quantization error costs the model
    (``cachegen.codec.sensitivity``); levels with ``mean_bins`` then share their bins out by it. ``transform``
    (``cachegen.codec.transform_fit``, needs the model) adds the transform-coded levels it has steps for."""
    if not samples:
        raise ValueError("calibration needs at least one KV sample")
    for kv in samples:
        check_kv(kv, layout, "sample")
    # 16-bit dtypes only for the lossless level: its symbols are the two bytes of each value.
    wanted = [
        level for level, scheme in sorted(SCHEME_BY_LEVEL.items())
        if (not scheme.is_lossless or layout.dtype != "float32")
        and (not scheme.is_transform or (transform is not None and transform.has_level(level)))
        and (not scheme.token_adaptive or transform.probe is not None)
    ]  # fmt: skip
    levels = tuple(_level_tables(samples, level, layout, sensitivity, transform) for level in wanted)
    return CodecTables(layout, bytes(model_id), levels, transform)
