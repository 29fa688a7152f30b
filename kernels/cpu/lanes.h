// The CPU decoder's inner loop (FORMAT.md §7): kLanes streams of one (layer, K|V, head) group decoded in lockstep.
// The lanes' states are independent, so their steps overlap in the pipeline; every step is branch-free on the
// common path (symbol pick and word refill), because both depend on the data and would mispredict as branches.
#pragma once
#include <cstdint>

#include "cachegen/codec.h"

namespace cachegen {

// Read by a lane whose stream has no words, so the branch-free refill always has an address it may load.
inline constexpr uint32_t kNoWords[1] = {0};

// One lane: its state and the stack of words it pops from (FORMAT.md §7, decoding).
struct Lane {
  uint64_t state;
  uint32_t remaining;
  const uint32_t* words;
};

inline Lane start_lane(const uint32_t* words, uint32_t num_words) {
  Lane lane{0, num_words, num_words ? words : kNoWords};
  lane.state = initial_state(lane.words, &lane.remaining);
  return lane;
}

// One decode step of `lane`, with the same result as decode_step.
inline uint32_t lane_step(Lane& lane, const LookupRow& row, uint32_t alphabet) {
  const uint64_t x = lane.state;
  const uint32_t quantile = static_cast<uint32_t>(x) & (kTotal - 1);
  uint64_t p;
  const uint32_t sym = lookup_symbol(row, alphabet, quantile, &p);
  const uint64_t next = static_cast<uint64_t>(pair_freq(p)) * (x >> kPrecision) + quantile - pair_low(p);
  // Refill when next < 2^32 and words remain, as a mask (a ternary here compiles to a mispredicting branch). The load
  // at remaining - 1 (or 0) is always in range: after initial_state that index is < num_words, or 0 on kNoWords.
  const uint64_t refill = 0 - static_cast<uint64_t>((next < (1ull << 32)) & (lane.remaining != 0));
  const uint64_t word = lane.words[lane.remaining + static_cast<uint32_t>(refill)];
  lane.state = (next << (refill & 32)) | (word & refill);
  lane.remaining += static_cast<uint32_t>(refill);
  return sym;
}

// Decode `tokens` tokens of kLanes equal-length streams; rows[c] = the lookup rows of column c. sinks[k](j, token,
// symbol) stores lane k's symbols. Returns a bitmask of the lanes that failed their final check or their sink's.
template <uint32_t kLanes, class Sink>
uint32_t decode_lanes(Lane* lanes, uint32_t tokens, const LookupRow* rows, uint32_t per_token, uint32_t alphabet,
                      Sink* sinks) {
  Lane lane[kLanes];
  for (uint32_t k = 0; k < kLanes; ++k) lane[k] = lanes[k];
  uint32_t j = 0;
  for (uint32_t token = 0; token < tokens; ++token) {
    for (uint32_t c = 0; c < per_token; ++c, ++j) {
      const LookupRow row = rows[c];
#pragma GCC unroll 8
      for (uint32_t k = 0; k < kLanes; ++k) sinks[k](j, token, lane_step(lane[k], row, alphabet));
    }
  }
  uint32_t bad = 0;
  for (uint32_t k = 0; k < kLanes; ++k)
    bad |= static_cast<uint32_t>(lane[k].state != 0 || lane[k].remaining != 0 || sinks[k].is_bad()) << k;
  return bad;
}

}  // namespace cachegen
