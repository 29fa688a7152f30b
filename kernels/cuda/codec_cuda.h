// CUDA twin of decode_values_cpu (STYLE §6): torch-free, plain device pointers, C linkage for a ctypes binding.
#pragma once
#include <cstdint>

extern "C" {

// All pointers are device pointers. cum: (num_tables, alphabet) exclusive prefix sums (freq is their differences,
// the last up to 2^24); slots: (num_tables, 256) the symbol of quantile i << 16 per table (tables.py
// LevelTables.slots). offsets[num_streams] are the streams' first word (host-computed prefix sums of the sizes,
// already checked to add up). out must be 4-byte aligned. scales/bins null => lossless (bytes joined). status[num_streams]
// receives 0 or a cachegen::Status per stream. Returns a cudaError_t as int (0 = launched).
int cachegen_decode_values_cuda(uint32_t layers, uint32_t heads, uint32_t num_tokens, uint32_t per_token,
                                const uint32_t* table_map, const uint32_t* cum, const uint8_t* slots,
                                uint32_t alphabet, const uint32_t* words, const uint64_t* offsets,
                                const uint32_t* sizes, const uint16_t* scales, const uint16_t* bins,
                                uint16_t* out, int32_t* status, void* cuda_stream);

// Levels 6-8: the symbols themselves, one byte each, into out (L, 2, H, T, per_token), 16-byte aligned; bins as
// above (a symbol above bins - 2 is an error); token_shift (layers, num_tokens) int8 or null: level 8's per-token
// move of every column's row (FORMAT.md §5.6), each map + shift checked against num_tables.
int cachegen_decode_symbols_cuda(uint32_t layers, uint32_t heads, uint32_t num_tokens, uint32_t per_token,
                                 const uint32_t* table_map, const uint32_t* cum, const uint8_t* slots,
                                 uint32_t alphabet, uint32_t num_tables, const uint32_t* words,
                                 const uint64_t* offsets, const uint32_t* sizes, const uint16_t* bins,
                                 const int8_t* token_shift, uint8_t* out, int32_t* status, void* cuda_stream);

int cachegen_cuda_device_count();
}
