// The CPU decoder's inner loop with AVX-512 (FORMAT.md §7): the steps of lanes.h, bit for bit, on 8 lanes (8
// blocks of one group) per vector, for unshifted levels: all lanes of a vector share each column's row, so its 256
// slots (4 registers) and 64 of its bounds (4 registers) are looked up by permutes, and the only gather left on the
// common path is the refill's. Rows of alphabet + 2 <= 64 bounds fit whole; larger ones (255 symbols) keep the
// window of 64 centred on the symbol of a zero coefficient, and the lanes whose symbol falls outside it gather
// theirs (a branch: taken by ~1% of steps on pca3, 0.1% on pca2; q8's symbols spread too wide, so it stays
// portable). Chosen at run time (simd_fits); the rest use lanes.h.
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

constexpr uint32_t kMaxRegisterBounds = 64;  // bounds that sit in 4 registers: a whole row, or a row's window

// First bound of a row's register window: 0 when the row fits whole, else alphabet / 2 - 31, so the window's
// symbols (those whose three bounds a step reads lie inside: base .. base + 61) are centred on alphabet / 2, where
// the transform levels put a zero coefficient (FORMAT.md §5.5: symbol q + 127) and the quantized levels theirs.
inline uint32_t window_base(uint32_t alphabet) {
  return alphabet + 2 <= kMaxRegisterBounds ? 0 : alphabet / 2 - 31;
}

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

