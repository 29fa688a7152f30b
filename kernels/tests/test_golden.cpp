// C++ side of the golden-frame tests (STYLE §7): the same frames and verdicts as tests/unit/test_format_golden.py.
// Usage: test_golden <dir with MANIFEST>; exits non-zero on the first failure.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/frame.h"
#include "cuda/symbols.h"

namespace {

std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

bool same_bytes(const std::vector<uint16_t>& values, const std::vector<uint8_t>& expected) {
  return values.size() * 2 == expected.size() &&
         std::equal(expected.begin(), expected.end(), reinterpret_cast<const uint8_t*>(values.data()));
}

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  failures += ok ? 0 : 1;
}

// The four golden tables files. A frame names its tables by BLAKE2b id, a check this reader leaves to its caller;
// the golden frames of levels 6-7 were coded with the one that has a transform record, those of level 8 with the
// one that also has the level's ladder and a probe record, level 9 with the one that has a cross-layer record, all
// others with the plain.
struct GoldenTables {
  cachegen::TablesFile plain, pca, pca2t, pca2x;
  const cachegen::TablesFile* of(uint32_t level) const {
    return level == 9 ? &pca2x : level == 8 ? &pca2t : level >= 6 ? &pca : &plain;
  }
};

// Parse and decode one frame; "" when it decodes, else the field the reader rejected.
std::string verdict(const std::vector<uint8_t>& data, const GoldenTables& tables, std::vector<uint16_t>* out) {
  cachegen::FrameView frame;
  std::string bad = cachegen::parse_frame(data.data(), data.size(), &frame);
  if (!bad.empty()) return bad;
  return cachegen::decode_frame(data.data(), frame, tables.of(frame.level), out);
}

// The check a MANIFEST line asks for (FORMAT.md Appendix A): "tables" parse, "mismatch" frames parse but name
// another model (the caller's comparison, §3.2), "ok" and "transform" frames decode (their values are compared
// in main), any other verdict is the field a bad frame must be rejected with. "values" files are data.
void check_entry(const std::string& dir, const std::string& name, const std::string& expect,
                 const GoldenTables& tables) {
  const auto data = read_file(dir + "/" + name);
  if (expect == "values") return;
  if (expect == "tables") {
    cachegen::TablesFile parsed;
    const std::string got = cachegen::parse_tables(data.data(), data.size(), &parsed);
    check(got.empty(), name + " parses" + (got.empty() ? "" : " (got " + got + ")"));
    return;
  }
  if (expect == "mismatch") {
    cachegen::FrameView frame;
    const bool ok = cachegen::parse_frame(data.data(), data.size(), &frame).empty() && frame.model_id != "golden";
    check(ok, name + " parses and names another model");
    return;
  }
  std::vector<uint16_t> out;
  const std::string got = verdict(data, tables, &out);
  const std::string want = expect == "ok" || expect == "transform" ? "" : expect;
  check(got == want, name + " -> " + (got.empty() ? "ok" : got) + " (want " + expect + ")");
}

// Within one bf16 step of the reference decoder, the bound tests/unit/test_format_golden.py uses: |got - want| <=
// |want| 2^-7 + 1e-6. Levels 6-8 end in a sum of products, so decoders agree to f32 rounding only (FORMAT.md §5.5).
bool within_bf16_step(const std::vector<uint16_t>& got, const std::vector<uint8_t>& want_bytes) {
  if (got.size() * 2 != want_bytes.size()) return false;
  for (size_t i = 0; i < got.size(); ++i) {
    uint16_t bits;
    std::memcpy(&bits, want_bytes.data() + 2 * i, 2);
    const float want = cachegen::bf16_to_float(bits), diff = std::fabs(cachegen::bf16_to_float(got[i]) - want);
    if (!(diff <= std::fabs(want) * 0x1p-7f + 1e-6f)) return false;
  }
  return true;
}

