// SparseK forward attention for sm_90: one CTA per (batch, kv head, query block).
//
// The CTA's 64 rows are (query head of the GQA group) x (query of the block): the heads of a
// group share one selection, so they share every K/V tile. Each CTA iterates
//   1. window tiles: the contiguous keys (i0 - window, i1) that some row's window covers,
//   2. list tiles:   the block's union of selected keys (from the selection kernels),
// 64 keys per tile, gathered row by row with cp.async into swizzled shared memory, two stages
// in flight. Per element a mask decides membership (window: i - W < j <= i; selected:
// j + W <= i < end_j) and selected keys carry the gate g = clip(u_j - tau_i, 0, 1). The gate
// multiplies the softmax weight (exp(s) * g == exp(s + log g)), so no logarithm is evaluated;
// the running max is taken over the ungated logits, which is still an upper bound (g <= 1).
// Matrix products use mma.sync m16n8k16 with fp32 accumulation (FlashAttention-2 layout).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>

#include "sparsek_params.h"

namespace sparsek {
namespace {

constexpr int kRows = kAttnRows;          // rows (query x head) per CTA
constexpr int kWarps = kRows / 16;        // one m16 slice of rows per warp
constexpr int kThreads = kWarps * 32;
constexpr int kTileN = 64;                // keys per tile
constexpr int kStages = 3;                // tiles in flight: hides the gather latency
constexpr float kLn2 = 0.69314718055994531f;

template <int kD>
struct Traits {
  static constexpr int kChunks = kD / 8;                    // 16-byte chunks per row
  static constexpr int kLoadersPerRow = kThreads / kTileN;  // threads that copy one key row
  static constexpr int kChunksPerThread = kChunks / kLoadersPerRow;
  static constexpr int kTileElems = kTileN * kD;
  static constexpr int kSmemBytes =
      (kRows * kD + 2 * kStages * kTileElems) * 2 + kStages * kTileN * (2 * sizeof(int) + sizeof(float));
};
static_assert(kThreads % kTileN == 0, "whole loader threads per key row");

// Element offset of 16-byte chunk `chunk` of row `row`: XOR-swizzled so that the 8 rows an
// ldmatrix reads at one logical chunk fall into 8 different bank groups.
template <int kD>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * kD + ((chunk ^ (row & 7)) << 3);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0 bytes read: the destination is zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}

__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

template <typename Elem>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

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

template <int kD, typename Elem>
__global__ void __launch_bounds__(kThreads, 1) attention_fwd_kernel(const AttnParams p) {
  using T = Traits<kD>;
  constexpr int kKSteps = kD / 16;  // k-steps of Q.K^T
  constexpr int kDBlocks = kD / 8;  // n-blocks of the output

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Elem* sQ = reinterpret_cast<Elem*>(smem_raw);
  Elem* sK = sQ + kRows * kD;
  Elem* sV = sK + kStages * T::kTileElems;
  int* sKey = reinterpret_cast<int*>(sV + kStages * T::kTileElems);  // [stage][key row]
  int* sEnd = sKey + kStages * kTileN;
  float* sU = reinterpret_cast<float*>(sEnd + kStages * kTileN);

  const int blk = blockIdx.x;
  const int bh = blockIdx.y;  // b * kv_heads + kv head
  const int b = bh / p.kv_heads, hkv = bh % p.kv_heads;
  const int S = p.seq_len, W = p.window;
  const int i0 = blk * p.block_q, i1 = min(S, i0 + p.block_q);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int quad = lane & 3;

  const Elem* q_base = static_cast<const Elem*>(p.q) + b * p.q_batch_stride;
  const Elem* k_base = static_cast<const Elem*>(p.k) + b * p.k_batch_stride + hkv * p.k_head_stride;
  const Elem* v_base = static_cast<const Elem*>(p.v) + b * p.v_batch_stride + hkv * p.v_head_stride;
  const float* scores = p.scores + (size_t)bh * S;
  const int* ends = p.end + (size_t)bh * S;

  // ---- tile plan: window tiles over [w0, i1), then the block's list of selected keys ----
  const int w0 = W > 0 ? max(0, i0 - W + 1) : i1;
  const int n_win = (i1 - w0 + kTileN - 1) / kTileN;
  const int count = p.block_count[(size_t)bh * p.n_blocks + blk];
  const int* list = p.block_keys + ((size_t)bh * p.n_blocks + blk) * p.cap;
  const int n_tiles = n_win + (count + kTileN - 1) / kTileN;

  // Loader role: kLoadersPerRow consecutive threads copy key row r of every tile.
  const int my_row = tid / T::kLoadersPerRow, my_part = tid % T::kLoadersPerRow;
  auto tile_key = [&](int t) -> int {  // key index of my_row in tile t, -1 for padding
    if (t >= n_tiles) return -1;
    if (t < n_win) {
      const int j = w0 + t * kTileN + my_row;
      return j < i1 ? j : -1;
    }
    const int idx = (t - n_win) * kTileN + my_row;
    return idx < count ? __ldg(list + idx) : -1;
  };
  auto load_tile = [&](int t, int stage, int j) {
    const bool ok = j >= 0;
    const int64_t jj = ok ? j : 0;
    const Elem* ksrc = k_base + jj * p.k_row_stride;
    const Elem* vsrc = v_base + jj * p.v_row_stride;
    Elem* kdst = sK + stage * T::kTileElems;
    Elem* vdst = sV + stage * T::kTileElems;
#pragma unroll
    for (int c = 0; c < T::kChunksPerThread; ++c) {
      const int ch = my_part * T::kChunksPerThread + c;
      cp_async16(kdst + swz<kD>(my_row, ch), ksrc + ch * 8, ok);
      cp_async16(vdst + swz<kD>(my_row, ch), vsrc + ch * 8, ok);
    }
    if (my_part == 0) {
      const int m = stage * kTileN + my_row;
      sKey[m] = j;
      if (t >= n_win && ok) {
        cp_async4(&sEnd[m], ends + j);
        cp_async4(&sU[m], scores + j);
      } else {
        sEnd[m] = -1;  // padding (or a window tile, which does not read it): never selected
        sU[m] = 0.f;
      }
    }
  };

  // ---- prologue: Q rows (zero beyond S) with tile 0, then tile 1 ----
  for (int c = tid; c < kRows * T::kChunks; c += kThreads) {
    const int r = c / T::kChunks, ch = c % T::kChunks;
    const int i = i0 + r % p.block_q, head = hkv * p.group + r / p.block_q;
    const bool ok = i < S;
    const Elem* src = q_base + head * p.q_head_stride + (int64_t)(ok ? i : 0) * p.q_row_stride + ch * 8;
    cp_async16(sQ + swz<kD>(r, ch), src, ok);
  }
  if (n_tiles > 0) load_tile(0, 0, tile_key(0));
  cp_async_commit();
  if (n_tiles > 1) load_tile(1, 1, tile_key(1));
  cp_async_commit();
  int key_next = tile_key(2);

  // Per-thread rows (mma accumulator layout): r_lo = warp*16 + lane/4 and r_lo + 8.
  const int r_lo = warp * 16 + (lane >> 2);
  int qi[2], head_of[2];
  float tau_row[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = r_lo + 8 * h;
    qi[h] = i0 + r % p.block_q;
    head_of[h] = hkv * p.group + r / p.block_q;
    tau_row[h] = qi[h] < S ? p.tau[(size_t)bh * S + qi[h]] : 0.f;
  }

  cp_async_wait<1>();  // Q and tile 0
  __syncthreads();
  uint32_t qf[kKSteps][4];
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk) {
    ldmatrix_x4(qf[kk], sQ + swz<kD>(warp * 16 + (lane & 15), 2 * kk + (lane >> 4)));
  }

