// The CPU decoder's inner loop with AVX-512 (FORMAT.md §7): the steps of lanes.h, bit for bit, on 8 lanes (8
// blocks of one group) per vector, for levels whose lookup rows fit in registers: all lanes of a vector share each
// column's row, so its 256 slots (4 registers) and its alphabet + 2 <= 64 bounds (4 registers) are looked up by
// permutes, and the only gather left is the refill's. Chosen at run time (simd_fits); the rest use lanes.h.
//
// What did not pay on Zen 4, whose 8-lane gathers take ~30 cycles and issue one per ~11-14 (measured): gathering
// slots and bounds per lane (0.55-0.65x lanes.h; so large alphabets and per-token shifts stay scalar), staging every
// vector's rows at once (spills), and loading refill words a step ahead (no gain once rows are in registers).
#pragma once
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CACHEGEN_HAS_AVX512_PATH 1
// GCC 12 warns inside its own AVX-512 intrinsics (their _mm512_undefined_* operands, GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstdint>

#include "lanes.h"

#define CG_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512vbmi")))
#define CG_AVX512_INLINE CG_AVX512 __attribute__((always_inline)) inline

namespace cachegen {

constexpr uint32_t kMaxRegisterBounds = 64;  // bounds a row may have (alphabet + 2) to sit in 4 registers

inline bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512vbmi");
}

// 8 lanes of lanes.h's Lane: state, words left, and the byte offset (from the frame's words) of the word a refill
// pops next (gathers take one base and 64-bit indexes, so per-lane pointers become offsets).
struct LaneVec {
  __m512i state, remaining, next_word;
};

// One column's lookup row in registers: slots[i] holds slots 64i..64i+63, bounds[i] bounds 16i..16i+15 (zero past
// alphabet + 2).
struct RowRegs {
  __m512i slots[4], bounds[4];
};

// Entry `index` (< 64, in each qword lane) of the row's bounds: two 32-entry permutes and a blend on the index's
// bit 5. The qwords' high halves look up entry 0, so they are cleared.
CG_AVX512_INLINE __m512i bound_at(const RowRegs& r, __m512i index) {
  const __m512i low = _mm512_permutex2var_epi32(r.bounds[0], index, r.bounds[1]);
  const __m512i high = _mm512_permutex2var_epi32(r.bounds[2], index, r.bounds[3]);
  const __mmask16 upper = _mm512_test_epi32_mask(index, _mm512_set1_epi32(32));
  return _mm512_and_si512(_mm512_mask_blend_epi32(upper, low, high), _mm512_set1_epi64(0xFFFFFFFF));
}

// The slot of `index` (< 256, in each qword lane): two 128-entry byte permutes and a blend on the index's bit 7.
CG_AVX512_INLINE __m512i slot_at(const RowRegs& r, __m512i index) {
  const __m512i low = _mm512_permutex2var_epi8(r.slots[0], index, r.slots[1]);
  const __m512i high = _mm512_permutex2var_epi8(r.slots[2], index, r.slots[3]);
  const __mmask64 upper = _mm512_test_epi8_mask(index, _mm512_set1_epi8(char(0x80)));
  return _mm512_and_si512(_mm512_mask_blend_epi8(upper, low, high), _mm512_set1_epi64(0xFF));
}