// Whether tokens [0, num_tokens) of every (layer, K|V, head) of got equal those of kv_bytes (both (L, 2, H, T, D)).
bool same_tokens(const std::vector<uint16_t>& got, const std::vector<uint8_t>& kv_bytes, uint32_t tokens_per_group,
                 uint32_t head_dim, uint32_t num_tokens) {
  if (got.size() * 2 != kv_bytes.size()) return false;
  const auto* kv = reinterpret_cast<const uint16_t*>(kv_bytes.data());
  for (size_t group = 0; group < got.size() / (size_t(tokens_per_group) * head_dim); ++group) {
    const size_t at = group * tokens_per_group * head_dim;
    if (!std::equal(kv + at, kv + at + size_t(num_tokens) * head_dim, got.begin() + at)) return false;
  }
  return true;
}

// A golden tables file after edit(body) with its CRC recomputed, so that parsing reaches the edited bytes.
template <class Edit>
std::string parse_edited(std::vector<uint8_t> bytes, Edit edit) {
  bytes.resize(bytes.size() - 4);
  edit(bytes);
  const uint32_t crc = cachegen::crc32(bytes.data(), bytes.size());
  bytes.insert(bytes.end(), reinterpret_cast<const uint8_t*>(&crc), reinterpret_cast<const uint8_t*>(&crc) + 4);
  cachegen::TablesFile parsed;
  return cachegen::parse_tables(bytes.data(), bytes.size(), &parsed);
}

// Bad transform records (FORMAT.md §8.1), made here from the golden pca tables: the golden set has no bad tables
// file, and the fields named are those cachegen/codec/transform.py read_transform reports.
void check_bad_transforms(const std::vector<uint8_t>& bytes, const cachegen::TablesFile& pca) {
  const size_t width = size_t(pca.heads) * pca.head_dim, per_level = size_t(pca.layers) * 2 * width;
  const size_t steps_at = 12 + 1, inv_freq_at = 12 + pca.transform->steps.size() * (1 + 4 * per_level);
  const size_t matrix_at = inv_freq_at + 4 * (pca.head_dim / 2) + 4 * per_level;
  const size_t record = bytes.size() - 4 - (matrix_at + 4 * per_level * width);  // the record ends at the CRC
  check(std::memcmp(bytes.data() + record, "CGTX", 4) == 0, "tables_small_pca.cgct transform record located");
  auto put_float = [](std::vector<uint8_t>& b, size_t at, float v) { std::memcpy(b.data() + at, &v, 4); };
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"transform", parse_edited(bytes, [&](auto& b) { b[record + 3] = 'Y'; })},
      {"transform.steps", parse_edited(bytes, [&](auto& b) { put_float(b, record + steps_at, 0.0f); })},
      {"transform.inv_freq", parse_edited(bytes, [&](auto& b) { put_float(b, record + inv_freq_at, NAN); })},
      {"transform.decode_matrix", parse_edited(bytes, [&](auto& b) {  // row 1 = row 0: singular
         std::memcpy(b.data() + record + matrix_at + 4 * width, b.data() + record + matrix_at, 4 * width);
       })},
      {"transform.decode_matrix", parse_edited(bytes, [](auto& b) { b.resize(b.size() - 4); })},
      {"probe", parse_edited(bytes, [](auto& b) { b.resize(b.size() + 4, 0); })},  // too short for a probe record
  };
  for (const auto& [want, got] : cases) check(got == want, "bad transform record -> " + got + " (want " + want + ")");
}

