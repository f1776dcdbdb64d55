// fp-export: W4A8 GEMM for few tokens on Hopper (sm_90) tensor cores.
//
// C^T = W A^T: the weights are the 16-row side of mma.sync m16n8k16 (FP16 inputs, FP32
// accumulation; 16 output channels per warp), the tokens its 8-column side (NT tiles of 8 tokens).
// sm_90 has no FP8 mma.sync (only wgmma): an E4M3 mma.sync compiles to FP8 -> FP16 conversions and
// FP16 HMMAs, so the kernel decodes the FP4 codes straight to FP16 and converts the activations
// (E4M3 -> FP16 is exact) itself.
//
// Decode (no table, no arithmetic on values): an E2M1 code s|e1 e0 m placed as FP16 bits
// s << 15 | (e1 e0 m) << 9 is the code's value times 2^-14 exactly (E2M1's subnormal 0.5 lands on
// FP16's subnormals), so a code pair becomes an FP16x2 register with a shift and a mask. The
// group's power of two 2^shift and the 2^14 multiply the FP32 partial sum of each 32-code group
// (exact), before it is added to the accumulator.
//
// Layout (fp_export/runtime/w4a8_gemm.py, ``prepare``): for each 16-row tile and 128-wide K chunk,
// 1 KB in which lane L = 4g + t holds two 16-byte vectors, rows g and g + 8; word j (0..3) of a
// vector holds the 8 codes k = 128c + 32j + 8t + i (i = 0..7) with code i's 3 magnitude bits and
// sign bit at (MAG_AT[i], SIGN_AT[i]), chosen so that codes (0,1), (2,3), (4,5), (6,7) decode with
// shifts of 0, 3, 6 (sign 1) and 9 (sign 2) bits and one mask each (``decode``). MMA j, h (two per
// word) takes the lane's codes 4h .. 4h + 3 of word j and the same four activations: every MMA
// lies inside one 32-code group. The shifts of a chunk are 16 x SUB bytes (SUB = 1, 2 or 4 shifts
// per row per chunk: groups of >= 128, 64, 32 codes).
//
// Up to 16 tokens (w4a8_gemm_kernel), each warp (a 16-row tile and a part of its K range; 4 warps
// per CTA, 1, 2 or 4 of them per tile) streams its weights, shifts and activations through its own
// ring of shared-memory stages with cp.async (weights with the L2 evict-first policy), so the copies
// of several K chunks are in flight while one is decoded and multiplied; the warps of a tile add
// their sums in shared memory. From 17 to 128 tokens (w4a8_gemm_wide_kernel) the activations of a
// chunk outweigh a tile's weights, so the warps of a CTA share one ring and copy each chunk's
// activations once. K is also split over gridDim.y CTAs; partial sums go to a workspace and the
// last CTA of each column block (an arrival counter, reset by that CTA) adds them in split order.
// Every reduction has a fixed order: deterministic.
#include "w4a8_gemm.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>

