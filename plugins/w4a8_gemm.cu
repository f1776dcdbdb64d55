// fp-export: W4A8 GEMM on Hopper (sm_90a) FP8 tensor cores (wgmma): up to 128 tokens in launches of up to 64
// (w4a8_gemm_kernel), more in one launch of 128-token blocks fed by the Tensor Memory Accelerator
// (w4a8_tiled_kernel, below), both on the same per-chunk multiply (chunk_mma).
//
// C^T = W A^T on wgmma.mma_async m64nNk32 (N = 8, 16, 32, 64 tokens; f32 accumulators): the weights
// are wgmma's 64-row A side, taken from registers, where each warp of a warpgroup decodes its 16
// rows; the activations (E4M3, as quantized) are its N side, read from shared memory.
//
// Decode (no table, no arithmetic on values): an E2M1 code s|e1 e0 m placed as E5M2 bits
// s << 7 | (e1 e0 m) << 1 is the code's value times 2^-14 exactly (E2M1's subnormal 0.5 lands on
// E5M2's subnormals), so a 32-bit layout word (8 codes) becomes two registers of four E5M2 bytes with
// one mask for codes 0-3 and two shifts and masks for codes 4-7 (``decode``); wgmma multiplies E5M2
// by E4M3 directly. The group's power of two 2^shift and the 2^14 multiply each 32-code group's
// partial sum (exact), before it is added to the FP32 accumulator.
//
// Accumulation: Hopper's FP8 wgmma adds the 32 products of one k32 step and the accumulator in one
// fused sum aligned to its largest term, keeping 13 bits below it and truncating (the precision of
// cuBLAS FP8 GEMMs on this GPU). Each group's sum (1, 2 or 4 k32 steps) starts from zero and is
// promoted to the FP32 accumulator by an FMA, so the truncation never reaches the running total.
//
// Layout (fp_export/runtime/w4a8_gemm.py, ``prepare``): for each 16-row tile and 128-wide K chunk,
// 1 KB in which lane L = 4g + t holds two 16-byte vectors, rows g and g + 8; word j (0..3) of a
// vector is wgmma step j of the chunk: codes i = 0..3 are k = 128c + 32j + 4t + i, codes 4..7 are
// k = 128c + 32j + 16 + 4t + (i - 4), the lane's part of wgmma's register fragment (rows g and
// g + 8, k 4t..4t+3 and 16+4t..16+4t+3). Byte i of a word holds code i's sign at bit 7 and
// magnitude at bits 1-3, code (i + 4)'s magnitude at bits 4-6 and sign at bit 0 (MAG_AT, SIGN_AT).
// The shifts of a chunk are 16 x SUB bytes per tile (SUB = 1, 2 or 4 shifts per row per chunk:
// groups of >= 128, 64, 32 codes), so every wgmma step lies inside one 32-code group.
//
// Grid: a CTA takes 64 NW rows (NW = 1, 2 or 4 row blocks of 4 tiles) and KW x NW warpgroups (at
// most 4): KW rings of shared-memory stages, each streaming 1/KW of the CTA's K range with cp.async
// (weights with the L2 evict-first policy) for the NW warpgroups that share it, one per row block.
// A ring's stage holds the NW blocks' weights and one copy of the activations, so NW row blocks read
// the activations from L2 once (at 32 tokens a chunk's activations are as large as its weights;
// H100: their copies were a third of the kernel's time). The copies of several K chunks are in
// flight while one is decoded and multiplied. The rings add their sums in shared memory; K is also
// split over gridDim.y CTAs, whose partial sums go to a workspace where the last CTA of each column block (an arrival
// counter, reset by that CTA) adds them in split order. Every reduction has a fixed order:
// deterministic. More than 64 tokens: one launch per 64.
#include "w4a8_gemm.h"

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <utility>

namespace {

constexpr int WG_THREADS = 128;  // one warpgroup: 4 warps, one 16-row tile each
constexpr int WG_TILES = 4;      // 16-row tiles per CTA (wgmma's 64 rows)
constexpr int MAX_M = 64;        // tokens per launch (wgmma N = 64) up to TILED_FROM tokens
constexpr int TILED_FROM = 128;  // more tokens: one launch of w4a8_tiled_kernel

// Offline-tuned constants (tools/sweep_w4a8.py builds variants with -D and times them on L2-cold
// weights; benchmarks/w4a8_config.md): pipeline stages (128-wide K chunks per warpgroup; even, as the
// ring alternates two sets of registers); whether each warpgroup starts at a different chunk of its
// K range (FPX_ROTATE: warps that all read the same offset of their tiles at once are slower);
// whether weight copies carry the L2 evict-first policy and a 256-byte prefetch.
#ifndef FPX_STAGES
#define FPX_STAGES 4
#endif
#ifndef FPX_ROTATE
#define FPX_ROTATE 1
#endif
#ifndef FPX_EVICT_FIRST
#define FPX_EVICT_FIRST 1
#endif
// K parts over up to MAX_CLUSTER CTAs as one thread-block cluster whose sums are added through
// distributed shared memory (1), or always through the global workspace and an arrival counter (0).
// Clusters of 2 were faster than the workspace on every shape; clusters of 4 and 8 slower where the
// grid fills the GPU (benchmarks/w4a8_config_cluster.md: K=N=8192, 16 tokens, 4 parts x 4 row
// blocks in clusters of 4 29.5 us against 20.1), so more parts than 2 go through the workspace.
#ifndef FPX_CLUSTER
#define FPX_CLUSTER 1
#endif
constexpr int MAX_CLUSTER = 2;
// The tiled kernel (more than 128 tokens): its pipeline stages, and the column blocks of its CTA order.
#ifndef FPX_TILE_STAGES
#define FPX_TILE_STAGES 4
#endif
#ifndef FPX_RASTER
#define FPX_RASTER 16
#endif
static_assert(FPX_STAGES % 2 == 0 && FPX_STAGES >= 4, "FPX_STAGES: even, at least 4");
static_assert(FPX_TILE_STAGES % 2 == 0 && FPX_TILE_STAGES >= 4, "FPX_TILE_STAGES: even, at least 4");

// Shared memory of one pipeline stage (one K chunk of one ring): the 4 NW tiles' weights (1 KB
// each), their shifts (16 rows x SUB bytes each) and the activations of 8 * NT tokens in wgmma's
// K-major layout without swizzle: NT x 8 "core matrices" of 8 tokens x 16 bytes (128 bytes each),
// token m's bytes 16v .. 16v + 15 of the chunk at A + ((m / 8) * 8 + v) * 128 + (m % 8) * 16.
template <int NT, int SUB, int NW>
struct Stage {
  static constexpr int W = 0;
  static constexpr int S = W + NW * WG_TILES * 1024;
  static constexpr int A = S + NW * WG_TILES * 16 * SUB;
  static constexpr int BYTES = A + NT * 1024;
};

// After the KW rings' stages, in cluster launches only: the inbox of a CTA whose K part is one of a
// cluster's two, which holds the peer's sums of the tiles this CTA stores (each warp's NT x 4 floats
// per lane, lane-minor).
template <int NT, int NW>
constexpr int inbox_bytes() { return NW * WG_TILES * NT * 4 * 32 * 4; }

// Whether a CTA of `warpgroups` x 128 threads fits its registers: 512 threads leave 128 per thread,
// enough for up to 16 tokens and for 32 with one scale group per chunk (more would spill).
constexpr bool fits(int nt, int sub, int warpgroups) { return warpgroups < 4 || nt <= 2 || (nt == 4 && sub == 1); }

// The row blocks per CTA that are built: 1, or 2 and 4 from 9 tokens on (up to 8 the activations are
// small beside the weights) where they fit.
constexpr bool built(int nt, int sub, int nw) { return nw == 1 || (nt >= 2 && fits(nt, sub, nw)); }

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

// The THREADS threads of ring `ring` of the CTA (named barrier 1 + ring; 0 is __syncthreads).
template <int THREADS>
__device__ __forceinline__ void ring_sync(int ring) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(1 + ring), "n"(THREADS) : "memory");
}

