// fp-export: device helpers of the shift-based FP4 (E2M1) -> FP8 (E4M3) cast, shared by the cast
// kernel (fp4_to_fp8.cu) and the W4A8 GEMM (w4a8_gemm.cu).
//
// An E2M1 code s e1 e0 m maps to the E4M3 magnitude byte T[e1 e0 m] =
// {0x00, 0x30, 0x38, 0x3C, 0x40, 0x44, 0x48, 0x4C} (0, 0.5, 1, 1.5, 2, 3, 4, 6); multiplying by
// 2^k adds k to the exponent field of every non-zero entry, so one group's table is
// T_k[i] = T[i] + (k << 3) for i > 0. The eight table bytes live in two 32-bit registers and
// PRMT (__byte_perm) looks up four codes at once; the sign bit moves from bit 3 of each nibble to
// bit 7 of its byte.
#pragma once
#include <stdint.h>

namespace fp_export {

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

// Eight codes (one 32-bit word of the standard packing: code i in nibble i) -> two words of four
// E4M3 bytes (codes 0-3, codes 4-7). Magnitudes: one PRMT per four codes; signs: a second PRMT
// picking byte 0 (0x00) or byte 1 (0x80) of 0x8000 by each nibble's sign bit.
__device__ __forceinline__ void cast8(uint32_t w, uint32_t lo, uint32_t hi, uint32_t& out0, uint32_t& out1) {
  const uint32_t m = w & 0x77777777u;
  const uint32_t sel = (w >> 3) & 0x11111111u;
  out0 = __byte_perm(lo, hi, m) | __byte_perm(0x8000u, 0u, sel);
  out1 = __byte_perm(lo, hi, m >> 16) | __byte_perm(0x8000u, 0u, sel >> 16);
}

}  // namespace fp_export
