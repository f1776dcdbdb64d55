// fp-export: the shift-based FP4 -> FP8 cast kernel (integer operations only).
//
// The table and PRMT decode live in fp4_cast.cuh.
#include "fp4_to_fp8.h"

#include <algorithm>

#include "fp4_cast.cuh"

namespace {

using fp_export::cast4;
using fp_export::shifted_table;

// Vector path: each thread turns 8 packed bytes (16 codes, inside one group) into 16 output
// bytes per step, so a warp's loads (256 B) and stores (512 B) are contiguous; UNROLL independent
// steps per thread keep several loads in flight.
constexpr int UNROLL = 4;

__global__ void fp4_to_fp8_vec(const uint2* __restrict__ packed, const int8_t* __restrict__ shift,
                               uint4* __restrict__ out, uint32_t n_vec, uint32_t vec_per_group) {
  const uint32_t stride = gridDim.x * blockDim.x;
  for (uint32_t base = blockIdx.x * blockDim.x + threadIdx.x; base < n_vec; base += stride * UNROLL) {
    uint2 p[UNROLL];
    int8_t k[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const uint32_t i = base + u * stride;
      if (i < n_vec) {
        p[u] = packed[i];
        k[u] = shift[i / vec_per_group];
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const uint32_t i = base + u * stride;
      if (i < n_vec) {
        uint32_t lo, hi;
        shifted_table(k[u], lo, hi);
        out[i] = make_uint4(cast4(p[u].x & 0xFFFFu, lo, hi), cast4(p[u].x >> 16, lo, hi),
                            cast4(p[u].y & 0xFFFFu, lo, hi), cast4(p[u].y >> 16, lo, hi));
      }
    }
  }
}

// Scalar path for any even group size, the last group of a row possibly partial: one packed byte
// (two codes) per thread; each row has ceil(cols / group) shifts.
__global__ void fp4_to_fp8_scalar(const uint8_t* __restrict__ packed, const int8_t* __restrict__ shift,
                                  uint16_t* __restrict__ out, int64_t n_bytes, int64_t row_bytes,
                                  int64_t bytes_per_group, int64_t groups_per_row) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n_bytes; i += stride) {
    uint32_t lo, hi;
    const int64_t row = i / row_bytes;
    shifted_table(shift[row * groups_per_row + (i - row * row_bytes) / bytes_per_group], lo, hi);
    out[i] = static_cast<uint16_t>(cast4(packed[i], lo, hi));
  }
}

}  // namespace

extern "C" int fp_export_fp4_to_fp8(const uint8_t* packed, const int8_t* shift, uint8_t* out, int64_t rows,
                                    int64_t cols, int64_t group, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0 || cols % 2 || group <= 0 || group % 2) return cudaErrorInvalidValue;
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int threads = 256;
  const bool aligned = (reinterpret_cast<uintptr_t>(packed) % 8 == 0) && (reinterpret_cast<uintptr_t>(out) % 16 == 0);
  const int64_t n_vec = rows * cols / 16;
  if (group % 16 == 0 && cols % group == 0 && aligned && n_vec < (int64_t{1} << 32)) {
    const int64_t per_step = static_cast<int64_t>(threads) * UNROLL;
    const int64_t blocks = std::min<int64_t>((n_vec + per_step - 1) / per_step, static_cast<int64_t>(sms) * 32);
    fp4_to_fp8_vec<<<blocks, threads, 0, stream>>>(reinterpret_cast<const uint2*>(packed), shift,
                                                   reinterpret_cast<uint4*>(out), static_cast<uint32_t>(n_vec),
                                                   static_cast<uint32_t>(group / 16));
  } else {
    const int64_t n_bytes = rows * cols / 2;
    const int64_t blocks = std::min<int64_t>((n_bytes + threads - 1) / threads, static_cast<int64_t>(sms) * 16);
    fp4_to_fp8_scalar<<<blocks, threads, 0, stream>>>(packed, shift, reinterpret_cast<uint16_t*>(out), n_bytes,
                                                      cols / 2, group / 2, (cols + group - 1) / group);
  }
  return static_cast<int>(cudaGetLastError());
}
