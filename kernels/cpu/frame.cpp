// FORMAT.md §3, §5.5-5.7 and §6 in C++: every size is checked against the buffer before it is used. The tables
// file (§8-8.3) is read by tables_file.cpp.
#include "frame.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace cachegen {
namespace {

std::string check_fixed(const uint8_t* d, size_t len, FrameView* f, size_t* head) {
  if (len < kHeaderSize) return "header";
  if (load<uint32_t>(d) != kMagic) return "magic";
  if (load<uint16_t>(d + 4) != kFormatVersion) return "version";
  const uint32_t id_len = d[15], num_sections = load<uint16_t>(d + 28);
  if (id_len < 1 || id_len > 64) return "model_id_len";
  if (num_sections < 1 || num_sections > 16) return "num_sections";
  *head = kHeaderSize + id_len + 16 * num_sections;
  if (len < *head + 4) return "header";
  if (load<uint32_t>(d + *head) != crc32(d, *head)) return "header_crc32";
  if (d[7] != 0) return "flags";
  if (load<uint16_t>(d + 30) != 0) return "reserved";
  f->level = d[6];
  f->layers = load<uint16_t>(d + 8);
  f->heads = load<uint16_t>(d + 10);
  f->head_dim = load<uint16_t>(d + 12);
  f->dtype = d[14];
  f->tokens_per_chunk = load<uint32_t>(d + 16);
  f->token_start = load<uint32_t>(d + 20);
  f->num_tokens = load<uint32_t>(d + 24);
  if (f->level > 9) return "level";  // levels 0-9 (FORMAT.md §4)
  if (f->dtype < 1 || f->dtype > 3) return "dtype";
  if (f->num_tokens < 1 || f->num_tokens > 65536) return "num_tokens";
  if (uint64_t(f->token_start) + f->num_tokens > 0xFFFFFFFFull) return "token_start";
  if (!f->layers || !f->heads || !f->head_dim || !f->tokens_per_chunk) return "layout";
  f->model_id.assign(reinterpret_cast<const char*>(d + kHeaderSize), id_len);
  return "";
}

std::string expect(const FrameView& f, std::vector<uint32_t> kinds, std::vector<int64_t> sizes) {
  if (f.sections.size() != kinds.size()) return "section.kind";
  for (size_t i = 0; i < kinds.size(); ++i) {
    if (f.sections[i].kind != kinds[i]) return "section.kind";
    if (sizes[i] >= 0 && f.sections[i].size != uint64_t(sizes[i])) return "section.size";
  }
  return "";
}

// The tables' entry for the frame's level when the tables fit the frame: its layout, the P that decoders size
// their output by, and for levels 6-9 a transform record with the level's steps, in its cross-layer record for
// level 9 (FORMAT.md §6 rule 8). nullptr
// is a mismatch (the Python decoder's LayoutMismatch). The first entry of the level counts, as in tables.py.
const LevelData* level_for(const TablesFile& t, const FrameView& f) {
  if (t.layers != f.layers || t.heads != f.heads || t.head_dim != f.head_dim) return nullptr;
  const auto is_level = [&](const LevelData& l) { return l.level == f.level; };
  const auto lv = std::find_if(t.levels.begin(), t.levels.end(), is_level);
  if (lv == t.levels.end() || lv->per_token != (f.level == 1 ? 2 : 1) * f.head_dim) return nullptr;
  if (f.level >= 6 && (!t.transform || !t.transform->has_level(f.level))) return nullptr;
  return &*lv;
}

// The sections a coded level prescribes (FORMAT.md §5.4, §5.5, §5.6); -1 for a size the header does not imply:
// WORDS, and ESCAPES, whose size follows from its own count (read_escapes checks it).
std::string check_coded_sections(const FrameView& f, uint64_t streams) {
  std::vector<uint32_t> kinds = {kSectionTablesId, kSectionStreamSizes, kSectionWords};
  std::vector<int64_t> sizes = {16, int64_t(4 * streams), -1};
  if (f.level >= 2) {
    const bool is_transform = f.level >= 6;
    kinds.insert(kinds.begin() + 1, is_transform ? kSectionEscapes : kSectionScales);
    sizes.insert(sizes.begin() + 1, is_transform ? -1 : int64_t(f.layers) * 2 * f.num_tokens * 2);
  }
  if (f.level == kTokenAdaptiveLevel) {  // TOKEN_CLASSES, third: one nibble per (layer, token)
    kinds.insert(kinds.begin() + 2, kSectionTokenClasses);
    sizes.insert(sizes.begin() + 2, (int64_t(f.layers) * f.num_tokens + 1) / 2);
  }
  return expect(f, kinds, sizes);
}

// Runs one of codec_cpu.h's decoders, decode(desc, words, num_words, sizes, &bad_stream), over the frame's
// streams (its last two sections) and names the field of what it reports. `token_shift` (L, T): level 8's table
// shifts (nullptr: none), in range by the ladder check of the tables.
template <class Decode>
std::string run_streams(const uint8_t* d, const FrameView& f, const LevelData& lv, const int8_t* token_shift,
                        Decode decode) {
  const SectionView& words = f.sections.back();
  const SectionView& stream_sizes = f.sections[f.sections.size() - 2];
  std::vector<uint32_t> w(words.size / 4), z(stream_sizes.size / 4);
  std::memcpy(w.data(), d + words.offset, w.size() * 4);
  std::memcpy(z.data(), d + stream_sizes.offset, z.size() * 4);
  LevelDesc desc{f.layers, f.heads, f.num_tokens, lv.per_token, lv.table_map.data(), lv.num_tables,
                 {lv.freq.data(), lv.cum.data(), lv.alphabet}, token_shift};
  std::vector<uint8_t> slots;
  std::vector<uint32_t> bounds;
  build_lookup(desc.tables, lv.num_tables, &slots, &bounds);  // per frame: fine for a test reader
  desc.tables.slots = slots.data();
  desc.tables.bounds = bounds.data();
  int64_t bad_stream = -1;
  const Status st = decode(desc, w.data(), uint64_t(w.size()), z.data(), &bad_stream);
  if (words.size % 4 != 0 || st == kBadSizes) return "stream_sizes";
  if (st == kBadFinalState) return "rans_final_state";
  if (st == kBadSymbol) return "symbol";
  return "";
}

// Whether the STREAM_SIZES word counts add up to the WORDS section, checked before TOKEN_CLASSES as the Python
// decoder does (decode._payload), so a frame wrong in both gets the same field from both readers.
bool words_add_up(const uint8_t* d, const FrameView& f) {
  const SectionView &words = f.sections.back(), &stream_sizes = f.sections[f.sections.size() - 2];
  const uint64_t limit = words.size / 4;
  uint64_t total = 0;  // stops past the limit, so no count of hostile sizes wraps
  for (uint64_t i = 0; i < stream_sizes.size / 4 && total <= limit; ++i)
    total += load<uint32_t>(d + stream_sizes.offset + 4 * i);
  return words.size % 4 == 0 && total == limit;
}

// The ESCAPES section of a level-6/7/8/9 frame (FORMAT.md §5.5), checked as transform_frame.read_escapes: the token
// indices, ascending and below T, and where their raw values start. Sizes are compared by division, so no
// count times a layout can wrap.
std::string read_escapes(const uint8_t* d, const FrameView& f, std::vector<uint32_t>* tokens, const uint8_t** raw) {
  const SectionView& s = f.sections[1];
  if (s.size < 4) return "escapes";
  const uint64_t n = load<uint32_t>(d + s.offset);
  const uint64_t token_bytes = uint64_t(f.layers) * 2 * f.heads * f.head_dim * 2;  // 16-bit dtypes only here
  if (n > f.num_tokens || s.size - 4 < 2 * n) return "escapes";
  const uint64_t raw_bytes = s.size - 4 - 2 * n;
  if (raw_bytes % token_bytes != 0 || raw_bytes / token_bytes != n) return "escapes";
  tokens->resize(n);
  for (uint64_t i = 0; i < n; ++i) {
    (*tokens)[i] = load<uint16_t>(d + s.offset + 4 + 2 * i);
    if ((*tokens)[i] >= f.num_tokens || (i > 0 && (*tokens)[i] <= (*tokens)[i - 1])) return "escapes";
  }
  *raw = d + s.offset + 4 + 2 * n;
  return "";
}

// Levels 6-9 once their streams gave `symbols` (L, 2, H, T, D): ESCAPES, dequantization (transform.h; `classes`
// (L, T) on level 8, else empty; level 9 from its cross-layer record), then the escaped tokens' raw values over
// their dequantized ones (FORMAT.md §5.5 step 4). Every symbol is <= 254 (A = 255, checked with the tables), so no
// symbol check is due.
std::string finish_transform(const uint8_t* d, const FrameView& f, const TransformData& tx,
                             const std::vector<uint8_t>& classes, const std::vector<int32_t>& symbols,
                             std::vector<uint16_t>* out) {
  std::vector<uint32_t> tokens;
  const uint8_t* raw = nullptr;
  const std::string bad = read_escapes(d, f, &tokens, &raw);
  if (!bad.empty()) return bad;
  out->resize(symbols.size());
  const TransformShape shape{f.layers, f.heads, f.head_dim, f.num_tokens, f.token_start, f.dtype == 1};
  const uint8_t* class_data = classes.empty() ? nullptr : classes.data();
  const auto cross = tx.cross_layer.find(f.level);
  if (cross != tx.cross_layer.end())
    dequantize_cross_layer(shape, tx, cross->second, symbols.data(), out->data());
  else
    dequantize_transform(shape, tx, tx.steps.at(f.level).data(), class_data, symbols.data(), out->data());
  const uint64_t groups = uint64_t(f.layers) * 2 * f.heads, n = tokens.size(), row_bytes = uint64_t(f.head_dim) * 2;
  for (uint64_t g = 0; g < groups; ++g)  // raw order (l, kv, h, i, d): each group's n tokens in a row
    for (uint64_t i = 0; i < n; ++i)
      std::memcpy(out->data() + (g * f.num_tokens + tokens[i]) * f.head_dim, raw + (g * n + i) * row_bytes, row_bytes);
  return "";
}

}  // namespace

