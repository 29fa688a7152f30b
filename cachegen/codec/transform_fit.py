"""Fit the transform of the transform-coded levels to a model (``cachegen calibrate``; needs HF transformers).

Three measured steps, each kept because it won on real SmolLM2 KV (README's codec table, levels.py):
1. A metric per (layer, K|V): a key error costs through the queries that read it (their mean energy per
   channel, rotary pairs averaged), a value error through the output projection (``W_o^T W_o`` of the query
   heads sharing it). PCA of ``M^1/2 (x - mean)`` then puts the directions that matter first, and the decode
   matrix is ``U^T M^-1/2``.
2. A sensitivity per (layer, K|V): the KL of next-token distributions per unit of noise variance added to that
   group's coefficients alone (60 short forward passes).
3. Steps ``c * sensitivity^-ALPHA`` per (layer, K|V), raised for the few coefficients whose range would not
   fit 127 steps, with ``c`` bisected so the calibration KV codes at each level's target bits/value (empirical entropy of its symbols; the raw sinks add ~0.03 bits/value at 2K tokens).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from cachegen.codec import token_classes
from cachegen.codec.levels import SCHEME_BY_LEVEL
from cachegen.codec.token_classes import MULTIPLIERS, SHIFTS, Probe
from cachegen.codec.transform import MAX_COEFFICIENT, Transform, _rotate, coefficients, from_vectors, to_vectors
from cachegen.spec import KVLayout

log = logging.getLogger(__name__)

NUM_SINKS = 4
"""Positions [0, 4) of a context travel raw: attention sinks, 10-100x the norm of other tokens."""
ALPHA = 0.65
"""Step exponent. High-rate theory says 0.5; 0.65 gave the same KL at ~10% fewer bits on real KV (measured)."""
NOISE_SHARE = 0.1
"""Probe noise as a share of a group's coefficient RMS: small enough that the KL grows with its square."""


