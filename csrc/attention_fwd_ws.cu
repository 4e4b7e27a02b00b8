// SparseK forward attention for sm_90a, warp-specialised (v7, docs/perf-notes.md): the same
// tile plan, masks, gates and online softmax as attention_fwd.cu (v5), with the roles split.
//
// - A producer warpgroup (128 threads, registers lowered with setmaxnreg) gathers each tile's K
//   and V rows (and a list tile's per-key start, end and score) with cp.async into a ring of four
//   stages. When a tile has landed, every producer thread fences its writes for the async proxy
//   (wgmma reads shared memory through it) and arrives on the stage's `full` mbarrier.
// - Two consumer warpgroups (64 rows each, registers raised with setmaxnreg) wait on `full`, issue
//   S = Q K^T of tile t with the P V of tile t - 1 (v4's overlap inside a warpgroup), run the
//   softmax, and, once that P V has completed, arrive on the `empty` mbarrier of tile t - 1's
//   stage, which the producer waits for before refilling it.
// - The two consumer warpgroups take turns issuing their matrix products (two named barriers,
//   FlashAttention-3's ping-pong), so that one's softmax runs while the other's products occupy
//   the tensor cores; v5 had only v4's overlap and two warps per scheduler.
// No CTA-wide barrier after the prologue: the warpgroups meet only at the mbarriers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>

#include "ptx.h"
#include "sparsek_params.h"
#include "tile_plan.h"
#include "wgmma.h"

