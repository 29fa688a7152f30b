// Levels 6-8's stream decode (FORMAT.md §5.3, §5.6) for the CUDA symbol kernel in decode.cu: the symbols themselves,
// one byte each (the alphabet is 255), which the caller's inverse transform turns into KV on the same device.
// Written as __host__ __device__ code with no CUDA types, so that kernels/tests/test_golden.cpp runs this very
// function on the CPU against decode_symbols_cpu (`make kernels-check`, no GPU needed).
#pragma once
#include <cstdint>
#include <cstring>

#include "cachegen/codec.h"

#if defined(__CUDACC__)
#define CG_UNROLL _Pragma("unroll")
#else
#define CG_UNROLL
#endif

namespace cachegen {

// One column's table on a GPU: the symbol guess per quantile >> 16 and the cumulative frequencies (cum[alphabet]
// is 2^24). The GPU decoders keep cum rather than the CPU's bounds rows: a third less to stage in shared memory.
struct CumRow {
  const uint8_t* slots;
  const uint32_t* cum;
  uint32_t alphabet;
};

CG_HD uint32_t cum_at(const CumRow& r, uint32_t s) { return s < r.alphabet ? r.cum[s] : kTotal; }

// Same symbol and state as cachegen::decode_step (the guess is the symbol of quantile & ~0xFFFF, so the true one
// is it or a few above).
CG_HD uint32_t decode_one(const CumRow& r, uint64_t* state, const uint32_t* words, uint32_t* remaining) {
  const uint32_t quantile = static_cast<uint32_t>(*state & (kTotal - 1));
  uint32_t sym = r.slots[quantile >> 16];
  uint32_t next = cum_at(r, sym + 1);
  while (next <= quantile) next = cum_at(r, ++sym + 1);
  const uint32_t low = r.cum[sym];
  advance(state, quantile, low, next - low, words, remaining);
  return sym;
}

struct SymbolArgs {
  uint32_t heads, num_tokens, per_token, alphabet, blocks_per_group, num_tables;
  const uint32_t* table_map;  // (layers, 2, heads, per_token)
  const uint32_t* cum;        // (num_tables, alphabet)
  const uint8_t* slots;       // (num_tables, 256)
  const uint32_t* words;
  const uint64_t* offsets;  // first word of each stream
  const uint32_t* sizes;
  const uint16_t* bins;       // (layers, 2): a symbol above bins - 2 is invalid
  const int8_t* token_shift;  // (layers, num_tokens) level 8's row moves, or null
  uint8_t* out;               // (layers, 2, heads, num_tokens, per_token); tokens 16-byte aligned when kP % 16 == 0
};

// Stream (g, b): block b of group g = (layer, K|V, head). On level 8 each token moves every column's row by its
// layer's token_shift, so rows are known only as a token starts. kP: per_token known at compile time (a token's
// bytes then collect in registers and leave as 16-byte stores on the GPU), or 0 for any. Returns a Status.
template <uint32_t kP>
CG_HD int32_t decode_symbol_stream(const SymbolArgs& a, uint32_t g, uint32_t b) {
  const uint32_t P = kP ? kP : a.per_token, A = a.alphabet;
  const uint32_t* map = a.table_map + uint64_t(g) * P;
  const uint64_t s = uint64_t(g) * a.blocks_per_group + b;
  const uint32_t t0 = b * kStreamTokens;
  const uint32_t tokens = a.num_tokens - t0 < kStreamTokens ? a.num_tokens - t0 : kStreamTokens;
  const uint32_t* words = a.words + a.offsets[s];
  uint32_t remaining = a.sizes[s];
  uint64_t state = initial_state(words, &remaining);
  const uint32_t layer_kv = g / a.heads, limit = a.bins[layer_kv] - 2u;
  const int8_t* shifts = a.token_shift ? a.token_shift + uint64_t(layer_kv / 2) * a.num_tokens + t0 : nullptr;
  uint8_t* out = a.out + (uint64_t(g) * a.num_tokens + t0) * P;
  bool is_bad = false;
  for (uint32_t token = 0; token < tokens; ++token) {
    const int64_t shift = shifts ? shifts[token] : 0;
    uint8_t* dst = out + uint64_t(token) * P;
    auto symbol = [&](uint32_t c) -> uint32_t {
      int64_t t = int64_t(map[c]) + shift;
      if (t < 0 || t >= int64_t(a.num_tables)) is_bad = true, t = 0;  // the host checks; never read outside
      const CumRow row{a.slots + t * 256, a.cum + t * A, A};
      const uint32_t sym = decode_one(row, &state, words, &remaining);
      is_bad |= sym > limit;
      return sym;
    };
    if constexpr (kP != 0 && kP % 16 == 0) {
      uint32_t buf[kP / 4];
      CG_UNROLL
      for (uint32_t c = 0; c < kP; ++c) {
        const uint32_t sym = symbol(c);
        buf[c >> 2] = (c & 3) == 0 ? sym : buf[c >> 2] | sym << (8 * (c & 3));
      }
#if defined(__CUDA_ARCH__)
      CG_UNROLL
      for (uint32_t i = 0; i < kP / 16; ++i)
        reinterpret_cast<uint4*>(dst)[i] = make_uint4(buf[4 * i], buf[4 * i + 1], buf[4 * i + 2], buf[4 * i + 3]);
#else
      std::memcpy(dst, buf, kP);  // the words' bytes are little-endian on every host this builds for
#endif
    } else {
      for (uint32_t c = 0; c < P; ++c) dst[c] = static_cast<uint8_t>(symbol(c));
    }
  }
  const bool ended = state == 0 && remaining == 0;
  return !ended ? kBadFinalState : is_bad ? kBadSymbol : kOk;
}

}  // namespace cachegen
