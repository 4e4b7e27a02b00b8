// SparseK forward attention for sm_90a: one CTA per (batch, kv head, query block), warpgroup MMA.
//
// The CTA's 128 rows are (query head of the GQA group) x (query of the block): the heads of a
// group share one selection, so they share every K/V tile. Each of the two warpgroups owns 64
// rows, the M of one wgmma. Each CTA iterates
//   1. window tiles: the contiguous keys (i0 - window, i1) that some row's window covers,
//   2. list tiles:   the block's union of selected keys (from the selection kernels),
// 64 keys per tile, gathered row by row with cp.async (TMA cannot gather rows) into shared memory
// laid out as wgmma's 128-byte-swizzled operands, in a ring of four: tiles t+1 and t+2 in flight,
// t in the softmax, t-1 in P V. S = Q K^T reads Q and K from shared memory; O += P V takes P from
// registers and V from shared memory (MN-major, the transpose flag). The P V of tile t-1 runs on
// the tensor cores while tile t's softmax runs on the ALUs (docs/perf-notes.md, v4).
// Per element a mask decides membership (window: i - W < j <= i; selected: j + W <= i < end_j)
// and selected keys carry the gate g = clip(u_j - tau_i, 0, 1). The gate multiplies the softmax
// weight (exp(s) * g == exp(s + log g)), so no logarithm is evaluated; the running max is taken
// over the ungated logits, which is still an upper bound (g <= 1).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>
#include <type_traits>

#include "ptx.h"
#include "sparsek_params.h"
#include "fwd_tile.h"
#include "tile_plan.h"
#include "wgmma.h"