namespace sparsek {
namespace {

constexpr int kRows = kAttnRows;  // rows (query x head) per CTA
constexpr int kWgRows = 64;       // rows per consumer warpgroup: the M of wgmma
constexpr int kConsumers = kRows / kWgRows;
constexpr int kThreads = (kConsumers + 1) * 128;  // one producer warpgroup, then the consumers
constexpr int kTileN = 64;        // keys per tile
constexpr int kStages = 4;        // ring slots
constexpr float kLn2 = 0.69314718055994531f;
// setmaxnreg: the producer needs addresses and a key index, the consumers v5's ~190 registers.
// Launched with 384 threads at most 168 each; after the change 128 x 56 + 256 x 224 = 64,512 of
// the SM's 65,536.
constexpr int kProducerRegs = 56;
constexpr int kConsumerRegs = 224;
static_assert(128 * kProducerRegs + kConsumers * 128 * kConsumerRegs <= 65536, "register file");
constexpr int kTurnBarrier = 1;  // named barriers kTurnBarrier + c: consumer c's turn to issue (0 is __syncthreads)

template <int kD>
struct Traits {
  static constexpr int kChunks = kD / 8;                   // 16-byte chunks per row
  static constexpr int kLoadersPerRow = 128 / kTileN;      // producer threads that copy one key row
  static constexpr int kChunksPerThread = kChunks / kLoadersPerRow;
  static constexpr int kTileElems = kTileN * kD;
  static constexpr int kKeyDataBytes = kStages * kTileN * (2 * sizeof(int) + sizeof(float));
  static constexpr int kSmemBytes = kAlign + (kRows * kD + 2 * kStages * kTileElems) * 2 + kKeyDataBytes + 2 * kStages * 8;
};

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

// Release: this thread's earlier writes (and, after fence_proxy_async, their async-proxy view)
// are visible to a thread whose wait sees the phase complete.
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

// Acquire: returns once the phase with this parity has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred ready;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 ready, [%0], %1;\n"
      "@!ready bra WAIT;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

template <int kRegs>
__device__ __forceinline__ void regs_raise() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

template <int kRegs>
__device__ __forceinline__ void regs_lower() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

template <int kD, typename Elem>
__global__ void __launch_bounds__(kThreads, 1) attention_fwd_ws_kernel(const AttnParams p) {
  using T = Traits<kD>;
  constexpr int kKSteps = kD / 16;  // k-steps of Q.K^T
  constexpr int kDBlocks = kD / 8;  // n8 blocks of the output
  constexpr int kPanelBytes = kPanel * 2;
  constexpr uint32_t kTileBytes = T::kTileElems * 2;

  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw_addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  unsigned char* smem = smem_raw + ((kAlign - (raw_addr & (kAlign - 1))) & (kAlign - 1));
  Elem* sQ = reinterpret_cast<Elem*>(smem);
  Elem* sK = sQ + kRows * kD;
  Elem* sV = sK + kStages * T::kTileElems;
  int* sStart = reinterpret_cast<int*>(sV + kStages * T::kTileElems);  // [stage][key row]: j + W
  int* sEnd = sStart + kStages * kTileN;
  float* sU = reinterpret_cast<float*>(sEnd + kStages * kTileN);
  uint64_t* full = reinterpret_cast<uint64_t*>(sU + kStages * kTileN);  // 8-byte aligned: the offsets above are
  uint64_t* empty = full + kStages;

  const int blk = blockIdx.x;
  const int bh = blockIdx.y;  // b * kv_heads + kv head
  const int b = bh / p.kv_heads, hkv = bh % p.kv_heads;
  const int S = p.seq_len, W = p.window;
  const int i0 = blk * p.block_q, i1 = min(S, i0 + p.block_q);
  const int tid = threadIdx.x, lane = tid & 31;

  const Elem* q_base = static_cast<const Elem*>(p.q) + b * p.q_batch_stride;
  const TilePlan<kTileN> plan(p.block_keys, p.block_count, bh, blk, p.n_blocks, p.cap, i0, i1, W);
  const int n_win = plan.n_win, n_tiles = plan.n_tiles;

  // ---- prologue, all warpgroups: Q rows (zero beyond S) and the barriers ----
  for (int c = tid; c < kRows * T::kChunks; c += kThreads) {
    const int r = c / T::kChunks, ch = c % T::kChunks;
    const int i = i0 + r % p.block_q, head = hkv * p.group + r / p.block_q;
    const bool ok = i < S;
    const Elem* src = q_base + head * p.q_head_stride + (int64_t)(ok ? i : 0) * p.q_row_stride + ch * 8;
    cp_async16(smem_addr(sQ + sw128<kRows>(r, ch)), src, ok);
  }
  cp_async_commit();
  cp_async_wait<0>();
  fence_proxy_async();
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 128);               // every producer thread, once its copies landed
      mbar_init(&empty[s], kConsumers * 4);   // every consumer warp, once its P.V of the tile completed
    }
  }
  __syncthreads();

  if (tid < 128) {
    // ---- producer ----
    regs_lower<kProducerRegs>();
    const Elem* k_base = static_cast<const Elem*>(p.k) + b * p.k_batch_stride + hkv * p.k_head_stride;
    const Elem* v_base = static_cast<const Elem*>(p.v) + b * p.v_batch_stride + hkv * p.v_head_stride;
    const float* scores = p.scores + (size_t)bh * S;
    const int* ends = p.end + (size_t)bh * S;
    const int my_row = tid / T::kLoadersPerRow, my_part = tid % T::kLoadersPerRow;
    const uint32_t k_addr = smem_addr(sK), v_addr = smem_addr(sV);
    int key = plan.key(0, my_row);
    for (int t = 0; t < n_tiles; ++t) {
      const int stage = t % kStages;
      if (t >= kStages) mbar_wait(&empty[stage], ((t / kStages) - 1) & 1);  // tile t - 4's P.V done
      const bool ok = key >= 0;
      const int64_t jj = ok ? key : 0;
      const Elem* ksrc = k_base + jj * p.k_row_stride + my_part * T::kChunksPerThread * 8;
      const Elem* vsrc = v_base + jj * p.v_row_stride + my_part * T::kChunksPerThread * 8;
      const uint32_t kdst = k_addr + stage * kTileBytes, vdst = v_addr + stage * kTileBytes;
#pragma unroll
      for (int c = 0; c < T::kChunksPerThread; ++c) {
        const uint32_t off = 2 * sw128<kTileN>(my_row, my_part * T::kChunksPerThread + c);
        cp_async16(kdst + off, ksrc + c * 8, ok);
        cp_async16(vdst + off, vsrc + c * 8, ok);
      }
      if (my_part == 0 && t >= n_win) {  // window tiles need no per-key data
        const int m = stage * kTileN + my_row;
        if (ok) {
          sStart[m] = key + W;
          cp_async4(&sEnd[m], ends + key);
          cp_async4(&sU[m], scores + key);
        } else {
          sStart[m] = S;  // padding: selected by no row (i < S)
          sEnd[m] = -1;
          sU[m] = 0.f;
        }
      }
      cp_async_commit();
      key = plan.key(t + 1, my_row);  // a global load for list tiles, under the copies in flight
      if (t > 0) {  // publish tile t - 1: landed, fenced for the async proxy, released
        cp_async_wait<1>();
        fence_proxy_async();
        mbar_arrive(&full[(t - 1) % kStages]);
      }
    }
    if (n_tiles > 0) {
      cp_async_wait<0>();
      fence_proxy_async();
      mbar_arrive(&full[(n_tiles - 1) % kStages]);
    }
    return;
  }

  // ---- consumers ----
  regs_raise<kConsumerRegs>();
  const int cwg = tid / 128 - 1;           // consumer warpgroup: rows 64 cwg .. 64 cwg + 63
  const int cwarp = (tid - 128) >> 5;      // consumer warp: rows 16 cwarp .. 16 cwarp + 15
  const int quad = lane & 3;
  const int r_lo = cwarp * 16 + (lane >> 2);
  int qi[2], head_of[2];
  float tau_row[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = r_lo + 8 * h;
    qi[h] = i0 + r % p.block_q;
    head_of[h] = hkv * p.group + r / p.block_q;
    tau_row[h] = qi[h] < S ? p.tau[(size_t)bh * S + qi[h]] : 0.f;
  }
  const int w0 = plan.w0;

  // Descriptors as in v5: Q and K K-major, V MN-major for O += P V.
  const uint32_t q_addr = smem_addr(sQ) + cwg * kWgRows * kPanelBytes;
  const uint32_t k_addr = smem_addr(sK), v_addr = smem_addr(sV);
  constexpr uint32_t kGroupBytes = 8 * kPanelBytes;
  constexpr uint32_t kTilePanelBytes = kTileN * kPanelBytes;
  auto q_desc = [&](int kk) {
    return smem_desc(q_addr + (kk / 4) * (kRows * kPanelBytes) + (kk % 4) * 32, 16, kGroupBytes);
  };
  auto k_desc = [&](int stage, int kk) {
    return smem_desc(k_addr + stage * kTileBytes + (kk / 4) * kTilePanelBytes + (kk % 4) * 32, 16, kGroupBytes);
  };
  auto v_desc = [&](int stage, int kk) {
    return smem_desc(v_addr + stage * kTileBytes + kk * 16 * kPanelBytes, kTilePanelBytes, kGroupBytes);
  };
  auto pv = [&](float (&acc)[kDBlocks][4], const uint32_t (&pa)[kTileN / 16][4], int stage) {
#pragma unroll
    for (int kk = 0; kk < kTileN / 16; ++kk) {
      if constexpr (kD == 128) {
        Wgmma<Elem>::rs_n128(acc, pa[kk], v_desc(stage, kk));
      } else {
        Wgmma<Elem>::rs_n64(acc, pa[kk], v_desc(stage, kk));
      }
    }
  };

  float o[kDBlocks][4];
