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

// One decode step of `lane`, with the same result as decode_step. kChecked = false: the caller knows a word is left
// for every refill this step may make (see decode_lanes), so the remaining != 0 test drops out.
template <bool kChecked = true>
inline uint32_t lane_step(Lane& lane, const LookupRow& row, uint32_t alphabet) {
  const uint64_t x = lane.state;
  const uint32_t quantile = static_cast<uint32_t>(x) & (kTotal - 1);
  uint64_t p;
  const uint32_t sym = lookup_symbol(row, alphabet, quantile, &p);
  const uint64_t next = static_cast<uint64_t>(pair_freq(p)) * (x >> kPrecision) + quantile - pair_low(p);
  // Refill when next < 2^32 and words remain, as a mask (a ternary here compiles to a mispredicting branch). The load
  // at remaining - 1 (or 0) is always in range: after initial_state that index is < num_words, or 0 on kNoWords.
  const uint64_t small = 0 - static_cast<uint64_t>(next < (1ull << 32));
  const uint64_t refill = kChecked ? small & (0 - static_cast<uint64_t>(lane.remaining != 0)) : small;
  const uint64_t word = lane.words[lane.remaining + static_cast<uint32_t>(refill)];
  lane.state = (next << (refill & 32)) | (word & refill);
  lane.remaining += static_cast<uint32_t>(refill);
  return sym;
}

// The lookup rows of a group's columns. Every token visits all of them (64-128 tables); for the large alphabets
// they are more than L1 holds (q8: 82 KB), so each visit would miss, and the steps' loads are data-dependent, which
// no hardware prefetcher predicts. So there, two columns ahead, the whole row is fetched into L1 (measured: +13% on
// q8, while fetching only the rows' central lines gained nothing; small rows that fit lose ~4%, so they skip it).
struct Prefetch {
  LookupRow row;  // the row of column (c + kPrefetchColumns) % per_token, fetched while decoding column c
  uint32_t lines;  // 64-byte lines of its bounds to fetch with its slots; 0: none
};

struct GroupRows {
  const LookupRow* rows;
  const Prefetch* ahead;  // per column
};

constexpr uint32_t kPrefetchColumns = 2;
constexpr uint32_t kL1RowBytes = 48 * 1024;  // prefetch when a group's rows are larger than this

inline void prefetch_row(const LookupRow& row, uint32_t bound_lines) {
  for (uint32_t i = 0; i < 4; ++i) __builtin_prefetch(row.slots + 64 * i, 0, 3);
  const char* bounds = reinterpret_cast<const char*>(row.bounds);
  for (uint32_t i = 0; i < bound_lines; ++i) __builtin_prefetch(bounds + 64 * i, 0, 3);
}

constexpr uint32_t kBatch = 8;  // columns decoded between checks of the words left

// Columns [c, end) of one token for kLanes lanes: symbols into syms[k * per_token + column].
template <bool kChecked, uint32_t kLanes>
inline void decode_columns(Lane* lane, const GroupRows& g, uint32_t c, uint32_t end, uint32_t per_token,
                           uint32_t alphabet, uint8_t* syms) {
  for (; c < end; ++c) {
    if (g.ahead[c].lines != 0) prefetch_row(g.ahead[c].row, g.ahead[c].lines);
    const LookupRow row = g.rows[c];
#pragma GCC unroll 8
    for (uint32_t k = 0; k < kLanes; ++k)
      syms[k * per_token + c] = static_cast<uint8_t>(lane_step<kChecked>(lane[k], row, alphabet));
  }
}

// A lane's current token moves every column's lookup row by `shift` tables (LevelDesc::token_shift): that many
// rows of 256 slots and of alphabet + 2 bounds.
struct RowMove {
  int64_t slots, bounds;
};

inline LookupRow moved_row(const LookupRow& row, const RowMove& move) {
  return {row.slots + move.slots, row.bounds + move.bounds};
}

// decode_columns when rows vary per token: lane k reads its rows moved by move[k]. Its own function, not a flag of
// decode_columns: any change to that one's code (even dead parameters) cost the unshifted levels ~4% (spills).
// No prefetch: the lanes' rows differ per token, and on 80 tables of 255 symbols shared by every group (so they
// stay in L2) fetching lane 0's next rows cost 13%, two or all lanes' more. Measured without prefetch in either
// loop: 0.89x the unshifted loop's speed with random shifts, 0.96x with all-zero shifts.
template <bool kChecked, uint32_t kLanes>
inline void decode_columns_moved(Lane* lane, const GroupRows& g, const RowMove* move, uint32_t c, uint32_t end,
                                 uint32_t per_token, uint32_t alphabet, uint8_t* syms) {
  for (; c < end; ++c) {
    const LookupRow row = g.rows[c];
#pragma GCC unroll 8
    for (uint32_t k = 0; k < kLanes; ++k)
      syms[k * per_token + c] = static_cast<uint8_t>(lane_step<kChecked>(lane[k], moved_row(row, move[k]), alphabet));
  }
}

// Decode `tokens` tokens of kLanes equal-length streams of group g. Each token's symbols collect in syms
// (kLanes * per_token bytes, lane-major), then sinks[k].put(token, lane k's symbols) stores them. kShifted: lane k's
// token t moves its rows by shifts[k][t] tables (shifts: nullptr otherwise).
// Returns a bitmask of the lanes that failed their final check or their sink's.
template <uint32_t kLanes, bool kShifted, class Sink>
uint32_t decode_lanes(Lane* lanes, uint32_t tokens, const GroupRows& g, uint32_t per_token, uint32_t alphabet,
                      Sink* sinks, uint8_t* syms, const int8_t* const* shifts) {
  Lane lane[kLanes];
  for (uint32_t k = 0; k < kLanes; ++k) lane[k] = lanes[k];
  RowMove move[kLanes];
  for (uint32_t token = 0; token < tokens; ++token) {
    if constexpr (kShifted)
      for (uint32_t k = 0; k < kLanes; ++k) move[k] = {shifts[k][token] * 256ll, shifts[k][token] * (alphabet + 2ll)};
    for (uint32_t c = 0; c < per_token; c += kBatch) {
      // A step takes at most one word: with kBatch words left in every lane, no step of the batch checks for one.
      uint32_t fewest = lane[0].remaining;
      for (uint32_t k = 1; k < kLanes; ++k) fewest = lane[k].remaining < fewest ? lane[k].remaining : fewest;
      const uint32_t end = c + kBatch < per_token ? c + kBatch : per_token;
      if constexpr (kShifted) {
        if (fewest >= kBatch) decode_columns_moved<false, kLanes>(lane, g, move, c, end, per_token, alphabet, syms);
        else decode_columns_moved<true, kLanes>(lane, g, move, c, end, per_token, alphabet, syms);
      } else {
        if (fewest >= kBatch) decode_columns<false, kLanes>(lane, g, c, end, per_token, alphabet, syms);
        else decode_columns<true, kLanes>(lane, g, c, end, per_token, alphabet, syms);
      }
    }
    for (uint32_t k = 0; k < kLanes; ++k) sinks[k].put(token, syms + k * per_token);
  }
  uint32_t bad = 0;
  for (uint32_t k = 0; k < kLanes; ++k)
    bad |= static_cast<uint32_t>(lane[k].state != 0 || lane[k].remaining != 0 || sinks[k].is_bad()) << k;
  return bad;
}

}  // namespace cachegen
