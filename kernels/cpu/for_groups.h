// Threads over equal units of work, for the CPU entry points (codec_cpu.cpp, transform_cpu.cpp).
#pragma once
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace cachegen {

// Runs work(group) for every group on up to num_threads threads; groups are equal work, so static split.
template <class Work>
void for_groups(uint32_t groups, int num_threads, Work work) {
  const uint32_t n = std::max(1, std::min<int>(num_threads, static_cast<int>(groups)));
  if (n == 1) {
    for (uint32_t g = 0; g < groups; ++g) work(g);
    return;
  }
  std::vector<std::thread> pool;
  for (uint32_t i = 0; i < n; ++i)
    pool.emplace_back([&, i] { for (uint32_t g = i; g < groups; g += n) work(g); });
  for (auto& t : pool) t.join();
}

}  // namespace cachegen
