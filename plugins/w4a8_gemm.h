// fp-export: W4A8 GEMM for up to 128 tokens (FP4 shift-cast weights decoded to E5M2 x FP8 E4M3
// activations on Hopper's FP8 wgmma; sm_90a) and the FP4 -> FP8 cast of its weight layout. C API
// (ctypes); the layout and the semantics are documented in fp_export/runtime/w4a8_gemm.py.
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// out[m, n] = (acc[m, n] * a_scale[m] * w_scale[n]) + a_scale[m] * lorc(m, n) (+ bias[n]),
// acc = sum_k a[m, k] * e4m3(w[n, k]); lorc(m, n) = sum_r lorc_t[m, r] * lorc_u[n, r] when
// lorc_rank > 0. wt: uint8 [tiles, kc, 2, 32, 16]; st: int8 [tiles, kc, 16, sub] (both 16-byte aligned); a: E4M3 bits
// [m, lda]; out: float32 (out_bf16 = 0) or bfloat16 [m, ldo]. nw (1, 2 or 4): at most that many
// 64-row blocks per CTA sharing one copy of the activations (fewer where a launch has 8 tokens or
// fewer, or the registers do not allow them). splits: K parts (up to 4 warpgroups of a CTA in all,
// row blocks x the parts within it; the rest over CTAs); splits > 1 needs ws (float32,
// splits * m * tiles * 16) and counters (int32, >= tiles / 4, all zero; left zero).
// m <= 128 (one launch per 64 tokens). pdl != 0: programmatic dependent launch (the kernel may start before the previous
// kernel in the stream has finished; it reads its weights early and waits before anything else).
// Returns a cudaError_t value.
int fp_export_w4a8_gemm(const void* wt, const int8_t* st, const uint8_t* a, const float* a_scale,
                        const float* w_scale, const float* bias, const float* lorc_t, const float* lorc_u,
                        int lorc_rank, void* out, int out_bf16, float* ws, int* counters, int m, int n, int k,
                        int lda, int ldo, int kc, int sub, int splits, int nw, int pdl, cudaStream_t stream);

// E4M3 bits uint8 [n, k] (row-major) of the weight layout above.
int fp_export_w4a8_weight_to_fp8(const void* wt, const int8_t* st, uint8_t* out, int n, int k, int kc, int sub,
                                 cudaStream_t stream);

#ifdef __cplusplus
}
#endif