namespace {

constexpr int WARPS = 4;  // 16-row tiles per CTA (one per warp)

// Offline-tuned constants (tools/sweep_w4a8.py builds variants with -D and times them on L2-cold
// weights; benchmarks/w4a8_config.md): pipeline stages (128-wide K chunks in flight per warp) at up
// to 16 tokens; whether each warp starts at a different chunk of its K range (FPX_ROTATE: on the
// H100, 1.10x at equal stages: warps that all read the same offset of their tiles at once are
// slower); whether weight copies carry the L2 evict-first policy and a 256-byte prefetch.
#ifndef FPX_STAGES
#define FPX_STAGES 4
#endif
#ifndef FPX_ROTATE
#define FPX_ROTATE 1
#endif
#ifndef FPX_EVICT_FIRST
#define FPX_EVICT_FIRST 1
#endif

// Shared memory of one pipeline stage (one K chunk) for TILES 16-row tiles: their weights (64
// 16-byte vectors each), shifts (16 rows x SUB bytes each) and the activations (8 * NT token rows
// of 128 bytes, row stride 160 bytes so the 16 lanes of an 8-byte access phase hit distinct
// banks). The few-token kernel has one ring of these per warp (TILES = 1), the wide kernel one per
// CTA.
constexpr int A_STRIDE = 160;
template <int TILES, int NT, int SUB>
struct Stage {
  static constexpr int W = 0;
  static constexpr int S = W + TILES * 64 * 16;
  static constexpr int A = S + TILES * 16 * SUB;
  static constexpr int BYTES = A + 8 * NT * A_STRIDE;
};

// x, opaque to the compiler: it stays in a register instead of being recomputed where it is used.
template <typename T>
__device__ __forceinline__ T pinned(T x) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "one or two registers");
  if constexpr (sizeof(T) == 4)
    asm volatile("" : "+r"(x));
  else
    asm volatile("" : "+l"(x));
  return x;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copies (cp.async.cg: L2 only). src_bytes = 0 writes zeros.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async16_stream(uint32_t dst, const void* src, uint64_t policy) {
#if FPX_EVICT_FIRST
  asm volatile("cp.async.cg.shared.global.L2::cache_hint.L2::256B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "l"(policy));
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
#endif
}

// Programmatic dependent launch (sm_90): wait until the kernel this one depends on has completed and
// its memory is visible (a no-op when launched without the attribute). The GEMMs do not trigger
// their own dependents early: a GEMM launched into a draining GEMM would be placed on whichever
// multiprocessors had room (measured on the H100: 1.2x slower at 16 tokens, one CTA per SM).
__device__ __forceinline__ void grid_dependency_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// The four FP16x2 registers (value * 2^-14) of one layout word: codes (0,1), (2,3), (4,5), (6,7).
__device__ __forceinline__ void decode(uint32_t w, uint32_t (&o)[4]) {
  constexpr uint32_t MAG = 0x0E000E00u, SIGN = 0x80008000u;
  o[0] = w & (MAG | SIGN);
  o[1] = (w << 3) & (MAG | SIGN);
  o[2] = ((w << 6) & MAG) | ((w << 1) & SIGN);
  o[3] = ((w << 9) & MAG) | ((w << 2) & SIGN);
}

// 2^(14 + shift) as float: undoes decode's 2^-14 and applies the group's power of two.
__device__ __forceinline__ float group_scale(int shift) { return __int_as_float((shift + 141) << 23); }

// Four E4M3 bytes -> two FP16x2 registers (bytes 0-1, bytes 2-3; exact).
__device__ __forceinline__ void fp8x4_to_half2x2(uint32_t x, uint32_t& lo, uint32_t& hi) {
  asm("{\n .reg .b16 l, h;\n mov.b32 {l, h}, %2;\n cvt.rn.f16x2.e4m3x2 %0, l;\n cvt.rn.f16x2.e4m3x2 %1, h;\n}\n"
      : "=r"(lo), "=r"(hi)
      : "r"(x));
}

__device__ __forceinline__ void mma_f16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 2^shift as FP16x2 bits (shift in the shift-cast's [-5, 6]: FP16 normals).
__device__ __forceinline__ uint32_t half2_pow2(int shift) {
  const uint32_t h = static_cast<uint32_t>(shift + 15) << 10;
  return h | (h << 16);
}

__device__ __forceinline__ uint32_t hmul2(uint32_t x, uint32_t y) {
  uint32_t z;
  asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(z) : "r"(x), "r"(y));
  return z;
}

// The cp.async ring both kernels run over `chunks` K chunks, S stages of BYTES each: load(i, stage,
// weights, acts) copies the i-th chunk of the caller's order into the stage at byte offset `stage`,
// sync() makes a landed stage visible to every reader (and frees the previous one), compute(stage)
// multiplies it. The first stages' weights go out before the wait for the kernel that writes the
// activations (programmatic dependent launch), everything else after it; every thread waits, so
// nothing (workspace, counters, scales) is touched before that kernel has finished. (An L2
// prefetch of further weight chunks before the wait was slower: benchmarks/w4a8_notes.md.)
template <int S, int BYTES, typename Load, typename Sync, typename Compute>
__device__ __forceinline__ void run_ring(int chunks, Load&& load, Sync&& sync, Compute&& compute) {
#pragma unroll
  for (int i = 0; i < S - 1; ++i)
    if (i < chunks) load(i, i * BYTES, true, false);
  grid_dependency_wait();
  if (chunks <= 0) return;
#pragma unroll
  for (int i = 0; i < S - 1; ++i) {
    if (i < chunks) load(i, i * BYTES, false, true);
    cp_async_commit();
  }
  // Unrolled by S, so that every stage offset is a constant.
  for (int i0 = 0; i0 < chunks; i0 += S) {
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int i = i0 + s;
      if (i < chunks) {
        cp_async_wait<S - 2>();
        sync();  // chunk i has landed for every thread; every reader is done with chunk i - 1's stage
        if (i + S - 1 < chunks) load(i + S - 1, ((s + S - 1) % S) * BYTES, true, true);
        cp_async_commit();
        compute(s * BYTES);
      }
    }
  }
  cp_async_wait<0>();
}

