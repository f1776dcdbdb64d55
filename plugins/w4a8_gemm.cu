// fp-export: W4A8 GEMM for few tokens on Hopper (sm_90) tensor cores, mma.sync m16n8k32 E4M3.
//
// C^T = W A^T: the weights are the MMA's 16-row side (16 output channels per warp), the tokens its
// 8-column side (NT tiles of 8 tokens). Weights arrive pre-shuffled (fp_export/runtime/w4a8_gemm.py,
// ``prepare``): for each 16-row tile and 128-wide K chunk, 1 KB in which lane L = 4g + t holds, as
// two 16-byte vectors, the 32 codes k = 128c + 32t .. +31 of rows g and g + 8 (standard nibble
// packing), so a warp's two loads are 512 contiguous bytes each. The shifts of the chunk are
// 16 x SUB bytes (SUB = 1, 2 or 4 shifts per row per chunk: groups of >= 128, 64, 32 codes).
// Decode: PRMT table lookup (fp4_cast.cuh), no arithmetic on values. A lane's logical K slice
// 32t .. 32t + 31 maps onto MMA k positions (4t + i, 16 + 4t + i) of four MMA steps, and the
// activations are loaded with the same map, so the products pair up exactly.
// K is split over gridDim.y CTAs; partial sums go to a workspace and the last CTA of each column
// block (an arrival counter, reset by that CTA) adds them in split order: deterministic.
#include "w4a8_gemm.h"

#include <cuda_bf16.h>

#include <algorithm>

#include "fp4_cast.cuh"

