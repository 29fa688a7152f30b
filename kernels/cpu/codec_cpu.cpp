// Reference CPU implementation of the coded levels (FORMAT.md §5): the oracle the CUDA kernels must match.
#include "codec_cpu.h"

#include "for_groups.h"
#include "lanes.h"
#include "lanes_avx512.h"

#include <algorithm>
#include <atomic>
#include <vector>

namespace cachegen {
namespace {

// Stream s of a frame: group g = s / per_group (layer, K|V, head), block b = s % per_group.
struct StreamPlan {
  uint32_t groups, per_group, full_blocks, tail_tokens;
  uint32_t first_token(uint32_t block) const { return block * kStreamTokens; }
  uint32_t tokens(uint32_t block) const { return block < full_blocks ? kStreamTokens : tail_tokens; }
};

StreamPlan plan_of(const LevelDesc& d) {
  StreamPlan p;
  p.groups = d.layers * 2 * d.heads;
  p.full_blocks = d.num_tokens / kStreamTokens;
  p.tail_tokens = d.num_tokens % kStreamTokens;
  p.per_group = p.full_blocks + (p.tail_tokens ? 1 : 0);
  return p;
}

// Word offset of every stream; kBadSizes unless they add up to num_words exactly.
Status stream_offsets(const uint32_t* sizes, uint64_t count, uint64_t num_words, std::vector<uint64_t>& out) {
  out.resize(count + 1);
  out[0] = 0;
  for (uint64_t s = 0; s < count; ++s) out[s + 1] = out[s] + sizes[s];
  return out[count] == num_words ? kOk : kBadSizes;
}

// Sinks take one token of a stream at a time: put(token, syms) with per_token symbols (< 256), in plain loops
// the compiler vectorizes.
struct SymbolSink {
  int32_t* out;
  uint32_t per_token;
  void put(uint32_t token, const uint8_t* syms) {
    int32_t* dst = out + uint64_t(token) * per_token;
    for (uint32_t c = 0; c < per_token; ++c) dst[c] = syms[c];
  }
  bool is_bad() const { return false; }
};

struct QuantSink {  // fused dequantization: one f32 multiply, bf16 round half to even (FORMAT.md §5.2)
  uint16_t* out;
  uint32_t per_token, half, limit;
  float steps[kStreamTokens];  // per token of this block
  uint32_t top = 0;            // largest symbol seen: above limit, no quantizer of this level emitted it
  void put(uint32_t token, const uint8_t* syms) {
    uint16_t* dst = out + uint64_t(token) * per_token;
    const float step = steps[token];
    uint8_t seen = 0;
    for (uint32_t c = 0; c < per_token; ++c) {
      seen = syms[c] > seen ? syms[c] : seen;
      dst[c] = float_to_bf16(static_cast<float>(static_cast<int32_t>(syms[c]) - static_cast<int32_t>(half)) * step);
    }
    top = seen > top ? seen : top;
  }
  bool is_bad() const { return top > limit; }
};

struct BytesSink {  // lossless: high byte then low byte of each 16-bit value
  uint16_t* out;
  uint32_t per_token;
  void put(uint32_t token, const uint8_t* syms) {
    uint16_t* dst = out + uint64_t(token) * (per_token / 2);
    for (uint32_t i = 0; i < per_token / 2; ++i) dst[i] = static_cast<uint16_t>(syms[2 * i] << 8 | syms[2 * i + 1]);
  }
  bool is_bad() const { return false; }
};

// Lookup rows of group g's columns, resolved once per group so no step multiplies a table index, and what to
// prefetch while decoding each (lanes.h): nothing when the group's rows fit L1, nor a row one of the two columns
// before it used (the lossless level's low bytes share one table per group).
void group_rows(const LevelDesc& d, uint32_t g, std::vector<LookupRow>& rows, std::vector<Prefetch>& ahead) {
  const TableSet& t = d.tables;
  const uint32_t P = d.per_token, *map = d.table_map + uint64_t(g) * P;
  const uint32_t bounds_bytes = (t.alphabet + 2) * 4;
  const bool is_large = uint64_t(P) * (256 + bounds_bytes) > kL1RowBytes;
  rows.resize(P);
  ahead.resize(P);
  for (uint32_t c = 0; c < P; ++c) rows[c] = {t.slots + map[c] * 256ull, t.bounds + map[c] * (t.alphabet + 2ull)};
  for (uint32_t c = 0; c < P; ++c) {
    const uint32_t a = (c + kPrefetchColumns) % P;
    const bool is_recent = (a >= 1 && map[a - 1] == map[a]) || (a >= 2 && map[a - 2] == map[a]);
    ahead[c] = {rows[a], is_large && !is_recent ? (bounds_bytes + 63) / 64 + 1 : 0};
  }
}

// The token shifts of block b of group g (layer g / (2 heads)): nullptr without LevelDesc::token_shift.
const int8_t* block_shift(const LevelDesc& d, const StreamPlan& p, uint32_t g, uint32_t b) {
  if (d.token_shift == nullptr) return nullptr;
  return d.token_shift + uint64_t(g / (2 * d.heads)) * d.num_tokens + p.first_token(b);
}

// Decodes blocks [b, b + kLanes) of group g together; reports each failed stream through fail(stream, is_symbol).
// kShifted: d.token_shift is set, and each lane's rows move per token (lanes.h).
template <uint32_t kLanes, bool kShifted, class MakeSink, class Fail>
void decode_blocks(const LevelDesc& d, const StreamPlan& p, uint32_t g, uint32_t b, const uint32_t* words,
                   const uint64_t* offsets, const uint32_t* sizes, const GroupRows& rows, uint8_t* scratch,
                   MakeSink& make_sink, Fail& fail) {
  const uint64_t s = uint64_t(g) * p.per_group + b;
  Lane lanes[kLanes];
  decltype(make_sink(0u, 0u, 0u)) sinks[kLanes];
  const int8_t* shifts[kLanes];
  for (uint32_t k = 0; k < kLanes; ++k) {
    lanes[k] = start_lane(words + offsets[s + k], sizes[s + k]);
    sinks[k] = make_sink(g, p.first_token(b + k), p.tokens(b + k));
    if constexpr (kShifted) shifts[k] = block_shift(d, p, g, b + k);  // unshifted: no code at all (lanes.h)
  }
  const uint32_t bad = decode_lanes<kLanes, kShifted>(lanes, p.tokens(b), rows, d.per_token, d.tables.alphabet, sinks,
                                                      scratch, shifts);
  for (uint32_t k = 0; k < kLanes; ++k) if (bad >> k & 1) fail(s + k, sinks[k].is_bad());
}

#if CACHEGEN_HAS_AVX512_PATH
constexpr uint32_t kChains = 4;  // vectors in flight (lanes_avx512.h); 2 and 6 measured the same within noise

// Decodes items [first, first + kN) with decode_vectors: item i is the 8 full blocks from 8 * (i % runs) of group
// i / runs, one vector.
template <uint32_t kN, class MakeSink, class Fail>
void decode_items(const LevelDesc& d, const StreamPlan& p, uint64_t first, uint32_t runs, const uint32_t* words,
                  const uint64_t* offsets, const uint32_t* sizes, MakeSink& make_sink, Fail& fail) {
  const uint32_t stride = (d.per_token + 7) / 8 * 8;
  std::vector<LookupRow> rows[kN];
  std::vector<Prefetch> ahead[kN];
  GroupRows group[kN];
  Lane lanes[8 * kN];
  decltype(make_sink(0u, 0u, 0u)) sinks[8 * kN];
  uint64_t stream[kN];
  for (uint32_t j = 0; j < kN; ++j) {
    const uint32_t g = uint32_t((first + j) / runs), b = uint32_t((first + j) % runs) * 8;
    group_rows(d, g, rows[j], ahead[j]);
    group[j] = {rows[j].data(), ahead[j].data()};
    stream[j] = uint64_t(g) * p.per_group + b;
    for (uint32_t k = 0; k < 8; ++k) {
      lanes[8 * j + k] = start_lane(words + offsets[stream[j] + k], sizes[stream[j] + k]);
      sinks[8 * j + k] = make_sink(g, p.first_token(b + k), kStreamTokens);
    }
  }
  std::vector<uint8_t> syms(uint64_t(8) * kN * stride);
  const uint64_t bad =
      decode_vectors<kN>(lanes, words, group, d.per_token, d.tables.alphabet, sinks, syms.data(), stride);
  for (uint32_t i = 0; i < 8 * kN; ++i) if (bad >> i & 1) fail(stream[i / 8] + i % 8, sinks[i].is_bad());
}

// Decodes every group's runs of 8 full blocks with AVX-512 where it applies (simd_fits and the CPU has it), kChains
// runs (of any groups) at a time; returns the blocks per group it decoded, the first ones (0: none).
template <class MakeSink, class Fail>
uint32_t decode_runs(const LevelDesc& d, const StreamPlan& p, const uint32_t* words, const uint64_t* offsets,
                     const uint32_t* sizes, int num_threads, MakeSink& make_sink, Fail& fail) {
  const uint32_t runs = p.full_blocks / 8;
  const uint64_t items = uint64_t(p.groups) * runs;
  if (items == 0 || !simd_decodes(d)) return 0;
  const uint32_t batches = uint32_t((items + kChains - 1) / kChains);
  for_groups(batches, num_threads, [&](uint32_t batch) {
    uint64_t i = uint64_t(batch) * kChains;
    if (i + kChains <= items) {
      decode_items<kChains>(d, p, i, runs, words, offsets, sizes, make_sink, fail);
      return;
    }
    for (; i + 2 <= items; i += 2) decode_items<2>(d, p, i, runs, words, offsets, sizes, make_sink, fail);
    if (i < items) decode_items<1>(d, p, i, runs, words, offsets, sizes, make_sink, fail);
  });
  return runs * 8;
}
#endif

// Decodes every stream: runs of 8 full blocks with AVX-512 where the CPU has it, then full blocks 8 and 4 at a
// time, the rest (and the short tail block) one by one. kShifted must say whether d.token_shift is set (the
// unshifted lane loop is the fast path, kept apart).
template <bool kShifted, class MakeSink>
Status decode_all(const LevelDesc& d, const uint32_t* words, uint64_t num_words, const uint32_t* sizes,
                  int num_threads, int64_t* bad_stream, MakeSink make_sink) {
  if (d.tables.slots == nullptr || d.tables.bounds == nullptr) return kBadArgument;
  const StreamPlan p = plan_of(d);
  std::vector<uint64_t> offsets;
  if (stream_offsets(sizes, uint64_t(p.groups) * p.per_group, num_words, offsets) != kOk) return kBadSizes;
  std::atomic<int64_t> first_bad{-1};
  std::atomic<int32_t> status{kOk};
  auto fail = [&](uint64_t s, bool is_symbol) {
    int64_t expected = -1;
    if (first_bad.compare_exchange_strong(expected, int64_t(s))) status.store(is_symbol ? kBadSymbol : kBadFinalState);
  };
  uint32_t first_block = 0;
#if CACHEGEN_HAS_AVX512_PATH
  first_block = decode_runs(d, p, words, offsets.data(), sizes, num_threads, make_sink, fail);
#endif
  if (first_block < p.per_group) for_groups(p.groups, num_threads, [&](uint32_t g) {
    std::vector<LookupRow> rows;
    std::vector<Prefetch> ahead;
    group_rows(d, g, rows, ahead);
    const GroupRows gr{rows.data(), ahead.data()};
    std::vector<uint8_t> scratch(8 * d.per_token);  // a token's symbols per lane
    uint8_t* syms = scratch.data();
    const uint64_t* o = offsets.data();
    uint32_t b = first_block;
    for (; b + 8 <= p.full_blocks; b += 8)
      decode_blocks<8, kShifted>(d, p, g, b, words, o, sizes, gr, syms, make_sink, fail);
    for (; b + 4 <= p.full_blocks; b += 4)
      decode_blocks<4, kShifted>(d, p, g, b, words, o, sizes, gr, syms, make_sink, fail);
    for (; b < p.per_group; ++b) decode_blocks<1, kShifted>(d, p, g, b, words, o, sizes, gr, syms, make_sink, fail);
  });
  *bad_stream = first_bad.load();
  return static_cast<Status>(status.load());
}

}  // namespace

void build_lookup(const TableSet& t, uint32_t num_tables, std::vector<uint8_t>* slots, std::vector<uint32_t>* bounds) {
  const uint32_t A = t.alphabet;
  slots->resize(uint64_t(num_tables) * 256);
  bounds->resize(uint64_t(num_tables) * (A + 2));
  for (uint64_t r = 0; r < num_tables; ++r) {
    const uint32_t* cum = t.cum + r * A;
    for (uint32_t i = 0; i < 256; ++i) (*slots)[r * 256 + i] = static_cast<uint8_t>(find_symbol(cum, A, i << 16));
    std::copy(cum, cum + A, bounds->begin() + r * (A + 2));
    (*bounds)[r * (A + 2) + A] = (*bounds)[r * (A + 2) + A + 1] = kTotal;
  }
}

bool has_simd_decode() {
#if CACHEGEN_HAS_AVX512_PATH
  return cpu_has_avx512();  // for the levels simd_fits takes
#else
  return false;
#endif
}

bool simd_decodes(const LevelDesc& d) {
#if CACHEGEN_HAS_AVX512_PATH
  const uint64_t map_size = uint64_t(d.layers) * 2 * d.heads * d.per_token;
  return d.allow_simd && cpu_has_avx512() && simd_fits(d.tables, d.token_shift != nullptr, d.table_map, map_size);
#else
  return false;
#endif
}

uint64_t num_streams(const LevelDesc& d) {
  const StreamPlan p = plan_of(d);
  return uint64_t(p.groups) * p.per_group;
}

uint64_t encode_symbols_cpu(const LevelDesc& d, const int32_t* symbols, uint32_t* sizes, uint32_t* words,
                            int num_threads) {
  const StreamPlan p = plan_of(d);
  const uint64_t capacity = uint64_t(kStreamTokens) * d.per_token + 2;
  for_groups(p.groups, num_threads, [&](uint32_t g) {
    const uint32_t* row = d.table_map + uint64_t(g) * d.per_token;
    for (uint32_t b = 0; b < p.per_group; ++b) {
      const uint64_t s = uint64_t(g) * p.per_group + b;
      const int32_t* src = symbols + (uint64_t(g) * d.num_tokens + p.first_token(b)) * d.per_token;
      sizes[s] = encode_stream(src, p.tokens(b) * d.per_token, row, d.per_token, d.tables, words + s * capacity,
                               block_shift(d, p, g, b));
    }
  });
  uint64_t total = 0;  // compact the per-stream scratch slots into one run, in stream order
  for (uint64_t s = 0; s < uint64_t(p.groups) * p.per_group; ++s) {
    std::copy(words + s * capacity, words + s * capacity + sizes[s], words + total);
    total += sizes[s];
  }
  return total;
}

Status decode_symbols_cpu(const LevelDesc& d, const uint32_t* words, uint64_t num_words, const uint32_t* sizes,
                          int32_t* symbols, int num_threads, int64_t* bad_stream) {
  auto make_sink = [&](uint32_t g, uint32_t t0, uint32_t) {
    return SymbolSink{symbols + (uint64_t(g) * d.num_tokens + t0) * d.per_token, d.per_token};
  };
  if (d.token_shift != nullptr) return decode_all<true>(d, words, num_words, sizes, num_threads, bad_stream, make_sink);
  return decode_all<false>(d, words, num_words, sizes, num_threads, bad_stream, make_sink);
}

Status decode_values_cpu(const LevelDesc& d, const uint32_t* words, uint64_t num_words, const uint32_t* sizes,
                         const uint16_t* scales, const uint16_t* bins, uint16_t* out, int num_threads,
                         int64_t* bad_stream) {
  if (d.token_shift != nullptr) return kBadArgument;  // transform levels with shifts decode to symbols only
  if (!bins) {  // lossless: P = 2 * head_dim symbols per token, two per output value
    auto make_sink = [&](uint32_t g, uint32_t t0, uint32_t) {
      return BytesSink{out + (uint64_t(g) * d.num_tokens + t0) * (d.per_token / 2), d.per_token};
    };
    return decode_all<false>(d, words, num_words, sizes, num_threads, bad_stream, make_sink);
  }
  auto make_sink = [&](uint32_t g, uint32_t t0, uint32_t tokens) {
    const uint32_t layer_kv = g / d.heads;  // (layer, K|V) of group (layer, K|V, head)
    QuantSink sink{out + (uint64_t(g) * d.num_tokens + t0) * d.per_token, d.per_token, bins[layer_kv] / 2u - 1u,
                   bins[layer_kv] - 2u, {}, 0};
    for (uint32_t t = 0; t < tokens; ++t)
      sink.steps[t] = dequant_step(scales[uint64_t(layer_kv) * d.num_tokens + t0 + t], sink.half);
    return sink;
  };
  return decode_all<false>(d, words, num_words, sizes, num_threads, bad_stream, make_sink);
}

}  // namespace cachegen
