// FORMAT.md §8-8.3 in C++: the tables file, its level entries and its transform, probe and cross-layer records,
// with the field names and checks of cachegen/codec/tables.py, transform.py and token_classes.py. Every size is
// checked against the buffer before it is used.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "frame.h"

namespace cachegen {
namespace {

// Bounds-checked cursor over untrusted bytes, as _Reader in cachegen/codec/tables.py: take() hands out the next
// `size` bytes, or nullptr (moving nowhere) when fewer are left, and the caller names the field.
struct Cursor {
  const uint8_t* data;
  uint64_t at, end;
  const uint8_t* take(uint64_t size) {
    if (size > end - at) return nullptr;
    at += size;
    return data + at - size;
  }
};

// `count` f32 of a transform record, each finite (FORMAT.md §8.1); "" or `field`.
std::string take_floats(Cursor& in, uint64_t count, const char* field, std::vector<float>* out) {
  const uint8_t* p = count <= (in.end - in.at) / 4 ? in.take(4 * count) : nullptr;  // no 4 * count to wrap
  if (!p) return field;
  out->resize(count);
  std::memcpy(out->data(), p, 4 * count);
  for (float v : *out) if (!std::isfinite(v)) return field;
  return "";
}

// `count` steps of a transform or cross-layer record: finite and > 0 (FORMAT.md §8.1, §8.3).
std::string take_steps(Cursor& in, uint64_t count, const char* field, std::vector<float>* out) {
  const std::string bad = take_floats(in, count, field, out);
  if (!bad.empty()) return bad;
  return std::all_of(out->begin(), out->end(), [](float s) { return s > 0; }) ? "" : field;
}

// The 2L decode matrices (W x W) of a transform or cross-layer record: finite and well conditioned (FORMAT.md §8.1).
std::string take_matrices(Cursor& in, const TablesFile& t, const char* field, std::vector<float>* out) {
  const uint64_t width = uint64_t(t.heads) * t.head_dim, per_level = uint64_t(t.layers) * 2 * width;
  // width <= 2^32 - 1, so width^2 fits; the product with the 2L matrices saturates instead of wrapping
  const uint64_t matrix_floats = per_level > UINT64_MAX / width ? UINT64_MAX : per_level * width;
  const std::string bad = take_floats(in, matrix_floats, field, out);
  if (!bad.empty()) return bad;
  for (uint64_t m = 0; m < uint64_t(t.layers) * 2; ++m)
    if (!is_well_conditioned(out->data() + m * width * width, uint32_t(width))) return field;
  return "";
}

// The shape of a level entry (FORMAT.md §8, §8.1), in the order of tables._read_level: levels 6-9 need A = 255,
// P = D and bins 256 everywhere, level 8 also its 96-row ladder with every map entry in [16, 81] (§5.6), so that
// the decoder's table_map + shift is a row for every class; a quantized level (any bin non-zero) even 4..256 bins.
std::string check_shape(const LevelData& lv, const TablesFile& t) {
  const bool is_quantized = std::any_of(lv.bins.begin(), lv.bins.end(), [](uint16_t b) { return b != 0; });
  const bool is_all_256 = std::all_of(lv.bins.begin(), lv.bins.end(), [](uint16_t b) { return b == 256; });
  if (lv.level >= 6 && (lv.alphabet != 255 || lv.per_token != t.head_dim || !is_all_256)) return "level_shape";
  const auto [low, high] = std::minmax_element(lv.table_map.begin(), lv.table_map.end());
  const bool is_ladder = lv.num_tables == kLadderTables && *low >= kLadderMapLow && *high <= kLadderMapHigh;
  if (lv.level == kTokenAdaptiveLevel && !is_ladder) return "table_map";  // map is never empty: L, H, P >= 1
  for (uint16_t b : lv.bins) if (is_quantized && (b < 4 || b > 256 || b % 2)) return "bins";
  return "";
}

// One level entry of a tables file (FORMAT.md §8), with the field names and order of tables._read_level.
std::string parse_level(Cursor& in, const TablesFile& t, LevelData* lv) {
  const uint8_t* head = in.take(9);
  if (!head) return "level";
  lv->level = head[0];
  lv->alphabet = load<uint16_t>(head + 1);
  lv->num_tables = load<uint32_t>(head + 3);
  lv->per_token = load<uint16_t>(head + 7);
  if (lv->level < 1 || lv->level > 9) return "level";  // the coded levels (FORMAT.md §4)
  const bool is_p_valid = lv->per_token == t.head_dim || lv->per_token == 2 * t.head_dim;
  if (!is_p_valid || lv->alphabet < 2 || lv->alphabet > 256) return "level_shape";
  const uint64_t n_bins = uint64_t(t.layers) * 2, n_map = n_bins * t.heads * lv->per_token;
  const uint64_t n_freq = uint64_t(lv->num_tables) * lv->alphabet;
  const uint8_t *bins = in.take(2 * n_bins), *map = bins ? in.take(4 * n_map) : nullptr;
  const uint8_t* freq = map ? in.take(4 * n_freq) : nullptr;
  if (!freq) return !bins ? "bins" : !map ? "table_map" : "freq";
  lv->bins.assign(reinterpret_cast<const uint16_t*>(bins), reinterpret_cast<const uint16_t*>(bins) + n_bins);
  lv->table_map.resize(n_map);
  lv->freq.resize(n_freq);
  std::memcpy(lv->table_map.data(), map, 4 * n_map);
  std::memcpy(lv->freq.data(), freq, 4 * n_freq);
  std::string bad = check_shape(*lv, t);
  if (!bad.empty()) return bad;
  for (uint32_t m : lv->table_map) if (m >= lv->num_tables) return "table_map";
  lv->cum.resize(n_freq);
  for (uint32_t r = 0; r < lv->num_tables; ++r) {
    uint64_t sum = 0;
    for (uint32_t k = 0; k < lv->alphabet; ++k) {
      const uint32_t f = lv->freq[uint64_t(r) * lv->alphabet + k];
      if (f == 0) return "freq";
      lv->cum[uint64_t(r) * lv->alphabet + k] = uint32_t(sum);
      sum += f;
    }
    if (sum != kTotal) return "freq";
  }
  return "";
}

// The first `size` bytes of a transform or cross-layer record (FORMAT.md §8.1, §8.3): `magic`, num_levels (u16,
// 1..255), reserved (u16, 0), then the record's own fields; nullptr when they are not so or the bytes run out.
const uint8_t* take_record_head(Cursor& in, uint64_t size, const char* magic, uint32_t* num_levels) {
  const uint8_t* head = in.take(size);
  if (!head || std::memcmp(head, magic, 4) != 0 || load<uint16_t>(head + 6) != 0) return nullptr;
  *num_levels = load<uint16_t>(head + 4);
  return *num_levels >= 1 && *num_levels <= 255 ? head : nullptr;
}

// The transform record (FORMAT.md §8.1), with the field names and checks of transform.read_transform.
std::string read_transform(Cursor& in, const TablesFile& t, TransformData* tx) {
  uint32_t num_levels = 0;
  const uint8_t* head = take_record_head(in, 12, "CGTX", &num_levels);
  if (!head || t.head_dim % 2) return "transform";  // odd head_dim: no rotary pairs (i, i + D/2) for the keys
  tx->num_sinks = load<uint32_t>(head + 8);
  const uint64_t width = uint64_t(t.heads) * t.head_dim, per_level = uint64_t(t.layers) * 2 * width;
  for (uint32_t i = 0; i < num_levels; ++i) {
    const uint8_t* level = in.take(1);
    if (!level) return "transform.level";
    std::vector<float> steps;
    const std::string bad = take_steps(in, per_level, "transform.steps", &steps);
    if (!bad.empty()) return bad;
    tx->steps[*level] = std::move(steps);
  }
  std::string bad = take_floats(in, t.head_dim / 2, "transform.inv_freq", &tx->inv_freq);
  if (bad.empty()) bad = take_floats(in, per_level, "transform.mean", &tx->mean);
  if (bad.empty()) bad = take_matrices(in, t, "transform.decode_matrix", &tx->decode_matrix);
  return bad;
}

// The cross-layer record (FORMAT.md §8.3), with the field names and checks of transform.read_cross_layer.
std::string read_cross_layer(Cursor& in, const TablesFile& t, TransformData* tx) {
  uint32_t num_levels = 0;
  if (!take_record_head(in, 8, "CGXL", &num_levels)) return "cross_layer";
  const uint64_t width = uint64_t(t.heads) * t.head_dim, per_level = uint64_t(t.layers) * 2 * width;
  for (uint32_t i = 0; i < num_levels; ++i) {
    const uint8_t* level = in.take(2);  // level, depth
    if (!level) return "cross_layer.level";
    CrossLayerData cl;
    cl.depth = level[1];
    if (cl.depth < 1 || cl.depth > kMaxDepth) return "cross_layer.depth";
    // L 2 (2 depth + 1) W W floats: L < 2^16, depth <= 8 and W < 2^32, so saturate as take_matrices does
    const uint64_t rows = per_level * (2 * cl.depth + 1);
    const uint64_t predict_floats = rows > UINT64_MAX / width ? UINT64_MAX : rows * width;
    std::string bad = take_steps(in, per_level, "cross_layer.steps", &cl.steps);
    if (bad.empty()) bad = take_floats(in, per_level, "cross_layer.mean", &cl.mean);
    if (bad.empty()) bad = take_matrices(in, t, "cross_layer.decode_matrix", &cl.decode_matrix);
    if (bad.empty()) bad = take_floats(in, predict_floats, "cross_layer.predict_matrix", &cl.predict_matrix);
    if (!bad.empty()) return bad;
    tx->cross_layer[*level] = std::move(cl);
  }
  return "";
}

// The probe record (FORMAT.md §8.2), checked as token_classes.read_probe: sizes, finite values, reference > 0.
// Only encoders use its values, so they are dropped.
std::string read_probe(Cursor& in, const TablesFile& t, TransformData* tx) {
  const uint8_t* head = in.take(8);
  if (!head) return "probe";
  const uint32_t per_head = load<uint32_t>(head + 4);
  if (std::memcmp(head, "CGIP", 4) != 0 || per_head < 1 || per_head > 4096) return "probe";
  const uint64_t log_norms = uint64_t(t.layers) * t.heads * per_head;  // < 2^44, times D < 2^60: no wrap
  std::vector<float> values;
  std::string bad = take_floats(in, log_norms * t.head_dim, "probe.queries", &values);
  if (bad.empty()) bad = take_floats(in, log_norms, "probe.log_norm", &values);
  if (bad.empty()) bad = take_floats(in, t.layers, "probe.reference", &values);
  if (bad.empty() && !std::all_of(values.begin(), values.end(), [](float r) { return r > 0; }))
    bad = "probe.reference";
  tx->probe_queries = bad.empty() ? per_head : 0;
  return bad;
}

}  // namespace

std::string parse_tables(const uint8_t* d, size_t len, TablesFile* t) {
  if (len < 22 || load<uint32_t>(d + len - 4) != crc32(d, len - 4)) return "tables_crc32";  // 18-byte head + CRC
  if (std::memcmp(d, "CGCT", 4) != 0 || load<uint16_t>(d + 4) != 1 || d[12] < 1 || d[12] > 3) return "tables_header";
  t->layers = load<uint16_t>(d + 6);
  t->heads = load<uint16_t>(d + 8);
  t->head_dim = load<uint16_t>(d + 10);
  t->levels.clear();
  t->transform.reset();
  Cursor in{d, 18, len - 4};  // after the head (FORMAT.md §8), up to the CRC
  if (!in.take(d[13])) return "model_id";
  const uint8_t* count = in.take(2);
  if (!count) return "num_levels";
  for (uint32_t i = 0, n = load<uint16_t>(count); i < n; ++i) {
    LevelData lv;
    const std::string bad = parse_level(in, *t, &lv);
    if (!bad.empty()) return bad;
    t->levels.push_back(std::move(lv));
  }
  // FORMAT.md §8.1: a transform record follows the levels when there are bytes left, as the Python reader has it;
  // whether the levels need one is the decoder's question (FORMAT.md §6 rule 8). Then the optional probe and
  // cross-layer records in that order (§8.2, §8.3): bytes that do not start the cross-layer one must be a probe.
  const auto next_is = [&](const char* magic) { return in.end - in.at >= 4 && !std::memcmp(d + in.at, magic, 4); };
  if (in.at < in.end) {
    std::string bad = read_transform(in, *t, &t->transform.emplace());
    if (bad.empty() && in.at < in.end && !next_is("CGXL")) bad = read_probe(in, *t, &*t->transform);
    if (bad.empty() && in.at < in.end) bad = read_cross_layer(in, *t, &*t->transform);
    if (!bad.empty()) return bad;
  }
  return in.at == in.end ? "" : "tables_size";
}

}  // namespace cachegen
