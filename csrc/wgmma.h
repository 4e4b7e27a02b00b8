// Warpgroup MMA (wgmma, sm_90a) helpers shared by the forward and backward attention kernels:
// the 128-byte swizzled operand layout, shared-memory matrix descriptors, the async-proxy fence,
// the wgmma fence / commit / wait, and the m64nNk16 instructions the kernels issue.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace sparsek {

constexpr int kPanel = 64;    // elements per 128-byte swizzled row of an operand panel
constexpr int kAlign = 1024;  // the 128-byte swizzle repeats every 8 rows = 1024 bytes

// Element offset of 16-byte chunk `chunk` of row `row` in a (kOperandRows x D) operand stored the
// way wgmma reads it with the 128-byte swizzle: D / 64 column panels of kOperandRows rows x 128
// bytes, chunk c of row r at position c ^ (r % 8) within its row.
template <int kOperandRows>
__device__ __forceinline__ int sw128(int row, int chunk) {
  return (chunk >> 3) * (kOperandRows * kPanel) + row * kPanel + (((chunk & 7) ^ (row & 7)) << 3);
}

// wgmma shared-memory matrix descriptor: start address, leading and stride byte offsets (all in
// 16-byte units), swizzle mode 1 = 128 bytes.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lead_bytes, uint32_t stride_bytes) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lead_bytes >> 4) << 16) |
         (static_cast<uint64_t>(stride_bytes >> 4) << 32) | (1ull << 62);
}

// cp.async writes through the generic proxy, wgmma reads through the async proxy: each writer
// fences before the barrier that publishes its rows.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Ties registers an in-flight wgmma reads or writes (accumulators, A fragments) to the wgmma
// waits, so the compiler neither reads, rewrites nor reuses them before the wait.
template <typename R, int N>
__device__ __forceinline__ void fence_regs(R (&r)[N][4]) {
  static_assert(std::is_same_v<R, float> || std::is_same_v<R, uint32_t>, "32-bit float or integer registers");
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if constexpr (std::is_same_v<R, float>) {
        asm volatile("" : "+f"(r[i][c])::"memory");
      } else {
        asm volatile("" : "+r"(r[i][c])::"memory");
      }
    }
  }
}

// After a wait: marks accumulator registers [kFrom, N) as plain values (a move in place, which
// ptxas drops), so that ptxas, which does not follow wgmma-defined registers across a loop's back
// edge, does not insert a wait for later wgmma groups before they are read (warning C7517).
template <int kFrom, int N>
__device__ __forceinline__ void release_regs(float (&r)[N][4]) {
#pragma unroll
  for (int i = kFrom; i < N; ++i) {
#pragma unroll
    for (int c = 0; c < 4; ++c) asm volatile("mov.b32 %0, %0;" : "+f"(r[i][c]));
  }
}

#define SPARSEK_ACC4(d, i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define SPARSEK_ACC32(d)                                                                              \
  SPARSEK_ACC4(d, 0), SPARSEK_ACC4(d, 1), SPARSEK_ACC4(d, 2), SPARSEK_ACC4(d, 3), SPARSEK_ACC4(d, 4), \
      SPARSEK_ACC4(d, 5), SPARSEK_ACC4(d, 6), SPARSEK_ACC4(d, 7)
#define SPARSEK_OUT4(d, i) "=f"(d[i][0]), "=f"(d[i][1]), "=f"(d[i][2]), "=f"(d[i][3])
#define SPARSEK_OUT32(d)                                                                              \
  SPARSEK_OUT4(d, 0), SPARSEK_OUT4(d, 1), SPARSEK_OUT4(d, 2), SPARSEK_OUT4(d, 3), SPARSEK_OUT4(d, 4), \
      SPARSEK_OUT4(d, 5), SPARSEK_OUT4(d, 6), SPARSEK_OUT4(d, 7)
#define SPARSEK_OUT64(d)                                                                                \
  SPARSEK_OUT32(d), SPARSEK_OUT4(d, 8), SPARSEK_OUT4(d, 9), SPARSEK_OUT4(d, 10), SPARSEK_OUT4(d, 11),   \
      SPARSEK_OUT4(d, 12), SPARSEK_OUT4(d, 13), SPARSEK_OUT4(d, 14), SPARSEK_OUT4(d, 15)
#define SPARSEK_ACC64(d)                                                                                \
  SPARSEK_ACC32(d), SPARSEK_ACC4(d, 8), SPARSEK_ACC4(d, 9), SPARSEK_ACC4(d, 10), SPARSEK_ACC4(d, 11),   \
      SPARSEK_ACC4(d, 12), SPARSEK_ACC4(d, 13), SPARSEK_ACC4(d, 14), SPARSEK_ACC4(d, 15)
#define SPARSEK_REGS32                                                                                   \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define SPARSEK_REGS64                                                                                   \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, "   \
  "%42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, "   \
  "%62, %63}"

