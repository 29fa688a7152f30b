"""Transform-coded levels (FORMAT.md §5.5): KV -> per-model linear transform -> uniform steps -> symbols, and back.

Per (layer, K|V) every token is one vector ``x`` of ``H * D`` values (heads concatenated); keys first lose their
rotary embedding, so that the same channel means the same thing at every position. The encoder codes
``y = (x - mean) @ inverse(decode_matrix)`` as ``rint(y / step)``; the decoder computes ``(q * step) @
decode_matrix + mean`` and rotates keys back. ``cachegen.codec.transform_fit`` derives the matrix (PCA in a
metric that weighs each direction by what an error there costs attention), so most coefficients need few bits.
Tokens that the steps cannot hold (a coefficient beyond ``MAX_COEFFICIENT`` steps) and the first
``num_sinks`` positions of a context (attention sinks, far outside the calibrated distribution) travel raw.
Correctness never depends on the transform fitting the model: any invertible matrix decodes to within the
bound of ``error_bound``; a good one only makes the frame smaller. The cross-layer level's record (``CrossLayer``,
FORMAT.md §8.3) lives here too; its coding is ``cachegen.codec.cross_layer``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
import torch

from cachegen.codec import token_classes
from cachegen.codec.token_classes import MULTIPLIERS, NEUTRAL, Probe
from cachegen.errors import FormatError
from cachegen.spec import KVLayout

MAX_COEFFICIENT = 127
"""Symbols are ``q + 127`` for ``q`` in [-127, 127]: alphabet 255, ``bins`` 256 in the tables."""
TRANSFORM_BINS = 2 * MAX_COEFFICIENT + 2
_HEAD = struct.Struct("<4sHHI")  # magic, num_levels, reserved, num_sinks
TRANSFORM_MAGIC = b"CGTX"
_CROSS_HEAD = struct.Struct("<4sHH")  # magic, num_levels, reserved
CROSS_LAYER_MAGIC = b"CGXL"
MAX_DEPTH = 8
"""Most layers before it that a cross-layer prediction may read (FORMAT.md §8.3)."""


@dataclass(slots=True, frozen=True)
class CrossLayer:
    """One cross-layer predicted level (FORMAT.md §5.7, §8.3): its own ``steps`` and ``mean`` (L, 2, W),
    ``decode_matrix`` (L, 2, W, W) (row c: the direction of coefficient c) and ``predict_matrix`` (L, 2, F, W):
    entry [l][kv][j][i] weighs feature j of (l, kv)'s prediction into channel i, F = (2 depth + 1) W features:
    layers l - 1 .. l - depth decoded keys then values, then layer l's keys (values only). All float32."""

    steps: np.ndarray
    mean: np.ndarray
    decode_matrix: np.ndarray
    predict_matrix: np.ndarray
    encode_matrix: np.ndarray = field(init=False, repr=False, compare=False)
    """Derived, not stored: the inverse of ``decode_matrix`` (f64 inversion)."""
    device_copies: dict = field(init=False, repr=False, compare=False, default_factory=dict)
    """Memo of (steps, mean, decode_matrix, predict_matrix) on a GPU, keyed by device (``on_device``): uploaded
    once per model."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "encode_matrix", _inverse(self.decode_matrix))

    @property
    def depth(self) -> int:
        """How many layers before each layer its prediction reads."""
        return (self.predict_matrix.shape[2] // self.predict_matrix.shape[3] - 1) // 2

    def to_bytes(self) -> bytes:
        arrays = (self.steps, self.mean, self.decode_matrix, self.predict_matrix)
        return struct.pack("<B", self.depth) + b"".join(a.astype("<f4").tobytes() for a in arrays)


@dataclass(slots=True, frozen=True)
class Transform:
    """The per-model transform, shared by every transform-coded level of one tables file (FORMAT.md §8.1).

    ``mean`` (L, 2, H*D) and ``decode_matrix`` (L, 2, H*D, H*D) float32; ``inv_freq`` (D/2,) float32: the
    rotary frequencies of the keys (pairs (i, i + D/2)); ``steps`` maps level id -> (L, 2, W) float32 step > 0
    per coefficient.
    """

    mean: np.ndarray
    decode_matrix: np.ndarray
    inv_freq: np.ndarray
    num_sinks: int
    steps: dict[int, np.ndarray]
    probe: Probe | None = None
    """The token-adaptive level's encoder probe (token_classes.py); stored after the record (FORMAT.md §8.2)."""
    cross_layer: dict[int, CrossLayer] = field(default_factory=dict)
    """Level id -> the cross-layer level's own record, stored after the probe (FORMAT.md §8.3); its steps are there,
    not in ``steps``."""
    encode_matrix: np.ndarray = field(init=False, repr=False, compare=False)
    """Derived, not stored: the inverse of ``decode_matrix`` (f64 inversion). Encoders need not agree bit for bit."""
    device_copies: dict = field(init=False, repr=False, compare=False, default_factory=dict)
    """Memo of (mean, decode_matrix) on a GPU, keyed by device (``on_device``): uploaded once per model."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "encode_matrix", _inverse(self.decode_matrix))

    def to_bytes(self) -> bytes:
        parts = [_HEAD.pack(TRANSFORM_MAGIC, len(self.steps), 0, self.num_sinks)]
        for level in sorted(self.steps):
            parts += [struct.pack("<B", level), self.steps[level].astype("<f4").tobytes()]
        parts += [a.astype("<f4").tobytes() for a in (self.inv_freq, self.mean, self.decode_matrix)]
        if self.probe is not None:
            parts.append(self.probe.to_bytes())
        if self.cross_layer:
            parts.append(_CROSS_HEAD.pack(CROSS_LAYER_MAGIC, len(self.cross_layer), 0))
            for level in sorted(self.cross_layer):
                parts += [struct.pack("<B", level), self.cross_layer[level].to_bytes()]
        return b"".join(parts)

    def has_level(self, level: int) -> bool:
        return level in self.steps or level in self.cross_layer

    def basis(self, level: int) -> tuple[np.ndarray, np.ndarray]:
        """(steps (L, 2, W), decode matrix (L, 2, W, W)) that code ``level``'s coefficients."""
        if level in self.cross_layer:
            return self.cross_layer[level].steps, self.cross_layer[level].decode_matrix
        return self.steps[level], self.decode_matrix