uint32_t crc32(const uint8_t* data, size_t len) {
  uint32_t table[256];
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    table[i] = c;
  }
  uint32_t crc = 0xFFFFFFFFu;
  for (size_t i = 0; i < len; ++i) crc = table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
  return crc ^ 0xFFFFFFFFu;
}

std::string parse_frame(const uint8_t* d, size_t len, FrameView* f) {
  size_t head = 0;
  std::string bad = check_fixed(d, len, f, &head);
  if (!bad.empty()) return bad;
  uint64_t offset = head + 4;
  f->sections.clear();
  for (size_t at = kHeaderSize + f->model_id.size(); at < head; at += 16) {
    const uint64_t size = load<uint64_t>(d + at + 8);
    if (load<uint32_t>(d + at + 4) != 0) return "section.reserved";
    if (size > len - offset - 4) return "section.size";
    f->sections.push_back({load<uint32_t>(d + at), offset, size});
    offset += size;
  }
  if (offset + 4 != len) return "frame_size";
  if (load<uint32_t>(d + len - 4) != crc32(d + head + 4, len - head - 8)) return "payload_crc32";
  return "";
}

std::string decode_frame(const uint8_t* d, const FrameView& f, const TablesFile* tables, std::vector<uint16_t>* out) {
  const uint64_t values = uint64_t(f.layers) * 2 * f.heads * f.num_tokens * f.head_dim;
  if (f.dtype == 3) return "dtype";  // 16-bit outputs only in this reader
  if (f.level == 0) {
    std::string bad = expect(f, {kSectionRaw}, {int64_t(values * 2)});
    if (!bad.empty()) return bad;
    out->resize(values);
    std::memcpy(out->data(), d + f.sections[0].offset, values * 2);
    return "";
  }
  const LevelData* lv = tables ? level_for(*tables, f) : nullptr;
  if (!lv) return "tables";
  const uint64_t streams = uint64_t(f.layers) * 2 * f.heads * ((f.num_tokens + kStreamTokens - 1) / kStreamTokens);
  std::string bad = check_coded_sections(f, streams);
  if (!bad.empty()) return bad;
  if (f.level >= 6) {  // classes, symbols, then ESCAPES: the Python decoder's order, so both name the same field
    if (!words_add_up(d, f)) return "stream_sizes";
    std::vector<uint8_t> classes;
    std::vector<int8_t> shifts;
    if (f.level == kTokenAdaptiveLevel) {
      const SectionView& s = f.sections[2];
      if (!unpack_token_classes(d + s.offset, s.size, f.layers, f.num_tokens, &classes)) return "token_classes";
      for (uint8_t v : classes) shifts.push_back(class_shift(v));
    }
    std::vector<int32_t> symbols(values);
    const int8_t* shift = shifts.empty() ? nullptr : shifts.data();
    bad = run_streams(d, f, *lv, shift, [&](const LevelDesc& desc, const uint32_t* w, uint64_t n, const uint32_t* z,
                                            int64_t* bad_stream) {
      return decode_symbols_cpu(desc, w, n, z, symbols.data(), 1, bad_stream);
    });
    return bad.empty() ? finish_transform(d, f, *tables->transform, classes, symbols, out) : bad;
  }
  const bool is_quant = f.level >= 2;
  std::vector<uint16_t> scales;
  if (is_quant) {
    scales.resize(uint64_t(f.layers) * 2 * f.num_tokens);
    std::memcpy(scales.data(), d + f.sections[1].offset, scales.size() * 2);
  }
  out->assign(values, 0);
  return run_streams(d, f, *lv, nullptr, [&](const LevelDesc& desc, const uint32_t* w, uint64_t n,
                                             const uint32_t* z, int64_t* bad_stream) {
    return decode_values_cpu(desc, w, n, z, is_quant ? scales.data() : nullptr, is_quant ? lv->bins.data() : nullptr,
                             out->data(), 1, bad_stream);
  });
}

}  // namespace cachegen
