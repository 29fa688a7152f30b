// A C++ reader of FORMAT.md frames and tables files of every level (0-9): structure, sizes and CRCs (§3, §6, §8,
// §8.1-8.3), then decoding through the core (transform.h for levels 6-9). The BLAKE2b layout digest and tables
// id are left to the caller (the Python layer checks them).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "codec_cpu.h"
#include "transform.h"

namespace cachegen {

// A T from untrusted, possibly unaligned bytes; little-endian host assumed (x86-64, aarch64), as FORMAT.md §2.
template <class T>
T load(const uint8_t* p) {
  T value;
  std::memcpy(&value, p, sizeof(T));
  return value;
}

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
  std::optional<TransformData> transform;  // the record of FORMAT.md §8.1, when the file has one
};

uint32_t crc32(const uint8_t* data, size_t len);

// Empty string on success, else the FORMAT.md field name that is wrong (as the Python decoder reports it).
std::string parse_frame(const uint8_t* data, size_t len, FrameView* out);
std::string parse_tables(const uint8_t* data, size_t len, TablesFile* out);

// Decode a parsed bf16/f16 frame of any level into 16-bit values (L, 2, H, T, D). Levels 2-5 always write bf16
// (the fused CPU kernel's output); levels 6-9 write the frame's dtype and agree with other decoders to f32
// rounding only (FORMAT.md §5.5, §5.7).
std::string decode_frame(const uint8_t* data, const FrameView& frame, const TablesFile* tables,
                         std::vector<uint16_t>* out);

}  // namespace cachegen