template <typename Elem>
struct Wgmma;

// One instantiation per input type: PTX spells the type in the opcode.
#define SPARSEK_WGMMA(ELEM, TYPE)                                                                              \
  template <>                                                                                                  \
  struct Wgmma<ELEM> {                                                                                         \
    /* d (64 x 64) (+)= A (64 x 16, shared) B (16 x 64, shared, K-major) */                                  \
    static __device__ __forceinline__ void ss_n64(float (&d)[8][4], uint64_t a, uint64_t b, int accumulate) { \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                \
                   "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " " SPARSEK_REGS32              \
                   ", %32, %33, p, 1, 1, 0, 0;\n}\n"                                                           \
                   : SPARSEK_ACC32(d)                                                                          \
                   : "l"(a), "l"(b), "r"(accumulate));                                                         \
    }                                                                                                          \
    /* d (64 x 64) = A (64 x 16, shared) B (16 x 64, shared, K-major): the first k-step, which  \
       does not read d, so the compiler need not keep d's old value alive up to it */             \
    static __device__ __forceinline__ void ss_n64_init(float (&d)[8][4], uint64_t a, uint64_t b) {             \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 0, 0;\n"                                                \
                   "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " " SPARSEK_REGS32              \
                   ", %32, %33, p, 1, 1, 0, 0;\n}\n"                                                         \
                   : SPARSEK_OUT32(d)                                                                          \
                   : "l"(a), "l"(b));                                                                          \
    }                                                                                                          \
    /* d (64 x 64) += A (64 x 16, registers) B (16 x 64, shared, MN-major) */                                \
    static __device__ __forceinline__ void rs_n64(float (&d)[8][4], const uint32_t (&a)[4], uint64_t b) {     \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                \
                   "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " " SPARSEK_REGS32              \
                   ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                            \
                   : SPARSEK_ACC32(d)                                                                          \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(1));                              \
    }                                                                                                          \
    /* d (64 x 128) += A (64 x 16, registers) B (16 x 128, shared, MN-major) */                              \
    static __device__ __forceinline__ void rs_n128(float (&d)[16][4], const uint32_t (&a)[4], uint64_t b) {   \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                \
                   "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " " SPARSEK_REGS64             \
                   ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                            \
                   : SPARSEK_ACC64(d)                                                                          \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(1));                              \
    }                                                                                                          \
    /* d (64 x 64) (+)= A (64 x 16, shared, MN-major) B (16 x 64, shared, MN-major) */                       \
    static __device__ __forceinline__ void ss_n64_tt(float (&d)[8][4], uint64_t a, uint64_t b, int accumulate) { \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                \
                   "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " " SPARSEK_REGS32              \
                   ", %32, %33, p, 1, 1, 1, 1;\n}\n"                                                           \
                   : SPARSEK_ACC32(d)                                                                          \
                   : "l"(a), "l"(b), "r"(accumulate));                                                         \
    }                                                                                                          \
    /* d (64 x 64) = A (64 x 16, shared, MN-major) B (16 x 64, shared, MN-major): first k-step */             \
    static __device__ __forceinline__ void ss_n64_tt_init(float (&d)[8][4], uint64_t a, uint64_t b) {          \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 0, 0;\n"                                                \
                   "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " " SPARSEK_REGS32              \
                   ", %32, %33, p, 1, 1, 1, 1;\n}\n"                                                         \
                   : SPARSEK_OUT32(d)                                                                          \
                   : "l"(a), "l"(b));                                                                          \
    }                                                                                                          \
    /* d (64 x 128) = A (64 x 16, shared, MN-major) B (16 x 128, shared, MN-major): first k-step */           \
    static __device__ __forceinline__ void ss_n128_tt_init(float (&d)[16][4], uint64_t a, uint64_t b) {        \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 0, 0;\n"                                                \
                   "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " " SPARSEK_REGS64             \
                   ", %64, %65, p, 1, 1, 1, 1;\n}\n"                                                         \
                   : SPARSEK_OUT64(d)                                                                          \
                   : "l"(a), "l"(b));                                                                          \
    }                                                                                                          \
    /* d (64 x 128) (+)= A (64 x 16, shared, MN-major) B (16 x 128, shared, MN-major) */                     \
    static __device__ __forceinline__ void ss_n128_tt(float (&d)[16][4], uint64_t a, uint64_t b, int accumulate) { \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                \
                   "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " " SPARSEK_REGS64             \
                   ", %64, %65, p, 1, 1, 1, 1;\n}\n"                                                           \
                   : SPARSEK_ACC64(d)                                                                          \
                   : "l"(a), "l"(b), "r"(accumulate));                                                         \
    }                                                                                                          \
  };
SPARSEK_WGMMA(__nv_bfloat16, "bf16")
SPARSEK_WGMMA(__half, "f16")
#undef SPARSEK_WGMMA

}  // namespace sparsek
