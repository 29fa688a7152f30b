// C++ side of the golden-frame tests (STYLE §7): the same frames and verdicts as tests/unit/test_format_golden.py.
// Usage: test_golden <dir with MANIFEST>; exits non-zero on the first failure.
#include <cstdio>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/frame.h"

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

// Parse and decode one frame; "" when it decodes, else the field the reader rejected.
std::string verdict(const std::vector<uint8_t>& data, const cachegen::TablesFile& tables, std::vector<uint16_t>* out) {
  cachegen::FrameView frame;
  std::string bad = cachegen::parse_frame(data.data(), data.size(), &frame);
  return bad.empty() ? cachegen::decode_frame(data.data(), frame, &tables, out) : bad;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : "tests/golden";
  check(cachegen::crc32(reinterpret_cast<const uint8_t*>("123456789"), 9) == 0xCBF43926u, "crc32 check value");
  cachegen::TablesFile tables;
  const auto table_bytes = read_file(dir + "/tables_small.cgct");
  check(cachegen::parse_tables(table_bytes.data(), table_bytes.size(), &tables).empty(), "tables_small.cgct parses");
  std::ifstream manifest(dir + "/MANIFEST");
  std::string line;
  while (std::getline(manifest, line)) {
    std::istringstream fields(line);
    std::string name, sha, expect;
    fields >> name >> sha >> expect;
    if (expect != "ok" && name.rfind("bad_", 0) != 0) continue;
    std::vector<uint16_t> out;
    const std::string got = verdict(read_file(dir + "/" + name), tables, &out);
    check(got == (expect == "ok" ? "" : expect), name + " -> " + (got.empty() ? "ok" : got) + " (want " + expect + ")");
  }
  std::vector<uint16_t> out;
  verdict(read_file(dir + "/lossless_small.bin"), tables, &out);
  check(same_bytes(out, read_file(dir + "/small_kv.bin")), "lossless_small.bin decodes to small_kv.bin");
  verdict(read_file(dir + "/q32_small.bin"), tables, &out);
  check(same_bytes(out, read_file(dir + "/q32_small_decoded.bin")), "q32_small.bin decodes to q32_small_decoded.bin");
  std::printf("%d failure(s)\n", failures);
  return failures ? 1 : 0;
}