  float o[kDBlocks][4];
#pragma unroll
  for (int nd = 0; nd < kDBlocks; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
  float m_run[2] = {-CUDART_INF_F, -CUDART_INF_F};
  float l_run[2] = {0.f, 0.f};

  for (int t = 0; t < n_tiles; ++t) {
    const int stage = t % kStages;
    cp_async_wait<kStages - 2>();  // tile t has landed
    // Also the barrier before refilling: the stage loaded below was read during tile t - 1.
    __syncthreads();
    if (t + kStages - 1 < n_tiles) load_tile(t + kStages - 1, (t + kStages - 1) % kStages, key_next);
    cp_async_commit();  // possibly empty: keeps the group count uniform
    key_next = tile_key(t + kStages);

    const Elem* sKs = sK + stage * T::kTileElems;
    const Elem* sVs = sV + stage * T::kTileElems;
    const bool is_window = t < n_win;
    const int win_base = w0 + t * kTileN;

    // S = Q K^T for this warp's 16 rows x 64 keys.
    float s[kTileN / 8][4];
#pragma unroll
    for (int nb = 0; nb < kTileN / 8; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
      for (int nb2 = 0; nb2 < kTileN / 16; ++nb2) {
        uint32_t bfr[4];
        const int krow = 16 * nb2 + (lane & 7) + ((lane >> 4) << 3);
        ldmatrix_x4(bfr, sKs + swz<kD>(krow, 2 * kk + ((lane >> 3) & 1)));
        mma16816<Elem>(s[2 * nb2], qf[kk], bfr[0], bfr[1]);
        mma16816<Elem>(s[2 * nb2 + 1], qf[kk], bfr[2], bfr[3]);
      }
    }

    // Mask, gate, online softmax (log2 domain). Each row lives in the 4 threads of a quad.
    float gate[kTileN / 8][4];
    float tile_max[2] = {-CUDART_INF_F, -CUDART_INF_F};
#pragma unroll
    for (int nb = 0; nb < kTileN / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * nb + 2 * quad + e;
        int j, end_j = -1;
        float u_j = 0.f;
        if (is_window) {
          j = win_base + col;
        } else {
          j = sKey[stage * kTileN + col];
          end_j = sEnd[stage * kTileN + col];
          u_j = sU[stage * kTileN + col];
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int i = qi[h];
          bool valid;
          float g;
          if (is_window) {
            valid = j <= i && j > i - W && i < S;
            g = 1.f;
          } else {
            valid = j >= 0 && j + W <= i && i < end_j;  // i < end_j <= S
            g = fminf(fmaxf(u_j - tau_row[h], 0.f), 1.f);
          }
          const float x = valid ? s[nb][2 * h + e] * p.scale_log2 : -CUDART_INF_F;
          s[nb][2 * h + e] = x;
          gate[nb][2 * h + e] = g;
          tile_max[h] = fmaxf(tile_max[h], x);
        }
      }
    }
    float alpha[2], m_use[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
      const float m_new = fmaxf(m_run[h], tile_max[h]);
      m_use[h] = m_new == -CUDART_INF_F ? 0.f : m_new;  // a row with nothing valid yet
      alpha[h] = exp2f(m_run[h] - m_use[h]);              // 0 when m_run is -inf
      m_run[h] = m_new;
    }
    float row_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int nb = 0; nb < kTileN / 8; ++nb) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int h = c >> 1;
        const float pv = exp2f(s[nb][c] - m_use[h]) * gate[nb][c];
        s[nb][c] = pv;
        row_sum[h] += pv;
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) l_run[h] = l_run[h] * alpha[h] + row_sum[h];
#pragma unroll
    for (int nd = 0; nd < kDBlocks; ++nd) {
      o[nd][0] *= alpha[0];
      o[nd][1] *= alpha[0];
      o[nd][2] *= alpha[1];
      o[nd][3] *= alpha[1];
    }

    // O += P V, P taken straight from the accumulators as the A operand.
