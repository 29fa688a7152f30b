// Levels 6-8's inverse transform on the CPU (FORMAT.md §5.5 steps 1-4 but the escapes; §5.6's class multipliers):
// what cachegen/codec/transform.py's dequantize computes with torch, in one pass per token instead of a dense
// matrix product and five passes over the chunk. The sums are f32, in the order of the token's nonzero
// coefficients (the format leaves the order free; transform.h's reference reader sums in f64). Most coefficients
// of a coarse level are 0 (pca2: about half), and their rows of the decode matrix are skipped.
#include "codec_cpu.h"

#include "for_groups.h"
#include "transform.h"

#include <vector>

#define CG_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))  // what has_avx512 checks

namespace cachegen {
namespace {

using Floats16 = float __attribute__((vector_size(64)));  // GCC vectors: zmm under AVX-512, else SSE pairs

// x = sum over the token's nonzero coefficients k of y[k] * matrix row k (rows `width` floats apart). kW: the width
// at compile time, a multiple of 16, so the accumulators stay in registers (SmolLM2: 3 heads x 64 = 192); 0: any.
template <uint32_t kW>
__attribute__((always_inline)) inline void combine(const float* y, const uint32_t* nonzero, uint32_t count,
                                                   const float* matrix, uint32_t width, float* x) {
  if constexpr (kW == 0) {
    for (uint32_t i = 0; i < width; ++i) x[i] = 0.0f;
    for (uint32_t k = 0; k < count; ++k) {
      const float v = y[nonzero[k]];
      const float* row = matrix + uint64_t(nonzero[k]) * width;
      for (uint32_t i = 0; i < width; ++i) x[i] += v * row[i];
    }
  } else {
    static_assert(kW % 16 == 0);
    constexpr uint32_t kVectors = kW / 16;
    Floats16 acc[kVectors];
#pragma GCC unroll 32
    for (uint32_t j = 0; j < kVectors; ++j) acc[j] = Floats16{};
    for (uint32_t k = 0; k < count; ++k) {
      const float v = y[nonzero[k]];
      const float* row = matrix + uint64_t(nonzero[k]) * kW;
#pragma GCC unroll 32
      for (uint32_t j = 0; j < kVectors; ++j) {
        Floats16 r;
        __builtin_memcpy(&r, row + 16 * j, 64);
        acc[j] += v * r;
      }
    }
#pragma GCC unroll 32
    for (uint32_t j = 0; j < kVectors; ++j) __builtin_memcpy(x + 16 * j, &acc[j], 64);
  }
}

// y = (f32(symbol - 127) * step) * mult of n coefficients, as transform.py (FORMAT.md §5.5 step 1, §5.6).
__attribute__((always_inline)) inline void steps_of(const int32_t* __restrict symbols, const float* __restrict step,
                                                    float mult, float* __restrict y, uint32_t n) {
  for (uint32_t i = 0; i < n; ++i) y[i] = (static_cast<float>(symbols[i] - kMaxCoefficient) * step[i]) * mult;
}

// One head's key channels: pairs (i, i + half) rotated back by the position's angle (FORMAT.md §5.5 step 3).
__attribute__((always_inline)) inline void rotate_back(const float* __restrict u, const float* __restrict cs,
                                                       const float* __restrict sn, float* __restrict out,
                                                       uint32_t half) {
  for (uint32_t i = 0; i < half; ++i) {
    out[i] = u[i] * cs[i] - u[i + half] * sn[i];
    out[i + half] = u[i + half] * cs[i] + u[i] * sn[i];
  }
}

// n floats rounded to 16 bits as transform.h's round_to_16, the NaN test a select for bf16 so that the loop
// vectorizes.
__attribute__((always_inline)) inline void round_all(const float* __restrict in, uint16_t* __restrict out, uint32_t n,
                                                     bool is_bf16) {
  if (!is_bf16) {
    for (uint32_t i = 0; i < n; ++i) out[i] = float_to_f16(in[i]);
    return;
  }
  for (uint32_t i = 0; i < n; ++i) out[i] = in[i] != in[i] ? uint16_t(0x7FC0u) : float_to_bf16(in[i]);
}

// Group lk (layer, K|V) of every token: steps 1-3, rounded to 16 bits into out (L, 2, H, T, D). Each step is its
// own loop over the token's W values, so that all but the list of nonzero coefficients vectorize.
template <uint32_t kW>
__attribute__((always_inline)) inline void group_tokens(const InverseTransform& t, uint32_t lk, const int32_t* symbols,
                                                        const float* cos_t, const float* sin_t, uint16_t* out) {
  const uint32_t D = t.head_dim, half = D / 2, H = t.heads, W = H * D, T = t.num_tokens;
  const float* step = t.steps + uint64_t(lk) * W;
  const float* mean = t.mean + uint64_t(lk) * W;
  const float* matrix = t.decode_matrix + uint64_t(lk) * W * W;
  std::vector<float> y(W), x(W), r(W);
  std::vector<uint32_t> nonzero(W);
  for (uint32_t tok = 0; tok < T; ++tok) {
    const uint64_t first = (uint64_t(lk) * H * T + tok) * D;  // (h, d) of this token at first + h T D + d
    const float mult = t.classes ? class_multiplier(t.classes[uint64_t(lk / 2) * T + tok]) : 1.0f;
    for (uint32_t h = 0; h < H; ++h)
      steps_of(symbols + first + uint64_t(h) * T * D, step + h * D, mult, y.data() + h * D, D);
    uint32_t count = 0;
    for (uint32_t c = 0; c < W; ++c) {
      nonzero[count] = c;
      count += y[c] != 0.0f;
    }
    combine<kW>(y.data(), nonzero.data(), count, matrix, W, x.data());
    for (uint32_t c = 0; c < W; ++c) x[c] += mean[c];
    if (lk % 2 == 0) {  // keys
      const float* cs = cos_t + uint64_t(tok) * half;
      const float* sn = sin_t + uint64_t(tok) * half;
      for (uint32_t h = 0; h < H; ++h) {
        rotate_back(x.data() + h * D, cs, sn, r.data() + h * D, half);
      }
    }
    const float* result = lk % 2 == 0 ? r.data() : x.data();  // values: no rotary embedding
    for (uint32_t h = 0; h < H; ++h) round_all(result + h * D, out + first + uint64_t(h) * T * D, D, t.is_bf16);
  }
}

template <uint32_t kW>
void group_portable(const InverseTransform& t, uint32_t lk, const int32_t* s, const float* c, const float* n,
                    uint16_t* out) {
  group_tokens<kW>(t, lk, s, c, n, out);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
template <uint32_t kW>
CG_AVX512 void group_avx512(const InverseTransform& t, uint32_t lk, const int32_t* s, const float* c,
                                   const float* n, uint16_t* out) {
  group_tokens<kW>(t, lk, s, c, n, out);
}

bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}
#endif

using GroupFn = void (*)(const InverseTransform&, uint32_t, const int32_t*, const float*, const float*, uint16_t*);

template <uint32_t kW>
GroupFn pick() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (has_avx512()) return group_avx512<kW>;
#endif
  return group_portable<kW>;
}

}  // namespace

void inverse_transform_cpu(const InverseTransform& t, const int32_t* symbols, uint16_t* out, int num_threads) {
  std::vector<float> inv_freq(t.inv_freq, t.inv_freq + t.head_dim / 2), cos_t, sin_t;
  rotary(inv_freq, t.token_start, t.num_tokens, &cos_t, &sin_t);
  const uint32_t W = t.heads * t.head_dim;
  const GroupFn group = W == 192 ? pick<192>() : W == 256 ? pick<256>() : W == 512 ? pick<512>() : pick<0>();
  for_groups(t.layers * 2, num_threads,
             [&](uint32_t lk) { group(t, lk, symbols, cos_t.data(), sin_t.data(), out); });
}

}  // namespace cachegen