namespace {

constexpr int WARPS = 4;  // 16-row tiles per CTA (one per warp)

// Offline-tuned constants (tools/sweep_w4a8.py builds variants with -D and times them on L2-cold
// weights; benchmarks/w4a8_config.md): 128-wide K chunks loaded ahead per warp at 8 tokens, and the
// CTAs per multiprocessor the register allocation must allow. On the H100 no variant of
// {4, 6, 8} x {1, 4, 6} beats 4 x 1: deeper unrolling or a register cap lowers occupancy or spills.
#ifndef FPX_UNROLL1
#define FPX_UNROLL1 4
#endif
#ifndef FPX_MIN_BLOCKS
#define FPX_MIN_BLOCKS 1
#endif

__device__ __forceinline__ void mma_e4m3(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <int NT>
struct Unroll {
  static constexpr int value = NT == 1 ? FPX_UNROLL1 : (NT == 2 ? 4 : (NT == 4 ? 2 : 1));
};

template <int NT, int SUB>
__global__ void __launch_bounds__(WARPS * 32, FPX_MIN_BLOCKS) w4a8_gemm_kernel(
    const uint4* __restrict__ wt, const int8_t* __restrict__ st, const uint8_t* __restrict__ a,
    const float* __restrict__ a_scale, const float* __restrict__ w_scale, const float* __restrict__ bias,
    const float* __restrict__ lorc_t, const float* __restrict__ lorc_u, int lorc_rank, void* __restrict__ out,
    int out_bf16, float* __restrict__ ws, int* __restrict__ counters, int M, int N, int K, int lda, int ldo,
    int KC, int chunks_per_split) {
  constexpr int U = Unroll<NT>::value;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int ntiles = (N + 15) >> 4;
  const int tile = blockIdx.x * WARPS + warp;
  const int splits = gridDim.y;
  const int c_begin = blockIdx.y * chunks_per_split;
  const int c_end = min(KC, c_begin + chunks_per_split);
  const int sub = (t * SUB) >> 2;

  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

  if (tile < ntiles) {
    const uint4* wp = wt + static_cast<size_t>(tile) * KC * 64 + lane;
    const int8_t* sp = st + static_cast<size_t>(tile) * KC * 16 * SUB + sub;
    for (int c0 = c_begin; c0 < c_end; c0 += U) {
      uint4 w0[U], w1[U];
      int s0[U], s1[U];
      uint4 xa[U][NT], xb[U][NT];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + u;
        if (c < c_end) {
          w0[u] = __ldcs(wp + c * 64);
          w1[u] = __ldcs(wp + c * 64 + 32);
          s0[u] = __ldg(sp + (c * 16 + g) * SUB);
          s1[u] = __ldg(sp + (c * 16 + g + 8) * SUB);
          const int kk = c * 128 + 32 * t;
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            const int m = j * 8 + g;
            if (m < M && kk < K) {
              const uint4* ap = reinterpret_cast<const uint4*>(a + static_cast<size_t>(m) * lda + kk);
              xa[u][j] = __ldg(ap);
              xb[u][j] = __ldg(ap + 1);
            } else {
              xa[u][j] = make_uint4(0, 0, 0, 0);
              xb[u][j] = make_uint4(0, 0, 0, 0);
            }
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (c0 + u < c_end) {
          uint32_t lo0, hi0, lo1, hi1;
          fp_export::shifted_table(s0[u], lo0, hi0);
          fp_export::shifted_table(s1[u], lo1, hi1);
          uint32_t A0[8], A1[8];  // decoded rows g and g + 8: word i = codes 32t + 4i .. +3
          fp_export::cast8(w0[u].x, lo0, hi0, A0[0], A0[1]);
          fp_export::cast8(w0[u].y, lo0, hi0, A0[2], A0[3]);
          fp_export::cast8(w0[u].z, lo0, hi0, A0[4], A0[5]);
          fp_export::cast8(w0[u].w, lo0, hi0, A0[6], A0[7]);
          fp_export::cast8(w1[u].x, lo1, hi1, A1[0], A1[1]);
          fp_export::cast8(w1[u].y, lo1, hi1, A1[2], A1[3]);
          fp_export::cast8(w1[u].z, lo1, hi1, A1[4], A1[5]);
          fp_export::cast8(w1[u].w, lo1, hi1, A1[6], A1[7]);
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            const uint32_t X[8] = {xa[u][j].x, xa[u][j].y, xa[u][j].z, xa[u][j].w,
                                   xb[u][j].x, xb[u][j].y, xb[u][j].z, xb[u][j].w};
#pragma unroll
            for (int s = 0; s < 4; ++s)
              mma_e4m3(acc[j], A0[2 * s], A1[2 * s], A0[2 * s + 1], A1[2 * s + 1], X[2 * s], X[2 * s + 1]);
          }
        }
      }
    }
  }

  // acc[j][i]: row n = tile*16 + g + 8*(i >> 1), token m = 8j + 2t + (i & 1).
  const int npad = ntiles * 16;
  if (splits > 1) {
    if (tile < ntiles) {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int m = 8 * j + 2 * t + (i & 1), n = tile * 16 + g + 8 * (i >> 1);
          if (m < M) __stcg(ws + (static_cast<size_t>(blockIdx.y) * M + m) * npad + n, acc[j][i]);
        }
    }
    __threadfence();
    __syncthreads();
    __shared__ int last;
    if (threadIdx.x == 0) {
      const int prev = atomicAdd(counters + blockIdx.x, 1);
      last = prev == splits - 1;
      if (last) counters[blockIdx.x] = 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    if (tile < ntiles) {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int m = 8 * j + 2 * t + (i & 1), n = tile * 16 + g + 8 * (i >> 1);
          float v = 0.f;
          if (m < M)
            for (int s = 0; s < splits; ++s) v += __ldcg(ws + (static_cast<size_t>(s) * M + m) * npad + n);
          acc[j][i] = v;
        }
    }
  }
  if (tile >= ntiles) return;
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = 8 * j + 2 * t + (i & 1), n = tile * 16 + g + 8 * (i >> 1);
      if (m >= M || n >= N) continue;
      const float as = a_scale[m];
      float y = acc[j][i] * as * w_scale[n];
      if (lorc_rank > 0) {
        float z = 0.f;
        for (int r = 0; r < lorc_rank; ++r) z += lorc_t[m * lorc_rank + r] * lorc_u[n * lorc_rank + r];
        y += z * as;
      }
      if (bias != nullptr) y += bias[n];
      if (out_bf16)
        reinterpret_cast<__nv_bfloat16*>(out)[static_cast<size_t>(m) * ldo + n] = __float2bfloat16_rn(y);
      else
        reinterpret_cast<float*>(out)[static_cast<size_t>(m) * ldo + n] = y;
    }
}

// One thread per 32 codes (one 16-byte vector of the layout) -> 32 E4M3 bytes of row n.
template <int SUB>
__global__ void weight_to_fp8_kernel(const uint4* __restrict__ wt, const int8_t* __restrict__ st,
                                     uint8_t* __restrict__ out, int N, int K, int KC) {
  const int64_t total = static_cast<int64_t>((N + 15) >> 4) * KC * 64;
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < total;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int lane = static_cast<int>(v & 31), h = static_cast<int>((v >> 5) & 1);
    const int64_t tc = v >> 6;  // tile * KC + c
    const int c = static_cast<int>(tc % KC);
    const int tile = static_cast<int>(tc / KC);
    const int g = lane >> 2, t = lane & 3;
    const int n = tile * 16 + g + 8 * h, kk = c * 128 + 32 * t;
    if (n >= N || kk >= K) continue;
    uint32_t lo, hi;
    fp_export::shifted_table(st[(tc * 16 + g + 8 * h) * SUB + ((t * SUB) >> 2)], lo, hi);
    const uint4 w = wt[v];
    uint4 r0, r1;
    fp_export::cast8(w.x, lo, hi, r0.x, r0.y);
    fp_export::cast8(w.y, lo, hi, r0.z, r0.w);
    fp_export::cast8(w.z, lo, hi, r1.x, r1.y);
    fp_export::cast8(w.w, lo, hi, r1.z, r1.w);
    uint4* o = reinterpret_cast<uint4*>(out + static_cast<size_t>(n) * K + kk);
    o[0] = r0;
    o[1] = r1;
  }
}

