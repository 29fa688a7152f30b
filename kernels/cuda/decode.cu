// GPU rANS decode with fused dequantization (FORMAT.md §5.3). One thread per stream; one block per (layer, K|V,
// head) group and run of up to kThreads of its streams, so every thread of a block uses the same tables, which the
// block first copies into shared memory: each decode step is then two shared-memory loads instead of a chain of
// global ones. Values of one token collect in registers and leave as 16-byte stores. The state arithmetic is the
// CPU's (cachegen/codec.h). Torch-free, so `nvcc -c` builds it on machines without a GPU (`make kernels-check`).
#include <cuda_runtime.h>

#include "cachegen/codec.h"
#include "codec_cuda.h"
#include "symbols.h"

namespace {

using cachegen::kStreamTokens;
using cachegen::CumRow;
using cachegen::decode_one;
using cachegen::kTotal;

constexpr uint32_t kThreads = 128;  // streams per block; all of them copy the tables, the tail block decodes fewer

struct Args {
  uint32_t heads, num_tokens, per_token, alphabet, blocks_per_group;
  const uint32_t* table_map;
  const uint32_t* cum;
  const uint8_t* slots;
  const uint32_t* words;
  const uint64_t* offsets;
  const uint32_t* sizes;
  const uint16_t* scales;  // null: lossless
  const uint16_t* bins;
  uint16_t* out;
  int32_t* status;
};

__device__ __forceinline__ uint32_t quant_value(uint32_t sym, uint32_t half, float step) {
  const float q = static_cast<float>(static_cast<int32_t>(sym) - static_cast<int32_t>(half));
  return cachegen::float_to_bf16(__fmul_rn(q, step));  // __fmul_rn: never contracted into an FMA, as on the CPU
}

// Where a block reads its tables. Staging them in shared memory pays unless they are so large (lossless: 160 KB)
// that one block fills an SM: measured on an H100 (README, GPU codec figures), chunk and whole-context frames alike.
enum TablesIn : int { kGlobal = 0, kShared = 1 };

// kP: symbols per token known at compile time (the token's values stay in registers), or 0 for any.
template <uint32_t kP, bool kLossless>
__global__ void __launch_bounds__(kThreads) decode_kernel(Args a, int tables_in) {
  extern __shared__ __align__(16) uint8_t smem[];
  const uint32_t g = blockIdx.x, P = kP ? kP : a.per_token, A = a.alphabet;
  const uint32_t* map = a.table_map + uint64_t(g) * P;
  uint8_t* s_slots = smem;
  uint32_t* s_cum = reinterpret_cast<uint32_t*>(smem + P * 256);
  if (tables_in == kShared) {
    for (uint32_t i = threadIdx.x; i < P * 64; i += kThreads)  // slots as words: 64 per column
      reinterpret_cast<uint32_t*>(s_slots)[i] =
          reinterpret_cast<const uint32_t*>(a.slots + uint64_t(map[i / 64]) * 256)[i % 64];
    for (uint32_t i = threadIdx.x; i < P * A; i += kThreads) s_cum[i] = a.cum[uint64_t(map[i / A]) * A + i % A];
    __syncthreads();
  }
  auto row = [&](uint32_t c) -> CumRow {
    if (tables_in == kShared) return {s_slots + c * 256, s_cum + c * A, A};
    const uint64_t t = map[c];
    return {a.slots + t * 256, a.cum + t * A, A};
  };

  const uint32_t b = blockIdx.y * kThreads + threadIdx.x;
  if (b >= a.blocks_per_group) return;
  const uint64_t s = uint64_t(g) * a.blocks_per_group + b;
  const uint32_t t0 = b * kStreamTokens, tokens = min(kStreamTokens, a.num_tokens - t0);
  const uint32_t* words = a.words + a.offsets[s];
  uint32_t remaining = a.sizes[s];
  uint64_t state = cachegen::initial_state(words, &remaining);
  const uint32_t dim = kLossless ? P / 2 : P;  // 16-bit values per token
  uint16_t* out = a.out + (uint64_t(g) * a.num_tokens + t0) * dim;
  const uint32_t layer_kv = g / a.heads;
  const uint32_t half = kLossless ? 0 : a.bins[layer_kv] / 2u - 1u, limit = kLossless ? 0 : a.bins[layer_kv] - 2u;
  bool is_bad = false;
  for (uint32_t token = 0; token < tokens; ++token) {
    const float step = kLossless ? 0.0f : cachegen::dequant_step(a.scales[uint64_t(layer_kv) * a.num_tokens + t0 + token], half);
    uint16_t* dst = out + uint64_t(token) * dim;
    if constexpr (kP != 0) {
      constexpr uint32_t kWords = (kLossless ? kP / 2 : kP) / 2;
      uint32_t buf[kWords];
#pragma unroll
      for (uint32_t c = 0; c < kP; ++c) {
        const uint32_t sym = decode_one(row(c), &state, words, &remaining);
        if constexpr (kLossless) {  // value c/2 = byte c (even) << 8 | byte c + 1; two values per word, low first
          const uint32_t shift = ((c >> 1) & 1) * 16 + ((c & 1) ? 0 : 8);
          buf[c >> 2] = (c & 3) == 0 ? sym << shift : buf[c >> 2] | sym << shift;
        } else {
          is_bad |= sym > limit;
          const uint32_t v = quant_value(sym, half, step);
          buf[c >> 1] = (c & 1) == 0 ? v : buf[c >> 1] | v << 16;
        }
      }
      if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
#pragma unroll
        for (uint32_t i = 0; i < kWords / 4; ++i)
          reinterpret_cast<uint4*>(dst)[i] = make_uint4(buf[4 * i], buf[4 * i + 1], buf[4 * i + 2], buf[4 * i + 3]);
      } else {
#pragma unroll
        for (uint32_t i = 0; i < kWords; ++i) reinterpret_cast<uint32_t*>(dst)[i] = buf[i];  // 4-aligned: see launch
      }
    } else {
      for (uint32_t c = 0; c < P; ++c) {
        const uint32_t sym = decode_one(row(c), &state, words, &remaining);
        if (kLossless) {
          dst[c >> 1] = (c & 1) == 0 ? static_cast<uint16_t>(sym << 8) : static_cast<uint16_t>(dst[c >> 1] | sym);
        } else {
          is_bad |= sym > limit;
          dst[c] = static_cast<uint16_t>(quant_value(sym, half, step));
        }
      }
    }
  }
  const bool ended = state == 0 && remaining == 0;
  a.status[s] = !ended ? cachegen::kBadFinalState : is_bad ? cachegen::kBadSymbol : cachegen::kOk;
}