// One column's lookup row in registers: slots[i] holds slots 64i..64i+63, bounds[i] bounds base + 16i .. base +
// 16i + 15 (zero past alphabet + 2); `row` is its bounds in memory and `alphabet` its size, for the lanes that
// leave the window.
struct RowRegs {
  __m512i slots[4], bounds[4];
  const uint32_t* row;
  uint32_t alphabet;
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

// The lanes in `lanes` of a windowed step, one by one: the symbol of each one's quantile by a binary search of the
// row in memory (lookup_symbol's result, in ~8 loads however far its walk would go) and that symbol's bounds.
CG_AVX512_INLINE void scalar_lanes(__mmask8 lanes, __m512i quantile, const RowRegs& r, __m512i& sym, __m512i& low,
                                   __m512i& high) {
  alignas(64) uint64_t q[8], s[8], lo[8], hi[8];
  _mm512_store_si512(q, quantile);
  _mm512_store_si512(s, sym);
  _mm512_store_si512(lo, low);
  _mm512_store_si512(hi, high);
  for (uint32_t k = 0; k < 8; ++k) {
    if (!(lanes >> k & 1)) continue;
    const uint32_t found = find_symbol(r.row, r.alphabet, uint32_t(q[k]));  // row[x] = cum[x] for x < alphabet
    s[k] = found;
    lo[k] = r.row[found];
    hi[k] = r.row[found + 1];
  }
  sym = _mm512_load_si512(s);
  low = _mm512_load_si512(lo);
  high = _mm512_load_si512(hi);
}

// One decode step of 8 lanes on row r; returns their symbols. The arithmetic of lane_step + lookup_symbol: guess
// from the slot, then its next symbol if the quantile lies past it, then further only in lanes whose slot holds
// three or more symbols (rare, so a branch). kChecked as in lane_step. kWindowed (`base` = window_base): lanes
// whose guess, or walk, leaves the registers' window finish by scalar_lanes (rare, so a branch). Their slot is
// mostly slot 0, which on a peaked 255-symbol row spans ~100 near-empty tail symbols: walking those one bound at a
// time in the vector loop (with gathers) ran 5x slower than the portable lanes.
template <bool kChecked, bool kWindowed>
CG_AVX512_INLINE __m512i vec_step(LaneVec& v, const RowRegs& r, const uint32_t* words, __m512i alphabet,
                                  __m512i base) {
  const __m512i ones = _mm512_set1_epi64(1);
  const __m512i quantile = _mm512_and_si512(v.state, _mm512_set1_epi64(kTotal - 1));
  __m512i sym = slot_at(r, _mm512_srli_epi64(quantile, 16));
  const __m512i at = kWindowed ? _mm512_sub_epi64(sym, base) : sym;  // below the window wraps: outside too
  // symbols base .. base + 61 have all three bounds in the window
  __mmask8 outside = kWindowed ? _mm512_cmpgt_epu64_mask(at, _mm512_set1_epi64(kMaxRegisterBounds - 3)) : 0;
  const __m512i first = bound_at(r, at), second = bound_at(r, _mm512_add_epi64(at, ones));
  const __m512i third = bound_at(r, _mm512_add_epi64(at, _mm512_set1_epi64(2)));
  const __mmask8 up = _mm512_cmpge_epu64_mask(quantile, second);
  sym = _mm512_mask_add_epi64(sym, up, sym, ones);
  __m512i low = _mm512_mask_blend_epi64(up, first, second);
  __m512i high = _mm512_mask_blend_epi64(up, second, third);
  __mmask8 more = _mm512_cmpge_epu64_mask(quantile, high) &
                  _mm512_cmplt_epu64_mask(_mm512_add_epi64(sym, ones), alphabet) & ~outside;
  while (more != 0) {
    sym = _mm512_mask_add_epi64(sym, more, sym, ones);
    low = _mm512_mask_mov_epi64(low, more, high);
    const __m512i next_at = kWindowed ? _mm512_sub_epi64(_mm512_add_epi64(sym, ones), base)
                                      : _mm512_add_epi64(sym, ones);
    if (kWindowed) {  // a walk past the window's last bound finishes in scalar_lanes
      const __mmask8 leaving = _mm512_mask_cmpgt_epu64_mask(more, next_at, _mm512_set1_epi64(kMaxRegisterBounds - 1));
      outside |= leaving;
      more &= ~leaving;
    }
    high = _mm512_mask_mov_epi64(high, more, bound_at(r, next_at));
    more = _mm512_mask_cmpge_epu64_mask(more, quantile, high) &
           _mm512_cmplt_epu64_mask(_mm512_add_epi64(sym, ones), alphabet);
  }
  if (kWindowed && outside) scalar_lanes(outside, quantile, r, sym, low, high);
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
template <bool kChecked, bool kWindowed, uint32_t kChains>
CG_AVX512_INLINE void vec_batch(LaneVec* v, const GroupRows* rows, const uint32_t* words, uint32_t num_symbols,
                                uint32_t base, const __mmask16* fill, uint32_t c, uint32_t end, __m512i* packed) {
  const __m512i alphabet = _mm512_set1_epi64(num_symbols);
  const __m512i base_vec = _mm512_set1_epi64(base);
  for (uint32_t j = 0; j < kChains; ++j) packed[j] = _mm512_setzero_si512();
#pragma GCC unroll 8
  for (uint32_t col = c; col < end; ++col) {
#pragma GCC unroll 8
    for (uint32_t j = 0; j < kChains; ++j) {
      const LookupRow& row = rows[j].rows[col];
      RowRegs r;
      r.row = row.bounds;
      r.alphabet = num_symbols;
      for (uint32_t i = 0; i < 4; ++i) {
        r.slots[i] = _mm512_loadu_si512(row.slots + 64 * i);
        r.bounds[i] = _mm512_maskz_loadu_epi32(fill[i], row.bounds + base + 16 * i);  // masked: none past the row
      }
      const __m512i sym = vec_step<kChecked, kWindowed>(v[j], r, words, alphabet, base_vec);
      packed[j] = _mm512_or_si512(packed[j], _mm512_slli_epi64(sym, 8 * (col - c)));
    }
  }
}

// Whether decode_vectors takes a level: unshifted rows (shared by a vector's lanes) that fit in registers, or
// whose window holds nearly all of the probability: at most 1/128 outside, on average over the rows table_map
// names (pca3 ~0.1%, pca2 ~0.01%, q8 ~20%: there one of a vector's 8 lanes would gather almost every step).
inline bool simd_fits(const TableSet& t, bool is_shifted, const uint32_t* table_map, uint64_t map_size) {
  if (is_shifted) return false;
  if (t.alphabet + 2 <= kMaxRegisterBounds) return true;
  const uint32_t base = window_base(t.alphabet), count = t.alphabet + 2;
  uint64_t outside = 0;
  for (uint64_t i = 0; i < map_size; ++i) {
    const uint32_t* row = t.bounds + uint64_t(table_map[i]) * count;
    outside += kTotal - (row[base + kMaxRegisterBounds - 2] - row[base]);  // symbols base .. base + 61 held
  }
  return map_size != 0 && outside <= map_size * (kTotal / 128);
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
  const uint32_t base = window_base(alphabet), count = alphabet + 2 - base;  // bounds from the window's start
  __mmask16 fill[4];  // which of each bounds register's 16 entries the row has
  for (uint32_t i = 0; i < 4; ++i)
    fill[i] = count >= 16 * (i + 1) ? 0xFFFF : count <= 16 * i ? 0 : __mmask16((1u << (count - 16 * i)) - 1);
  const bool windowed = base != 0;
  const __m512i lane_rows = _mm512_mullo_epi64(_mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi64(stride));
  for (uint32_t token = 0; token < kStreamTokens; ++token) {
    for (uint32_t c = 0; c < per_token; c += kBatch) {
      // As decode_lanes: with kBatch words left in every lane, no step of the batch needs the words-left test.
      __mmask8 short_lanes = 0;
      for (uint32_t j = 0; j < kChains; ++j)
        short_lanes |= _mm512_cmplt_epu64_mask(v[j].remaining, _mm512_set1_epi64(kBatch));
      const uint32_t end = c + kBatch < per_token ? c + kBatch : per_token;
      __m512i packed[kChains];
      if (windowed) {
        if (short_lanes) vec_batch<true, true, kChains>(v, rows, words, alphabet, base, fill, c, end, packed);
        else vec_batch<false, true, kChains>(v, rows, words, alphabet, base, fill, c, end, packed);
      } else {
        if (short_lanes) vec_batch<true, false, kChains>(v, rows, words, alphabet, base, fill, c, end, packed);
        else vec_batch<false, false, kChains>(v, rows, words, alphabet, base, fill, c, end, packed);
      }
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
