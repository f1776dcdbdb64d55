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

// Vector path: each thread turns 16 packed bytes (32 codes, one group) into 32 output bytes.
__global__ void fp4_to_fp8_vec(const uint4* __restrict__ packed, const int8_t* __restrict__ shift,
                               uint4* __restrict__ out, int64_t n_vec, int64_t vec_per_group) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n_vec; i += stride) {
    const uint4 p = packed[i];
    uint32_t lo, hi;
    shifted_table(shift[i / vec_per_group], lo, hi);
    const uint32_t w[4] = {p.x, p.y, p.z, p.w};
    uint32_t r[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      r[2 * j] = cast4(w[j] & 0xFFFFu, lo, hi);
      r[2 * j + 1] = cast4(w[j] >> 16, lo, hi);
    }
    out[2 * i] = make_uint4(r[0], r[1], r[2], r[3]);
    out[2 * i + 1] = make_uint4(r[4], r[5], r[6], r[7]);
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
  const bool aligned = (reinterpret_cast<uintptr_t>(packed) % 16 == 0) && (reinterpret_cast<uintptr_t>(out) % 16 == 0);
  if (group % 32 == 0 && aligned) {
    const int64_t n_vec = rows * cols / 32;
    const int64_t blocks = std::min<int64_t>((n_vec + threads - 1) / threads, static_cast<int64_t>(sms) * 16);
    fp4_to_fp8_vec<<<blocks, threads, 0, stream>>>(reinterpret_cast<const uint4*>(packed), shift,
                                                   reinterpret_cast<uint4*>(out), n_vec, group / 32);
  } else {
    const int64_t n_bytes = rows * cols / 2;
    const int64_t blocks = std::min<int64_t>((n_bytes + threads - 1) / threads, static_cast<int64_t>(sms) * 16);
    fp4_to_fp8_scalar<<<blocks, threads, 0, stream>>>(packed, shift, reinterpret_cast<uint16_t*>(out), n_bytes,
                                                      group / 2);
  }
  return static_cast<int>(cudaGetLastError());
}