// One decode step of 8 lanes on row r; returns their symbols. The arithmetic of lane_step + lookup_symbol: guess
// from the slot, then its next symbol if the quantile lies past it, then further only in lanes whose slot holds
// three or more symbols (rare, so a branch). kChecked as in lane_step.
template <bool kChecked>
CG_AVX512_INLINE __m512i vec_step(LaneVec& v, const RowRegs& r, const uint32_t* words, __m512i alphabet) {
  const __m512i ones = _mm512_set1_epi64(1);
  const __m512i quantile = _mm512_and_si512(v.state, _mm512_set1_epi64(kTotal - 1));
  __m512i sym = slot_at(r, _mm512_srli_epi64(quantile, 16));
  const __m512i first = bound_at(r, sym), second = bound_at(r, _mm512_add_epi64(sym, ones));
  const __m512i third = bound_at(r, _mm512_add_epi64(sym, _mm512_set1_epi64(2)));
  const __mmask8 up = _mm512_cmpge_epu64_mask(quantile, second);
  sym = _mm512_mask_add_epi64(sym, up, sym, ones);
  __m512i low = _mm512_mask_blend_epi64(up, first, second);
  __m512i high = _mm512_mask_blend_epi64(up, second, third);
  __mmask8 more = _mm512_cmpge_epu64_mask(quantile, high) &
                  _mm512_cmplt_epu64_mask(_mm512_add_epi64(sym, ones), alphabet);
  while (more != 0) {
    sym = _mm512_mask_add_epi64(sym, more, sym, ones);
    low = _mm512_mask_mov_epi64(low, more, high);
    high = _mm512_mask_mov_epi64(high, more, bound_at(r, _mm512_add_epi64(sym, ones)));
    more = _mm512_mask_cmpge_epu64_mask(more, quantile, high) &
           _mm512_cmplt_epu64_mask(_mm512_add_epi64(sym, ones), alphabet);
  }
  const __m512i freq = _mm512_sub_epi64(high, low);
  const __m512i next = _mm512_add_epi64(_mm512_mullo_epi64(freq, _mm512_srli_epi64(v.state, kPrecision)),
                                        _mm512_sub_epi64(quantile, low));
  __mmask8 refill = _mm512_cmplt_epu64_mask(next, _mm512_set1_epi64(int64_t(1) << 32));
  if (kChecked) refill &= _mm512_cmpneq_epu64_mask(v.remaining, _mm512_setzero_si512());
  const __m512i popped =
      _mm512_cvtepu32_epi64(_mm512_mask_i64gather_epi32(_mm256_setzero_si256(), refill, v.next_word, words, 1));
  v.state = _mm512_mask_mov_epi64(next, refill, _mm512_or_si512(_mm512_slli_epi64(next, 32), popped));
  v.remaining = _mm512_mask_sub_epi64(v.remaining, refill, v.remaining, ones);
  v.next_word = _mm512_mask_sub_epi64(v.next_word, refill, v.next_word, _mm512_set1_epi64(4));
  return sym;
}

// Columns [c, end) (at most 8) of one token for every vector; packed[j] collects vector j's symbols, lane k's in
// qword k, column c + i's in byte i. Vector by vector per column: every vector's rows at once do not fit registers.
template <bool kChecked, uint32_t kChains>
CG_AVX512_INLINE void vec_batch(LaneVec* v, const GroupRows* rows, const uint32_t* words, __m512i alphabet,
                                const __mmask16* fill, uint32_t c, uint32_t end, __m512i* packed) {
  for (uint32_t j = 0; j < kChains; ++j) packed[j] = _mm512_setzero_si512();
#pragma GCC unroll 8
  for (uint32_t col = c; col < end; ++col) {
#pragma GCC unroll 8
    for (uint32_t j = 0; j < kChains; ++j) {
      const LookupRow& row = rows[j].rows[col];
      RowRegs r;
      for (uint32_t i = 0; i < 4; ++i) {
        r.slots[i] = _mm512_loadu_si512(row.slots + 64 * i);
        r.bounds[i] = _mm512_maskz_loadu_epi32(fill[i], row.bounds + 16 * i);  // masked: no read past the row
      }
      const __m512i sym = vec_step<kChecked>(v[j], r, words, alphabet);
      packed[j] = _mm512_or_si512(packed[j], _mm512_slli_epi64(sym, 8 * (col - c)));
    }
  }
}

