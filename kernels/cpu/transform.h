// The numerics of the transform-coded levels 6-9 (FORMAT.md §5.5-5.7, §8.1, §8.3) for the C++ frame reader: the
// records' matrix check, level 8's token classes, level 9's prediction down the layers and dequantization, as
// cachegen/codec/transform.py, token_classes.py and cross_layer.py. Header-only like codec.h, so the reader still
// builds from frame.cpp, tables_file.cpp and codec_cpu.cpp alone (Makefile, tests/unit/test_codec_kernels.py).
#pragma once
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <vector>

#include "cachegen/codec.h"

namespace cachegen {

constexpr int32_t kMaxCoefficient = 127;  // symbol = q + 127, q in [-127, 127]: alphabet 255 (FORMAT.md §5.5)
constexpr double kMaxCondition = 1e6;     // decode matrices' largest 2-norm condition number (FORMAT.md §8.1)

// Level 8 (FORMAT.md §5.6): a class v in 0..15 per (layer, token) scales its steps by mult[v] and moves its tables
// shift(v) rows along a 96-row ladder; table_map entries in [kLadderMapLow, kLadderMapHigh] keep every row in range.
constexpr uint32_t kTokenAdaptiveLevel = 8, kNumClasses = 16, kNeutralClass = 8, kLadderTables = 96;
constexpr uint32_t kLadderMapLow = 16, kLadderMapHigh = 81;
// mult[v] = 2^((v - 8) / 2) rounded to f32, as the bit patterns FORMAT.md §5.6 lists them.
constexpr uint32_t kClassMultiplierBits[kNumClasses] = {
    0x3D800000u, 0x3DB504F3u, 0x3E000000u, 0x3E3504F3u, 0x3E800000u, 0x3EB504F3u, 0x3F000000u, 0x3F3504F3u,
    0x3F800000u, 0x3FB504F3u, 0x40000000u, 0x403504F3u, 0x40800000u, 0x40B504F3u, 0x41000000u, 0x413504F3u};

inline float class_multiplier(uint32_t v) {
  float m;
  std::memcpy(&m, &kClassMultiplierBits[v], 4);
  return m;
}

// Half an octave finer step spreads a coefficient's symbols as the ladder row two up: +16 at v = 0, -14 at v = 15.
inline int8_t class_shift(uint32_t v) { return static_cast<int8_t>(2 * (int32_t(kNeutralClass) - int32_t(v))); }

// The TOKEN_CLASSES section (FORMAT.md §5.6): class (l, t) is nibble i = l T + t, the low one of byte i / 2 first.
// false when the size is not ceil(L T / 2) or an odd count's padding nibble is not 0; else `classes` (L, T).
inline bool unpack_token_classes(const uint8_t* data, uint64_t size, uint32_t layers, uint32_t num_tokens,
                                 std::vector<uint8_t>* classes) {
  const uint64_t count = uint64_t(layers) * num_tokens;
  if (size != (count + 1) / 2 || (count % 2 == 1 && (data[size - 1] >> 4) != 0)) return false;
  classes->resize(count);
  for (uint64_t i = 0; i < count; ++i) (*classes)[i] = (data[i / 2] >> (4 * (i % 2))) & 15u;
  return true;
}

constexpr uint32_t kMaxDepth = 8;  // most layers a cross-layer prediction reads (FORMAT.md §8.3)

// One level of a tables file's cross-layer record (FORMAT.md §8.3); W = heads * head_dim.
struct CrossLayerData {
  uint32_t depth = 1;                 // layers before each layer that its prediction reads
  std::vector<float> steps;           // (layers, 2, W)
  std::vector<float> mean;            // (layers, 2, W)
  std::vector<float> decode_matrix;   // (layers, 2, W, W): row c is the direction of coefficient c
  std::vector<float> predict_matrix;  // (layers, 2, (2 depth + 1) W, W): row j weighs feature j (§5.7)
};

// A tables file's transform record (FORMAT.md §8.1); W = heads * head_dim.
struct TransformData {
  uint32_t num_sinks = 0;
  std::map<uint32_t, std::vector<float>> steps;  // level -> (layers, 2, W); a repeated level: the last one counts,
                                                 // as in the Python reader (a dict)
  std::vector<float> inv_freq;                   // head_dim / 2 rotary frequencies of the keys
  std::vector<float> mean;                       // (layers, 2, W)
  std::vector<float> decode_matrix;              // (layers, 2, W, W): row c is the direction of coefficient c
  uint32_t probe_queries = 0;                    // P of the probe record (FORMAT.md §8.2), 0 without one; its
                                                 // values only serve encoders, so the reader checks and drops them
  std::map<uint32_t, CrossLayerData> cross_layer;  // level -> its record (FORMAT.md §8.3); a repeated level: the
                                                   // last one counts
  bool has_level(uint32_t level) const { return steps.count(level) != 0 || cross_layer.count(level) != 0; }
};

// One frame's shape as dequantize_transform needs it.
struct TransformShape {
  uint32_t layers, heads, head_dim, num_tokens, token_start;
  bool is_bf16;  // else f16 (the reader's output is 16-bit)
};

// Whether a width x width matrix has a 2-norm condition number <= kMaxCondition, as numpy's cond (the ratio of
// the largest to the smallest singular value; a singular matrix fails). One-sided Jacobi (Hestenes) in f64:
// rotate pairs of rows until all are orthogonal; the row norms are then the singular values, the small ones
// found to high relative accuracy, which a threshold on their ratio needs. O(width^3) per sweep: fine for a
// reference reader, not meant for the hot path.
inline bool is_well_conditioned(const float* matrix, uint32_t width) {
  std::vector<double> a(matrix, matrix + uint64_t(width) * width);
  const double tolerance = width * DBL_EPSILON;  // what rounding leaves of an exact zero in a dot product
  for (int sweep = 0, rotated = 1; rotated && sweep < 64; ++sweep) {
    rotated = 0;
    for (uint32_t i = 0; i < width; ++i) {
      for (uint32_t j = i + 1; j < width; ++j) {
        double *ri = &a[uint64_t(i) * width], *rj = &a[uint64_t(j) * width], alpha = 0, beta = 0, gamma = 0;
        for (uint32_t k = 0; k < width; ++k) alpha += ri[k] * ri[k], beta += rj[k] * rj[k], gamma += ri[k] * rj[k];
        if (std::abs(gamma) <= tolerance * std::sqrt(alpha * beta)) continue;
        rotated = 1;  // the rotation by t = tan(theta) that makes rows i and j orthogonal, the smaller root
        const double zeta = (beta - alpha) / (2 * gamma);
        const double t = std::copysign(1.0, zeta) / (std::abs(zeta) + std::sqrt(1 + zeta * zeta));
        const double c = 1 / std::sqrt(1 + t * t), s = c * t;
        for (uint32_t k = 0; k < width; ++k) {
          const double p = ri[k], q = rj[k];
          ri[k] = c * p - s * q;
          rj[k] = s * p + c * q;
        }
      }
    }
  }
  double lo = INFINITY, hi = 0;
  for (uint32_t i = 0; i < width; ++i) {
    double norm = 0;
    for (uint32_t k = 0; k < width; ++k) norm += a[uint64_t(i) * width + k] * a[uint64_t(i) * width + k];
    lo = std::min(lo, std::sqrt(norm));
    hi = std::max(hi, std::sqrt(norm));
  }
  return lo > 0 && hi / lo <= kMaxCondition;
}

// f16 of a float, round half to even, with subnormals, overflow to infinity and NaN kept NaN (what torch's
// .to(float16) does). Subnormals: adding 0.5 makes the float adder round at f16's subnormal spacing, 2^-24.
inline uint16_t float_to_f16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  const uint32_t sign = (bits >> 16) & 0x8000u, magnitude = bits & 0x7FFFFFFFu;
  if (magnitude >= 0x47800000u) return sign | (magnitude > 0x7F800000u ? 0x7E00u : 0x7C00u);  // >= 2^16: inf, NaN
  if (magnitude < 0x38800000u) {                                                               // < 2^-14: subnormal
    float shifted;
    std::memcpy(&shifted, &magnitude, 4);
    shifted += 0.5f;
    uint32_t out;
    std::memcpy(&out, &shifted, 4);
    return static_cast<uint16_t>(sign | (out - 0x3F000000u));
  }
  const uint32_t is_odd = (magnitude >> 13) & 1u;  // rebias 127 -> 15, then round the 13 dropped bits to even
  return static_cast<uint16_t>(sign | ((magnitude - (112u << 23) + 0xFFFu + is_odd) >> 13));
}