size_t shared_bytes(uint32_t per_token, uint32_t alphabet) { return size_t(per_token) * (256 + 4 * size_t(alphabet)); }

template <uint32_t kP, bool kLossless>
int launch(const Args& a, dim3 grid, int tables_in, cudaStream_t stream) {
  auto kernel = decode_kernel<kP, kLossless>;
  const size_t dynamic = tables_in == kShared ? shared_bytes(a.per_token, a.alphabet) : 0;
  if (dynamic > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(dynamic));
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  kernel<<<grid, kThreads, dynamic, stream>>>(a, tables_in);
  return static_cast<int>(cudaGetLastError());
}

int choose_tables_in(uint32_t per_token, uint32_t alphabet, size_t limit) {
#ifdef CG_TABLES_IN  // for benchmarking the choice: build with -DCG_TABLES_IN=0 (global) or 1 (shared)
  (void)per_token, (void)alphabet, (void)limit;
  return CG_TABLES_IN;
#else
  return shared_bytes(per_token, alphabet) * 2 <= limit ? kShared : kGlobal;  // room for two blocks per SM
#endif
}

// Levels 6-8: one thread per stream, as above; the tables stay in global memory (the 96-row ladder, 122 KB, lives in
// L2 and L1), since level 8's rows change per token and staging every row per block would cost more than it saves.
template <uint32_t kP>
__global__ void __launch_bounds__(kThreads) symbols_kernel(cachegen::SymbolArgs a, int32_t* status) {
  const uint32_t b = blockIdx.y * kThreads + threadIdx.x;
  if (b >= a.blocks_per_group) return;
  status[uint64_t(blockIdx.x) * a.blocks_per_group + b] = cachegen::decode_symbol_stream<kP>(a, blockIdx.x, b);
}