// Bad probe records and ladders (FORMAT.md §8.2, §5.6), made from tables_small_pca2t.cgct: the fields are those
// token_classes.read_probe and tables._read_level report.
void check_bad_probes(const std::vector<uint8_t>& bytes, const cachegen::TablesFile& t) {
  const uint32_t per_head = t.transform->probe_queries;
  const size_t log_norms = size_t(t.layers) * t.heads * per_head, queries_at = 8;
  const size_t log_norm_at = queries_at + 4 * log_norms * t.head_dim, reference_at = log_norm_at + 4 * log_norms;
  const size_t record = bytes.size() - 4 - (reference_at + 4 * t.layers);  // the probe record ends at the CRC
  check(std::memcmp(bytes.data() + record, "CGIP", 4) == 0, "tables_small_pca2t.cgct probe record located");
  size_t ladder_map = 18 + bytes[13] + 2;  // the level entries follow the head, model id and level count (§8)
  for (const auto& lv : t.levels) {
    if (lv.level == 8) break;
    ladder_map += 9 + 2 * lv.bins.size() + 4 * lv.table_map.size() + 4 * lv.freq.size();
  }
  ladder_map += 9 + 2 * size_t(t.layers) * 2;  // level 8's head and bins, then its table_map
  auto put_u32 = [](std::vector<uint8_t>& b, size_t at, uint32_t v) { std::memcpy(b.data() + at, &v, 4); };
  auto put_float = [](std::vector<uint8_t>& b, size_t at, float v) { std::memcpy(b.data() + at, &v, 4); };
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"probe", parse_edited(bytes, [&](auto& b) { b[record + 3] = 'Q'; })},
      {"probe", parse_edited(bytes, [&](auto& b) { put_u32(b, record + 4, 0); })},
      {"probe", parse_edited(bytes, [&](auto& b) { put_u32(b, record + 4, 4097); })},
      {"probe.queries", parse_edited(bytes, [&](auto& b) { put_float(b, record + queries_at, NAN); })},
      {"probe.log_norm", parse_edited(bytes, [&](auto& b) { put_float(b, record + log_norm_at, INFINITY); })},
      {"probe.reference", parse_edited(bytes, [&](auto& b) { put_float(b, record + reference_at, 0.0f); })},
      {"probe.reference", parse_edited(bytes, [](auto& b) { b.resize(b.size() - 4); })},
      {"cross_layer", parse_edited(bytes, [](auto& b) { b.resize(b.size() + 4, 0); })},  // not a §8.3 record
      {"table_map", parse_edited(bytes, [&](auto& b) { put_u32(b, ladder_map, 15); })},  // 15 - 14 at v = 15 < 0
      {"table_map", parse_edited(bytes, [&](auto& b) { put_u32(b, ladder_map, 82); })},  // 82 + 16 at v = 0 > 95
  };
  for (const auto& [want, got] : cases) check(got == want, "bad probe or ladder -> " + got + " (want " + want + ")");
}

// Bad cross-layer records (FORMAT.md §8.3), made from tables_small_pca2x.cgct: the fields are those
// transform.read_cross_layer reports. The record ends at the CRC: head, level and depth bytes, steps, mean, matrices.
void check_bad_cross_layer(const std::vector<uint8_t>& bytes, const cachegen::TablesFile& t) {
  const size_t width = size_t(t.heads) * t.head_dim, per_level = size_t(t.layers) * 2 * width;
  const uint32_t depth = t.transform->cross_layer.at(9).depth;
  const size_t steps_at = 10, matrix_at = steps_at + 8 * per_level, predict_at = matrix_at + 4 * per_level * width;
  const size_t record = bytes.size() - 4 - (predict_at + 4 * per_level * (2 * depth + 1) * width);
  check(std::memcmp(bytes.data() + record, "CGXL", 4) == 0, "tables_small_pca2x.cgct cross-layer record located");
  auto put_float = [](std::vector<uint8_t>& b, size_t at, float v) { std::memcpy(b.data() + at, &v, 4); };
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"cross_layer", parse_edited(bytes, [&](auto& b) { b[record + 6] = 1; })},  // reserved
      {"cross_layer.depth", parse_edited(bytes, [&](auto& b) { b[record + 9] = 0; })},
      {"cross_layer.depth", parse_edited(bytes, [&](auto& b) { b[record + 9] = 9; })},
      {"cross_layer.steps", parse_edited(bytes, [&](auto& b) { put_float(b, record + steps_at, -1.0f); })},
      {"cross_layer.decode_matrix", parse_edited(bytes, [&](auto& b) {  // row 1 = row 0: singular
         std::memcpy(b.data() + record + matrix_at + 4 * width, b.data() + record + matrix_at, 4 * width);
       })},
      {"cross_layer.predict_matrix", parse_edited(bytes, [&](auto& b) { put_float(b, record + predict_at, NAN); })},
      {"cross_layer.predict_matrix", parse_edited(bytes, [](auto& b) { b.resize(b.size() - 4); })},
      {"tables_size", parse_edited(bytes, [](auto& b) { b.resize(b.size() + 4, 0); })},
  };
  for (const auto& [want, got] : cases) check(got == want, "bad cross-layer record -> " + got + " (want " + want + ")");
}