inline uint16_t round_to_16(float value, bool is_bf16) {
  if (!is_bf16) return float_to_f16(value);
  // codec.h's float_to_bf16 assumes a finite input; huge steps can overflow to inf - inf here, and torch keeps NaN.
  return std::isnan(value) ? 0x7FC0u : float_to_bf16(value);
}

// cos, sin (T, D/2) of angle (token_start + t) * inv_freq[i], the angle in f64 then rounded to f32, as
// transform.rotary; the rotation itself is f32 (FORMAT.md §5.5 step 3).
inline void rotary(const std::vector<float>& inv_freq, uint32_t token_start, uint32_t num_tokens,
                   std::vector<float>* cos_out, std::vector<float>* sin_out) {
  const size_t half = inv_freq.size();
  cos_out->resize(size_t(num_tokens) * half);
  sin_out->resize(size_t(num_tokens) * half);
  for (uint32_t t = 0; t < num_tokens; ++t) {
    for (size_t i = 0; i < half; ++i) {
      const double angle = double(uint64_t(token_start) + t) * double(inv_freq[i]);
      (*cos_out)[t * half + i] = static_cast<float>(std::cos(angle));
      (*sin_out)[t * half + i] = static_cast<float>(std::sin(angle));
    }
  }
}

// One token's vector x = y M + mean of (layer, K|V) lk (FORMAT.md §5.5 steps 1-2): y[c] = (f32(q) * step[c]) *
// mult as two f32 products (§5.6; mult = 1 on levels 6-7, exact), the sum of products in f64 (the format allows
// any order in f32 or wider), rounded once.
inline void token_vector(const TransformData& tx, const float* steps, uint32_t lk, const int32_t* q, float mult,
                         float* x, uint32_t width) {
  const float* mean = tx.mean.data() + uint64_t(lk) * width;
  const float* matrix = tx.decode_matrix.data() + uint64_t(lk) * width * width;
  std::vector<double> sum(mean, mean + width);
  for (uint32_t c = 0; c < width; ++c) {
    const float y = (static_cast<float>(q[c]) * steps[uint64_t(lk) * width + c]) * mult;
    if (y == 0) continue;  // most coefficients of a coarse level are 0: skip their row
    for (uint32_t i = 0; i < width; ++i) sum[i] += double(y) * matrix[uint64_t(c) * width + i];
  }
  for (uint32_t i = 0; i < width; ++i) x[i] = static_cast<float>(sum[i]);
}