template <int NT, int SUB>
cudaError_t launch(const void* wt, const int8_t* st, const uint8_t* a, const float* a_scale, const float* w_scale,
                   const float* bias, const float* lorc_t, const float* lorc_u, int lorc_rank, void* out, int out_bf16,
                   float* ws, int* counters, int m, int n, int k, int lda, int ldo, int kc, int splits,
                   cudaStream_t stream) {
  const int ntiles = (n + 15) / 16;
  const int per_split = (kc + splits - 1) / splits;
  const dim3 grid((ntiles + WARPS - 1) / WARPS, splits);
  w4a8_gemm_kernel<NT, SUB><<<grid, WARPS * 32, 0, stream>>>(
      static_cast<const uint4*>(wt), st, a, a_scale, w_scale, bias, lorc_t, lorc_u, lorc_rank, out, out_bf16, ws,
      counters, m, n, k, lda, ldo, kc, per_split);
  return cudaGetLastError();
}

template <int NT>
cudaError_t launch_sub(int sub, const void* wt, const int8_t* st, const uint8_t* a, const float* a_scale,
                       const float* w_scale, const float* bias, const float* lorc_t, const float* lorc_u,
                       int lorc_rank, void* out, int out_bf16, float* ws, int* counters, int m, int n, int k,
                       int lda, int ldo, int kc, int splits, cudaStream_t stream) {
  switch (sub) {
    case 1: return launch<NT, 1>(wt, st, a, a_scale, w_scale, bias, lorc_t, lorc_u, lorc_rank, out, out_bf16, ws, counters, m, n, k, lda, ldo, kc, splits, stream);
    case 2: return launch<NT, 2>(wt, st, a, a_scale, w_scale, bias, lorc_t, lorc_u, lorc_rank, out, out_bf16, ws, counters, m, n, k, lda, ldo, kc, splits, stream);
    case 4: return launch<NT, 4>(wt, st, a, a_scale, w_scale, bias, lorc_t, lorc_u, lorc_rank, out, out_bf16, ws, counters, m, n, k, lda, ldo, kc, splits, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

extern "C" int fp_export_w4a8_gemm(const void* wt, const int8_t* st, const uint8_t* a, const float* a_scale,
                                   const float* w_scale, const float* bias, const float* lorc_t,
                                   const float* lorc_u, int lorc_rank, void* out, int out_bf16, float* ws,
                                   int* counters, int m, int n, int k, int lda, int ldo, int kc, int sub,
                                   int splits, cudaStream_t stream) {
  if (m <= 0 || m > 64 || n <= 0 || k <= 0 || k % 32 || kc * 128 < k || lda % 16 || splits < 1 || splits > kc ||
      (reinterpret_cast<uintptr_t>(a) % 16) || (splits > 1 && (ws == nullptr || counters == nullptr)))
    return cudaErrorInvalidValue;
#define FPX_ARGS wt, st, a, a_scale, w_scale, bias, lorc_t, lorc_u, lorc_rank, out, out_bf16, ws, counters, m, n, k, lda, ldo, kc, splits, stream
  cudaError_t e;
  if (m <= 8) e = launch_sub<1>(sub, FPX_ARGS);
  else if (m <= 16) e = launch_sub<2>(sub, FPX_ARGS);
  else if (m <= 32) e = launch_sub<4>(sub, FPX_ARGS);
  else e = launch_sub<8>(sub, FPX_ARGS);
#undef FPX_ARGS
  return static_cast<int>(e);
}

extern "C" int fp_export_w4a8_weight_to_fp8(const void* wt, const int8_t* st, uint8_t* out, int n, int k, int kc,
                                            int sub, cudaStream_t stream) {
  if (n <= 0 || k <= 0 || k % 32 || kc * 128 < k) return cudaErrorInvalidValue;
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t total = static_cast<int64_t>((n + 15) / 16) * kc * 64;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((total + threads - 1) / threads, static_cast<int64_t>(sms) * 16));
  const uint4* w = static_cast<const uint4*>(wt);
  switch (sub) {
    case 1: weight_to_fp8_kernel<1><<<blocks, threads, 0, stream>>>(w, st, out, n, k, kc); break;
    case 2: weight_to_fp8_kernel<2><<<blocks, threads, 0, stream>>>(w, st, out, n, k, kc); break;
    case 4: weight_to_fp8_kernel<4><<<blocks, threads, 0, stream>>>(w, st, out, n, k, kc); break;
    default: return cudaErrorInvalidValue;
  }
  return static_cast<int>(cudaGetLastError());
}