// The CTAs of this CTA's thread-block cluster (1 without a cluster launch).
__device__ __forceinline__ uint32_t cluster_ctas() {
  uint32_t n;
  asm("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(n));
  return n;
}

// Every thread of every CTA of the cluster: its shared-memory writes are visible to the others.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

// v to shared-memory address `addr` of the cluster's CTA `rank` (visible there after a cluster barrier).
__device__ __forceinline__ void st_cluster(uint32_t addr, uint32_t rank, float v) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(addr), "r"(rank));
  asm volatile("st.shared::cluster.f32 [%0], %1;\n" ::"r"(remote), "f"(v) : "memory");
}

// lo, hi: the E5M2 bytes (value * 2^-14) of a layout word's codes 0-3 and 4-7.
__device__ __forceinline__ void decode(uint32_t w, uint32_t& lo, uint32_t& hi) {
  lo = w & 0x8E8E8E8Eu;
  hi = ((w >> 3) & 0x0E0E0E0Eu) | ((w << 7) & 0x80808080u);
}

// 2^(14 + shift) as float: undoes decode's 2^-14 and applies the group's power of two.
__device__ __forceinline__ float group_scale(int shift) { return __int_as_float((shift + 141) << 23); }

// wgmma matrix descriptor of shared memory at byte address `addr`: K-major, no swizzle, core
// matrices 128 bytes apart along K (leading byte offset) and 1024 bytes apart along N (stride byte
// offset), as Stage::A lays the activations out.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(128 >> 4) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// d = A B (ACC false) or d += A B (ACC true) for one k32 step: a = the thread's register fragment of
// the warpgroup's 64 x 32 E5M2 weights, desc = the 32 x (8 NT) E4M3 activations in shared memory.
// (The zeroing form writes d without reading it: d needs no initial value, and ptxas keeps the
// wgmmas asynchronous only when no other instruction defines their accumulators.)
template <int NT, bool ACC>
__device__ __forceinline__ void wgmma(float (&d)[NT][4], const uint32_t (&a)[4], uint64_t desc);