// Level 8's constants and TOKEN_CLASSES nibbles (FORMAT.md §5.6): mult[v] is 2^((v - 8) / 2) rounded to f32 and
// shift(v) = 2 (8 - v); L T odd leaves a padding nibble that must be 0. The golden frame has L T even, so the
// padding rule is checked here on hand-made bytes.
void check_token_classes() {
  bool ok = true;
  for (uint32_t v = 0; v < cachegen::kNumClasses; ++v)
    ok = ok && cachegen::class_multiplier(v) == float(std::pow(2.0, (double(v) - 8) / 2)) &&
         cachegen::class_shift(v) == 2 * (8 - int(v));
  check(ok, "class multipliers and shifts as FORMAT.md 5.6");
  std::vector<uint8_t> classes;
  const uint8_t nibbles[] = {0x21, 0x03}, padded[] = {0x21, 0x13};
  ok = cachegen::unpack_token_classes(nibbles, 2, 1, 3, &classes) && classes == std::vector<uint8_t>{1, 2, 3};
  check(ok, "TOKEN_CLASSES nibbles low first");
  check(!cachegen::unpack_token_classes(padded, 2, 1, 3, &classes), "TOKEN_CLASSES padding nibble 1 rejected");
  check(!cachegen::unpack_token_classes(nibbles, 2, 1, 5, &classes), "TOKEN_CLASSES of the wrong size rejected");
}

