// CPU twin of the CUDA entry points (STYLE §6): whole frames' streams, threads over streams.
#pragma once
#include <cstdint>
#include <vector>

#include "cachegen/codec.h"

namespace cachegen {

// The shape of a coded frame's symbols: (layers, 2, heads, num_tokens, per_token), streams per FORMAT.md §5.3.
struct LevelDesc {
  uint32_t layers, heads, num_tokens, per_token;
  const uint32_t* table_map;  // (layers, 2, heads, per_token) table rows
  uint32_t num_tables;
  TableSet tables;
  // Optional (layers, num_tokens) table shifts (nullptr: none), for levels whose tokens have step classes: the
  // symbol at (l, kv, h, t, c) uses table table_map[l, kv, h, c] + token_shift[l * num_tokens + t]. The caller
  // checks that every such index lies in [0, num_tables). Only the symbol coders take it (decode_values_cpu: none).
  const int8_t* token_shift = nullptr;
  // Decoders may use the AVX-512 lanes (kernels/cpu/lanes_avx512.h) where the CPU has them: same results, faster.
  // false: the portable lanes only (to compare the two, or to time the portable path).
  bool allow_simd = true;
};

// Whether this CPU runs the AVX-512 decode path (and the build has it).
bool has_simd_decode();

// Whether the decoders take d's runs of full blocks with the AVX-512 lanes: this CPU has them, d.allow_simd, and
// its rows suit them (lanes_avx512.h, simd_fits). Needs d.tables.slots and .bounds.
bool simd_decodes(const LevelDesc& d);

uint64_t num_streams(const LevelDesc& d);

// The runtime lookup the decoders need (TableSet::slots and ::bounds) for num_tables rows of t: what
// cachegen/codec/tables.py derives as LevelTables.slots and .bounds, for C++ callers without Python.
void build_lookup(const TableSet& t, uint32_t num_tables, std::vector<uint8_t>* slots, std::vector<uint32_t>* bounds);

// Decoding needs d.tables.slots and .bounds (kBadArgument without them).

// Symbols (layers, 2, heads, tokens, per_token) int32 -> sizes[num_streams] and words (capacity
// num_streams * (STREAM_TOKENS * per_token + 2)); returns the word count.
uint64_t encode_symbols_cpu(const LevelDesc& d, const int32_t* symbols, uint32_t* sizes, uint32_t* words,
                            int num_threads);

// Decode into int32 symbols; on error returns the status and the first bad stream in *bad_stream.
Status decode_symbols_cpu(const LevelDesc& d, const uint32_t* words, uint64_t num_words, const uint32_t* sizes,
                          int32_t* symbols, int num_threads, int64_t* bad_stream);

// Fused decode into 16-bit output values (layers, 2, heads, tokens, head_dim): quantized levels dequantize
// with bf16 `scales` (layers, 2, tokens) and `bins` (layers, 2) into bf16; lossless (bins == nullptr) joins bytes.
// kBadArgument with d.token_shift set: levels with shifts decode to symbols only.
Status decode_values_cpu(const LevelDesc& d, const uint32_t* words, uint64_t num_words, const uint32_t* sizes,
                         const uint16_t* scales, const uint16_t* bins, uint16_t* out, int num_threads,
                         int64_t* bad_stream);

// Levels 6-8's dequantization and inverse transform (FORMAT.md §5.5 steps 1-3, §5.6's multipliers) for one frame;
// all arrays are the tables file's transform record (§8.1) for the frame's level, W = heads * head_dim.
struct InverseTransform {
  uint32_t layers, heads, head_dim, num_tokens, token_start;
  const float* steps;          // (layers, 2, W) the level's
  const float* mean;           // (layers, 2, W)
  const float* decode_matrix;  // (layers, 2, W, W), row c the direction of coefficient c
  const float* inv_freq;       // head_dim / 2
  const uint8_t* classes;      // (layers, num_tokens) level 8's token classes (< 16); nullptr on levels 6-7
  bool is_bf16;                // output bf16, else f16
};

// Symbols (layers, 2, heads, tokens, head_dim) int32 in [0, 255) -> 16-bit values of the same shape, keys rotated
// back; escaped tokens are the caller's to overwrite. Equal to transform.dequantize within f32 rounding.
void inverse_transform_cpu(const InverseTransform& t, const int32_t* symbols, uint16_t* out, int num_threads);

}  // namespace cachegen