def _inverse(matrix: np.ndarray) -> np.ndarray:
    """float32 inverse of each decode matrix, inverted in float64 (encoders need not agree bit for bit)."""
    return np.linalg.inv(matrix.astype(np.float64)).astype(np.float32)


def read_transform(take, layout: KVLayout) -> Transform:
    """Parse a transform record with ``take(size, field) -> bytes`` (a bounds-checked reader of untrusted bytes)."""
    magic, num_levels, reserved, num_sinks = _HEAD.unpack(take(_HEAD.size, "transform"))
    if magic != TRANSFORM_MAGIC or reserved or not 1 <= num_levels <= 255:
        raise FormatError("transform", 0, (magic, num_levels, reserved), "not a transform record")
    layers, width, dim = layout.num_layers, layout.num_kv_heads * layout.head_dim, layout.head_dim
    if dim % 2:
        raise FormatError("transform", 0, dim, "rotary pairs need an even head_dim")
    steps = {}
    for _ in range(num_levels):
        (level,) = struct.unpack("<B", take(1, "transform.level"))
        steps[level] = _steps(take, (layers, 2, width), "transform.steps")
    inv_freq = _floats(take, (dim // 2,), "transform.inv_freq")
    mean = _floats(take, (layers, 2, width), "transform.mean")
    matrix = _decode_matrix(take, (layers, 2, width, width), "transform.decode_matrix")
    return Transform(mean, matrix, inv_freq, int(num_sinks), steps)


def read_cross_layer(take, layout: KVLayout) -> dict[int, CrossLayer]:
    """Parse a cross-layer record (FORMAT.md §8.3) with ``take(size, field) -> bytes``: level id -> CrossLayer."""
    magic, num_levels, reserved = _CROSS_HEAD.unpack(take(_CROSS_HEAD.size, "cross_layer"))
    if magic != CROSS_LAYER_MAGIC or reserved or not 1 <= num_levels <= 255:
        raise FormatError("cross_layer", 0, (magic, num_levels, reserved), "not a cross-layer record")
    layers, width = layout.num_layers, layout.num_kv_heads * layout.head_dim
    out = {}
    for _ in range(num_levels):
        level, depth = struct.unpack("<BB", take(2, "cross_layer.level"))
        if not 1 <= depth <= MAX_DEPTH:
            raise FormatError("cross_layer.depth", 0, depth, f"depth must be 1..{MAX_DEPTH}")
        steps = _steps(take, (layers, 2, width), "cross_layer.steps")
        mean = _floats(take, (layers, 2, width), "cross_layer.mean")
        matrix = _decode_matrix(take, (layers, 2, width, width), "cross_layer.decode_matrix")
        predict = _floats(take, (layers, 2, (2 * depth + 1) * width, width), "cross_layer.predict_matrix")
        out[level] = CrossLayer(steps, mean, matrix, predict)
    return out


def _floats(take, shape: tuple[int, ...], name: str) -> np.ndarray:
    values = np.frombuffer(take(4 * int(np.prod(shape)), name), "<f4").astype(np.float32)
    if not np.isfinite(values).all():
        raise FormatError(name, 0, "non-finite", "transform values must be finite")
    return values.reshape(shape)


def _steps(take, shape: tuple[int, ...], name: str) -> np.ndarray:
    steps = _floats(take, shape, name)
    if not (steps > 0).all():
        raise FormatError(name, 0, float(steps.min()), "steps must be > 0")
    return steps


def _decode_matrix(take, shape: tuple[int, ...], name: str) -> np.ndarray:
    matrix = _floats(take, shape, name)
    if np.linalg.cond(matrix.astype(np.float64)).max() > 1e6:
        raise FormatError(name, 0, "singular", "decode matrices must be well conditioned")
    return matrix


def rotary(inv_freq: np.ndarray, token_start: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, D/2) float32 of angle ``(token_start + t) * inv_freq[i]``, computed in float64."""
    positions = torch.arange(token_start, token_start + num_tokens, dtype=torch.float64)
    angle = positions[:, None] * torch.from_numpy(inv_freq.astype(np.float64))[None, :]
    return angle.cos().float(), angle.sin().float()


def _rotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of ``keys`` (..., T, D) by ``sign`` times their angle."""
    half = keys.shape[-1] // 2
    a, b = keys[..., :half], keys[..., half:]
    return torch.cat([a * cos - sign * b * sin, b * cos + sign * a * sin], -1)


def to_vectors(kv: torch.Tensor, inv_freq: np.ndarray, token_start: int) -> torch.Tensor:
    """(L, 2, H, T, D) KV -> (L, 2, T, H*D) float32 with the keys' rotation undone."""
    x = kv.detach().to("cpu", torch.float32)
    cos, sin = rotary(inv_freq, token_start, x.shape[3])
    x = torch.stack([_rotate(x[:, 0], cos, sin, -1.0), x[:, 1]], 1)
    layers, _, heads, tokens, dim = x.shape
    return x.permute(0, 1, 3, 2, 4).reshape(layers, 2, tokens, heads * dim)


def from_vectors(x: torch.Tensor, layout: KVLayout, inv_freq: np.ndarray, token_start: int) -> torch.Tensor:
    """Inverse of ``to_vectors``: (L, 2, T, H*D) float32 -> (L, 2, H, T, D) float32 on x's device, keys rotated
    back."""
    layers, _, tokens, _ = x.shape
    x = x.reshape(layers, 2, tokens, layout.num_kv_heads, layout.head_dim).permute(0, 1, 3, 2, 4)
    cos, sin = (a.to(x.device) for a in rotary(inv_freq, token_start, tokens))
    return torch.stack([_rotate(x[:, 0], cos, sin, 1.0), x[:, 1]], 1).contiguous()


def coefficients(x: torch.Tensor, transform: Transform) -> torch.Tensor:
    """(L, 2, T, W) vectors -> (L, 2, T, W) coefficients ``(x - mean) @ encode_matrix``."""
    return (x - torch.from_numpy(transform.mean)[:, :, None]) @ torch.from_numpy(transform.encode_matrix)


def quantize(
    kv: torch.Tensor, transform: Transform, level: int, token_start: int, adaptive: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Symbols (L, 2, H, T, D) int32, the sorted token indices that must travel raw (FORMAT.md §5.5) and, for
    the token-adaptive level (``adaptive``, needs ``transform.probe``), the (L, T) classes (§5.6); else None."""
    x = to_vectors(kv, transform.inv_freq, token_start)
    step = torch.from_numpy(transform.steps[level])[:, :, None]
    coefs = coefficients(x, transform)
    classes = None
    if adaptive:
        assert transform.probe is not None
        wanted = token_classes.classes_of(token_classes.scores(x[:, 0], transform.probe), transform.probe.reference)
        # a token no class holds (16) takes the coarsest, overflows it and so travels raw below
        classes = np.minimum(np.maximum(wanted, _fitting_class(coefs, step)), len(MULTIPLIERS) - 1)
        step = step * torch.from_numpy(MULTIPLIERS[classes])[:, None, :, None]
    q = torch.round(coefs / step)  # round half to even, as rint
    sinks = np.arange(x.shape[2]) + token_start < transform.num_sinks
    escaped = np.flatnonzero(sinks | (q.abs() > MAX_COEFFICIENT).any(dim=(0, 1, 3)).numpy())
    q[:, :, escaped] = 0
    if classes is not None:
        classes[:, escaped] = NEUTRAL
    layers, _, tokens, _ = q.shape
    symbols = (q.to(torch.int32) + MAX_COEFFICIENT).reshape(layers, 2, tokens, -1, kv.shape[4])
    return symbols.permute(0, 1, 3, 2, 4).contiguous().numpy(), escaped.astype(np.uint16), classes


def _fitting_class(coefs: torch.Tensor, step: torch.Tensor) -> np.ndarray:
    """(L, T) smallest class whose steps hold every K and V coefficient of that (layer, token) within 127 steps;
    16 where none does (the token then travels raw). Fitting only gets easier as the class grows, so a binary
    search per (layer, token) needs 5 passes over the coefficients, not one per class."""
    multipliers = torch.from_numpy(MULTIPLIERS)
    layers, _, tokens, _ = coefs.shape
    low = torch.zeros(layers, tokens, dtype=torch.int64)  # the answer lies in [low, high]
    high = torch.full((layers, tokens), len(MULTIPLIERS), dtype=torch.int64)
    while bool((low < high).any()):
        middle = (low + high) // 2  # < 16 wherever low < high
        multiplier = multipliers[middle.clamp(max=len(MULTIPLIERS) - 1)][:, None, :, None]
        fits = (torch.round(coefs / (step * multiplier)).abs() <= MAX_COEFFICIENT).all(dim=(1, 3))
        open_ = low < high
        high = torch.where(open_ & fits, middle, high)
        low = torch.where(open_ & ~fits, middle + 1, low)
    return low.numpy()


def dequantize(
    symbols: np.ndarray | torch.Tensor, transform: Transform, level: int, layout: KVLayout, token_start: int,
    classes: np.ndarray | None = None, device: torch.device | str = "cpu",
):  # fmt: skip
    """float32 KV (L, 2, H, T, D) of symbols (L, 2, H, T, D): ``(s - 127) * step [* MULTIPLIERS[class]] @
    decode_matrix + mean``, the class of (layer, token) from ``classes`` (L, T) on the token-adaptive level.

    Runs on ``device`` (the symbols may already be there). On a GPU the product runs in float64: a TF32 setting
    would otherwise make it coarser than the f32 FORMAT.md §5.5 asks for."""
    device = torch.device(device)
    q = torch.as_tensor(symbols).to(device, torch.float32) - MAX_COEFFICIENT
    layers, _, heads, tokens, dim = q.shape
    y = q.permute(0, 1, 3, 2, 4).reshape(layers, 2, tokens, heads * dim)
    y = y * torch.from_numpy(transform.steps[level]).to(device)[:, :, None]
    if classes is not None:
        y = y * torch.from_numpy(MULTIPLIERS[classes]).to(device)[:, None, :, None]
    mean, matrix = on_device(transform.device_copies, (transform.mean, transform.decode_matrix), device)
    if device.type == "cpu":
        x = y @ matrix + mean[:, :, None]
    else:
        x = (y.double() @ matrix.double()).float() + mean[:, :, None]
    return from_vectors(x, layout, transform.inv_freq, token_start)


def on_device(
    memo: dict, arrays: tuple[np.ndarray, ...], device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, ...]:
    """A record's float32 ``arrays`` as tensors on ``device``: views on the CPU; elsewhere ``dtype`` copies, uploaded
    once and kept in ``memo`` (the record's ``device_copies``) by device."""
    if device.type == "cpu":
        return tuple(torch.from_numpy(a) for a in arrays)
    key = str(device)
    if key not in memo:
        memo[key] = tuple(torch.from_numpy(a).to(device, dtype) for a in arrays)
    return memo[key]


def error_bound(transform: Transform, level: int) -> np.ndarray:
    """(L, 2, H*D) largest |x - x'| per channel before output rounding, for tokens not sent raw (times the
    token's ``MULTIPLIERS[class]`` on the token-adaptive level). The cross-layer level codes in closed loop (its
    encoder predicts from what the decoder will have), so its error is its own coefficients' alone, in its basis.

    Coefficient j is off by at most step_j / 2, so channel i of ``x`` by ``sum_j |M[j, i]| step_j / 2``; the
    rotation of keys mixes channel i with its pair i +- D/2, so a key channel's bound is the sum of the two.
    """
    steps, matrix = transform.basis(level)
    matrix = np.abs(matrix.astype(np.float64))  # (L, 2, W coefficients, W channels)
    bound = (matrix * steps[:, :, :, None]).sum(axis=2) / 2
    dim = transform.inv_freq.size * 2
    keys = bound[:, 0].reshape(bound.shape[0], -1, dim)
    bound[:, 0] = (keys + np.roll(keys, dim // 2, axis=-1)).reshape(bound.shape[0], -1)
    return bound