// One 128-wide K chunk of one 16-row tile: w0, w1 = the lane's layout vectors (rows g and g + 8),
// act = the chunk's activations in shared memory (token m's 128 bytes at act + m * A_STRIDE), sc =
// the tile's shifts of the chunk (16 rows x SUB). The group's power of two is applied one of two
// ways, both exact:
// - SCALE_W false: FP32 partial sums per 32-code group in part, scaled by 2^(14 + shift) into acc
//   (few tokens: a few FMAs per group);
// - SCALE_W true: the decoded FP16 weights (value * 2^-14) times 2^shift, an FP16 multiply that is
//   exact because value * 2^(shift - 14) (value a multiple of 0.5, shift >= -5) is a multiple of
//   2^-20, within FP16's reach; acc then holds the sum times 2^-14 (many tokens: no second set of
//   accumulators; part is unused).
template <int NT, int SUB, bool SCALE_W>
__device__ __forceinline__ void mma_chunk(float (&acc)[NT][4], float (&part)[NT][4], const uint4& w0, const uint4& w1,
                                          const uint8_t* act, const int8_t* sc, int g, int t, int M) {
  constexpr int WORDS_PER_GROUP = 4 / SUB;
  const uint32_t W0[4] = {w0.x, w0.y, w0.z, w0.w}, W1[4] = {w1.x, w1.y, w1.z, w1.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint32_t r0[4], r1[4];  // rows g and g + 8
    decode(W0[j], r0);
    decode(W1[j], r1);
    if constexpr (SCALE_W) {
      const int q = j / WORDS_PER_GROUP;
      const uint32_t s0 = half2_pow2(sc[g * SUB + q]), s1 = half2_pow2(sc[(g + 8) * SUB + q]);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        r0[i] = hmul2(r0[i], s0);
        r1[i] = hmul2(r1[i], s1);
      }
    }
    const uint32_t a_lo[4] = {r0[0], r1[0], r0[1], r1[1]}, a_hi[4] = {r0[2], r1[2], r0[3], r1[3]};
    float(&sum)[NT][4] = SCALE_W ? acc : part;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const int m = n * 8 + g;
      uint2 x = make_uint2(0, 0);
      if (m < M) x = *reinterpret_cast<const uint2*>(act + m * A_STRIDE + 32 * j + 8 * t);
      uint32_t b[4];
      fp8x4_to_half2x2(x.x, b[0], b[1]);
      fp8x4_to_half2x2(x.y, b[2], b[3]);
      mma_f16(sum[n], a_lo, b[0], b[1]);
      mma_f16(sum[n], a_hi, b[2], b[3]);
    }
    if (!SCALE_W && (j + 1) % WORDS_PER_GROUP == 0) {
      const int q = j / WORDS_PER_GROUP;
      const float s0 = group_scale(sc[g * SUB + q]), s1 = group_scale(sc[(g + 8) * SUB + q]);
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        acc[n][0] = fmaf(part[n][0], s0, acc[n][0]);
        acc[n][1] = fmaf(part[n][1], s0, acc[n][1]);
        acc[n][2] = fmaf(part[n][2], s1, acc[n][2]);
        acc[n][3] = fmaf(part[n][3], s1, acc[n][3]);
        part[n][0] = part[n][1] = part[n][2] = part[n][3] = 0.f;
      }
    }
  }
}

