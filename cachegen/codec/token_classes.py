"""Token step classes of the token-adaptive transform level "pca2t" (FORMAT.md §5.6).

Why: a KV error costs in proportion to the attention its token receives (squared, for values), and attention
lands on few tokens. On SmolLM2 (2K tokens, pca2's rate), steps set by the continuation's real attention per
(layer, token) cut the KL 4x at equal bits (0.0126 -> 0.0030). The estimate below needs only the keys; as shipped
it measured KL 0.0095 at 1.90 bits/value against pca2's 0.0117 at 1.98 at 2K tokens, but 0.056 at 1.84 against
0.038 at 1.96 at 8K (calibrated on 2K contexts). README's codec section has the rows.

What the format fixes (decoders need only this): a class ``v`` in 0..15 per (layer, token), its step multiplier
``MULTIPLIERS[v]`` on that token's K and V coefficients, and its table shift ``SHIFTS[v]``: the level's tables are
a ladder ordered by scale (``LADDER_TABLES`` rows, 4 per octave), so half an octave finer is two rows up. One
ladder serves every class with no mixing of distributions (measured: the same bits as one table per coefficient).

What the encoder chooses (not normative): the class from an importance score. A probe of calibration queries
(``Probe``), each turned by a sampled query-key distance into the keys' de-rotated frame, scores token ``n`` by
``sum_p exp(2 * (q_p . k_n - log_norm_p))``: the squared attention those queries would pay it, with each query's
normaliser taken over a calibration context (so a chunk's score does not depend on its neighbours). Then
``v = 8 + clamp(round(-log2(score / reference)), CLASS_RANGE)``, raised where a coefficient would not fit 127 steps.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

from cachegen.errors import FormatError
from cachegen.spec import KVLayout

NEUTRAL = 8
"""Class of multiplier 1 (and table shift 0)."""
NUM_CLASSES = 16
MULTIPLIERS = (2.0 ** ((np.arange(NUM_CLASSES) - NEUTRAL) / 2)).astype(np.float32)
"""Step multiplier of class v: 2^((v - 8) / 2) rounded to float32 (FORMAT.md §5.6 lists the 16 values)."""
SHIFTS = (2 * (NEUTRAL - np.arange(NUM_CLASSES))).astype(np.int8)
"""Table shift of class v: a finer step spreads the symbols as a table two ladder rows up (4 rows per octave)."""
LADDER_TABLES = 96
LADDER_CENTER = 48
"""Ladder row ``b`` holds symbols of coefficients whose mean |coefficient| / step is about 2^((b - 48) / 4)."""
MAP_RANGE = (int(SHIFTS.max()), LADDER_TABLES - 1 + int(SHIFTS.min()))
"""Every table_map entry of a ladder level lies here, so map + SHIFTS[v] is a row for every class v."""
CLASS_RANGE = (-4, 2)
"""Encoder: classes from the score alone span multipliers 1/4 .. 2 (measured at equal bits: letting the least
looked-at tokens go to 4 raised the KL by a third)."""
PROBE_MAGIC = b"CGIP"
_PROBE_HEAD = struct.Struct("<4sI")  # magic, probes per KV head


@dataclass(slots=True, frozen=True)
class Probe:
    """Calibration queries that score tokens (encoder only; decoders skip it; FORMAT.md §8.2).

    ``queries`` (L, H, P, D) float32, already scaled by the attention's 1/sqrt(D) and turned into the keys'
    de-rotated frame; ``log_norm`` (L, H, P) float32; ``reference`` (L,) float32 median score of calibration tokens.
    """

    queries: np.ndarray
    log_norm: np.ndarray
    reference: np.ndarray

    def to_bytes(self) -> bytes:
        head = _PROBE_HEAD.pack(PROBE_MAGIC, self.queries.shape[2])
        return head + b"".join(a.astype("<f4").tobytes() for a in (self.queries, self.log_norm, self.reference))


def read_probe(take, layout: KVLayout) -> Probe:
    """Parse a probe record with ``take(size, field) -> bytes`` (a bounds-checked reader of untrusted bytes)."""
    magic, per_head = _PROBE_HEAD.unpack(take(_PROBE_HEAD.size, "probe"))
    if magic != PROBE_MAGIC or not 1 <= per_head <= 4096:
        raise FormatError("probe", 0, (magic, per_head), "not a probe record")
    layers, heads, dim = layout.num_layers, layout.num_kv_heads, layout.head_dim

    def floats(shape: tuple[int, ...], name: str) -> np.ndarray:
        values = np.frombuffer(take(4 * int(np.prod(shape)), name), "<f4").astype(np.float32).reshape(shape)
        if not np.isfinite(values).all():
            raise FormatError(name, 0, "non-finite", "probe values must be finite")
        return values

    queries = floats((layers, heads, per_head, dim), "probe.queries")
    log_norm = floats((layers, heads, per_head), "probe.log_norm")
    reference = floats((layers,), "probe.reference")
    if not (reference > 0).all():
        raise FormatError("probe.reference", 0, float(reference.min()), "reference scores must be > 0")
    return Probe(queries, log_norm, reference)


def scores(keys: torch.Tensor, probe: Probe) -> torch.Tensor:
    """(L, T) float32 score of de-rotated keys (L, T, H*D): squared attention the probe's queries would pay."""
    layers, tokens, _ = keys.shape
    heads, dim = probe.queries.shape[1], probe.queries.shape[3]
    k = keys.reshape(layers, tokens, heads, dim).permute(0, 2, 3, 1)  # (L, H, D, T)
    logits = torch.from_numpy(probe.queries) @ k - torch.from_numpy(probe.log_norm)[..., None]  # (L, H, P, T)
    return torch.exp(2 * logits.clamp(max=30.0)).sum(dim=(1, 2))