template <>
__device__ __forceinline__ void wgmma<1, false>(float (&d)[1][4], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n8k32.f32.e5m2.e4m3 {%0,%1,%2,%3}, {%4,%5,%6,%7}, %8, 0, 1, 1;\n"
               : "=f"(d[0][0]), "=f"(d[0][1]), "=f"(d[0][2]), "=f"(d[0][3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}
template <>
__device__ __forceinline__ void wgmma<1, true>(float (&d)[1][4], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n8k32.f32.e5m2.e4m3 {%0,%1,%2,%3}, {%4,%5,%6,%7}, %8, 1, 1, 1;\n"
               : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}
template <>
__device__ __forceinline__ void wgmma<2, false>(float (&d)[2][4], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n16k32.f32.e5m2.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7}, {%8,%9,%10,%11}, %12, 0, 1, 1;\n"
               : "=f"(d[0][0]), "=f"(d[0][1]), "=f"(d[0][2]), "=f"(d[0][3]), "=f"(d[1][0]), "=f"(d[1][1]), "=f"(d[1][2]), "=f"(d[1][3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}
template <>
__device__ __forceinline__ void wgmma<2, true>(float (&d)[2][4], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n16k32.f32.e5m2.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7}, {%8,%9,%10,%11}, %12, 1, 1, 1;\n"
               : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}
template <>
__device__ __forceinline__ void wgmma<4, false>(float (&d)[4][4], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n32k32.f32.e5m2.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19}, %20, 0, 1, 1;\n"
               : "=f"(d[0][0]), "=f"(d[0][1]), "=f"(d[0][2]), "=f"(d[0][3]), "=f"(d[1][0]), "=f"(d[1][1]), "=f"(d[1][2]), "=f"(d[1][3]), "=f"(d[2][0]), "=f"(d[2][1]), "=f"(d[2][2]), "=f"(d[2][3]), "=f"(d[3][0]), "=f"(d[3][1]), "=f"(d[3][2]), "=f"(d[3][3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}
template <>
__device__ __forceinline__ void wgmma<4, true>(float (&d)[4][4], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n32k32.f32.e5m2.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19}, %20, 1, 1, 1;\n"
               : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}
template <>
__device__ __forceinline__ void wgmma<8, false>(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n64k32.f32.e5m2.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, 0, 1, 1;\n"
               : "=f"(d[0][0]), "=f"(d[0][1]), "=f"(d[0][2]), "=f"(d[0][3]), "=f"(d[1][0]), "=f"(d[1][1]), "=f"(d[1][2]), "=f"(d[1][3]), "=f"(d[2][0]), "=f"(d[2][1]), "=f"(d[2][2]), "=f"(d[2][3]), "=f"(d[3][0]), "=f"(d[3][1]), "=f"(d[3][2]), "=f"(d[3][3]), "=f"(d[4][0]), "=f"(d[4][1]), "=f"(d[4][2]), "=f"(d[4][3]), "=f"(d[5][0]), "=f"(d[5][1]), "=f"(d[5][2]), "=f"(d[5][3]), "=f"(d[6][0]), "=f"(d[6][1]), "=f"(d[6][2]), "=f"(d[6][3]), "=f"(d[7][0]), "=f"(d[7][1]), "=f"(d[7][2]), "=f"(d[7][3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}
template <>
__device__ __forceinline__ void wgmma<8, true>(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n64k32.f32.e5m2.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, 1, 1, 1;\n"
               : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}
template <>
__device__ __forceinline__ void wgmma<16, false>(float (&d)[16][4], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n128k32.f32.e5m2.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, 0, 1, 1;\n"
               : "=f"(d[0][0]), "=f"(d[0][1]), "=f"(d[0][2]), "=f"(d[0][3]), "=f"(d[1][0]), "=f"(d[1][1]), "=f"(d[1][2]), "=f"(d[1][3]), "=f"(d[2][0]), "=f"(d[2][1]), "=f"(d[2][2]), "=f"(d[2][3]), "=f"(d[3][0]), "=f"(d[3][1]), "=f"(d[3][2]), "=f"(d[3][3]), "=f"(d[4][0]), "=f"(d[4][1]), "=f"(d[4][2]), "=f"(d[4][3]), "=f"(d[5][0]), "=f"(d[5][1]), "=f"(d[5][2]), "=f"(d[5][3]), "=f"(d[6][0]), "=f"(d[6][1]), "=f"(d[6][2]), "=f"(d[6][3]), "=f"(d[7][0]), "=f"(d[7][1]), "=f"(d[7][2]), "=f"(d[7][3]), "=f"(d[8][0]), "=f"(d[8][1]), "=f"(d[8][2]), "=f"(d[8][3]), "=f"(d[9][0]), "=f"(d[9][1]), "=f"(d[9][2]), "=f"(d[9][3]), "=f"(d[10][0]), "=f"(d[10][1]), "=f"(d[10][2]), "=f"(d[10][3]), "=f"(d[11][0]), "=f"(d[11][1]), "=f"(d[11][2]), "=f"(d[11][3]), "=f"(d[12][0]), "=f"(d[12][1]), "=f"(d[12][2]), "=f"(d[12][3]), "=f"(d[13][0]), "=f"(d[13][1]), "=f"(d[13][2]), "=f"(d[13][3]), "=f"(d[14][0]), "=f"(d[14][1]), "=f"(d[14][2]), "=f"(d[14][3]), "=f"(d[15][0]), "=f"(d[15][1]), "=f"(d[15][2]), "=f"(d[15][3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}
template <>
__device__ __forceinline__ void wgmma<16, true>(float (&d)[16][4], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n128k32.f32.e5m2.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, 1, 1, 1;\n"
               : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}

// A chunk's group sums, times their scales, into the accumulators (after its wgmmas completed).
template <int NT, int SUB>
__device__ __forceinline__ void promote(float (&acc)[NT][4], const float (&part)[SUB][NT][4], const float (&ps)[SUB][2]) {
#pragma unroll
  for (int q = 0; q < SUB; ++q)
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      acc[n][0] = fmaf(part[q][n][0], ps[q][0], acc[n][0]);
      acc[n][1] = fmaf(part[q][n][1], ps[q][0], acc[n][1]);
      acc[n][2] = fmaf(part[q][n][2], ps[q][1], acc[n][2]);
      acc[n][3] = fmaf(part[q][n][3], ps[q][1], acc[n][3]);
    }
}

// One 128-wide K chunk of a warp's 16-row tile in its warpgroup's wgmmas: decodes the chunk's 64
// codes (wv: the tile's 1 KB of the chunk in shared memory) into frag (the chunk's set of registers;
// the previous chunk's wgmmas may still read the other set), waits for the previous chunk's wgmmas
// and adds their group sums (prev), takes the chunk's group scales (sc: the tile's 16 x SUB shifts),
// and issues the chunk's wgmmas against the activations at wgmma descriptor desc, whose k32 step j
// starts at desc + j * step. Each 32-code group's sum starts from zero (the zeroing wgmma) in
// registers of its own (part).
template <int NT, int SUB>
__device__ __forceinline__ void chunk_mma(float (&acc)[NT][4], float (&part)[SUB][NT][4], float (&ps)[SUB][2],
                                          uint32_t (&frag)[4][4], const uint4* wv, const int8_t* sc, uint64_t desc,
                                          uint32_t step, bool prev, int lane, int g) {
  constexpr int STEPS = 4 / SUB;  // wgmma k32 steps per group
  const uint4 w0 = wv[lane], w1 = wv[lane + 32];
  const uint32_t W0[4] = {w0.x, w0.y, w0.z, w0.w}, W1[4] = {w1.x, w1.y, w1.z, w1.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    decode(W0[j], frag[j][0], frag[j][2]);
    decode(W1[j], frag[j][1], frag[j][3]);
  }
  wgmma_wait<0>();  // the previous chunk's wgmmas have completed
  if (prev) promote<NT, SUB>(acc, part, ps);
#pragma unroll
  for (int q = 0; q < SUB; ++q) {
    ps[q][0] = group_scale(sc[g * SUB + q]);
    ps[q][1] = group_scale(sc[(g + 8) * SUB + q]);
  }
  wgmma_fence();
#pragma unroll
  for (int q = 0; q < SUB; ++q) {
    wgmma<NT, false>(part[q], frag[q * STEPS], desc + q * STEPS * step);
#pragma unroll
    for (int u = 1; u < STEPS; ++u) wgmma<NT, true>(part[q], frag[q * STEPS + u], desc + (q * STEPS + u) * step);
  }
  wgmma_commit();
}

// The cp.async ring that a ring's warpgroups run over `chunks` K chunks, S stages of BYTES each:
// load(i, stage, weights, acts) copies the i-th chunk of the caller's order into the stage at byte
// offset `stage`, sync() makes a landed stage visible to the ring's threads, compute(stage, s, i)
// multiplies it (s = i % S). A stage is refilled two chunks after it was multiplied: the warpgroups' wgmmas read it
// asynchronously and the last ones of a chunk may still run while the next chunk is issued, so
// S - 2 chunks are in flight. The first stages' weights go out before the wait for the kernel that
// writes the activations (programmatic dependent launch), everything else after it; every thread
// waits, so nothing (workspace, counters, scales) is touched before that kernel has finished.
template <int S, int BYTES, typename Load, typename Sync, typename Compute>
__device__ __forceinline__ void run_ring(int chunks, Load&& load, Sync&& sync, Compute&& compute) {
  constexpr int AHEAD = S - 2;
#pragma unroll
  for (int i = 0; i < AHEAD; ++i)
    if (i < chunks) load(i, i * BYTES, true, false);
  grid_dependency_wait();
  if (chunks <= 0) return;
#pragma unroll
  for (int i = 0; i < AHEAD; ++i) {
    if (i < chunks) load(i, i * BYTES, false, true);
    cp_async_commit();
  }
  // Unrolled by S, so that every stage offset is a constant.
  for (int i0 = 0; i0 < chunks; i0 += S) {
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int i = i0 + s;
      if (i < chunks) {
        cp_async_wait<AHEAD - 1>();
        sync();  // chunk i has landed for every thread; every wgmma of chunk i - 2 has completed
        if (i + AHEAD < chunks) load(i + AHEAD, ((s + AHEAD) % S) * BYTES, true, true);
        cp_async_commit();
        compute(s * BYTES, s, i);
      }
    }
  }
  cp_async_wait<0>();
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

// The epilogue of tokens m0 .. m0 + mb - 1 of `e` (one launch or token block of a larger M).
__host__ __device__ __forceinline__ Epilogue tokens_from(const Epilogue& e, int m0, int mb) {
  Epilogue r = e;
  r.a_scale += m0;
  if (e.lorc_rank > 0) r.lorc_t += static_cast<size_t>(m0) * e.lorc_rank;
  r.out = static_cast<uint8_t*>(e.out) + static_cast<size_t>(m0) * e.ldo * (e.out_bf16 ? 2 : 4);
  r.M = mb;
  return r;
}

// acc[j][i]: row n = tile*16 + g + 8*(i >> 1), token m = 8j + 2t + (i & 1). With K split over
// `splits` CTAs (gridDim.y) through the workspace, each CTA stores its partial sums there and the
// last CTA of its column block (blockIdx.x; an arrival counter, reset by that CTA) adds them in
// split order (deterministic), then scales, LoRC, bias and the output store.
template <int NT>
__device__ __forceinline__ void epilogue(float (&acc)[NT][4], const Epilogue& p, int tile, int ntiles, int g, int t,
                                         int splits) {
  const int M = p.M, npad = ntiles * 16;
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
  // The thread's scales and bias, loaded before any store (which the compiler could not move them past)
  float as[NT][2], wsc[2], bn[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int n = tile * 16 + g + 8 * h;
    wsc[h] = n < p.N ? p.w_scale[n] : 0.f;
    bn[h] = n < p.N && p.bias != nullptr ? p.bias[n] : 0.f;
  }
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int m = 8 * j + 2 * t + e;
      as[j][e] = m < M ? p.a_scale[m] : 0.f;
    }
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = 8 * j + 2 * t + (i & 1), n = tile * 16 + g + 8 * (i >> 1);
      if (m >= M || n >= p.N) continue;
      const float a_s = as[j][i & 1];
      float y = acc[j][i] * a_s * wsc[i >> 1];
      if (p.lorc_rank > 0) {
        float z = 0.f;
        for (int r = 0; r < p.lorc_rank; ++r) z += p.lorc_t[m * p.lorc_rank + r] * p.lorc_u[n * p.lorc_rank + r];
        y += z * a_s;
      }
      if (p.bias != nullptr) y += bn[i >> 1];
      if (p.out_bf16)
        reinterpret_cast<__nv_bfloat16*>(p.out)[static_cast<size_t>(m) * p.ldo + n] = __float2bfloat16_rn(y);
      else
        reinterpret_cast<float*>(p.out)[static_cast<size_t>(m) * p.ldo + n] = y;
    }
}

// The CTA's KW x NW warpgroups: ring kw = wg / NW takes 1/KW of the CTA's K range, warpgroup wg % NW
// of a ring its 64-row block (one 16-row tile per warp); each ring streams its chunks through
// FPX_STAGES stages (one barrier of the ring's threads per chunk). Per chunk a thread decodes its
// 64 codes into four wgmma fragments (two sets of registers, alternating between chunks, so that a
// chunk is decoded while the previous one's wgmmas run), then waits for those wgmmas, adds the
// previous chunk's group sums times their scales to the FP32 accumulators, and issues the chunk's
// wgmmas: each 32-code group's sum starts from zero (the zeroing wgmma) in registers of its own.
// The KW rings' sums are added in shared memory, in ring order, at the end.
template <int NT, int SUB, int KW, int NW>
__global__ void __launch_bounds__(KW * NW * WG_THREADS, NT <= 2 ? 4 / (KW * NW) : 1) w4a8_gemm_kernel(const uint4* __restrict__ wt,
                                                                     const int8_t* __restrict__ st,
                                                                     const uint8_t* __restrict__ a, int K, int lda,
                                                                     int KC, int chunks_per_split, const Epilogue ep) {
  using L = Stage<NT, SUB, NW>;
  constexpr int S = FPX_STAGES;
  constexpr int RING = NW * WG_THREADS;              // threads per ring
  constexpr int AV = (64 * NT + RING - 1) / RING;    // activation vectors per thread per chunk
  extern __shared__ __align__(128) uint8_t smem[];
  const int M = ep.M, N = ep.N;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int kw = warp / (WG_TILES * NW), wq = warp % (WG_TILES * NW), tid = threadIdx.x % RING;
  const int g = pinned(lane >> 2), t = pinned(lane & 3);
  const int ntiles = (N + 15) >> 4;
  const int tile = blockIdx.x * WG_TILES * NW + wq;  // wq: the warp's tile in the CTA's 4 NW
  const bool own = tile < ntiles;  // warps past the last tile multiply whatever their stage holds
  const int cta_begin = blockIdx.y * chunks_per_split;
  const int cta_chunks = max(0, min(KC, cta_begin + chunks_per_split) - cta_begin);
  const int per_ring = (cta_chunks + KW - 1) / KW;
  const int c_begin = cta_begin + kw * per_ring;
  const int chunks = max(0, min(per_ring, cta_chunks - kw * per_ring));  // the same for the ring's warps

  float acc[NT][4], part[SUB][NT][4];  // part: each 32-code group's sum of the chunk in flight
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;
  float ps[SUB][2];  // the scales (rows g, g + 8) of those groups

  uint8_t* ring = smem + kw * S * L::BYTES;
  const uint32_t ring_addr = smem_addr(ring);
  uint64_t policy = 0;
#if FPX_EVICT_FIRST
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
#endif
  // This thread's copies per chunk: its warp's two weight vectors, (lane < SUB) one shift vector,
  // and the activation vectors v = tid + RING r of tokens m = v / 8 < M (bytes 16 (v % 8) of the
  // chunk; zeros past K). Tokens >= M are never written: they only reach output columns >= M.
  const size_t first = static_cast<size_t>(own ? tile : 0) * KC + c_begin;
  const uint4* w_src = pinned(wt + first * 64 + lane);
  const int8_t* s_src = pinned(st + first * 16 * SUB + lane * 16);
  // Shared-memory destinations in stage 0 (pinned, so that the compiler keeps them in registers
  // instead of recomputing them from the thread index in every chunk).
  const uint32_t w_dst = pinned(ring_addr + L::W + wq * 1024 + lane * 16);
  const uint32_t s_dst = pinned(ring_addr + L::S + wq * 16 * SUB + lane * 16);
  const uint32_t w_on = pinned<uint32_t>(own), s_on = pinned<uint32_t>(own && lane < SUB);
  const uint8_t* a_src[AV];
  uint32_t a_dst[AV], a_k[AV];  // a_k: the vector's offset in its row at the range's first chunk
  uint32_t a_on[AV];            // token m < M
#pragma unroll
  for (int r = 0; r < AV; ++r) {
    const int v = tid + RING * r, m = v >> 3;
    a_k[r] = pinned<uint32_t>(c_begin * 128 + (v & 7) * 16);
    a_src[r] = pinned(a + static_cast<size_t>(m < M ? m : 0) * lda + a_k[r]);
    a_dst[r] = pinned(ring_addr + L::A + ((m >> 3) * 8 + (v & 7)) * 128 + (m & 7) * 16);
    a_on[r] = pinned<uint32_t>(m < M);
  }
  // The rings start at different chunks of their range (FPX_ROTATE), so that concurrent copies
  // spread over the address space instead of all reading the same offset of their tiles.
  const uint32_t rot = FPX_ROTATE && chunks > 0 ? (blockIdx.x * 5 + kw) % chunks : 0;
  // chunk c_begin + (i0 + rot) % chunks into the stage at byte offset `stage`: its weights and
  // shifts (which no earlier kernel writes) and/or its activations
  auto load = [&](uint32_t i0, uint32_t stage, bool weights, bool acts) {
    const uint32_t i = i0 + rot < static_cast<uint32_t>(chunks) ? i0 + rot : i0 + rot - chunks;
    if (weights) {
      const uint4* src = w_src + i * 64;
      if (w_on) {
        cp_async16_stream(w_dst + stage, src, policy);
        cp_async16_stream(w_dst + stage + 512, src + 32, policy);
      }
      if (s_on) cp_async16(s_dst + stage, s_src + i * 16 * SUB, 16);
    }
    if (acts)
#pragma unroll
      for (int r = 0; r < AV; ++r) {
        const bool in = a_k[r] + i * 128 < static_cast<uint32_t>(K);
        if (a_on[r]) cp_async16(a_dst[r] + stage, a_src[r] + (in ? i * 128 : 0), in ? 16 : 0);
      }
  };

  uint32_t frag[2][4][4];  // [chunk parity][wgmma step][register]: decoded while the previous chunk's wgmmas run
  auto compute = [&](uint32_t rd, int s, int i) {
    const uint8_t* stage = ring + rd;  // S is even: s & 1 is the parity of the chunk
    chunk_mma<NT, SUB>(acc, part, ps, frag[s & 1], reinterpret_cast<const uint4*>(stage + L::W) + wq * 64,
                       reinterpret_cast<const int8_t*>(stage + L::S) + wq * 16 * SUB,
                       smem_desc(ring_addr + rd + L::A), (2 * 128) >> 4, i > 0, lane, g);
  };

  run_ring<S, L::BYTES>(chunks, load, [kw] { ring_sync<RING>(kw); }, compute);
  wgmma_wait<0>();
  if (chunks > 0) promote<NT, SUB>(acc, part, ps);
  if constexpr (KW > 1) {  // rings 1 .. KW-1 hand their sums to ring 0 through the (drained) stages
    float* red = reinterpret_cast<float*>(smem);
    __syncthreads();
    if (kw > 0)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) red[(((kw - 1) * WG_TILES * NW + wq) * NT * 4 + j * 4 + i) * 32 + lane] = acc[j][i];
    __syncthreads();
    if (kw == 0)
#pragma unroll
      for (int s = 1; s < KW; ++s)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[j][i] += red[(((s - 1) * WG_TILES * NW + wq) * NT * 4 + j * 4 + i) * 32 + lane];
  }
  int out_tile = kw == 0 ? tile : ntiles;  // rings > 0 only join the epilogue's barriers
  int splits = gridDim.y;
#if FPX_CLUSTER
  if (cluster_ctas() > 1) {  // the two K parts of a column block are one cluster (rank blockIdx.y): tile
                             // wq's sums are added by the CTA of rank wq % 2, which stores that tile;
                             // the other CTA writes its sums of the tile into that CTA's inbox
    static_assert(MAX_CLUSTER == 2, "two parts: this CTA's and its peer's");
    const uint32_t rank = blockIdx.y;
    const uint32_t box = smem_addr(smem + KW * S * L::BYTES) + (wq * NT * 4 * 32 + lane) * 4;  // + (j*4+i)*128
    if (kw == 0 && wq % 2 != rank)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) st_cluster(box + (j * 4 + i) * 128, rank ^ 1, acc[j][i]);
    cluster_sync();  // the peer's sums are in this CTA's inbox; nothing reads a peer's memory after it
    if (kw == 0 && wq % 2 == rank) {
      const float* inbox = reinterpret_cast<const float*>(smem + KW * S * L::BYTES) + wq * NT * 4 * 32 + lane;
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // in part order: the same sums as the workspace's
          const float peer = inbox[(j * 4 + i) * 32];
          acc[j][i] = rank == 0 ? (0.f + acc[j][i]) + peer : (0.f + peer) + acc[j][i];
        }
    } else {
      out_tile = ntiles;
    }
    splits = 1;
  }
#endif
  epilogue<NT>(acc, ep, out_tile, ntiles, g, t, splits);
}

