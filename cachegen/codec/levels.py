"""What each coded level does (FORMAT.md §5): bins per (layer, K|V) for the quantized levels, or lossless, or the
transform-coded levels' target rates.

A schedule has three key groups split at round(L*10/32) and round(L*20/32) (CacheGen's layer groups stretched to
the model's depth) and two value groups, layers [0, 2) and the rest. "default" and "small" share bins out by
each (layer, K|V) group's measured sensitivity when calibrated with the model (``mean_bins``;
cachegen/codec/sensitivity.py); the fixed schedules below are their fallback. "pca3" and "pca2" code a per-model
transform's coefficients instead (cachegen/codec/transform.py); "pca2x" those of what a prediction from the
layers before misses (cachegen/codec/cross_layer.py). Measured on real SmolLM2 KV (an essay and pydoc,
teacher-forced over 256 tokens, tables, sensitivity and transform calibrated on other text; README has more):

    level / schedule (K / V bins)       2K tokens: bits/value  top-1   KL      8K tokens: bits  top-1  KL
    32,16,16 / 32,16 (CacheGen)         2.50        0.897   0.042
    sensitivity, mean 16 ("default")    2.22        0.931   0.040                2.36   0.898  0.070
    sensitivity, mean 12 ("small")      1.77        0.869   0.070                1.91   0.859  0.156
    32 / 32          ("q32")            3.45        0.965   0.010                3.65   0.941  0.034
    256 / 256        ("q8")             6.62        0.980   0.002                6.71   0.990  0.002
    transform, 2.6 bits target ("pca3") 2.87        0.984   0.004                2.85   0.973  0.012
    transform, 1.75 bits target ("pca2") 1.98       0.953   0.012                1.96   0.939  0.038
    + token classes, 1.75 target ("pca2t") 1.90   0.951   0.0095
    + token classes, 1.82 target ("pca2t")                               1.84   0.927  0.056
    + prediction from the layers before, 1.50 target ("pca2x")
                                        1.98        0.982   0.0035               1.96   0.965  0.0076

Tried and lost: per-channel key normalization before the token max (3.1 bits/value, top-1 0.88: the outlier
channels are the ones attention needs precise), fixed per-channel steps without token scales (0.82 at 3.0),
and, for the transform levels (prototype, 2K tokens): plain channels without PCA (KL 0.024 at 2.30 bits against
0.016 at 1.88 with PCA), PCA without the metric (KL 0.0127 at 2.04 bits against 0.0113 at 1.97 with it), a
dead-zone quantizer (KL 0.020 at 1.86 bits against 0.013 at 1.93) and step exponents 0.35 and 0.5 (0.65 won).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cachegen.spec import LEVEL_BY_NAME


@dataclass(slots=True, frozen=True)
class Scheme:
    """``key_bins`` per key layer group, ``value_bins`` for layers [0, 2) then the rest; empty = lossless.

    ``mean_bins`` > 0: with a measured sensitivity per (layer, K|V) (``cachegen calibrate`` measures it), bins
    follow it instead: ``mean_bins * sqrt(s / mean)`` where the mean is of sqrt(s), so that each group's share
    of the error is what high-rate theory calls optimal (error ~ s * step^2, bits ~ -log2 step). The static
    schedule remains for tables calibrated without a model (tests, golden frames).
    """

    name: str
    key_bins: tuple[int, int, int] = (0, 0, 0)
    value_bins: tuple[int, int] = (0, 0)
    mean_bins: int = 0
    target_bits: float = 0.0
    """> 0: a transform-coded level (FORMAT.md §5.5) whose steps calibration sets for this many bits/value of
    calibration KV (new text codes ~0.25 bits/value above it: its tables fit it less well, sinks go raw)."""
    range_margin: float = 1.0
    """Transform levels: steps stay coarse enough for this many times the largest calibration coefficient to fit
    127 steps (tokens beyond travel raw), but never coarser than the next coarser level's. Measured: 0.8 suits
    pca2 (1.5 cost it 35% more KL at equal bits), while pca3's finer steps need 1.2 (at 0.8 so many tokens went
    raw that it took 5.6 bits/value); without the cap pca3 ended coarser than pca2 on its widest coefficients."""

    token_adaptive: bool = False
    """Transform levels: each (layer, token) gets a step class by the attention it is likely to receive, and the
    level's tables are a scale ladder (FORMAT.md §5.6, cachegen/codec/token_classes.py)."""
    cross_layer: bool = False
    """Transform levels: each layer's vectors are predicted from the previous layer's decoded ones and only the
    remainder is coded, in a basis and with steps of the level's own (FORMAT.md §5.7, codec/cross_layer.py)."""

    @property
    def is_transform(self) -> bool:
        return self.target_bits > 0

    @property
    def is_lossless(self) -> bool:
        return self.key_bins == (0, 0, 0) and not self.is_transform

    def bins(self, num_layers: int, sensitivity: np.ndarray | None = None) -> np.ndarray:
        """(layers, 2) uint16 bins; every entry even and in [4, 256] for quantized levels, 0 for lossless."""
        if self.is_transform:
            return np.full((num_layers, 2), 256, np.uint16)  # symbols 0..254: q + 127 (transform.py)
        if self.mean_bins and sensitivity is not None and not self.is_lossless:
            root = np.sqrt(np.maximum(np.asarray(sensitivity, np.float64), 1e-12))
            return np.clip(2 * np.rint(self.mean_bins / 2 * root / root.mean()), 4, 256).astype(np.uint16)
        first, second = round(num_layers * 10 / 32), round(num_layers * 20 / 32)
        out = np.zeros((num_layers, 2), np.uint16)
        for layer in range(num_layers):
            group = 0 if layer < first else 1 if layer < second else 2
            out[layer, 0] = self.key_bins[group]
            out[layer, 1] = self.value_bins[0 if layer < 2 else 1]
        return out


SCHEMES: tuple[Scheme, ...] = (
    Scheme("lossless"),
    Scheme("q8", (256, 256, 256), (256, 256)),
    Scheme("q32", (32, 32, 32), (32, 32)),
    Scheme("default", (24, 24, 24), (12, 12), mean_bins=16),
    Scheme("small", (24, 24, 24), (8, 8), mean_bins=12),
    Scheme("pca3", target_bits=2.6, range_margin=1.2),
    Scheme("pca2", target_bits=1.70, range_margin=0.8),
    Scheme("pca2t", target_bits=1.82, range_margin=0.8, token_adaptive=True),
    Scheme("pca2x", target_bits=1.50, range_margin=1.2, cross_layer=True),
)
SCHEME_BY_LEVEL: dict[int, Scheme] = {LEVEL_BY_NAME[s.name].id: s for s in SCHEMES}