def model_metric(model, queries: dict[int, torch.Tensor], layout: KVLayout) -> torch.Tensor:
    """(L, 2, W, W) float64 metric per (layer, K|V), each normalized to mean eigenvalue 1; W = H * D."""
    heads, dim = layout.num_kv_heads, layout.head_dim
    group = model.config.num_attention_heads // heads
    width = heads * dim
    out = torch.zeros(layout.num_layers, 2, width, width, dtype=torch.float64)
    for layer in range(layout.num_layers):
        q = queries[layer][NUM_SINKS:].double().reshape(-1, heads, group, dim)
        energy = q.pow(2).mean(dim=(0, 2))  # (H, D): a query head group reads one KV head
        energy = 0.5 * (energy + energy.roll(dim // 2, -1))  # rotary pairs turn together
        out[layer, 0] = torch.diag(energy.reshape(-1))
        w_o = model.model.layers[layer].self_attn.o_proj.weight.detach().double().reshape(-1, heads, group, dim)
        for head in range(heads):
            part = w_o[:, head].reshape(-1, group, dim)
            out[layer, 1, head * dim : (head + 1) * dim, head * dim : (head + 1) * dim] = torch.einsum(
                "ogi,ogj->ij", part, part
            )
    trace = torch.diagonal(out, dim1=-2, dim2=-1).mean(-1)
    return out / trace[..., None, None]


def _sqrt_pair(metric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(metric)
    values = values.clamp_min(1e-6 * values.amax(-1, keepdim=True))
    root = vectors @ torch.diag_embed(values.sqrt()) @ vectors.transpose(-1, -2)
    inverse_root = vectors @ torch.diag_embed(values.rsqrt()) @ vectors.transpose(-1, -2)
    return root, inverse_root


def fit_basis(vectors: torch.Tensor, metric: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mean (L, 2, W), decode matrix (L, 2, W, W)) from calibration vectors (L, 2, N, W), sinks excluded."""
    x = vectors.double()
    mean = x.mean(2, keepdim=True)
    root, inverse_root = _sqrt_pair(metric)
    weighted = (x - mean) @ root
    _, basis = torch.linalg.eigh(weighted.transpose(-1, -2) @ weighted / x.shape[2])
    basis = basis.flip(-1)  # largest variance first
    decode_matrix = basis.transpose(-1, -2) @ inverse_root
    return mean[:, :, 0].float().numpy(), decode_matrix.float().numpy()


def noise_sensitivity(model, transform: Transform, layout: KVLayout, kv: torch.Tensor, continuation) -> np.ndarray:
    """(L, 2) KL per unit coefficient noise variance, each (layer, K|V) perturbed alone."""
    from cachegen.codec.sensitivity import kl_per_group

    vectors = to_vectors(kv, transform.inv_freq, 0)
    coefs = coefficients(vectors, transform)
    decode = torch.from_numpy(transform.decode_matrix)
    mean = torch.from_numpy(transform.mean)
    generator = torch.Generator().manual_seed(0)
    variance = np.zeros((layout.num_layers, 2))

    def perturbed(layer: int, kind: int) -> torch.Tensor:
        part = coefs[layer, kind, NUM_SINKS:]
        sigma = NOISE_SHARE * float(part.pow(2).mean().sqrt())
        variance[layer, kind] = sigma**2
        noisy = part + sigma * torch.randn(part.shape, generator=generator)
        probe = vectors.clone()
        probe[layer, kind, NUM_SINKS:] = noisy @ decode[layer, kind] + mean[layer, kind]
        return from_vectors(probe, layout, transform.inv_freq, 0).to(kv.dtype)

    return np.maximum(kl_per_group(model, kv, continuation, perturbed) / variance, 1e-9)


def _entropy_bits(coefs: torch.Tensor, step: torch.Tensor) -> float:
    """Empirical entropy (bits) of rint(coefs / step) per (layer, K|V, coefficient), clamped like the encoder."""
    q = torch.clamp(torch.round(coefs / step[:, :, None]), -MAX_COEFFICIENT, MAX_COEFFICIENT)
    alphabet = 2 * MAX_COEFFICIENT + 1
    rows = q.long().permute(0, 1, 3, 2).reshape(-1, q.shape[2]) + MAX_COEFFICIENT
    base = torch.arange(rows.shape[0])[:, None] * alphabet
    counts = torch.bincount((rows + base).ravel(), minlength=rows.shape[0] * alphabet).double()
    p = counts[counts > 0] / q.shape[2]
    return float(-(p * p.log2()).sum() * q.shape[2])


def fit_steps(
    coefs: torch.Tensor, sensitivity: np.ndarray, bits_per_value: float, margin: float = 1.0, cap=None
) -> np.ndarray:
    """(L, 2, W) steps for coefficients (L, 2, N, W): ``c * s^-ALPHA`` per (layer, K|V), raised where needed so
    that the largest calibration coefficient times ``margin`` still fits 127 steps (else whole tokens would
    travel raw), never above ``cap`` (a coarser level's steps), with ``c`` bisected in log space to code
    ``coefs`` at ``bits_per_value``. The rate is measured on every other token: half the time (the bisection took
    over a minute per level at 3 x 4,096 calibration tokens), the same answer to well under 0.01 bits/value."""
    subset = coefs[:, :, ::2]
    return _bisected_steps(
        coefs, sensitivity, bits_per_value, margin, cap, lambda step: _entropy_bits(subset, step) / subset.numel(), 24
    )


def _bisected_steps(coefs, sensitivity, bits_per_value: float, margin: float, cap, rate, iterations: int) -> np.ndarray:
    """``c * s^-ALPHA`` steps, floored by the range and capped, with ``c`` bisected in log space until
    ``rate(steps)`` (bits/value) meets ``bits_per_value``."""
    shape = torch.from_numpy(sensitivity**-ALPHA).float()[:, :, None]
    floor = coefs.abs().amax(dim=2) * margin / MAX_COEFFICIENT  # (L, 2, W)
    ceiling = torch.from_numpy(cap) if cap is not None else torch.full_like(floor, math.inf)

    def steps(log_c: float) -> torch.Tensor:
        return torch.minimum(torch.maximum(math.exp(log_c) * shape, floor), ceiling)

    low, high = math.log(1e-4), math.log(1e3)
    for _ in range(iterations):
        middle = (low + high) / 2
        low, high = (middle, high) if rate(steps(middle)) > bits_per_value else (low, middle)
    return steps(high).numpy()


PROBE_QUERIES = 64
"""Calibration queries per query head in the probe (token_classes.py): 32 and 128 scored tokens as well at 2K."""
PROBE_DISTANCE = 2048
"""Query-key distances of the probe are drawn from [1, 2048): retrieval reads the whole context, not its end."""


def fit_probe(model, samples, layout: KVLayout, inv_freq: np.ndarray) -> Probe:
    """The token-adaptive level's probe from calibration queries (q_proj outputs, before RoPE) and keys."""
    heads, dim = layout.num_kv_heads, layout.head_dim
    group = model.config.num_attention_heads // heads
    scaling = float(getattr(model.model.layers[0].self_attn, "scaling", dim**-0.5))
    generator = torch.Generator().manual_seed(0)
    kv, queries = samples[0]
    keys = to_vectors(kv, inv_freq, 0)[:, 0].reshape(layout.num_layers, -1, heads, dim)  # (L, T, H, D), sinks in
    probes, norms = [], []
    for layer in range(layout.num_layers):
        q = queries[layer].float().reshape(-1, heads * group, dim)
        rows = torch.randint(NUM_SINKS, q.shape[0], (PROBE_QUERIES,), generator=generator)
        distance = torch.randint(1, PROBE_DISTANCE, (PROBE_QUERIES,), generator=generator).double()
        angle = distance[:, None] * torch.from_numpy(inv_freq.astype(np.float64))[None]
        # a query `distance` after the key reads it through R(distance): turn the query, keep the key de-rotated
        turned = _rotate(q[rows].permute(1, 0, 2), angle.cos().float(), angle.sin().float(), 1.0) * scaling
        turned = turned.reshape(heads, group * PROBE_QUERIES, dim)  # (H, P, D): a KV head's query heads together
        norms.append(torch.logsumexp(turned @ keys[layer].permute(1, 2, 0), -1))  # (H, P) over the whole context
        probes.append(turned)
    unscaled = Probe(torch.stack(probes).numpy(), torch.stack(norms).numpy(), np.ones(layout.num_layers, np.float32))
    vectors = torch.cat([to_vectors(kv, inv_freq, 0)[:, 0, NUM_SINKS:] for kv, _ in samples], 1)
    reference = token_classes.scores(vectors, unscaled).median(dim=1).values.numpy().astype(np.float32)
    return Probe(unscaled.queries, unscaled.log_norm, np.maximum(reference, 1e-30))


def fit_adaptive_steps(coefs: torch.Tensor, keys: torch.Tensor, probe: Probe, sensitivity: np.ndarray,
                       bits_per_value: float, margin: float) -> np.ndarray:  # fmt: skip
    """``fit_steps`` for the token-adaptive level: the rate counts each token at its class (the probe's, raised
    to fit 127 steps as the encoder does) and each symbol in its ladder row, as the coder will."""
    importance = torch.from_numpy(token_classes.classes_of(token_classes.scores(keys, probe), probe.reference))
    mean_abs = coefs.abs().mean(2).numpy()
    multipliers, shifts = torch.from_numpy(MULTIPLIERS), torch.from_numpy(SHIFTS.astype(np.int64))
    alphabet = 2 * MAX_COEFFICIENT + 1

    def bits(step: torch.Tensor) -> float:
        ratio = (coefs.abs() / step[:, :, None]).amax(dim=(1, 3))  # (L, N)
        fitting = torch.ceil(2 * torch.log2(ratio.clamp_min(1e-12) / (MAX_COEFFICIENT + 0.5))) + token_classes.NEUTRAL
        v = torch.maximum(importance, fitting.long()).clamp(0, len(MULTIPLIERS) - 1)
        q = torch.clamp(torch.round(coefs / (step[:, :, None] * multipliers[v][:, None, :, None])), -127, 127)
        rows = torch.from_numpy(token_classes.ladder_map(mean_abs, step.numpy()).astype(np.int64))
        ids = rows[:, :, None, :] + shifts[v][:, None, :, None]
        flat = (ids * alphabet + q.long() + MAX_COEFFICIENT).ravel()
        counts = torch.bincount(flat, minlength=token_classes.LADDER_TABLES * alphabet).double().reshape(-1, alphabet)
        p = counts / counts.sum(1, keepdim=True).clamp_min(1)
        return float(-(counts * torch.where(counts > 0, p.log2(), 0)).sum()) / coefs.numel()

    return _bisected_steps(coefs, sensitivity, bits_per_value, margin, None, bits, 22)


def fit_transform(model, samples: list[tuple[torch.Tensor, dict[int, torch.Tensor]]], layout: KVLayout, probe):
    """The transform for every transform-coded level, from ``samples`` of (KV, q_proj outputs per layer).

    ``probe`` is (context KV, continuation ids) for the sensitivity measure. Levels' targets: ``levels.py``.
    """
    from cachegen.codec.cross_layer_fit import fit_cross_layer  # it builds on this module's primitives

    inv_freq = model.model.rotary_emb.inv_freq.detach().float().numpy()
    vectors = torch.cat([to_vectors(kv, inv_freq, 0)[:, :, NUM_SINKS:] for kv, _ in samples], 2)
    metric = model_metric(model, samples[0][1], layout)
    mean, decode_matrix = fit_basis(vectors, metric)
    unit = Transform(mean, decode_matrix, inv_freq, NUM_SINKS, {})
    log.info("measuring transform sensitivity groups=%d", layout.num_layers * 2)
    sensitivity = noise_sensitivity(model, unit, layout, *probe)
    coefs = coefficients(vectors, unit)
    steps: dict[int, np.ndarray] = {}
    cap = None  # coarsest level first: a finer level never gets a coarser step on any coefficient
    for level, scheme in sorted(SCHEME_BY_LEVEL.items(), key=lambda item: item[1].target_bits):
        if scheme.is_transform and not (scheme.token_adaptive or scheme.cross_layer):
            steps[level] = cap = fit_steps(coefs, sensitivity, scheme.target_bits, scheme.range_margin, cap)
    probe = fit_probe(model, samples, layout, inv_freq)
    keys = vectors[:, 0]
    for level, scheme in SCHEME_BY_LEVEL.items():
        if scheme.token_adaptive:  # its steps are a per-token scale apart from the others': no cap between them
            log.info("fitting token-adaptive steps level=%d", level)
            steps[level] = fit_adaptive_steps(coefs[:, :, ::2], keys[:, ::2], probe, sensitivity,
                                              scheme.target_bits, scheme.range_margin)  # fmt: skip
    cross_layer = {}
    for level, scheme in SCHEME_BY_LEVEL.items():
        if scheme.cross_layer:
            log.info("fitting cross-layer prediction level=%d", level)
            start = _step_scale(steps, sensitivity, scheme.target_bits)
            cross_layer[level] = fit_cross_layer(vectors, metric, sensitivity, scheme.target_bits,
                                                 scheme.range_margin, start)  # fmt: skip
    return Transform(mean, decode_matrix, inv_freq, NUM_SINKS, steps, probe, cross_layer)


def _step_scale(steps: dict[int, np.ndarray], sensitivity: np.ndarray, bits_per_value: float) -> float:
    """The ``c`` of ``c * s^-ALPHA`` that the fitted level nearest ``bits_per_value`` uses (median: most of its
    steps are not range floors): where a cross-layer fit starts its search."""
    nearest = min(steps, key=lambda level: abs(SCHEME_BY_LEVEL[level].target_bits - bits_per_value))
    return float(np.median(steps[nearest] / (sensitivity**-ALPHA)[:, :, None]))


def collect(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """KV (L, 2, H, T, D) of ``ids`` (1-D) and each layer's q_proj output (T, heads * D), from one forward pass."""
    queries: dict[int, torch.Tensor] = {}
    hooks = [
        layer.self_attn.q_proj.register_forward_hook(
            lambda _module, _inputs, output, index=index: queries.__setitem__(index, output[0].float())
        )
        for index, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            cache = model(ids[None], use_cache=True).past_key_values
    finally:
        for hook in hooks:
            hook.remove()
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]).contiguous()
    return kv, queries