#pragma unroll
  for (int nd = 0; nd < kDBlocks; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
  float m_run[2] = {-CUDART_INF_F, -CUDART_INF_F};
  float l_run[2] = {0.f, 0.f};
  uint32_t p_prev[kTileN / 16][4];
  float gate[kTileN / 8][4];

  // Turns: consumer 0 issues first; after each issue a consumer hands the turn to the other. The
  // arrivals and waits on each named barrier balance: consumer 1 skips the hand-over after its last
  // tile, which is matched by this first one.
  if (cwg == 1 && n_tiles > 0) named_barrier_arrive(kTurnBarrier, kConsumers * 128);

  for (int t = 0; t < n_tiles; ++t) {
    const int stage = t % kStages;
    mbar_wait(&full[stage], (t / kStages) & 1);

    named_barrier_sync(kTurnBarrier + cwg, kConsumers * 128);
    float s[kTileN / 8][4];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) Wgmma<Elem>::ss_n64(s, q_desc(kk), k_desc(stage, kk), kk > 0);
    wgmma_commit();
    if (t > 0) pv(o, p_prev, (t - 1) % kStages);
    wgmma_commit();
    if (cwg == 0 || t + 1 < n_tiles) named_barrier_arrive(kTurnBarrier + (1 - cwg), kConsumers * 128);
    wgmma_wait<1>();  // S done; P.V of tile t - 1 may still run
    fence_regs(s);

    float tile_max[2] = {-CUDART_INF_F, -CUDART_INF_F};
    if (t < n_win) {
      const int j0 = w0 + t * kTileN;
      if (!(j0 + kTileN - 1 <= i0 && j0 > i1 - 1 - W)) {
#pragma unroll
        for (int nb = 0; nb < kTileN / 8; ++nb) {
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int behind = qi[c >> 1] - (j0 + 8 * nb + 2 * quad + (c & 1));  // i - j
            if (static_cast<unsigned>(behind) >= static_cast<unsigned>(W)) s[nb][c] = -CUDART_INF_F;
          }
        }
      }
#pragma unroll
      for (int nb = 0; nb < kTileN / 8; ++nb) {
#pragma unroll
        for (int c = 0; c < 4; ++c) tile_max[c >> 1] = fmaxf(tile_max[c >> 1], s[nb][c]);
      }
    } else {
      const int* start = sStart + stage * kTileN;
      const int* end = sEnd + stage * kTileN;
      const float* u = sU + stage * kTileN;
#pragma unroll
      for (int nb = 0; nb < kTileN / 8; ++nb) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = 8 * nb + 2 * quad + e;
          const int start_j = start[col], end_j = end[col];
          const float u_j = u[col];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int i = qi[h];
            if (!(start_j <= i && i < end_j)) s[nb][2 * h + e] = -CUDART_INF_F;
            gate[nb][2 * h + e] = __saturatef(u_j - tau_row[h]);
            tile_max[h] = fmaxf(tile_max[h], s[nb][2 * h + e]);
          }
        }
      }
    }
    float alpha[2], m_scaled[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
      const float m_new = fmaxf(m_run[h], tile_max[h] * p.scale_log2);
      const float m_use = m_new == -CUDART_INF_F ? 0.f : m_new;
      alpha[h] = exp2f(m_run[h] - m_use);
      m_run[h] = m_new;
      m_scaled[h] = -m_use;
    }
    float row_sum[2] = {0.f, 0.f};
    const bool gated = t >= n_win;