template <uint32_t kP>
int launch_symbols(const cachegen::SymbolArgs& a, int32_t* status, dim3 grid, cudaStream_t stream) {
  symbols_kernel<kP><<<grid, kThreads, 0, stream>>>(a, status);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int cachegen_decode_values_cuda(uint32_t layers, uint32_t heads, uint32_t num_tokens, uint32_t per_token,
                                           const uint32_t* table_map, const uint32_t* cum, const uint8_t* slots,
                                           uint32_t alphabet, const uint32_t* words, const uint64_t* offsets,
                                           const uint32_t* sizes, const uint16_t* scales, const uint16_t* bins,
                                           uint16_t* out, int32_t* status, void* cuda_stream) {
  const bool lossless = scales == nullptr;
  const uint32_t dim = lossless ? per_token / 2 : per_token;
  // 16-bit values, and whole 32-bit words per token for the register path (dim is even for every real model).
  if (num_tokens == 0 || dim % 2 != 0 || (reinterpret_cast<uintptr_t>(out) & 3) != 0) return int(cudaErrorInvalidValue);
  const uint32_t blocks_per_group = (num_tokens + kStreamTokens - 1) / kStreamTokens;
  Args a{heads, num_tokens, per_token, alphabet, blocks_per_group, table_map, cum, slots,
         words, offsets, sizes, scales, bins, out, status};
  const dim3 grid(layers * 2 * heads, (blocks_per_group + kThreads - 1) / kThreads);
  int device = 0, limit = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const int tables_in = choose_tables_in(per_token, alphabet, size_t(limit));
  auto stream = static_cast<cudaStream_t>(cuda_stream);
  if (lossless) return per_token == 128 ? launch<128, true>(a, grid, tables_in, stream)
                                        : launch<0, true>(a, grid, tables_in, stream);
  if (per_token == 64) return launch<64, false>(a, grid, tables_in, stream);
  if (per_token == 128) return launch<128, false>(a, grid, tables_in, stream);
  return launch<0, false>(a, grid, tables_in, stream);
}

extern "C" int cachegen_cuda_device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

extern "C" int cachegen_decode_symbols_cuda(uint32_t layers, uint32_t heads, uint32_t num_tokens, uint32_t per_token,
                                            const uint32_t* table_map, const uint32_t* cum, const uint8_t* slots,
                                            uint32_t alphabet, uint32_t num_tables, const uint32_t* words,
                                            const uint64_t* offsets, const uint32_t* sizes, const uint16_t* bins,
                                            const int8_t* token_shift, uint8_t* out, int32_t* status,
                                            void* cuda_stream) {
  // one byte per symbol; the register path's 16-byte stores need 16-byte aligned tokens
  if (num_tokens == 0 || alphabet > 256 || num_tables == 0 || (reinterpret_cast<uintptr_t>(out) & 15) != 0)
    return int(cudaErrorInvalidValue);
  const uint32_t blocks_per_group = (num_tokens + kStreamTokens - 1) / kStreamTokens;
  const cachegen::SymbolArgs a{heads, num_tokens, per_token, alphabet, blocks_per_group, num_tables, table_map,
                               cum, slots, words, offsets, sizes, bins, token_shift, out};
  const dim3 grid(layers * 2 * heads, (blocks_per_group + kThreads - 1) / kThreads);
  auto stream = static_cast<cudaStream_t>(cuda_stream);
  if (per_token == 64) return launch_symbols<64>(a, status, grid, stream);
  if (per_token == 128) return launch_symbols<128>(a, status, grid, stream);
  return launch_symbols<0>(a, status, grid, stream);
}