// Symbols (L, 2, H, T, D) of a level-6/7/8 frame -> 16-bit values (L, 2, H, T, D), keys rotated back
// (FORMAT.md §5.5 steps 1-4 but the escapes, which the caller writes over these). `steps` is the level's (L, 2, W);
// `classes` (L, T) level 8's token classes (§5.6), nullptr on levels 6-7.
inline void dequantize_transform(const TransformShape& s, const TransformData& tx, const float* steps,
                                 const uint8_t* classes, const int32_t* symbols, uint16_t* out) {
  const uint32_t D = s.head_dim, half = D / 2, W = s.heads * D, T = s.num_tokens;
  std::vector<float> cos_t, sin_t, x(W);
  std::vector<int32_t> q(W);
  rotary(tx.inv_freq, s.token_start, T, &cos_t, &sin_t);
  for (uint32_t lk = 0; lk < s.layers * 2; ++lk) {
    for (uint32_t t = 0; t < T; ++t) {
      auto at = [&](uint32_t h, uint32_t d) { return ((uint64_t(lk) * s.heads + h) * T + t) * D + d; };
      for (uint32_t c = 0; c < W; ++c) q[c] = symbols[at(c / D, c % D)] - kMaxCoefficient;  // c = h D + j
      const float mult = classes ? class_multiplier(classes[uint64_t(lk / 2) * T + t]) : 1.0f;
      token_vector(tx, steps, lk, q.data(), mult, x.data(), W);
      for (uint32_t h = 0; h < s.heads; ++h) {
        const float* v = x.data() + h * D;
        if (lk % 2 == 1) {  // values: no rotary embedding
          for (uint32_t d = 0; d < D; ++d) out[at(h, d)] = round_to_16(v[d], s.is_bf16);
          continue;
        }
        for (uint32_t i = 0; i < half; ++i) {  // keys: pairs (i, i + D/2) rotated by the position's angle
          const float cs = cos_t[t * half + i], sn = sin_t[t * half + i];
          out[at(h, i)] = round_to_16(v[i] * cs - v[i + half] * sn, s.is_bf16);
          out[at(h, i + half)] = round_to_16(v[i + half] * cs + v[i] * sn, s.is_bf16);
        }
      }
    }
  }
}