#pragma unroll
    for (int nb = 0; nb < kTileN / 8; ++nb) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int h = c >> 1;
        float w = exp2f(fmaf(s[nb][c], p.scale_log2, m_scaled[h]));
        if (gated) w *= gate[nb][c];
        s[nb][c] = w;
        row_sum[h] += w;
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) l_run[h] = l_run[h] * alpha[h] + row_sum[h];

    wgmma_wait<0>();  // P.V of tile t - 1 done: O and p_prev are free, and so is its stage
    fence_regs(o);
    fence_regs(p_prev);
    if (t > 0 && lane == 0) mbar_arrive(&empty[(t - 1) % kStages]);
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
      for (int nd = 0; nd < kDBlocks; ++nd) {
        o[nd][0] *= alpha[0];
        o[nd][1] *= alpha[0];
        o[nd][2] *= alpha[1];
        o[nd][3] *= alpha[1];
      }
    }
#pragma unroll
    for (int kk = 0; kk < kTileN / 16; ++kk) {
      p_prev[kk][0] = pack2<Elem>(s[2 * kk][0], s[2 * kk][1]);
      p_prev[kk][1] = pack2<Elem>(s[2 * kk][2], s[2 * kk][3]);
      p_prev[kk][2] = pack2<Elem>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      p_prev[kk][3] = pack2<Elem>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
  }
  if (n_tiles > 0) {
    wgmma_fence();
    pv(o, p_prev, (n_tiles - 1) % kStages);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(o);
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
  return launch_with_smem(attention_fwd_ws_kernel<kD, Elem>, dim3(p.n_blocks, p.batch * p.kv_heads), kThreads,
                          Traits<kD>::kSmemBytes, stream, p);
}

}  // namespace

cudaError_t launch_attention_fwd_ws(const AttnParams& p, int head_dim, cudaStream_t stream) {
  if (p.n_blocks == 0 || p.batch * p.kv_heads == 0) return cudaSuccess;
  if (head_dim == 128) return p.is_bf16 ? launch<128, __nv_bfloat16>(p, stream) : launch<128, __half>(p, stream);
  if (head_dim == 64) return p.is_bf16 ? launch<64, __nv_bfloat16>(p, stream) : launch<64, __half>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace sparsek