// The per-call FP4 -> FP8 cast of the large-M path. One warp per 16-row tile and 128-wide chunk:
// each lane decodes its two layout vectors (rows g and g + 8, 32 codes each) to E4M3 into a
// shared-memory tile of 16 rows x 128 bytes (rows CAST_ROW bytes apart: the lanes' 4-byte stores hit
// 32 different banks), from which each 8 lanes store one row's 128 bytes (whole 128-byte lines;
// storing the lanes' 4-byte pieces straight to global memory ran at 1.7 TB/s on the H100).
constexpr int CAST_WARPS = 8, CAST_ROW = 144;

template <int SUB>
__global__ void __launch_bounds__(CAST_WARPS * 32) weight_to_fp8_kernel(const uint4* __restrict__ wt,
                                                                        const int8_t* __restrict__ st,
                                                                        uint8_t* __restrict__ out, int N, int K,
                                                                        int KC) {
  __shared__ __align__(16) uint8_t tiles[CAST_WARPS][16 * CAST_ROW];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  uint8_t* sm = tiles[warp];
  const int64_t tasks = static_cast<int64_t>((N + 15) >> 4) * KC;
  for (int64_t tc = blockIdx.x * static_cast<int64_t>(CAST_WARPS) + warp; tc < tasks;
       tc += static_cast<int64_t>(gridDim.x) * CAST_WARPS) {  // tc = tile * KC + c
    const int c = static_cast<int>(tc % KC), tile = static_cast<int>(tc / KC);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint4 w = wt[tc * 64 + h * 32 + lane];
      const uint32_t words[4] = {w.x, w.y, w.z, w.w};
      const int row = g + 8 * h;
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // codes 0-3 at k = 32 j + 4 t .. + 3, codes 4-7 at 32 j + 16 + 4 t ..
        const float scale = group_scale(st[(tc * 16 + row) * SUB + j * SUB / 4]);
        uint32_t e5[2];
        decode(words[j], e5[0], e5[1]);
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          uint32_t bytes = 0;
#pragma unroll
          for (int p = 0; p < 2; ++p) {
            const __half2_raw h2 = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(e5[u] >> (16 * p)), __NV_E5M2);
            const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h2));
            const uint32_t pair = __nv_cvt_float2_to_fp8x2(make_float2(f.x * scale, f.y * scale), __NV_SATFINITE, __NV_E4M3);
            bytes |= pair << (16 * p);
          }
          *reinterpret_cast<uint32_t*>(sm + row * CAST_ROW + 32 * j + 16 * u + 4 * t) = bytes;
        }
      }
    }
    __syncwarp();
