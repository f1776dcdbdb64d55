// fp-export: device helpers of the shift-based FP4 (E2M1) -> FP8 (E4M3) cast kernel
// (fp4_to_fp8.cu). The W4A8 GEMM (w4a8_gemm.cu) decodes its own layout to E5M2 instead.
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

}  // namespace fp_export
