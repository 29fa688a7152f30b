// FORMAT.md §3 / §6 / §8 in C++: every size is checked against the buffer before it is used.
#include "frame.h"

#include <cstring>

namespace cachegen {
namespace {

template <class T>
T load(const uint8_t* p) {
  T value;
  std::memcpy(&value, p, sizeof(T));  // little-endian host assumed (x86-64, aarch64), as FORMAT.md §2
  return value;
}

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
  if (f->level > 5) return "level";
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

std::string parse_tables(const uint8_t* d, size_t len, TablesFile* t) {
  if (len < 24 || load<uint32_t>(d + len - 4) != crc32(d, len - 4)) return "tables_crc32";
  if (std::memcmp(d, "CGCT", 4) != 0 || load<uint16_t>(d + 4) != 1) return "tables_header";
  t->layers = load<uint16_t>(d + 6);
  t->heads = load<uint16_t>(d + 8);
  t->head_dim = load<uint16_t>(d + 10);
  size_t at = 18 + d[13];  // 18-byte head (FORMAT.md §8), then the model id
  const size_t end = len - 4;
  if (at + 2 > end) return "num_levels";
  const uint32_t num_levels = load<uint16_t>(d + at);
  at += 2;
  for (uint32_t i = 0; i < num_levels; ++i) {
    LevelData lv;
    if (at + 9 > end) return "level";
    lv.level = d[at];
    lv.alphabet = load<uint16_t>(d + at + 1);
    lv.num_tables = load<uint32_t>(d + at + 3);
    lv.per_token = load<uint16_t>(d + at + 7);
    at += 9;
    const uint64_t n_bins = uint64_t(t->layers) * 2, n_map = n_bins * t->heads * lv.per_token;
    const uint64_t n_freq = uint64_t(lv.num_tables) * lv.alphabet;
    if (lv.alphabet < 2 || lv.alphabet > 256 || (end - at) < 2 * n_bins + 4 * (n_map + n_freq)) return "level_shape";
    lv.bins.resize(n_bins);
    lv.table_map.resize(n_map);
    lv.freq.resize(n_freq);
    std::memcpy(lv.bins.data(), d + at, 2 * n_bins);
    std::memcpy(lv.table_map.data(), d + at + 2 * n_bins, 4 * n_map);
    std::memcpy(lv.freq.data(), d + at + 2 * n_bins + 4 * n_map, 4 * n_freq);
    at += 2 * n_bins + 4 * (n_map + n_freq);
    for (uint32_t m : lv.table_map) if (m >= lv.num_tables) return "table_map";
    lv.cum.resize(n_freq);
    for (uint32_t r = 0; r < lv.num_tables; ++r) {
      uint64_t sum = 0;
      for (uint32_t k = 0; k < lv.alphabet; ++k) {
        const uint32_t f = lv.freq[uint64_t(r) * lv.alphabet + k];
        if (f == 0) return "freq";
        lv.cum[uint64_t(r) * lv.alphabet + k] = uint32_t(sum);
        sum += f;
      }
      if (sum != kTotal) return "freq";
    }
    t->levels.push_back(std::move(lv));
  }
  return at == end ? "" : "tables_size";
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
  if (!tables) return "tables";
  const LevelData* lv = nullptr;
  for (const auto& l : tables->levels) if (l.level == f.level) lv = &l;
  if (!lv || tables->layers != f.layers || tables->heads != f.heads || tables->head_dim != f.head_dim) return "tables";
  const bool is_quant = f.level >= 2;
  const uint64_t streams = uint64_t(f.layers) * 2 * f.heads * ((f.num_tokens + kStreamTokens - 1) / kStreamTokens);
  std::vector<uint32_t> kinds = {kSectionTablesId, kSectionStreamSizes, kSectionWords};
  std::vector<int64_t> sizes = {16, int64_t(4 * streams), -1};
  if (is_quant) {
    kinds.insert(kinds.begin() + 1, kSectionScales);
    sizes.insert(sizes.begin() + 1, int64_t(f.layers) * 2 * f.num_tokens * 2);
  }
  std::string bad = expect(f, kinds, sizes);
  if (!bad.empty()) return bad;
  const SectionView& words = f.sections.back();
  const SectionView& stream_sizes = f.sections[f.sections.size() - 2];
  std::vector<uint32_t> w(words.size / 4), z(streams);
  std::memcpy(w.data(), d + words.offset, w.size() * 4);
  std::memcpy(z.data(), d + stream_sizes.offset, z.size() * 4);
  std::vector<uint16_t> scales;
  if (is_quant) {
    scales.resize(uint64_t(f.layers) * 2 * f.num_tokens);
    std::memcpy(scales.data(), d + f.sections[1].offset, scales.size() * 2);
  }
  LevelDesc desc{f.layers, f.heads, f.num_tokens, lv->per_token, lv->table_map.data(), lv->num_tables,
                 {lv->freq.data(), lv->cum.data(), lv->alphabet}};
  std::vector<uint8_t> slots;
  std::vector<uint32_t> bounds;
  build_lookup(desc.tables, lv->num_tables, &slots, &bounds);  // per frame: fine for a test reader
  desc.tables.slots = slots.data();
  desc.tables.bounds = bounds.data();
  out->assign(values, 0);
  int64_t bad_stream = -1;
  Status st = decode_values_cpu(desc, w.data(), w.size(), z.data(), is_quant ? scales.data() : nullptr,
                                is_quant ? lv->bins.data() : nullptr, out->data(), 1, &bad_stream);
  if (words.size % 4 != 0 || st == kBadSizes) return "stream_sizes";
  if (st == kBadFinalState) return "rans_final_state";
  if (st == kBadSymbol) return "symbol";
  return "";
}

}  // namespace cachegen
