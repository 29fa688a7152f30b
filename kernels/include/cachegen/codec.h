// One rANS core for the CPU extension and the CUDA kernels: plain C++, no torch, no Python, no allocation.
// Bit-compatible with constriction's AnsCoder: 64-bit state, 32-bit words, 24-bit frequencies (FORMAT.md §7).
#pragma once
#include <cstdint>

#include "cachegen/spec.h"

#if defined(__CUDACC__)
#define CG_HD __host__ __device__ __forceinline__
#else
#define CG_HD inline
#endif

namespace cachegen {

// num_tables rows of `alphabet` entries; freq >= 1, each row sums to 2^24; cum = exclusive prefix sums.
struct TableSet {
  const uint32_t* freq;
  const uint32_t* cum;
  uint32_t alphabet;
  // Optional runtime lookup (both or neither; nullptr: binary search), derived from cum, never stored:
  // slots[t * 256 + (q >> 16)] = the symbol of quantile (q >> 16) << 16 in table t (the true symbol is that one or
  // a few above it); bounds[t * (alphabet + 2) + s] = cum[s] for s < alphabet, then 2^24 twice, so one 8-byte
  // load at s gives a symbol's cum and the next one (freq = their difference) for every s <= alphabet.
  const uint8_t* slots = nullptr;
  const uint32_t* bounds = nullptr;
};

// One table's lookup rows (TableSet::slots and ::bounds at that table).
struct LookupRow {
  const uint8_t* slots;
  const uint32_t* bounds;
};

// cum[s] | cum[s + 1] << 32 of a bounds row: one (possibly unaligned) load, little-endian like the whole format.
CG_HD uint64_t bound_pair(const uint32_t* bounds, uint32_t s) {
  uint64_t pair;
  __builtin_memcpy(&pair, bounds + s, 8);
  return pair;
}

CG_HD uint32_t pair_low(uint64_t pair) { return static_cast<uint32_t>(pair); }
CG_HD uint32_t pair_freq(uint64_t pair) { return static_cast<uint32_t>(pair >> 32) - static_cast<uint32_t>(pair); }

// The symbol of `quantile` (< 2^24) and its bound pair (cum, next cum). The guess s0's pair and s0 + 1's load together
// and the pick needs no branch (symbols vary, so a data-dependent branch would mispredict); only a slot holding three
// or more symbols steps further. Indexes stay in range whatever the state: s0 < alphabet (checked by the caller), so
// both pairs lie in the row, and the loop stops at the last symbol.
CG_HD uint32_t lookup_symbol(const LookupRow& r, uint32_t alphabet, uint32_t quantile, uint64_t* pair) {
  const uint32_t s0 = r.slots[quantile >> 16];
  const uint32_t* at = r.bounds + s0;  // a pointer, so that s0 + 1 folds into the load's displacement
  const uint64_t p0 = bound_pair(at, 0), p1 = bound_pair(at, 1);
  const uint32_t up = quantile >= pair_low(p1);
  uint32_t sym = s0 + up;
  uint64_t p = up ? p1 : p0;
  while (quantile >= static_cast<uint32_t>(p >> 32) && sym + 1 < alphabet) p = bound_pair(r.bounds, ++sym);
  *pair = p;
  return sym;
}

// Largest s with cum[s] <= quantile: branch-free binary search over one row (alphabet <= 256).
CG_HD uint32_t find_symbol(const uint32_t* cum, uint32_t alphabet, uint32_t quantile) {
  uint32_t lo = 0, size = alphabet;
  while (size > 1) {
    uint32_t half = size >> 1;
    lo = (cum[lo + half] <= quantile) ? lo + half : lo;
    size -= half;
  }
  return lo;
}

// Pop the initial state: one word alone is the whole state; else high word last, low word before it.
CG_HD uint64_t initial_state(const uint32_t* words, uint32_t* remaining) {
  uint32_t n = *remaining;
  if (n == 0) return 0;
  if (n == 1) { *remaining = 0; return words[0]; }
  *remaining = n - 2;
  return (static_cast<uint64_t>(words[n - 1]) << 32) | words[n - 2];
}

// The state update of one decode step once the symbol of `quantile` (with its cum and freq) is known, refilling
// from the stack of words. Every decoder (CPU lanes, CUDA with tables in shared memory) goes through this.
CG_HD void advance(uint64_t* state, uint32_t quantile, uint32_t cum, uint32_t freq, const uint32_t* words,
                   uint32_t* remaining) {
  uint64_t x = static_cast<uint64_t>(freq) * (*state >> kPrecision) + quantile - cum;
  if (x < (1ull << 32) && *remaining > 0) x = (x << 32) | words[--*remaining];
  *state = x;
}

// One decode step: symbol for `row` of the tables, state advanced and refilled from the stack of words.
CG_HD uint32_t decode_step(uint64_t* state, const uint32_t* words, uint32_t* remaining, const TableSet& t,
                           uint32_t table) {
  const uint32_t quantile = static_cast<uint32_t>(*state & (kTotal - 1));
  if (t.slots != nullptr) {
    uint64_t p;
    const uint64_t at = table;
    const LookupRow r{t.slots + at * 256, t.bounds + at * (t.alphabet + 2)};
    const uint32_t sym = lookup_symbol(r, t.alphabet, quantile, &p);
    advance(state, quantile, pair_low(p), pair_freq(p), words, remaining);
    return sym;
  }
  const uint32_t* cum = t.cum + static_cast<uint64_t>(table) * t.alphabet;
  const uint32_t sym = find_symbol(cum, t.alphabet, quantile);
  advance(state, quantile, cum[sym], t.freq[static_cast<uint64_t>(table) * t.alphabet + sym], words, remaining);
  return sym;
}

// Decode `count` symbols of one stream; position j uses table row[j % per_token]. sink(j, token, symbol) stores
// them (token = j / per_token, tracked incrementally so no sink divides per symbol).
template <class Sink>
CG_HD Status decode_stream(const uint32_t* words, uint32_t num_words, uint32_t count, const uint32_t* row,
                           uint32_t per_token, const TableSet& t, Sink& sink) {
  uint32_t remaining = num_words;
  uint64_t state = initial_state(words, &remaining);
  uint32_t column = 0, token = 0;
  for (uint32_t j = 0; j < count; ++j) {
    sink(j, token, decode_step(&state, words, &remaining, t, row[column]));
    if (++column == per_token) { column = 0; ++token; }
  }
  return (state == 0 && remaining == 0) ? kOk : kBadFinalState;
}

// Encode one stream into `out` (capacity count + 2 words), in constriction's get_compressed() order. Position j
// uses table row[j % per_token], moved by shift[j / per_token] tables when shift is given (one per token; the
// caller checks every resulting table exists). Unsigned wrap-around makes a negative shift subtract.
CG_HD uint32_t encode_stream(const int32_t* symbols, uint32_t count, const uint32_t* row, uint32_t per_token,
                             const TableSet& t, uint32_t* out, const int8_t* shift = nullptr) {
  uint64_t state = 0;
  uint32_t n = 0;
  for (uint32_t j = count; j-- > 0;) {  // a stack: backwards, so the decoder pops forwards
    const uint32_t moved = shift != nullptr ? static_cast<uint32_t>(shift[j / per_token]) : 0u;
    const uint64_t base = static_cast<uint64_t>(row[j % per_token] + moved) * t.alphabet + symbols[j];
    const uint64_t f = t.freq[base];
    if ((state >> (64 - kPrecision)) >= f) {
      out[n++] = static_cast<uint32_t>(state);
      state >>= 32;
    }
    state = ((state / f) << kPrecision) | (t.cum[base] + state % f);
  }
  const uint32_t low = static_cast<uint32_t>(state), high = static_cast<uint32_t>(state >> 32);
  if (high != 0) { out[n++] = low; out[n++] = high; } else if (low != 0) { out[n++] = low; }
  return n;
}

// bf16 of a float, round half to even (NaN never occurs: inputs are finite products).
CG_HD uint16_t float_to_bf16(float value) {
  uint32_t bits;
  __builtin_memcpy(&bits, &value, 4);
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

CG_HD float bf16_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  __builtin_memcpy(&value, &wide, 4);
  return value;
}

// step = scale / half as one IEEE float division (FORMAT.md §5.2); 0 for an all-zero vector.
CG_HD float dequant_step(uint16_t scale_bits, uint32_t half) {
  const float scale = bf16_to_float(scale_bits);
  return scale == 0.0f ? 0.0f : scale / static_cast<float>(half);
}

}  // namespace cachegen
