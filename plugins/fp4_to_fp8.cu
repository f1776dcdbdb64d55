// fp-export: the shift-based FP4 -> FP8 cast kernel (integer operations only).
//
// An E2M1 code s e1 e0 m maps to the E4M3 magnitude byte T[e1 e0 m] =
// {0x00, 0x30, 0x38, 0x3C, 0x40, 0x44, 0x48, 0x4C} (0, 0.5, 1, 1.5, 2, 3, 4, 6); multiplying by
// 2^k adds k to the exponent field of every non-zero entry, so one group's table is
// T_k[i] = T[i] + (k << 3) for i > 0. The eight table bytes live in two 32-bit registers and
// PRMT (__byte_perm) looks up four codes at once; the sign bit moves from bit 3 of each nibble to
// bit 7 of its byte.
#include "fp4_to_fp8.h"

#include <algorithm>

namespace {

__device__ __forceinline__ void shifted_table(int k, uint32_t& lo, uint32_t& hi) {
  const uint32_t add = static_cast<uint32_t>(k << 3) & 0xFFu;
  const uint32_t add4 = add * 0x01010101u;
  // Per-byte adds (__vadd4: no carry between bytes); every sum stays in 0x08..0x7E for k in [-5, 6].
  lo = __vadd4(0x3C383000u, add4 & 0xFFFFFF00u);  // 0x00, 0x30, 0x38, 0x3C: the zero entry stays zero
  hi = __vadd4(0x4C484440u, add4);                 // 0x40, 0x44, 0x48, 0x4C
}

// Four codes (16 bits of packed input, element order = nibble order) -> four E4M3 bytes.
__device__ __forceinline__ uint32_t cast4(uint32_t nibbles, uint32_t lo, uint32_t hi) {
  const uint32_t mag = __byte_perm(lo, hi, nibbles & 0x7777u);
  const uint32_t s = nibbles & 0x8888u;
  const uint32_t sign = ((s & 0x8u) << 4) | ((s & 0x80u) << 8) | ((s & 0x800u) << 12) | ((s & 0x8000u) << 16);
  return mag | sign;
}

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

// Scalar path for any even group size: one packed byte (two codes) per thread.
__global__ void fp4_to_fp8_scalar(const uint8_t* __restrict__ packed, const int8_t* __restrict__ shift,
                                  uint16_t* __restrict__ out, int64_t n_bytes, int64_t bytes_per_group) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n_bytes; i += stride) {
    uint32_t lo, hi;
    shifted_table(shift[i / bytes_per_group], lo, hi);
    out[i] = static_cast<uint16_t>(cast4(packed[i], lo, hi));
  }
}

}  // namespace

extern "C" int fp_export_fp4_to_fp8(const uint8_t* packed, const int8_t* shift, uint8_t* out, int64_t rows,
                                    int64_t cols, int64_t group, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0 || group <= 0 || group % 2 || cols % group) return cudaErrorInvalidValue;
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int threads = 256;
  const bool aligned = (reinterpret_cast<uintptr_t>(packed) % 8 == 0) && (reinterpret_cast<uintptr_t>(out) % 16 == 0);
  const int64_t n_vec = rows * cols / 16;
  if (group % 16 == 0 && aligned && n_vec < (int64_t{1} << 32)) {
    const int64_t per_step = static_cast<int64_t>(threads) * UNROLL;
    const int64_t blocks = std::min<int64_t>((n_vec + per_step - 1) / per_step, static_cast<int64_t>(sms) * 32);
    fp4_to_fp8_vec<<<blocks, threads, 0, stream>>>(reinterpret_cast<const uint2*>(packed), shift,
                                                   reinterpret_cast<uint4*>(out), static_cast<uint32_t>(n_vec),
                                                   static_cast<uint32_t>(group / 16));
  } else {
    const int64_t n_bytes = rows * cols / 2;
    const int64_t blocks = std::min<int64_t>((n_bytes + threads - 1) / threads, static_cast<int64_t>(sms) * 16);
    fp4_to_fp8_scalar<<<blocks, threads, 0, stream>>>(packed, shift, reinterpret_cast<uint16_t*>(out), n_bytes,
                                                      group / 2);
  }
  return static_cast<int>(cudaGetLastError());
}