// What the epilogue needs besides the accumulators.
struct Epilogue {
  const float* a_scale;
  const float* w_scale;
  const float* bias;
  const float* lorc_t;
  const float* lorc_u;
  int lorc_rank;
  void* out;
  int out_bf16;
  float* ws;
  int* counters;
  int M, N, ldo;
};

// acc[j][i]: row n = tile*16 + g + 8*(i >> 1), token m = 8j + 2t + (i & 1). With K split over
// gridDim.y CTAs, each CTA stores its partial sums in the workspace and the last CTA of its column
// block (blockIdx.x; an arrival counter, reset by that CTA) adds them in split order
// (deterministic), then scales, LoRC, bias and the output store.
template <int NT>
__device__ __forceinline__ void epilogue(float (&acc)[NT][4], const Epilogue& p, int tile, int ntiles, int g, int t) {
  const int M = p.M, splits = gridDim.y, npad = ntiles * 16;
  if (splits > 1) {
    if (tile < ntiles) {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int m = 8 * j + 2 * t + (i & 1), n = tile * 16 + g + 8 * (i >> 1);
          if (m < M) __stcg(p.ws + (static_cast<size_t>(blockIdx.y) * M + m) * npad + n, acc[j][i]);
        }
    }
    __threadfence();
    __syncthreads();
    __shared__ int last;
    if (threadIdx.x == 0) {
      const int prev = atomicAdd(p.counters + blockIdx.x, 1);
      last = prev == splits - 1;
      if (last) p.counters[blockIdx.x] = 0;
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
            for (int s = 0; s < splits; ++s) v += __ldcg(p.ws + (static_cast<size_t>(s) * M + m) * npad + n);
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
      if (m >= M || n >= p.N) continue;
      const float as = p.a_scale[m];
      float y = acc[j][i] * as * p.w_scale[n];
      if (p.lorc_rank > 0) {
        float z = 0.f;
        for (int r = 0; r < p.lorc_rank; ++r) z += p.lorc_t[m * p.lorc_rank + r] * p.lorc_u[n * p.lorc_rank + r];
        y += z * as;
      }
      if (p.bias != nullptr) y += p.bias[n];
      if (p.out_bf16)
        reinterpret_cast<__nv_bfloat16*>(p.out)[static_cast<size_t>(m) * p.ldo + n] = __float2bfloat16_rn(y);
      else
        reinterpret_cast<float*>(p.out)[static_cast<size_t>(m) * p.ldo + n] = y;
    }
}