namespace sparsek {
namespace {

constexpr int kRows = kAttnRows;       // rows (query x head) per CTA
constexpr int kWgRows = 64;            // rows per warpgroup: the M of wgmma
constexpr int kWarpgroups = kRows / kWgRows;
constexpr int kThreads = kWarpgroups * 128;
constexpr int kTileN = kFwdTileN;      // keys per tile: the N of S = Q K^T, the K of O += P V
constexpr int kStages = 4;             // ring slots: tiles t+1, t+2 in flight, t in use, t-1 in P.V

template <int kD>
struct Traits {
  static constexpr int kChunks = kD / 8;                    // 16-byte chunks per row
  static constexpr int kLoadersPerRow = kThreads / kTileN;  // threads that copy one key row
  static constexpr int kChunksPerThread = kChunks / kLoadersPerRow;
  static constexpr int kTileElems = kTileN * kD;
  static constexpr int kSmemBytes =
      kAlign + (kRows * kD + 2 * kStages * kTileElems) * 2 + kStages * kTileN * (2 * sizeof(int) + sizeof(float));
};
static_assert(kThreads % kTileN == 0, "whole loader threads per key row");

template <int kD, typename Elem>
__global__ void __launch_bounds__(kThreads, 1) attention_fwd_kernel(const AttnParams p) {
  using T = Traits<kD>;
  constexpr int kDBlocks = kD / 8;      // n8 blocks of the output

  extern __shared__ unsigned char smem_raw[];
  // The swizzle is a function of the absolute shared address: start the operands on a 1024 B line.
  const uint32_t raw_addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  unsigned char* smem = smem_raw + ((kAlign - (raw_addr & (kAlign - 1))) & (kAlign - 1));
  Elem* sQ = reinterpret_cast<Elem*>(smem);
  Elem* sK = sQ + kRows * kD;
  Elem* sV = sK + kStages * T::kTileElems;
  int* sStart = reinterpret_cast<int*>(sV + kStages * T::kTileElems);  // [stage][key row]: j + W
  int* sEnd = sStart + kStages * kTileN;
  float* sU = reinterpret_cast<float*>(sEnd + kStages * kTileN);

  const int blk = blockIdx.x;
  const int bh = blockIdx.y;  // b * kv_heads + kv head
  const int b = bh / p.kv_heads, hkv = bh % p.kv_heads;
  const int S = p.seq_len, W = p.window;
  const int i0 = blk * p.block_q, i1 = min(S, i0 + p.block_q);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int quad = lane & 3;
  const int wg = warp / 4;

  const Elem* q_base = static_cast<const Elem*>(p.q) + b * p.q_batch_stride;
  const Elem* k_base = static_cast<const Elem*>(p.k) + b * p.k_batch_stride + hkv * p.k_head_stride;
  const Elem* v_base = static_cast<const Elem*>(p.v) + b * p.v_batch_stride + hkv * p.v_head_stride;
  const float* scores = p.scores + (size_t)bh * S;
  const int* ends = p.end + (size_t)bh * S;

  const TilePlan<kTileN> plan(p.block_keys, p.block_count, bh, blk, p.n_blocks, p.cap, i0, i1, W);
  const int w0 = plan.w0, n_win = plan.n_win, n_tiles = plan.n_tiles;

  // Loader role: kLoadersPerRow consecutive threads copy key row r of every tile, each the same
  // kChunksPerThread consecutive 16-byte pieces; their swizzled places in a tile never change.
  const int my_row = tid / T::kLoadersPerRow, my_part = tid % T::kLoadersPerRow;
  constexpr uint32_t kTileBytes = T::kTileElems * 2;
  const uint32_t k_addr = smem_addr(sK), v_addr = smem_addr(sV);
  uint32_t piece_off[T::kChunksPerThread];  // byte offset of my piece c within a tile
#pragma unroll
  for (int c = 0; c < T::kChunksPerThread; ++c) piece_off[c] = 2 * sw128<kTileN>(my_row, my_part * T::kChunksPerThread + c);
  auto tile_key = [&](int t) { return plan.key(t, my_row); };
  auto load_tile = [&](int t, int stage, int j) {
    gather_key_row<1>(p, k_base, v_base, ends, scores, piece_off, k_addr + stage * kTileBytes, v_addr + stage * kTileBytes,
                      my_part * T::kChunksPerThread, j, t >= n_win, sStart, sEnd, sU, stage * kTileN + my_row);
  };

  // ---- prologue: Q rows (zero beyond S) with tile 0, then tile 1 ----
  for (int c = tid; c < kRows * T::kChunks; c += kThreads) {
    const int r = c / T::kChunks, ch = c % T::kChunks;
    const int i = i0 + r % p.block_q, head = hkv * p.group + r / p.block_q;
    const bool ok = i < S;
    const Elem* src = q_base + head * p.q_head_stride + (int64_t)(ok ? i : 0) * p.q_row_stride + ch * 8;
    cp_async16(smem_addr(sQ + sw128<kRows>(r, ch)), src, ok);
  }
  if (n_tiles > 0) load_tile(0, 0, tile_key(0));
  cp_async_commit();
  if (n_tiles > 1) load_tile(1, 1, tile_key(1));
  cp_async_commit();
  int key_next = tile_key(2);
  float gate[kTileN / 8][4];  // gates of the current list tile

  // Per-thread rows (wgmma accumulator layout): warp w of the CTA holds rows 16w .. 16w + 15;
  // this thread rows r_lo = 16w + lane/4 and r_lo + 8.
  const int r_lo = warp * 16 + (lane >> 2);
  const FwdRows rows(p, r_lo, i0, hkv, bh);

  const FwdOperands<kD, Elem, kRows> operands(sQ, sK, sV, wg);

  float o[kDBlocks][4];
#pragma unroll
  for (int nd = 0; nd < kDBlocks; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
  float m_run[2] = {-CUDART_INF_F, -CUDART_INF_F};
  float l_run[2] = {0.f, 0.f};
  // P of the previous tile in the A-fragment layout of O += P V (a k-step of 16 keys is two n8
  // blocks of S). Its P.V runs on the tensor cores while this tile's softmax runs on the ALUs.
  uint32_t p_prev[kTileN / 16][4];

  for (int t = 0; t < n_tiles; ++t) {
    const int stage = t % kStages;
    cp_async_wait<1>();  // tile t (and Q) has landed; tile t + 1 may still be in flight
    fence_proxy_async();
    // Also the barrier before refilling: the stage loaded below held tile t - 2, whose P.V
    // every warpgroup waited for in iteration t - 1.
    __syncthreads();
    if (t + 2 < n_tiles) load_tile(t + 2, (t + 2) % kStages, key_next);
    cp_async_commit();  // possibly empty: keeps the group count uniform
    key_next = tile_key(t + 3);

    // S = Q K^T for this warpgroup's 64 rows x 64 keys, then O += P V of the previous tile.
    float s[kTileN / 8][4];
    wgmma_fence();
    operands.qk(s, stage);
    wgmma_commit();
    if (t > 0) operands.pv(o, p_prev, (t - 1) % kStages);
    wgmma_commit();
    wgmma_wait<1>();  // S done; P.V of tile t - 1 may still run
    fence_regs(s);

    // Mask, gate, online softmax. Each row lives in the 4 threads of a quad. Masking works on the
    // raw logits (scale > 0 keeps the max where it is); the scale and the log2(e) of the base-2
    // exponent are applied once, in the FFMA that feeds exp2.
    float alpha[2];
    tile_softmax(s, gate, m_run, l_run, alpha, rows, t < n_win, w0 + t * kTileN, i0, i1, W, sStart + stage * kTileN,
                 sEnd + stage * kTileN, sU + stage * kTileN, quad, p.scale_log2);

    wgmma_wait<0>();  // P.V of tile t - 1 done: O and p_prev are free
    fence_regs(o);
    fence_regs(p_prev);
    rescale_out(o, alpha);
    pack_p<Elem>(p_prev, s);
  }
  if (n_tiles > 0) operands.last_pv(o, p_prev, (n_tiles - 1) % kStages);

  write_rows<kD, Elem>(p, o, l_run, m_run, rows, b, quad);
}

template <int kD, typename Elem>
cudaError_t launch(const AttnParams& p, cudaStream_t stream) {
  return launch_with_smem(attention_fwd_kernel<kD, Elem>, dim3(p.n_blocks, p.batch * p.kv_heads), kThreads, Traits<kD>::kSmemBytes,
                          stream, p);
}

}  // namespace

cudaError_t launch_attention_fwd(const AttnParams& p, int head_dim, cudaStream_t stream) {
  if (p.n_blocks == 0 || p.batch * p.kv_heads == 0) return cudaSuccess;
  if (head_dim == 128) return p.is_bf16 ? launch<128, __nv_bfloat16>(p, stream) : launch<128, __half>(p, stream);
  if (head_dim == 64) return p.is_bf16 ? launch<64, __nv_bfloat16>(p, stream) : launch<64, __half>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace sparsek
