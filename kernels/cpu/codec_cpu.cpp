// Reference CPU implementation of the coded levels (FORMAT.md §5): the oracle the CUDA kernels must match.
#include "codec_cpu.h"

#include <algorithm>
#include <atomic>
#include <thread>
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

// Runs work(group) for every group on up to num_threads threads; groups are equal work, so static split.
template <class Work>
void for_groups(uint32_t groups, int num_threads, Work work) {
  const uint32_t n = std::max(1, std::min<int>(num_threads, static_cast<int>(groups)));
  if (n == 1) {
    for (uint32_t g = 0; g < groups; ++g) work(g);
    return;
  }
  std::vector<std::thread> pool;
  for (uint32_t i = 0; i < n; ++i)
    pool.emplace_back([&, i] { for (uint32_t g = i; g < groups; g += n) work(g); });
  for (auto& t : pool) t.join();
}

// Word offset of every stream; kBadSizes unless they add up to num_words exactly.
Status stream_offsets(const uint32_t* sizes, uint64_t count, uint64_t num_words, std::vector<uint64_t>& out) {
  out.resize(count + 1);
  out[0] = 0;
  for (uint64_t s = 0; s < count; ++s) out[s + 1] = out[s] + sizes[s];
  return out[count] == num_words ? kOk : kBadSizes;
}

struct SymbolSink {
  int32_t* out;
  void operator()(uint32_t j, uint32_t, uint32_t sym) { out[j] = static_cast<int32_t>(sym); }
  bool is_bad() const { return false; }
};

struct QuantSink {  // fused dequantization: one f32 multiply, bf16 round half to even (FORMAT.md §5.2)
  uint16_t* out;
  uint32_t head_dim, half, limit;
  float steps[kStreamTokens];  // per token of this block
  bool has_bad = false;
  void operator()(uint32_t j, uint32_t token, uint32_t sym) {
    has_bad |= sym > limit;
    const float q = static_cast<float>(static_cast<int32_t>(sym) - static_cast<int32_t>(half));
    out[j] = float_to_bf16(q * steps[token]);
  }
  bool is_bad() const { return has_bad; }
};

struct BytesSink {  // lossless: high byte then low byte of each 16-bit value
  uint16_t* out;
  void operator()(uint32_t j, uint32_t, uint32_t sym) {
    if ((j & 1) == 0) out[j >> 1] = static_cast<uint16_t>(sym << 8);
    else out[j >> 1] |= static_cast<uint16_t>(sym);
  }
  bool is_bad() const { return false; }
};

constexpr uint32_t kLanes = 4;  // streams decoded in lockstep per thread: independent states give the CPU ILP

// Decode kLanes equal-length streams together; returns a bitmask of the lanes that failed their final check.
template <class Sink>
uint32_t decode_lanes(const uint32_t* words, const uint64_t* offsets, const uint32_t* sizes, uint32_t count,
                      const uint32_t* row, uint32_t per_token, const TableSet& t, Sink* sinks) {
  uint64_t state[kLanes];
  uint32_t remaining[kLanes];
  const uint32_t* base[kLanes];
  for (uint32_t k = 0; k < kLanes; ++k) {
    base[k] = words + offsets[k];
    remaining[k] = sizes[k];
    state[k] = initial_state(base[k], &remaining[k]);
  }
  uint32_t column = 0, token = 0;
  for (uint32_t j = 0; j < count; ++j) {
    const uint32_t table = row[column];
    for (uint32_t k = 0; k < kLanes; ++k)
      sinks[k](j, token, decode_step(&state[k], base[k], &remaining[k], t, table));
    if (++column == per_token) { column = 0; ++token; }
  }
  uint32_t bad = 0;
  for (uint32_t k = 0; k < kLanes; ++k) bad |= (state[k] != 0 || remaining[k] != 0 || sinks[k].is_bad()) << k;
  return bad;
}