// Each warp streams its tile's K range chunk by chunk through its own ring of FPX_STAGES
// shared-memory stages (cp.async; the warp's lanes read what other lanes copied, so one __syncwarp
// per chunk and no CTA barrier): the copies of the next FPX_STAGES - 1 chunks are in flight while a
// chunk is decoded and multiplied, and registers hold one chunk only. The WARPS warps of a CTA take
// WARPS / KW tiles, KW warps per tile, each 1/KW of the CTA's K range; the KW sums of a tile are
// added in shared memory, in warp order, at the end (a K split without the global reduction).
template <int NT, int SUB, int KW>
__global__ void __launch_bounds__(WARPS * 32) w4a8_gemm_kernel(const uint4* __restrict__ wt,
                                                                const int8_t* __restrict__ st,
                                                                const uint8_t* __restrict__ a, int K, int lda, int KC,
                                                                int chunks_per_split, const Epilogue ep) {
  using L = Stage<1, NT, SUB>;
  constexpr int S = FPX_STAGES, TILES = WARPS / KW;
  const int M = ep.M, N = ep.N;
  constexpr int AV = 2 * NT;  // activation vectors per lane per chunk: 8 * NT rows x 8 vectors / 32 lanes
  extern __shared__ __align__(16) uint8_t smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = pinned(lane >> 2), t = pinned(lane & 3);
  const int ntiles = (N + 15) >> 4;
  const int tile = blockIdx.x * TILES + warp % TILES, slice = warp / TILES;
  const int cta_begin = blockIdx.y * chunks_per_split;
  const int cta_chunks = max(0, min(KC, cta_begin + chunks_per_split) - cta_begin);
  const int per_slice = (cta_chunks + KW - 1) / KW;
  const int c_begin = cta_begin + slice * per_slice;
  const int chunks = tile < ntiles ? max(0, min(per_slice, cta_chunks - slice * per_slice)) : 0;

  float acc[NT][4], part[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = part[j][i] = 0.f;

  uint8_t* ring = smem + warp * S * L::BYTES;
  const uint32_t ring_addr = smem_addr(ring);
  uint64_t policy = 0;
#if FPX_EVICT_FIRST
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
#endif
  // This lane's copies per chunk: two weight vectors, (lane < SUB) one shift vector, and the
  // activation vectors v = lane + 32 r of rows m = v / 8 < M (bytes 16 (v % 8) of the chunk;
  // zeros past K).
  const uint4* w_src = pinned(wt + (static_cast<size_t>(tile) * KC + c_begin) * 64 + lane);
  const int8_t* s_src = pinned(st + (static_cast<size_t>(tile) * KC + c_begin) * 16 * SUB + lane * 16);
  // Shared-memory destinations of this lane's copies in stage 0 (pinned, so that the compiler keeps
  // them in registers instead of recomputing them from the thread index in every chunk).
  const uint32_t w_dst = pinned(ring_addr + L::W + lane * 16), s_dst = pinned(ring_addr + L::S + lane * 16);
  const uint32_t s_on = pinned<uint32_t>(lane < SUB);
  const uint8_t* a_src[AV];
  uint32_t a_dst[AV], a_k[AV];  // a_k: the vector's offset in its row at the range's first chunk
  uint32_t a_on[AV];            // row m < M
#pragma unroll
  for (int r = 0; r < AV; ++r) {
    const int v = lane + 32 * r, m = v >> 3;
    a_k[r] = pinned<uint32_t>(c_begin * 128 + (v & 7) * 16);
    a_src[r] = pinned(a + static_cast<size_t>(m < M ? m : 0) * lda + a_k[r]);
    a_dst[r] = pinned(ring_addr + L::A + m * A_STRIDE + (v & 7) * 16);
    a_on[r] = pinned<uint32_t>(m < M);
  }
  // The warps start at different chunks of their range (FPX_ROTATE), so that concurrent copies
  // spread over the address space instead of all reading the same offset of their tiles.
  const uint32_t rot = FPX_ROTATE && chunks > 0 ? (tile * 5 + slice) % chunks : 0;
  // chunk c_begin + (i0 + rot) % chunks into the stage at byte offset `stage`: its weights and
  // shifts (which no earlier kernel writes) and/or its activations (zeros past K)
  auto load = [&](uint32_t i0, uint32_t stage, bool weights, bool acts) {
    const uint32_t i = i0 + rot < static_cast<uint32_t>(chunks) ? i0 + rot : i0 + rot - chunks;
    if (weights) {
      const uint4* src = w_src + i * 64;
      cp_async16_stream(w_dst + stage, src, policy);
      cp_async16_stream(w_dst + stage + 512, src + 32, policy);
      if (s_on) cp_async16(s_dst + stage, s_src + i * 16 * SUB, 16);
    }
    if (acts)
#pragma unroll
      for (int r = 0; r < AV; ++r) {
        const bool in = a_k[r] + i * 128 < static_cast<uint32_t>(K);
        if (a_on[r]) cp_async16(a_dst[r] + stage, a_src[r] + (in ? i * 128 : 0), in ? 16 : 0);
      }
  };

  run_ring<S, L::BYTES>(chunks, load, [] { __syncwarp(); }, [&](uint32_t rd) {
    const uint8_t* stage = ring + rd;
    const uint4* wv = reinterpret_cast<const uint4*>(stage + L::W);
    mma_chunk<NT, SUB, false>(acc, part, wv[lane], wv[lane + 32], stage + L::A,
                              reinterpret_cast<const int8_t*>(stage + L::S), g, t, M);
  });
  if constexpr (KW > 1) {  // slices 1 .. KW-1 hand their sums to slice 0 through the (drained) rings
    float* red = reinterpret_cast<float*>(smem);
    __syncthreads();
    if (slice > 0)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) red[((warp - TILES) * NT * 4 + j * 4 + i) * 32 + lane] = acc[j][i];
    __syncthreads();
    if (slice == 0)
#pragma unroll
      for (int s = 1; s < KW; ++s)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[j][i] += red[(((s - 1) * TILES + warp) * NT * 4 + j * 4 + i) * 32 + lane];
  }
  epilogue<NT>(acc, ep, slice == 0 ? tile : ntiles, ntiles, g, t);  // slices > 0 only join its barriers
}