#pragma unroll
    for (int q = 0; q < 4; ++q) {  // rows 4q .. 4q + 3, 16 bytes per lane
      const int r = 4 * q + (lane >> 3), v = lane & 7;
      const int n = tile * 16 + r, k = c * 128 + 16 * v;
      if (n < N && k < K)  // K % 32 == 0: a 16-byte piece is all in or all out
        *reinterpret_cast<uint4*>(out + static_cast<size_t>(n) * K + k) =
            *reinterpret_cast<const uint4*>(sm + r * CAST_ROW + 16 * v);
    }
    __syncwarp();
  }
}

// ---- The tiled kernel (more than TILED_FROM tokens) ------------------------------------------------
//
// A CTA multiplies 128 weight rows (two warpgroups of 64, one 16-row tile per warp) by a block of
// 8 NT tokens over all of K. Its shared-memory stages are filled by the Tensor Memory Accelerator,
// three tensor-map boxes per chunk: the activations ([8 NT tokens x 128 bytes] in the 128-byte
// swizzle that wgmma reads), the tiles' weights (1 KB each) and their shifts (16 x SUB bytes each).
// One thread of a third warpgroup issues them, each stage's "full" mbarrier counts their bytes, and
// each multiplying warp releases a stage on its "empty" mbarrier once the wgmmas that read it have
// completed (no barrier of the whole CTA per chunk). The multiply per chunk is the small-M kernel's
// (chunk_mma).

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@p bra DONE;\nbra WAIT;\nDONE:\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// The box of tensor map `map` at element (x, y, z) to shared memory, counted on mbarrier `bar`.
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, int x, int y, uint32_t bar) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
               "l"(map), "r"(x), "r"(y), "r"(bar)
               : "memory");
}
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, int x, int y, int z, uint32_t bar) {
  asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
               "l"(map), "r"(x), "r"(y), "r"(z), "r"(bar)
               : "memory");
}