// The CUDA symbol kernel's per-stream function (kernels/cuda/symbols.h), run here on the CPU over a golden level
// 6-8 frame: the same symbols as decode_symbols_cpu, every stream kOk; with one word of the last stream flipped, a
// failing status. `kP`: the kernel's register path (per_token known) or its generic one (0).
template <uint32_t kP>
bool symbol_kernel_on_host(const std::vector<uint8_t>& data, const cachegen::TablesFile& tables, bool corrupt) {
  cachegen::FrameView f;
  if (!cachegen::parse_frame(data.data(), data.size(), &f).empty()) return false;
  const cachegen::LevelData* lv = nullptr;
  for (const auto& l : tables.levels) lv = l.level == f.level ? &l : lv;
  if (lv == nullptr || (kP != 0 && kP != lv->per_token)) return false;
  const auto &sizes_sec = f.sections[f.sections.size() - 2], &words_sec = f.sections.back();
  std::vector<uint32_t> sizes(sizes_sec.size / 4), words(words_sec.size / 4);
  std::memcpy(sizes.data(), data.data() + sizes_sec.offset, sizes_sec.size);
  std::memcpy(words.data(), data.data() + words_sec.offset, words_sec.size);
  if (corrupt) words.back() ^= 0x40;  // the last stream's initial state
  std::vector<uint64_t> offsets(sizes.size());
  for (size_t i = 1; i < sizes.size(); ++i) offsets[i] = offsets[i - 1] + sizes[i - 1];
  std::vector<uint8_t> classes;
  std::vector<int8_t> shifts;
  if (f.level == cachegen::kTokenAdaptiveLevel) {
    const auto& sec = f.sections[2];
    if (!cachegen::unpack_token_classes(data.data() + sec.offset, sec.size, f.layers, f.num_tokens, &classes))
      return false;
    for (uint8_t v : classes) shifts.push_back(cachegen::class_shift(v));
  }
  const int8_t* shift = shifts.empty() ? nullptr : shifts.data();
  cachegen::TableSet set{lv->freq.data(), lv->cum.data(), lv->alphabet};
  std::vector<uint8_t> slots;
  std::vector<uint32_t> bounds;
  cachegen::build_lookup(set, lv->num_tables, &slots, &bounds);
  set.slots = slots.data(), set.bounds = bounds.data();
  const cachegen::LevelDesc desc{f.layers, f.heads, f.num_tokens, lv->per_token, lv->table_map.data(), lv->num_tables,
                                 set, shift};
  const uint64_t count = uint64_t(f.layers) * 2 * f.heads * f.num_tokens * lv->per_token;
  std::vector<int32_t> want(count);
  int64_t bad = -1;
  const auto cpu = cachegen::decode_symbols_cpu(desc, words.data(), words.size(), sizes.data(), want.data(), 1, &bad);
  const uint32_t blocks = (f.num_tokens + cachegen::kStreamTokens - 1) / cachegen::kStreamTokens;
  std::vector<uint8_t> got(count + 16);
  const cachegen::SymbolArgs a{f.heads, f.num_tokens, lv->per_token, lv->alphabet, blocks, lv->num_tables,
                               lv->table_map.data(), lv->cum.data(), slots.data(), words.data(), offsets.data(),
                               sizes.data(), lv->bins.data(), shift, got.data()};
  bool all_ok = true;
  for (uint32_t g = 0; g < f.layers * 2 * f.heads; ++g)
    for (uint32_t b = 0; b < blocks; ++b) all_ok &= cachegen::decode_symbol_stream<kP>(a, g, b) == cachegen::kOk;
  if (corrupt) return !all_ok && cpu != cachegen::kOk;
  bool same = cpu == cachegen::kOk;
  for (uint64_t i = 0; i < count && same; ++i) same = got[i] == uint32_t(want[i]);
  return all_ok && same;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : "tests/golden";
  check(cachegen::crc32(reinterpret_cast<const uint8_t*>("123456789"), 9) == 0xCBF43926u, "crc32 check value");
  GoldenTables tables;
  const auto plain_bytes = read_file(dir + "/tables_small.cgct"), pca_bytes = read_file(dir + "/tables_small_pca.cgct");
  const auto pca2t_bytes = read_file(dir + "/tables_small_pca2t.cgct");
  const auto pca2x_bytes = read_file(dir + "/tables_small_pca2x.cgct");
  cachegen::parse_tables(plain_bytes.data(), plain_bytes.size(), &tables.plain);
  check(cachegen::parse_tables(pca_bytes.data(), pca_bytes.size(), &tables.pca).empty() && tables.pca.transform &&
            !tables.plain.transform && tables.pca.transform->probe_queries == 0,
        "tables_small_pca.cgct has a transform record and no probe, tables_small.cgct none");
  check(cachegen::parse_tables(pca2t_bytes.data(), pca2t_bytes.size(), &tables.pca2t).empty() &&
            tables.pca2t.transform && tables.pca2t.transform->probe_queries == 4,
        "tables_small_pca2t.cgct has a transform record and a probe of 4 queries per head");
  check(cachegen::parse_tables(pca2x_bytes.data(), pca2x_bytes.size(), &tables.pca2x).empty() &&
            tables.pca2x.transform && tables.pca2x.transform->cross_layer.count(9) == 1,
        "tables_small_pca2x.cgct has a transform record and level 9's cross-layer record");
  std::ifstream manifest(dir + "/MANIFEST");
  std::string line;
  while (std::getline(manifest, line)) {
    std::istringstream fields(line);
    std::string name, sha, expect;
    if (fields >> name >> sha >> expect) check_entry(dir, name, expect, tables);
  }
  std::vector<uint16_t> out;
  verdict(read_file(dir + "/lossless_small.bin"), tables, &out);
  check(same_bytes(out, read_file(dir + "/small_kv.bin")), "lossless_small.bin decodes to small_kv.bin");
  verdict(read_file(dir + "/q32_small.bin"), tables, &out);
  check(same_bytes(out, read_file(dir + "/q32_small_decoded.bin")), "q32_small.bin decodes to q32_small_decoded.bin");
  const auto pca2 = read_file(dir + "/pca2_small.bin");
  check(verdict(pca2, tables, &out).empty() && within_bf16_step(out, read_file(dir + "/pca2_small_decoded.bin")),
        "pca2_small.bin decodes to pca2_small_decoded.bin within one bf16 step");
  check(same_tokens(out, read_file(dir + "/small_kv.bin"), 40, 16, 4), "pca2_small.bin sink tokens 0-3 exact (raw)");
  cachegen::FrameView frame;
  cachegen::parse_frame(pca2.data(), pca2.size(), &frame);
  check(cachegen::decode_frame(pca2.data(), frame, &tables.plain, &out) == "tables",
        "pca2_small.bin with tables lacking a transform record -> tables");
  check_bad_transforms(pca_bytes, tables.pca);
  const auto pca2t = read_file(dir + "/pca2t_small.bin");
  check(verdict(pca2t, tables, &out).empty() && within_bf16_step(out, read_file(dir + "/pca2t_small_decoded.bin")),
        "pca2t_small.bin decodes to pca2t_small_decoded.bin within one bf16 step");
  check(same_tokens(out, read_file(dir + "/small_kv.bin"), 40, 16, 4), "pca2t_small.bin sink tokens 0-3 exact (raw)");
  cachegen::parse_frame(pca2t.data(), pca2t.size(), &frame);
  check(cachegen::decode_frame(pca2t.data(), frame, &tables.pca, &out) == "tables",
        "pca2t_small.bin with tables lacking level 8 -> tables");
  check_bad_probes(pca2t_bytes, tables.pca2t);
  const auto pca2x = read_file(dir + "/pca2x_small.bin");
  check(verdict(pca2x, tables, &out).empty() && within_bf16_step(out, read_file(dir + "/pca2x_small_decoded.bin")),
        "pca2x_small.bin decodes to pca2x_small_decoded.bin within one bf16 step");
  check(same_tokens(out, read_file(dir + "/small_kv.bin"), 40, 16, 4), "pca2x_small.bin sink tokens 0-3 exact (raw)");
  cachegen::parse_frame(pca2x.data(), pca2x.size(), &frame);
  check(cachegen::decode_frame(pca2x.data(), frame, &tables.pca, &out) == "tables",
        "pca2x_small.bin with tables lacking level 9 -> tables");
  check_bad_cross_layer(pca2x_bytes, tables.pca2x);
  for (bool corrupt : {false, true}) {
    const std::string what = corrupt ? " catches a flipped word" : " equals decode_symbols_cpu";
    check(symbol_kernel_on_host<0>(pca2, tables.pca, corrupt), "CUDA symbol stream code on the host, pca2" + what);
    check(symbol_kernel_on_host<0>(pca2t, tables.pca2t, corrupt), "CUDA symbol stream code on the host, pca2t" + what);
    check(symbol_kernel_on_host<16>(pca2t, tables.pca2t, corrupt),
          "CUDA symbol stream code on the host, pca2t, register path" + what);
    check(symbol_kernel_on_host<16>(pca2x, tables.pca2x, corrupt), "CUDA symbol stream code on the host, pca2x" + what);
  }
  check_token_classes();
  std::printf("%d failure(s)\n", failures);
  return failures ? 1 : 0;
}