// The wide kernel (17-128 tokens): tiles per CTA and pipeline stages (offline-tuned, as above).
#ifndef FPX_WIDE_WARPS
#define FPX_WIDE_WARPS 4
#endif
#ifndef FPX_WIDE_STAGES
#define FPX_WIDE_STAGES 4
#endif
constexpr int WIDE_WARPS = FPX_WIDE_WARPS;

// 17-128 tokens, where the activations outweigh a tile's weights: the CTA's warps (one 16-row
// tile each) walk their K range together through one ring of FPX_WIDE_STAGES shared stages
// (cp.async, one CTA barrier per chunk), so each chunk's activations are copied once per CTA, not
// once per warp. The MMAs and the epilogue are the few-token kernel's.
template <int NT, int SUB>
__global__ void __launch_bounds__(WIDE_WARPS * 32) w4a8_gemm_wide_kernel(const uint4* __restrict__ wt,
                                                                         const int8_t* __restrict__ st,
                                                                         const uint8_t* __restrict__ a, int K,
                                                                         int lda, int KC, int chunks_per_split,
                                                                         const Epilogue ep) {
  using L = Stage<WIDE_WARPS, NT, SUB>;
  constexpr int S = FPX_WIDE_STAGES, THREADS = WIDE_WARPS * 32;
  constexpr int AV = 64 * NT / THREADS;  // activation vectors per thread per chunk: 8 * NT rows x 8 vectors
  static_assert(AV * THREADS == 64 * NT, "activation vectors must divide among the CTA's threads");
  extern __shared__ __align__(16) uint8_t smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int M = ep.M, ntiles = (ep.N + 15) >> 4;
  const int tile = blockIdx.x * WIDE_WARPS + warp;
  const bool own = tile < ntiles;
  const int c_begin = blockIdx.y * chunks_per_split;
  const int chunks = max(0, min(KC, c_begin + chunks_per_split) - c_begin);

  float acc[NT][4];  // the sums times 2^-14 (mma_chunk with SCALE_W)
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;

  const uint32_t ring_addr = smem_addr(smem);
  uint64_t policy = 0;
#if FPX_EVICT_FIRST
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
#endif
  // This thread's copies per chunk: its warp's two weight vectors and (lane < SUB) shift vector,
  // and the activation vectors v = threadIdx.x + THREADS r of rows m = v / 8 < M (bytes 16 (v % 8)
  // of the chunk).
  const size_t first = (static_cast<size_t>(own ? tile : 0) * KC + c_begin);
  const uint4* w_src = wt + first * 64 + lane;
  const int8_t* s_src = st + first * 16 * SUB + lane * 16;
  const int rot = FPX_ROTATE && chunks > 0 ? (blockIdx.x * 5) % chunks : 0;  // CTAs start at different chunks
  auto load = [&](int i0, uint32_t stage, bool weights, bool acts) {
    const int i = i0 + rot < chunks ? i0 + rot : i0 + rot - chunks;
    const uint32_t base = ring_addr + stage;
    if (weights && own) {
      cp_async16_stream(base + L::W + (warp * 64 + lane) * 16, w_src + i * 64, policy);
      cp_async16_stream(base + L::W + (warp * 64 + lane + 32) * 16, w_src + i * 64 + 32, policy);
      if (lane < SUB) cp_async16(base + L::S + (warp * SUB + lane) * 16, s_src + i * 16 * SUB, 16);
    }
    if (acts)
#pragma unroll
      for (int r = 0; r < AV; ++r) {
        const int v = threadIdx.x + THREADS * r, m = v >> 3, kk = (c_begin + i) * 128 + (v & 7) * 16;
        if (m < M)  // zeros past K (K % 32 == 0: a vector is all in or all out)
          cp_async16(base + L::A + m * A_STRIDE + (v & 7) * 16, a + static_cast<size_t>(m) * lda + (kk < K ? kk : 0),
                     kk < K ? 16 : 0);
      }
  };

  run_ring<S, L::BYTES>(chunks, load, [] { __syncthreads(); }, [&](uint32_t rd) {
    const uint8_t* stage = smem + rd;
    if (own) {
      const uint4* wv = reinterpret_cast<const uint4*>(stage + L::W) + warp * 64;
      mma_chunk<NT, SUB, true>(acc, acc, wv[lane], wv[lane + 32], stage + L::A,
                               reinterpret_cast<const int8_t*>(stage + L::S) + warp * 16 * SUB, g, t, M);
    }
  });
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] *= 16384.f;
  epilogue<NT>(acc, ep, tile, ntiles, g, t);
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
    const int n = tile * 16 + g + 8 * h;
    if (n >= N) continue;
    const uint4 w = wt[v];
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int kk = c * 128 + 32 * j + 8 * t;
      if (kk >= K) break;
      const float scale = group_scale(st[(tc * 16 + g + 8 * h) * SUB + j * SUB / 4]);
      uint32_t o[4];
      decode(words[j], o);
      uint32_t bytes[2] = {0, 0};
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&o[p]));
        const uint32_t pair = __nv_cvt_float2_to_fp8x2(make_float2(f.x * scale, f.y * scale), __NV_SATFINITE, __NV_E4M3);
        bytes[p >> 1] |= pair << (16 * (p & 1));
      }
      *reinterpret_cast<uint2*>(out + static_cast<size_t>(n) * K + kk) = make_uint2(bytes[0], bytes[1]);
    }
  }
}