// Whether decode_vectors takes a level: unshifted rows (shared by a vector's lanes) that fit in registers.
inline bool simd_fits(const TableSet& t, bool is_shifted) {
  return !is_shifted && t.alphabet + 2 <= kMaxRegisterBounds;
}

// Decode kChains vectors in lockstep, each 8 full blocks (kStreamTokens tokens) of one group: lanes[8j + k] starts
// lane k of vector j, rows[j] is its group's (prefetch hints unused: its rows are loaded whole per column), sinks
// as decode_lanes takes them. syms holds a token's symbols, 8 * kChains rows of `stride` >= round_up(per_token, 8)
// bytes. Needs simd_fits. Returns a bitmask of the lanes that failed their final check or their sink's.
template <uint32_t kChains, class Sink>
CG_AVX512 uint64_t decode_vectors(const Lane* lanes, const uint32_t* words, const GroupRows* rows,
                                  uint32_t per_token, uint32_t alphabet, Sink* sinks, uint8_t* syms,
                                  uint32_t stride) {
  LaneVec v[kChains];
  for (uint32_t j = 0; j < kChains; ++j) {
    alignas(64) uint64_t state[8], remaining[8], next_word[8];
    for (uint32_t k = 0; k < 8; ++k) {
      const Lane& lane = lanes[8 * j + k];
      state[k] = lane.state;
      remaining[k] = lane.remaining;
      // words[remaining - 1], as an offset: never loaded while remaining is 0 (kNoWords lanes included).
      next_word[k] = reinterpret_cast<uintptr_t>(lane.words + lane.remaining) - 4 - reinterpret_cast<uintptr_t>(words);
    }
    v[j] = {_mm512_load_si512(state), _mm512_load_si512(remaining), _mm512_load_si512(next_word)};
  }
  const uint32_t count = alphabet + 2;
  __mmask16 fill[4];  // which of each bounds register's 16 entries the row has
  for (uint32_t i = 0; i < 4; ++i)
    fill[i] = count >= 16 * (i + 1) ? 0xFFFF : count <= 16 * i ? 0 : __mmask16((1u << (count - 16 * i)) - 1);
  const __m512i alpha = _mm512_set1_epi64(alphabet);
  const __m512i lane_rows = _mm512_mullo_epi64(_mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi64(stride));
  for (uint32_t token = 0; token < kStreamTokens; ++token) {
    for (uint32_t c = 0; c < per_token; c += kBatch) {
      // As decode_lanes: with kBatch words left in every lane, no step of the batch needs the words-left test.
      __mmask8 short_lanes = 0;
      for (uint32_t j = 0; j < kChains; ++j)
        short_lanes |= _mm512_cmplt_epu64_mask(v[j].remaining, _mm512_set1_epi64(kBatch));
      const uint32_t end = c + kBatch < per_token ? c + kBatch : per_token;
      __m512i packed[kChains];
      if (short_lanes) vec_batch<true, kChains>(v, rows, words, alpha, fill, c, end, packed);
      else vec_batch<false, kChains>(v, rows, words, alpha, fill, c, end, packed);
      for (uint32_t j = 0; j < kChains; ++j)  // 8 bytes per lane: `stride` leaves room past a short last batch
        _mm512_i64scatter_epi64(syms + uint64_t(8 * j) * stride + c, lane_rows, packed[j], 1);
    }
    for (uint32_t k = 0; k < 8 * kChains; ++k) sinks[k].put(token, syms + uint64_t(k) * stride);
  }
  uint64_t bad = 0;
  for (uint32_t j = 0; j < kChains; ++j) {
    alignas(64) uint64_t state[8], remaining[8];
    _mm512_store_si512(state, v[j].state);
    _mm512_store_si512(remaining, v[j].remaining);
    for (uint32_t k = 0; k < 8; ++k)
      bad |= uint64_t(state[k] != 0 || remaining[k] != 0 || sinks[8 * j + k].is_bad()) << (8 * j + k);
  }
  return bad;
}

}  // namespace cachegen
#endif
