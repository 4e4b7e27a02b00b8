// Small helpers shared by the prefill kernels: asynchronous copies into shared memory, shared-memory
// addresses, packing two floats into one register of the input type, and the host-side launch.
// CUDA headers only, so every kernel file still compiles with plain nvcc.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace sparsek {

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// 16 bytes global -> shared; when !valid, 0 bytes are read and the destination is zero-filled.
__device__ __forceinline__ void cp_async16(uint32_t smem, const void* gmem, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(bytes));
}

__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(smem)), "l"(gmem));
}

// Barrier over `threads` threads (a multiple of 32) on named barrier `id` (1..15; __syncthreads is 0),
// e.g. one warpgroup.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Arrives on named barrier `id` without waiting: with named_barrier_sync by the other
// `threads` minus these, one group signals another.
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// mbarriers (count arrivals per phase) and setmaxnreg: the warp-specialised kernels.
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

// Release: this thread's earlier writes (and, after fence_proxy_async, their async-proxy view)
// are visible to a thread whose wait sees the phase complete.
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

// One poll (acquire when it returns true): has the phase with this parity completed?
__device__ __forceinline__ bool mbar_try_wait(uint64_t* bar, uint32_t parity) {
  uint32_t ready;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(ready)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
  return ready != 0;
}
// Returns once the phase with this parity has completed, in every lane of the warp (all 32 lanes
// must call it). The loop's condition is a warp vote, so ptxas sees a warp-uniform loop: with the
// poll looping inside the asm (a per-lane branch), it treated the code after the wait as
// possibly divergent and built the consumers' wgmma descriptors in vector registers, moving each
// into uniform registers with R2UR before every k-step. Once a lane has seen the phase complete
// it stays complete for the rest of the loop (the barrier cannot finish its next phase without
// this warp's arrival), so the last poll of every lane returned true: each lane has acquired.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  while (!__all_sync(0xffffffffu, mbar_try_wait(bar, parity))) {
  }
}

// Thread-block clusters (the backward's CTA pairs): another CTA's address of a shared-memory
// location (`mapa`), arrivals on another CTA's mbarrier, 8-byte stores into another CTA's shared
// memory that complete a transaction count on its mbarrier, and the barrier over every thread of
// the cluster.
__device__ __forceinline__ uint32_t cluster_map(uint32_t smem, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(smem), "r"(rank));
  return remote;
}

// Makes this thread's mbarrier initialisations visible to the cluster (before cluster_sync).
__device__ __forceinline__ void fence_mbar_init_cluster() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

// Arrives on the mbarrier at `remote` (a cluster_map address), with the default release at CTA
// scope: this thread's earlier reads of the shared memory it guards are done. A cluster-scope
// release compiles to a GPU-wide memory barrier (MEMBAR.ALL.GPU) before every arrival.
__device__ __forceinline__ void mbar_arrive_remote(uint32_t remote) {
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(remote) : "memory");
}

// Arrives and raises the phase's expected transaction count by `bytes` (stores that other CTAs
// send with st_async_f2 and that complete on this barrier).
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}

// Stores two floats at `remote` (another CTA's shared memory, cluster_map address); when they
// have landed they complete 8 bytes of the transaction count of the mbarrier at `remote_bar` (in
// the same CTA), so a thread waiting on that barrier sees them without any fence.
__device__ __forceinline__ void st_async_f2(uint32_t remote, float x, float y, uint32_t remote_bar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.f32 [%0], {%1, %2}, [%3];\n" ::"r"(remote), "f"(x),
               "f"(y), "r"(remote_bar)
               : "memory");
}

// Every thread of every CTA of the cluster (whole warps) arrives, then waits for all of them.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

template <int kRegs>
__device__ __forceinline__ void regs_raise() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

template <int kRegs>
__device__ __forceinline__ void regs_lower() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Explicit conversions: torch's extension build defines __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove the implicit ones.
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename Elem>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Host side: launch `kernel` with `smem` bytes of dynamic shared memory on `stream`; above 48 KB a
// kernel must first opt in to the larger carve-out. Returns the launch's error.
template <typename Kernel, typename Params>
cudaError_t launch_with_smem(Kernel kernel, dim3 grid, int threads, int smem, cudaStream_t stream, const Params& p) {
  if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem); e != cudaSuccess) {
    return e;
  }
  kernel<<<grid, threads, smem, stream>>>(p);
  return cudaGetLastError();
}

// The same for a kernel launched in clusters of `cluster_x` CTAs along x (gridDim.x a multiple of it).
template <typename Kernel, typename Params>
cudaError_t launch_clusters_with_smem(Kernel kernel, dim3 grid, int cluster_x, int threads, int smem, cudaStream_t stream,
                                      const Params& p) {
  if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem); e != cudaSuccess) {
    return e;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = static_cast<size_t>(smem);
  config.stream = stream;
  cudaLaunchAttribute cluster = {};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = static_cast<unsigned>(cluster_x);
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  config.attrs = &cluster;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, p);
}

}  // namespace sparsek