// grid = (column blocks of `tiles` tiles, splits), `warps` warps per CTA; chunks_per_split =
// ceil(kc / splits). pdl: may start before the previous kernel in the stream has finished
// (programmatic dependent launch; the kernel waits for it before it reads the activations or
// touches the workspace).
template <typename... Args>
cudaError_t launch(void (*kernel)(Args...), int tiles, int warps, int smem, const void* wt, const int8_t* st,
                   const uint8_t* a, int k, int lda, int kc, int splits, const Epilogue& ep, int pdl,
                   cudaStream_t stream) {
  const int ntiles = (ep.N + 15) / 16;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = pdl != 0;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((ntiles + tiles - 1) / tiles, splits);
  cfg.blockDim = dim3(warps * 32);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<const uint4*>(wt), st, a, k, lda, kc, (kc + splits - 1) / splits,
                            ep);
}

// NT token tiles of 8: the few-token kernel up to NT = 2 (16 tokens), the wide kernel beyond. The
// few-token kernel takes the K parts of `splits` within its CTAs as far as it can (KW = 4, 2 or 1
// warps per tile, the largest that divides splits) and splits / KW over CTAs; the wide kernel
// takes all of them over CTAs.
template <int NT>
cudaError_t launch_nt(int sub, const void* wt, const int8_t* st, const uint8_t* a, int k, int lda, int kc, int splits,
                      const Epilogue& ep, int pdl, cudaStream_t stream) {
#define FPX_FEW(SUB, KW)                                                                                         \
  return launch(w4a8_gemm_kernel<NT, SUB, KW>, WARPS / KW, WARPS, WARPS * FPX_STAGES * Stage<1, NT, SUB>::BYTES, \
                wt, st, a, k, lda, kc, splits / KW, ep, pdl, stream);
#define FPX_LAUNCH(SUB)                                                                                          \
  if constexpr (NT <= 2) {                                                                                       \
    if (splits % 4 == 0) FPX_FEW(SUB, 4)                                                                         \
    if (splits % 2 == 0) FPX_FEW(SUB, 2)                                                                         \
    FPX_FEW(SUB, 1)                                                                                              \
  } else                                                                                                         \
    return launch(w4a8_gemm_wide_kernel<NT, SUB>, WIDE_WARPS, WIDE_WARPS,                                        \
                  FPX_WIDE_STAGES * Stage<WIDE_WARPS, NT, SUB>::BYTES, wt, st, a, k, lda, kc, splits, ep, pdl, stream);
  switch (sub) {
    case 1: FPX_LAUNCH(1)
    case 2: FPX_LAUNCH(2)
    case 4: FPX_LAUNCH(4)
    default: return cudaErrorInvalidValue;
  }
#undef FPX_LAUNCH
#undef FPX_FEW
}

}  // namespace

