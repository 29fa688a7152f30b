// GPU rANS decode with fused dequantization: one thread per stream (FORMAT.md §5.3), the same core as the CPU
// (cachegen/codec.h). Torch-free so `nvcc -c` builds it on machines without a GPU (`make kernels-check`).
#include <cuda_runtime.h>

#include "cachegen/codec.h"
#include "codec_cuda.h"

namespace {

using cachegen::kStreamTokens;

struct Args {
  uint32_t layers, heads, num_tokens, per_token, blocks_per_group;
  const uint32_t* table_map;
  cachegen::TableSet tables;
  const uint32_t* words;
  const uint64_t* offsets;
  const uint32_t* sizes;
  const uint16_t* scales;
  const uint16_t* bins;
  uint16_t* out;
  int32_t* status;
};

struct DeviceQuantSink {  // same arithmetic as the CPU QuantSink: one f32 multiply, bf16 round half to even
  uint16_t* out;
  uint32_t head_dim, half, limit;
  const uint16_t* scales;  // of this (layer, K|V), indexed by token within the block
  bool is_bad;
  __device__ void operator()(uint32_t j, uint32_t token, uint32_t sym) {
    is_bad |= sym > limit;
    const float step = cachegen::dequant_step(scales[token], half);
    const float q = static_cast<float>(static_cast<int32_t>(sym) - static_cast<int32_t>(half));
    out[j] = cachegen::float_to_bf16(__fmul_rn(q, step));  // __fmul_rn: never contracted into an FMA
  }
};

struct DeviceBytesSink {
  uint16_t* out;
  __device__ void operator()(uint32_t j, uint32_t, uint32_t sym) {
    if ((j & 1) == 0) out[j >> 1] = static_cast<uint16_t>(sym << 8);
    else out[j >> 1] |= static_cast<uint16_t>(sym);
  }
};

__global__ void decode_kernel(Args a, uint64_t num_streams) {
  const uint64_t s = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= num_streams) return;
  const uint32_t g = static_cast<uint32_t>(s / a.blocks_per_group);
  const uint32_t b = static_cast<uint32_t>(s % a.blocks_per_group);
  const uint32_t t0 = b * kStreamTokens;
  const uint32_t tokens = min(kStreamTokens, a.num_tokens - t0);
  const uint32_t* row = a.table_map + uint64_t(g) * a.per_token;
  const uint32_t count = tokens * a.per_token;
  const uint32_t* words = a.words + a.offsets[s];
  cachegen::Status st;
  if (a.bins == nullptr) {
    DeviceBytesSink sink{a.out + (uint64_t(g) * a.num_tokens + t0) * (a.per_token / 2)};
    st = cachegen::decode_stream(words, a.sizes[s], count, row, a.per_token, a.tables, sink);
  } else {
    const uint32_t layer_kv = g / a.heads;
    DeviceQuantSink sink{a.out + (uint64_t(g) * a.num_tokens + t0) * a.per_token, a.per_token,
                         a.bins[layer_kv] / 2u - 1u, a.bins[layer_kv] - 2u,
                         a.scales + uint64_t(layer_kv) * a.num_tokens + t0, false};
    st = cachegen::decode_stream(words, a.sizes[s], count, row, a.per_token, a.tables, sink);
    if (st == cachegen::kOk && sink.is_bad) st = cachegen::kBadSymbol;
  }
  a.status[s] = st;
}

}  // namespace

extern "C" int cachegen_decode_values_cuda(uint32_t layers, uint32_t heads, uint32_t num_tokens, uint32_t per_token,
                                           const uint32_t* table_map, const uint32_t* freq, const uint32_t* cum,
                                           uint32_t alphabet, const uint32_t* words, const uint64_t* offsets,
                                           const uint32_t* sizes, const uint16_t* scales, const uint16_t* bins,
                                           uint16_t* out, int32_t* status, void* cuda_stream) {
  const uint32_t blocks_per_group = (num_tokens + kStreamTokens - 1) / kStreamTokens;
  const uint64_t num_streams = uint64_t(layers) * 2 * heads * blocks_per_group;
  Args a{layers, heads, num_tokens, per_token, blocks_per_group, table_map, {freq, cum, alphabet},
         words, offsets, sizes, scales, bins, out, status};
  const uint32_t threads = 128;
  const uint64_t grid = (num_streams + threads - 1) / threads;
  decode_kernel<<<static_cast<unsigned>(grid), threads, 0, static_cast<cudaStream_t>(cuda_stream)>>>(a, num_streams);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int cachegen_cuda_device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}
