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
#include "fwd_tile.h"
#include "tile_plan.h"
#include "wgmma.h"

namespace sparsek {
namespace {

constexpr int kRows = kAttnRows;  // rows (query x head) per CTA
constexpr int kWgRows = 64;       // rows per consumer warpgroup: the M of wgmma
constexpr int kConsumers = kRows / kWgRows;
constexpr int kThreads = (kConsumers + 1) * 128;  // one producer warpgroup, then the consumers
constexpr int kTileN = kFwdTileN;  // keys per tile
constexpr int kStages = 4;        // ring slots
// setmaxnreg: the producer needs addresses and a key index, the consumers v5's ~190 registers.
// Launched with 384 threads at most 168 each; after the change 128 x 56 + 256 x 224 = 64,512 of
// the SM's 65,536.
constexpr int kProducerRegs = 56;
constexpr int kConsumerRegs = 224;
static_assert(128 * kProducerRegs + kConsumers * 128 * kConsumerRegs <= 65536, "register file");
constexpr int kTurnBarrier = 1;  // named barriers kTurnBarrier + c: consumer c's turn to issue (0 is __syncthreads)
constexpr int kQBarrier = kTurnBarrier + kConsumers;  // the consumers, once Q has landed

template <int kD>
struct Traits {
  static constexpr int kChunks = kD / 8;                   // 16-byte chunks per row
  static constexpr int kLoadersPerRow = 128 / kTileN;      // producer threads that copy one key row
  static constexpr int kChunksPerThread = kChunks / kLoadersPerRow;
  static constexpr int kTileElems = kTileN * kD;
  static constexpr int kKeyDataBytes = kStages * kTileN * (2 * sizeof(int) + sizeof(float));
  static constexpr int kSmemBytes = kAlign + (kRows * kD + 2 * kStages * kTileElems) * 2 + kKeyDataBytes + 2 * kStages * 8;
};

template <int kD, typename Elem>
__global__ void __launch_bounds__(kThreads, 1) attention_fwd_ws_kernel(const AttnParams p) {
  using T = Traits<kD>;
  constexpr int kDBlocks = kD / 8;  // n8 blocks of the output
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

  // ---- prologue: the consumers start copying Q rows (zero beyond S); thread 0 makes the barriers.
  // Q is waited for only by the consumers, just before their first tile, so its copy overlaps the
  // producer's first tiles instead of preceding them (a block at seed has only ~14 tiles).
  if (tid >= 128) {
    for (int c = tid - 128; c < kRows * T::kChunks; c += kConsumers * 128) {
      const int r = c / T::kChunks, ch = c % T::kChunks;
      const int i = i0 + r % p.block_q, head = hkv * p.group + r / p.block_q;
      const bool ok = i < S;
      const Elem* src = q_base + head * p.q_head_stride + (int64_t)(ok ? i : 0) * p.q_row_stride + ch * 8;
      cp_async16(smem_addr(sQ + sw128<kRows>(r, ch)), src, ok);
    }
    cp_async_commit();
  }
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 128);               // every producer thread, once its copies landed
      mbar_init(&empty[s], kConsumers * 128); // every consumer thread, once its P.V of the tile completed
    }
  }
  __syncthreads();

  // The warpgroup's role, read through a shuffle so that ptxas knows it is the same in every
  // lane of a warp: with `tid < 128` as the role branch, ptxas treated the consumers' code as a
  // divergent path, inserted its own warpgroup.arrive there and serialised every wgmma behind a
  // wait (its warning C7520; the SASS had a `WARPGROUP.DEPBAR.LE gsb0, 0x0` after each HGMMA,
  // which took away v4's overlap of P.V with the softmax and the k-steps' pipelining).
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);
  if (wg == 0) {
    // ---- producer ----
    regs_lower<kProducerRegs>();
    const Elem* k_base = static_cast<const Elem*>(p.k) + b * p.k_batch_stride + hkv * p.k_head_stride;
    const Elem* v_base = static_cast<const Elem*>(p.v) + b * p.v_batch_stride + hkv * p.v_head_stride;
    const float* scores = p.scores + (size_t)bh * S;
    const int* ends = p.end + (size_t)bh * S;
    const int my_row = tid / T::kLoadersPerRow, my_part = tid % T::kLoadersPerRow;
    const uint32_t k_addr = smem_addr(sK), v_addr = smem_addr(sV);
    // The two threads of a key row take alternate 16-byte chunks (my_part, my_part + 2, ...), so
    // each copy instruction reads 32 contiguous bytes of a row: one 128-byte line per row. With
    // contiguous halves (v7's first layout, v5's) it read 16 bytes from each of the row's two
    // lines, and ncu showed L2 throughput at 86% against v5's 50% (same bytes, twice the requests).
    uint32_t piece_off[T::kChunksPerThread];  // byte offset of my piece c within a tile
#pragma unroll
    for (int c = 0; c < T::kChunksPerThread; ++c) piece_off[c] = 2 * sw128<kTileN>(my_row, my_part + c * T::kLoadersPerRow);
    int key = plan.key(0, my_row);
    for (int t = 0; t < n_tiles; ++t) {
      const int stage = t % kStages;
      if (t >= kStages) mbar_wait(&empty[stage], ((t / kStages) - 1) & 1);  // tile t - 4's P.V done
      gather_key_row<T::kLoadersPerRow>(p, k_base, v_base, ends, scores, piece_off, k_addr + stage * kTileBytes,
                                        v_addr + stage * kTileBytes, my_part, key, t >= n_win, sStart, sEnd, sU,
                                        stage * kTileN + my_row);
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
  const int cwg = wg - 1;                  // consumer warpgroup: rows 64 cwg .. 64 cwg + 63
  const int cwarp = (tid - 128) >> 5;      // consumer warp: rows 16 cwarp .. 16 cwarp + 15
  const int quad = lane & 3;
  const int r_lo = cwarp * 16 + (lane >> 2);
  const FwdRows rows(p, r_lo, i0, hkv, bh);
  const int w0 = plan.w0;

  const FwdOperands<kD, Elem, kRows, /*kDescAdd=*/true> operands(sQ, sK, sV, cwg);

  float o[kDBlocks][4];
#pragma unroll
  for (int nd = 0; nd < kDBlocks; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
  float m_run[2] = {-CUDART_INF_F, -CUDART_INF_F};
  float l_run[2] = {0.f, 0.f};
  uint32_t p_prev[kTileN / 16][4];
  float gate[kTileN / 8][4];

  // Q has landed: each consumer thread waits for its own copies and fences them for the async
  // proxy, then both consumer warpgroups meet (the producer does not take part).
  cp_async_wait<0>();
  fence_proxy_async();
  named_barrier_sync(kQBarrier, kConsumers * 128);

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
    operands.qk(s, stage);
    wgmma_commit();
    if (t > 0) operands.pv(o, p_prev, (t - 1) % kStages);
    wgmma_commit();
    if (cwg == 0 || t + 1 < n_tiles) named_barrier_arrive(kTurnBarrier + (1 - cwg), kConsumers * 128);
    wgmma_wait<1>();  // S done; P.V of tile t - 1 may still run
    fence_regs(s);

    float alpha[2];
    tile_softmax</*kPairLoads=*/true>(s, gate, m_run, l_run, alpha, rows, t < n_win, w0 + t * kTileN, i0, i1, W,
                                      sStart + stage * kTileN, sEnd + stage * kTileN, sU + stage * kTileN, quad,
                                      p.scale_log2);

    wgmma_wait<0>();  // P.V of tile t - 1 done: O and p_prev are free, and so is its stage
    fence_regs(o);
    fence_regs(p_prev);
    // Every consumer thread arrives, not one lane per warp: an arrival releases only the arriving
    // thread's own reads of the stage (its sStart/sEnd/sU loads in the softmax), so with one lane
    // the other lanes' reads were unordered against the producer's refill (compute-sanitizer's
    // racecheck flags it once the ring wraps; seen on the persistent v8, which had the same line).
    if (t > 0) mbar_arrive(&empty[(t - 1) % kStages]);
    rescale_out(o, alpha);
    pack_p<Elem>(p_prev, s);
  }
  if (n_tiles > 0) operands.last_pv(o, p_prev, (n_tiles - 1) % kStages);

  write_rows<kD, Elem>(p, o, l_run, m_run, rows, b, quad);
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