// Feature j of (l, kv)'s prediction (FORMAT.md §5.7) from one token's decoded vectors x (L, 2, W): layer l - d's
// keys then values for d = 1..depth, then layer l's keys for values; 0 below layer 0 and for keys' last block.
inline float cross_layer_feature(const std::vector<float>& x, uint32_t depth, uint32_t l, uint32_t kv, uint32_t j,
                                 uint32_t W) {
  const uint32_t block = j / W, d = block / 2 + 1;
  if (block == 2 * depth) return kv == 1 ? x[(uint64_t(l) * 2) * W + j % W] : 0.0f;
  return l >= d ? x[(uint64_t(l - d) * 2 + block % 2) * W + j % W] : 0.0f;
}

// Symbols (L, 2, H, T, D) of a level-9 frame -> 16-bit values (L, 2, H, T, D), keys rotated back (FORMAT.md §5.7),
// the escapes left to the caller. Token by token, layer by layer, keys before values: x = mean + y M + f P in f64,
// each x kept as f32 for the features of what follows.
inline void dequantize_cross_layer(const TransformShape& s, const TransformData& tx, const CrossLayerData& cl,
                                   const int32_t* symbols, uint16_t* out) {
  const uint32_t D = s.head_dim, half = D / 2, W = s.heads * D, T = s.num_tokens, F = (2 * cl.depth + 1) * W;
  std::vector<float> cos_t, sin_t, x(uint64_t(s.layers) * 2 * W);
  std::vector<double> sum(W);
  rotary(tx.inv_freq, s.token_start, T, &cos_t, &sin_t);
  for (uint32_t t = 0; t < T; ++t) {
    for (uint64_t lk = 0; lk < uint64_t(s.layers) * 2; ++lk) {
      const uint32_t l = uint32_t(lk / 2), kv = uint32_t(lk % 2);
      auto at = [&](uint32_t h, uint32_t d) { return ((lk * s.heads + h) * T + t) * D + d; };
      const float* matrix = cl.decode_matrix.data() + lk * W * W;
      const float* predict = cl.predict_matrix.data() + lk * F * W;
      for (uint32_t i = 0; i < W; ++i) sum[i] = cl.mean[lk * W + i];
      for (uint32_t c = 0; c < W; ++c) {
        const float y = static_cast<float>(symbols[at(c / D, c % D)] - kMaxCoefficient) * cl.steps[lk * W + c];
        if (y == 0) continue;
        for (uint32_t i = 0; i < W; ++i) sum[i] += double(y) * matrix[uint64_t(c) * W + i];
      }
      for (uint32_t j = 0; j < F; ++j) {
        const float f = cross_layer_feature(x, cl.depth, l, kv, j, W);
        if (f == 0) continue;
        for (uint32_t i = 0; i < W; ++i) sum[i] += double(f) * predict[uint64_t(j) * W + i];
      }
      float* v = x.data() + lk * W;
      for (uint32_t i = 0; i < W; ++i) v[i] = static_cast<float>(sum[i]);
      for (uint32_t h = 0; h < s.heads; ++h) {
        const float* u = v + h * D;
        if (kv == 1) {
          for (uint32_t d = 0; d < D; ++d) out[at(h, d)] = round_to_16(u[d], s.is_bf16);
          continue;
        }
        for (uint32_t i = 0; i < half; ++i) {
          const float cs = cos_t[t * half + i], sn = sin_t[t * half + i];
          out[at(h, i)] = round_to_16(u[i] * cs - u[i + half] * sn, s.is_bf16);
          out[at(h, i + half)] = round_to_16(u[i + half] * cs + u[i] * sn, s.is_bf16);
        }
      }
    }
  }
}

}  // namespace cachegen