#pragma unroll
    for (int kk = 0; kk < kTileN / 16; ++kk) {
      const uint32_t a[4] = {pack2<Elem>(s[2 * kk][0], s[2 * kk][1]), pack2<Elem>(s[2 * kk][2], s[2 * kk][3]),
                             pack2<Elem>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack2<Elem>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int nd2 = 0; nd2 < kD / 16; ++nd2) {
        uint32_t bfr[4];
        const int vrow = 16 * kk + (lane & 7) + (((lane >> 3) & 1) << 3);
        ldmatrix_x4_trans(bfr, sVs + swz<kD>(vrow, 2 * nd2 + (lane >> 4)));
        mma16816<Elem>(o[2 * nd2], a, bfr[0], bfr[1]);
        mma16816<Elem>(o[2 * nd2 + 1], a, bfr[2], bfr[3]);
      }
    }
  }

  // ---- epilogue: normalise, write out and lse ----
  Elem* out = static_cast<Elem*>(p.out);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = l_run[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int i = qi[h];
    if (i >= S) continue;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const size_t row_off = ((size_t)b * p.q_heads + head_of[h]) * S + i;
    Elem* dst = out + row_off * kD;
#pragma unroll
    for (int nd = 0; nd < kDBlocks; ++nd) {
      *reinterpret_cast<uint32_t*>(dst + 8 * nd + 2 * quad) = pack2<Elem>(o[nd][2 * h] * inv, o[nd][2 * h + 1] * inv);
    }
    if (quad == 0) p.lse[row_off] = l > 0.f ? (m_run[h] + log2f(l)) * kLn2 : -CUDART_INF_F;
  }
}

template <int kD, typename Elem>
cudaError_t launch(const AttnParams& p, cudaStream_t stream) {
  auto kernel = attention_fwd_kernel<kD, Elem>;
  constexpr int smem = Traits<kD>::kSmemBytes;
  // Above 48 KB a kernel must opt in to the larger dynamic shared memory carve-out.
  if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem); e != cudaSuccess) {
    return e;
  }
  const dim3 grid(p.n_blocks, p.batch * p.kv_heads);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_attention_fwd(const AttnParams& p, int head_dim, cudaStream_t stream) {
  if (p.n_blocks == 0 || p.batch * p.kv_heads == 0) return cudaSuccess;
  if (head_dim == 128) return p.is_bf16 ? launch<128, __nv_bfloat16>(p, stream) : launch<128, __half>(p, stream);
  if (head_dim == 64) return p.is_bf16 ? launch<64, __nv_bfloat16>(p, stream) : launch<64, __half>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace sparsek