// wgmma matrix descriptor of K-major shared memory in the 128-byte swizzle at byte address `addr`
// (1024-byte aligned; 8-row atoms of 128-byte rows, 1024 bytes apart along N). A k32 step j of
// the 128-byte rows starts at descriptor + 2 j (32 bytes).
__device__ __forceinline__ uint64_t smem_desc_sw128(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

// The column block (of 128 rows) and token block of a CTA. The launch takes its CTAs in groups of
// FPX_RASTER column blocks, token block after token block within a group, so that the CTAs resident
// at once share the weights of a few column blocks and the activations of a few token blocks in L2.
__device__ __forceinline__ void cta_block(int& cb, int& tb) {
  const int id = blockIdx.x + gridDim.x * blockIdx.z, span = FPX_RASTER * gridDim.z;
  const int first = id / span * FPX_RASTER, width = min(FPX_RASTER, static_cast<int>(gridDim.x) - first), r = id % span;
  cb = first + r % width;
  tb = r / width;
}

constexpr int TILED_TILES = 2 * WG_TILES;  // 16-row tiles per CTA of the tiled kernel (two warpgroups)

// Shared memory of one stage of the tiled kernel: the activations first (1024-byte aligned for the
// swizzle), then the TILED_TILES tiles' weights and shifts.
template <int NT, int SUB>
struct TiledStage {
  static constexpr int A = 0;
  static constexpr int W = A + NT * 1024;
  static constexpr int S = W + TILED_TILES * 1024;
  static constexpr int BYTES = (S + TILED_TILES * 16 * SUB + 1023) / 1024 * 1024;
};

// grid = (column blocks of 128 rows, 1, token blocks of 8 NT); three warpgroups: warps 0-7 multiply (one
// 16-row tile each, with 232 registers), lane 0 of warp 8 fills the stages (the third warpgroup gives
// its registers back: 40 each); amap: the activations [M, K] bytes as a tensor map with a [8 NT, 128] box
// in the 128-byte swizzle; wmap, smap: the weights and shifts [tiles, KC, 1024 and 16 SUB bytes] with
// an [8 tiles, 1 chunk] box.
constexpr int TILED_THREADS = 3 * WG_THREADS;
template <int NT, int SUB>
__global__ void __launch_bounds__(TILED_THREADS, 1) w4a8_tiled_kernel(const __grid_constant__ CUtensorMap amap,
                                                                     const __grid_constant__ CUtensorMap wmap,
                                                                     const __grid_constant__ CUtensorMap smap, int KC,
                                                                     const Epilogue all) {
  using L = TiledStage<NT, SUB>;
  constexpr int S = FPX_TILE_STAGES, TILES = TILED_TILES;
  extern __shared__ uint8_t smem_raw[];
  __shared__ __align__(8) uint64_t full[S], empty[S];
  const uint32_t base = (smem_addr(smem_raw) + 1023) & ~1023u;
  uint8_t* smem = smem_raw + (base - smem_addr(smem_raw));
  int cb, tb;
  cta_block(cb, tb);
  const int m0 = tb * 8 * NT;
  const Epilogue ep = tokens_from(all, m0, min(8 * NT, all.M - m0));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int ntiles = (ep.N + 15) >> 4, tile0 = cb * TILES;
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(smem_addr(&full[s]), 1);
      mbar_init(smem_addr(&empty[s]), TILES);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  if (warp >= TILES) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (warp > TILES || lane != 0) return;
    // Chunk c into its stage: the boxes of the tiles' weights and shifts and of the activations
    // (zeros past the last tile, token and K; counted in full). The first stages' weights go out
    // before the wait for the kernel that writes the activations.
    auto fill = [&](int c, bool weights, bool acts) {
      const uint32_t bar = smem_addr(&full[c % S]), stage = base + (c % S) * L::BYTES;
      if (weights) {
        mbar_expect_tx(bar, TILES * (1024 + 16 * SUB) + NT * 1024);
        tma_load(stage + L::W, &wmap, 0, 4 * c, tile0, bar);
        tma_load(stage + L::S, &smap, 0, c, tile0, bar);
      }
      if (acts) tma_load(stage + L::A, &amap, c * 128, m0, bar);
    };
    for (int c = 0; c < S && c < KC; ++c) fill(c, true, false);
    grid_dependency_wait();
    for (int c = 0; c < S && c < KC; ++c) fill(c, false, true);
    for (int c = S; c < KC; ++c) {  // once every warp released chunk c - S
      mbar_wait(smem_addr(&empty[c % S]), ((c - S) / S) & 1);
      fill(c, true, true);
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  grid_dependency_wait();
  const int g = pinned(lane >> 2), t = pinned(lane & 3);
  float acc[NT][4], part[SUB][NT][4], ps[SUB][2];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;
  uint32_t frag[2][4][4];
  // Two chunks per iteration: the register sets of frag alternate between them.
  for (int c0 = 0; c0 < KC; c0 += 2) {
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const int c = c0 + b;
      if (c < KC) {
        const int s = c % S;
        mbar_wait(smem_addr(&full[s]), (c / S) & 1);
        const uint8_t* stage = smem + s * L::BYTES;
        chunk_mma<NT, SUB>(acc, part, ps, frag[b], reinterpret_cast<const uint4*>(stage + L::W) + warp * 64,
                           reinterpret_cast<const int8_t*>(stage + L::S) + warp * 16 * SUB,
                           smem_desc_sw128(base + s * L::BYTES + L::A), 2, c > 0, lane, g);
        // chunk_mma waited for chunk c - 1's wgmmas: this warp is done with its stage
        if (c > 0 && lane == 0) mbar_arrive(smem_addr(&empty[(c - 1) % S]));
      }
    }
  }
  wgmma_wait<0>();
  if (KC > 0) promote<NT, SUB>(acc, part, ps);
  epilogue<NT>(acc, ep, tile0 + warp, ntiles, g, t, 1);
}

// `kernel` on `grid` x `threads` with `smem` bytes of dynamic shared memory, in clusters of
// cluster_y CTAs along y (1: no cluster); pdl: may start before the previous kernel in the stream has
// finished (programmatic dependent launch; the kernels wait for it before they read what it wrote).
template <typename... Params, typename... Args>
cudaError_t launch_ex(void (*kernel)(Params...), dim3 grid, int threads, int smem, int pdl, int cluster_y,
                      cudaStream_t stream, Args&&... args) {
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = pdl != 0;
  attr[1].id = cudaLaunchAttributeClusterDimension;
  attr[1].val.clusterDim.x = 1;
  attr[1].val.clusterDim.y = cluster_y;
  attr[1].val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = cluster_y > 1 ? 2 : 1;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

// grid = (column blocks of 64 NW rows, splits / KW), KW x NW warpgroups per CTA, the splits / KW CTAs
// of a column block one cluster where they are at most MAX_CLUSTER; chunks_per_split =
// ceil(kc / (splits / KW)). pdl: may start before the previous kernel in the stream has finished
// (programmatic dependent launch; the kernel waits for it before it reads the activations or
// touches the workspace).
template <int NT, int SUB, int KW, int NW>
cudaError_t launch(const void* wt, const int8_t* st, const uint8_t* a, int k, int lda, int kc, int splits,
                   const Epilogue& ep, int pdl, cudaStream_t stream) {
  static_assert(fits(NT, SUB, KW * NW), "registers");
  const int ctas_y = splits / KW, cluster = FPX_CLUSTER && ctas_y <= MAX_CLUSTER ? ctas_y : 1;
  return launch_ex(w4a8_gemm_kernel<NT, SUB, KW, NW>,
                   dim3((ep.N + 16 * WG_TILES * NW - 1) / (16 * WG_TILES * NW), ctas_y), KW * NW * WG_THREADS,
                   KW * FPX_STAGES * Stage<NT, SUB, NW>::BYTES + (cluster > 1 ? inbox_bytes<NT, NW>() : 0), pdl,
                   cluster, stream, static_cast<const uint4*>(wt), st, a, k, lda, kc, (kc + ctas_y - 1) / ctas_y, ep);
}

// A tensor map of bytes: `rank` dimensions (innermost first) of sizes dims, strides (bytes, of
// dimensions 1 ..) and box; zeros outside.
cudaError_t byte_map(CUtensorMap* map, const void* p, int rank, const cuuint64_t* dims, const cuuint64_t* strides,
                     const cuuint32_t* box, CUtensorMapSwizzle swizzle) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  if (encode == nullptr) {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      return cudaErrorNotSupported;
    encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }
  const cuuint32_t unit[3] = {1, 1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, rank, const_cast<void*>(p), dims, strides, box, unit,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// One launch of the tiled kernel over all tokens of `ep`.
template <int NT, int SUB>
cudaError_t launch_tiled(const void* wt, const int8_t* st, const uint8_t* a, int k, int lda, int kc, const Epilogue& ep,
                         int pdl, cudaStream_t stream) {
  // the activations [M, K] with an [8 NT, 128] box in the 128-byte swizzle; the weights and shifts
  // [tiles, kc, bytes] with a [TILED_TILES, 1, bytes] box (bytes = 1024 and 16 SUB; box sides of at
  // most 256)
  const cuuint64_t tiles = (ep.N + 15) / 16, ldw = static_cast<cuuint64_t>(kc) * 1024, lds = static_cast<cuuint64_t>(kc) * 16 * SUB;
  const cuuint64_t a_dims[2] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(ep.M)}, a_strides[1] = {static_cast<cuuint64_t>(lda)};
  const cuuint64_t w_dims[3] = {256, 4 * static_cast<cuuint64_t>(kc), tiles}, w_strides[2] = {256, ldw};
  const cuuint64_t s_dims[3] = {16 * SUB, static_cast<cuuint64_t>(kc), tiles}, s_strides[2] = {16 * SUB, lds};
  const cuuint32_t a_box[2] = {128, 8 * NT}, w_box[3] = {256, 4, TILED_TILES}, s_box[3] = {16 * SUB, 1, TILED_TILES};
  CUtensorMap amap, wmap, smap;
  cudaError_t e = byte_map(&amap, a, 2, a_dims, a_strides, a_box, CU_TENSOR_MAP_SWIZZLE_128B);
  if (e == cudaSuccess) e = byte_map(&wmap, wt, 3, w_dims, w_strides, w_box, CU_TENSOR_MAP_SWIZZLE_NONE);
  if (e == cudaSuccess) e = byte_map(&smap, st, 3, s_dims, s_strides, s_box, CU_TENSOR_MAP_SWIZZLE_NONE);
  if (e != cudaSuccess) return e;
  return launch_ex(w4a8_tiled_kernel<NT, SUB>,
                   dim3((tiles + TILED_TILES - 1) / TILED_TILES, 1, (ep.M + 8 * NT - 1) / (8 * NT)), TILED_THREADS,
                   FPX_TILE_STAGES * TiledStage<NT, SUB>::BYTES + 1024,  // + the 1024-byte alignment
                   pdl, 1, stream, amap, wmap, smap, kc, ep);
}

// NT token tiles of 8, NW row blocks per CTA. The K parts of `splits` go to the rings of one CTA as
// far as they can (KW = 4, 2 or 1: the largest that divides splits with KW x NW warpgroups that
// ``fits``), the rest (splits / KW) to CTAs.
template <int NT, int SUB, int NW>
cudaError_t launch_rings(const void* wt, const int8_t* st, const uint8_t* a, int k, int lda, int kc, int splits,
                         const Epilogue& ep, int pdl, cudaStream_t stream) {
  if constexpr (!built(NT, SUB, NW)) {
    return cudaErrorInvalidValue;
  } else {
    if constexpr (NW == 1 && fits(NT, SUB, 4))
      if (splits % 4 == 0) return launch<NT, SUB, 4, 1>(wt, st, a, k, lda, kc, splits, ep, pdl, stream);
    if constexpr (NW <= 2 && fits(NT, SUB, 2 * NW))
      if (splits % 2 == 0) return launch<NT, SUB, 2, NW>(wt, st, a, k, lda, kc, splits, ep, pdl, stream);
    return launch<NT, SUB, 1, NW>(wt, st, a, k, lda, kc, splits, ep, pdl, stream);
  }
}

// nw: at most that many row blocks per CTA (the most of nw, nw / 2, ..., 1 that is ``built``).
template <int NT>
cudaError_t launch_nt(int sub, int nw, const void* wt, const int8_t* st, const uint8_t* a, int k, int lda, int kc,
                      int splits, const Epilogue& ep, int pdl, cudaStream_t stream) {
  while (nw > 1 && !built(NT, sub, nw)) nw /= 2;
#define FPX_LAUNCH(SUB, NW) \
  if (sub == SUB && nw == NW) return launch_rings<NT, SUB, NW>(wt, st, a, k, lda, kc, splits, ep, pdl, stream);
  FPX_LAUNCH(1, 1) FPX_LAUNCH(2, 1) FPX_LAUNCH(4, 1)
  FPX_LAUNCH(1, 2) FPX_LAUNCH(2, 2) FPX_LAUNCH(4, 2)
  FPX_LAUNCH(1, 4) FPX_LAUNCH(2, 4) FPX_LAUNCH(4, 4)
#undef FPX_LAUNCH
  return cudaErrorInvalidValue;
}

}  // namespace

extern "C" int fp_export_w4a8_gemm(const void* wt, const int8_t* st, const uint8_t* a, const float* a_scale,
                                   const float* w_scale, const float* bias, const float* lorc_t,
                                   const float* lorc_u, int lorc_rank, void* out, int out_bf16, float* ws,
                                   int* counters, int m, int n, int k, int lda, int ldo, int kc, int sub,
                                   int splits, int nw, int pdl, cudaStream_t stream) {
  const bool tiled = m > TILED_FROM;
  if (m <= 0 || n <= 0 || k <= 0 || k % 32 || kc * 128 < k || lda % 16 || splits < 1 || splits > kc ||
      (nw != 1 && nw != 2 && nw != 4) || (tiled && (splits != 1 || nw != 2)) ||
      (reinterpret_cast<uintptr_t>(a) % 16) || (reinterpret_cast<uintptr_t>(wt) % 16) ||
      (reinterpret_cast<uintptr_t>(st) % 16) || (splits > 1 && (ws == nullptr || counters == nullptr)))
    return cudaErrorInvalidValue;
  const Epilogue all{a_scale, w_scale, bias, lorc_t, lorc_u, lorc_rank, out, out_bf16, ws, counters, m, n, ldo};
  if (tiled) {  // blocks of 128 tokens, 64 for groups of 64 codes and 32 for groups of 32 (their group
                // sums need registers)
    switch (sub) {
      case 1: return static_cast<int>(launch_tiled<16, 1>(wt, st, a, k, lda, kc, all, pdl, stream));
      case 2: return static_cast<int>(launch_tiled<8, 2>(wt, st, a, k, lda, kc, all, pdl, stream));
      case 4: return static_cast<int>(launch_tiled<4, 4>(wt, st, a, k, lda, kc, all, pdl, stream));
      default: return cudaErrorInvalidValue;
    }
  }
  for (int m0 = 0; m0 < m; m0 += MAX_M) {  // 64 tokens per launch
    const int mb = std::min(MAX_M, m - m0);
    const Epilogue ep = tokens_from(all, m0, mb);
    const uint8_t* am = a + static_cast<size_t>(m0) * lda;
    cudaError_t e;
    if (mb <= 8) e = launch_nt<1>(sub, nw, wt, st, am, k, lda, kc, splits, ep, pdl, stream);
    else if (mb <= 16) e = launch_nt<2>(sub, nw, wt, st, am, k, lda, kc, splits, ep, pdl, stream);
    else if (mb <= 32) e = launch_nt<4>(sub, nw, wt, st, am, k, lda, kc, splits, ep, pdl, stream);
    else e = launch_nt<8>(sub, nw, wt, st, am, k, lda, kc, splits, ep, pdl, stream);
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  return static_cast<int>(cudaSuccess);
}

extern "C" int fp_export_w4a8_weight_to_fp8(const void* wt, const int8_t* st, uint8_t* out, int n, int k, int kc,
                                            int sub, cudaStream_t stream) {
  if (n <= 0 || k <= 0 || k % 32 || kc * 128 < k) return cudaErrorInvalidValue;
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t tasks = static_cast<int64_t>((n + 15) / 16) * kc;  // one warp each
  const int threads = CAST_WARPS * 32;
  const int blocks =
      static_cast<int>(std::min<int64_t>((tasks + CAST_WARPS - 1) / CAST_WARPS, static_cast<int64_t>(sms) * 8));
  const uint4* w = static_cast<const uint4*>(wt);
  switch (sub) {
    case 1: weight_to_fp8_kernel<1><<<blocks, threads, 0, stream>>>(w, st, out, n, k, kc); break;
    case 2: weight_to_fp8_kernel<2><<<blocks, threads, 0, stream>>>(w, st, out, n, k, kc); break;
    case 4: weight_to_fp8_kernel<4><<<blocks, threads, 0, stream>>>(w, st, out, n, k, kc); break;
    default: return cudaErrorInvalidValue;
  }
  return static_cast<int>(cudaGetLastError());
}
