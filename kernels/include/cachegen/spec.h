// Numeric constants of FORMAT.md, mirrored from cachegen/spec.py and cachegen/codec/*.py.
// tests/unit/test_codec_ext.py compares the values the extension exports with the Python ones.
#pragma once
#include <cstdint>

namespace cachegen {

constexpr uint32_t kMagic = 0x564B4743u;  // "CGKV" read as a little-endian u32
constexpr uint32_t kFormatVersion = 1;
constexpr uint32_t kPrecision = 24;  // rANS probability bits (FORMAT.md §7)
constexpr uint32_t kTotal = 1u << kPrecision;
constexpr uint32_t kStreamTokens = 32;  // tokens per stream block (FORMAT.md §5.3)
constexpr uint32_t kHeaderSize = 48;

enum SectionKind : uint32_t {
  kSectionRaw = 1,
  kSectionTablesId = 2,
  kSectionScales = 3,
  kSectionStreamSizes = 4,
  kSectionWords = 5,
  kSectionEscapes = 6,       // levels 6-8 (FORMAT.md §5.5)
  kSectionTokenClasses = 7,  // level 8 (FORMAT.md §5.6)
};

enum Status : int32_t {
  kOk = 0,
  kBadFinalState = 1,   // a stream did not end in state 0 with every word consumed
  kBadSizes = 2,        // stream word counts do not add up to the words given
  kBadSymbol = 3,       // a decoded symbol no quantizer of this level emits
  kBadArgument = 4,     // shapes or sizes inconsistent (caller bug)
};

}  // namespace cachegen