// Decodes every stream: full blocks kLanes at a time, the rest one by one. make_sink(g, t0, tokens) -> Sink.
template <class MakeSink>
Status decode_all(const LevelDesc& d, const uint32_t* words, uint64_t num_words, const uint32_t* sizes,
                  int num_threads, int64_t* bad_stream, MakeSink make_sink) {
  const StreamPlan p = plan_of(d);
  std::vector<uint64_t> offsets;
  if (stream_offsets(sizes, uint64_t(p.groups) * p.per_group, num_words, offsets) != kOk) return kBadSizes;
  std::atomic<int64_t> first_bad{-1};
  std::atomic<int32_t> status{kOk};
  auto fail = [&](uint64_t s, bool is_symbol) {
    int64_t expected = -1;
    if (first_bad.compare_exchange_strong(expected, int64_t(s))) status.store(is_symbol ? kBadSymbol : kBadFinalState);
  };
  for_groups(p.groups, num_threads, [&](uint32_t g) {
    const uint32_t* row = d.table_map + uint64_t(g) * d.per_token;
    uint32_t b = 0;
    for (; b + kLanes <= p.full_blocks; b += kLanes) {
      const uint64_t s = uint64_t(g) * p.per_group + b;
      decltype(make_sink(0u, 0u, 0u)) sinks[kLanes] = {make_sink(g, p.first_token(b), kStreamTokens),
                                                       make_sink(g, p.first_token(b + 1), kStreamTokens),
                                                       make_sink(g, p.first_token(b + 2), kStreamTokens),
                                                       make_sink(g, p.first_token(b + 3), kStreamTokens)};
      const uint32_t bad = decode_lanes(words, &offsets[s], sizes + s, kStreamTokens * d.per_token, row,
                                        d.per_token, d.tables, sinks);
      for (uint32_t k = 0; k < kLanes; ++k) if (bad >> k & 1) fail(s + k, sinks[k].is_bad());
    }
    for (; b < p.per_group; ++b) {
      const uint64_t s = uint64_t(g) * p.per_group + b;
      auto sink = make_sink(g, p.first_token(b), p.tokens(b));
      Status st = decode_stream(words + offsets[s], sizes[s], p.tokens(b) * d.per_token, row, d.per_token,
                                d.tables, sink);
      if (st != kOk || sink.is_bad()) fail(s, sink.is_bad());
    }
  });
  *bad_stream = first_bad.load();
  return static_cast<Status>(status.load());
}

}  // namespace

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
      sizes[s] = encode_stream(src, p.tokens(b) * d.per_token, row, d.per_token, d.tables, words + s * capacity);
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
  return decode_all(d, words, num_words, sizes, num_threads, bad_stream, [&](uint32_t g, uint32_t t0, uint32_t) {
    return SymbolSink{symbols + (uint64_t(g) * d.num_tokens + t0) * d.per_token};
  });
}

Status decode_values_cpu(const LevelDesc& d, const uint32_t* words, uint64_t num_words, const uint32_t* sizes,
                         const uint16_t* scales, const uint16_t* bins, uint16_t* out, int num_threads,
                         int64_t* bad_stream) {
  if (!bins) {  // lossless: P = 2 * head_dim symbols per token, two per output value
    return decode_all(d, words, num_words, sizes, num_threads, bad_stream, [&](uint32_t g, uint32_t t0, uint32_t) {
      return BytesSink{out + (uint64_t(g) * d.num_tokens + t0) * (d.per_token / 2)};
    });
  }
  Status st = decode_all(d, words, num_words, sizes, num_threads, bad_stream,
                         [&](uint32_t g, uint32_t t0, uint32_t tokens) {
                           const uint32_t layer_kv = g / d.heads;  // (layer, K|V) of group (layer, K|V, head)
                           QuantSink sink{out + (uint64_t(g) * d.num_tokens + t0) * d.per_token, d.per_token,
                                          bins[layer_kv] / 2u - 1u, bins[layer_kv] - 2u, {}, false};
                           for (uint32_t t = 0; t < tokens; ++t)
                             sink.steps[t] = dequant_step(scales[uint64_t(layer_kv) * d.num_tokens + t0 + t], sink.half);
                           return sink;
                         });
  return st;
}

}  // namespace cachegen
