// A C++ reader of FORMAT.md frames and tables files: structure, sizes and CRCs (§3, §6, §8), then decoding
// through the core. The BLAKE2b layout digest and tables id are left to the caller (the Python layer checks them).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "codec_cpu.h"

namespace cachegen {

struct SectionView {
  uint32_t kind;
  uint64_t offset, size;
};

struct FrameView {
  uint32_t level, layers, heads, head_dim, dtype, tokens_per_chunk, token_start, num_tokens;
  std::string model_id;
  std::vector<SectionView> sections;
};

struct LevelData {
  uint32_t level, alphabet, num_tables, per_token;
  std::vector<uint16_t> bins;
  std::vector<uint32_t> table_map, freq, cum;
};

struct TablesFile {
  uint32_t layers, heads, head_dim;
  std::vector<LevelData> levels;
};

uint32_t crc32(const uint8_t* data, size_t len);

// Empty string on success, else the FORMAT.md field name that is wrong (as the Python decoder reports it).
std::string parse_frame(const uint8_t* data, size_t len, FrameView* out);
std::string parse_tables(const uint8_t* data, size_t len, TablesFile* out);

// Decode a parsed bf16/f16 frame of level 0, 1 or 2-5 into 16-bit values (L, 2, H, T, D).
std::string decode_frame(const uint8_t* data, const FrameView& frame, const TablesFile* tables,
                         std::vector<uint16_t>* out);

}  // namespace cachegen