def classes_of(score: torch.Tensor, reference: np.ndarray) -> np.ndarray:
    """(L, T) int64 classes from scores: a token 2x above its layer's reference gets a step 1/sqrt(2) finer."""
    ratio = (score / torch.from_numpy(reference)[:, None]).clamp_min(1e-30)
    exponent = torch.round(-torch.log2(ratio)).clamp(*CLASS_RANGE)
    return (NEUTRAL + exponent).to(torch.int64).numpy()


def pack(classes: np.ndarray) -> bytes:
    """(L, T) classes -> nibbles, (layer, token) order, two per byte, low nibble first (FORMAT.md §5.6)."""
    flat = classes.astype(np.uint8).ravel()
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def unpack(data: memoryview | bytes, layers: int, tokens: int, offset: int) -> np.ndarray:
    """Inverse of ``pack``; FormatError when the size is wrong or the padding nibble is not 0."""
    count = layers * tokens
    raw = np.frombuffer(data, np.uint8)
    if raw.size != (count + 1) // 2:
        raise FormatError(
            "token_classes", offset, raw.size, f"{layers} x {tokens} classes need {(count + 1) // 2} bytes"
        )
    flat = np.empty(raw.size * 2, np.int64)
    flat[0::2], flat[1::2] = raw & 15, raw >> 4
    if flat.size > count and flat[-1] != 0:
        raise FormatError("token_classes", offset + raw.size - 1, int(flat[-1]), "padding nibble must be 0")
    return flat[:count].reshape(layers, tokens)


def ladder_map(mean_abs: np.ndarray, step: np.ndarray) -> np.ndarray:
    """(L, 2, W) ladder row of each coefficient at class 8: its mean |coefficient| / step on the 4-per-octave
    scale, kept inside ``MAP_RANGE``."""
    ratio = np.maximum(mean_abs.astype(np.float64) / step, 1e-12)
    return np.clip(np.rint(4 * np.log2(ratio)) + LADDER_CENTER, *MAP_RANGE).astype(np.uint32)