extern "C" int fp_export_w4a8_gemm(const void* wt, const int8_t* st, const uint8_t* a, const float* a_scale,
                                   const float* w_scale, const float* bias, const float* lorc_t,
                                   const float* lorc_u, int lorc_rank, void* out, int out_bf16, float* ws,
                                   int* counters, int m, int n, int k, int lda, int ldo, int kc, int sub,
                                   int splits, int pdl, cudaStream_t stream) {
  if (m <= 0 || m > 128 || n <= 0 || k <= 0 || k % 32 || kc * 128 < k || lda % 16 || splits < 1 || splits > kc ||
      (reinterpret_cast<uintptr_t>(a) % 16) || (reinterpret_cast<uintptr_t>(wt) % 16) ||
      (reinterpret_cast<uintptr_t>(st) % 16) || (splits > 1 && (ws == nullptr || counters == nullptr)))
    return cudaErrorInvalidValue;
  const Epilogue ep{a_scale, w_scale, bias, lorc_t, lorc_u, lorc_rank, out, out_bf16, ws, counters, m, n, ldo};
  cudaError_t e;
  if (m <= 8) e = launch_nt<1>(sub, wt, st, a, k, lda, kc, splits, ep, pdl, stream);
  else if (m <= 16) e = launch_nt<2>(sub, wt, st, a, k, lda, kc, splits, ep, pdl, stream);
  else if (m <= 32) e = launch_nt<4>(sub, wt, st, a, k, lda, kc, splits, ep, pdl, stream);
  else if (m <= 64) e = launch_nt<8>(sub, wt, st, a, k, lda, kc, splits, ep, pdl, stream);
  else e = launch_nt<16>(sub, wt, st, a, k, lda, kc, splits, ep, pdl, stream);
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
