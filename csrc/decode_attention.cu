// SparseK decode: attention of one new query per head over the K + W cache slots, with gates.
//
// Grid (num_splits, Hkv * head_chunks, B), 4 warps per CTA. A CTA takes one range of slots of one
// (batch, kv head) pair and up to 8 query heads of its GQA group; each warp walks 16-slot tiles
// of that range with tensor-core MMAs (m16n8k16, fp32 accumulate):
//
//   S   = Q K^T     A = Q   (16 rows: the group's heads, rows >= 8 zero), B = K^T (8 slots per MMA)
//   O^T += V^T P^T  A = V^T (16 dims per MMA), B = P^T (8 columns: the heads)
//
// The query heads are the N = 8 columns of the second MMA, so one MMA serves the whole group.
// No shared memory on the main path: every thread loads its fragments straight from global
// memory with 16-byte loads. That works because an MMA's contraction index may be permuted
// freely as long as both operands use the same permutation: Q and K use one permutation of the
// head dimension (so a thread's key fragment is whole 16-byte pieces of a row), V^T's rows (the
// output dims) another, undone when the output is written. V^T needs pairs of slots per 32-bit
// register, built with one byte-permute per register.
//
// Softmax in base 2 with the gate folded into the logit: x = scale*log2(e) * q.k + log2(g), g = 1
// on window slots and clip(u - tau, 0, 1) on candidate slots; an online max per head per warp.
// Warps combine through shared memory; with several splits the CTAs write unnormalised partial
// results and the last CTA of each (pair, head chunk) to finish combines them (flash-decoding),
// so one launch does it all.
//
// Which slots: the window ring [0, min(p + 1, window)) with the query's own key and value (from the
// inputs) in place of ring slot p % window, and the live candidate slots (all but the spare) among
// the first max(0, p + 1 - window). With window >= 1 this kernel runs first and lets the step's
// update start as soon as every CTA has read (p, tau, spare, status): the update writes only what
// this kernel no longer reads (csrc/decode_params.h). A row masked out by `active` (a free serving
// slot) attends nothing and writes zeros; the update leaves its state alone.

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include "decode_params.h"

namespace sparsek {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarps = kDecodeAttentionWarps;
constexpr int kThreads = kDecodeAttentionThreads;
constexpr int kHeads = kDecodeHeadsPerCta;  // N of the P.V MMA
constexpr int kTile = kDecodeTileSlots;     // K of the P.V MMA
constexpr int kElemsPerVec = 8;             // 16 bytes of fp16/bf16
constexpr int kThreadsPerHead = kThreads / kHeads;  // in the CTA combine
// Two CTAs per SM at <= 240 registers (registers are allocated per warp in units of 256) leave
// 4096 registers free: room for one CTA of the concurrent update (2 warps x 56 registers) on every
// SM from the start of the step. At 242 registers (what ptxas picks unbounded) only 2048 are left.
constexpr int kMaxRegisters = 240;
// Byte-permute selectors: low halves of two words (element 0 of each), high halves (element 1).
constexpr unsigned kLowHalves = 0x5410u;
constexpr unsigned kHighHalves = 0x7632u;

template <int kHeadDim>
struct DecodeTraits {
  static_assert(kHeadDim % 64 == 0, "head dim must be a multiple of 64");
  static constexpr int kKSteps = kHeadDim / 16;   // k-steps of Q.K^T (over dims)
  static constexpr int kKVecs = kHeadDim / 32;    // 16-byte pieces per key row per thread (4 threads a row)
  static constexpr int kVVecs = kHeadDim / 64;    // 16-byte pieces per value row per thread (8 threads a row)
  static constexpr int kMTiles = kHeadDim / 16;   // m-tiles of V^T.P^T (over dims)
  static constexpr int kCombineDims = kHeadDim / kThreadsPerHead;  // dims per thread in the combines
  static_assert(kCombineDims == 4 || kCombineDims == 8, "combine stores are 8 or 16 bytes");
};

__device__ __forceinline__ uint4 load_stream(const void* ptr) {
  // Each key/value byte is read once per step: keep it out of L1. volatile keeps the load after
  // griddepcontrol.wait.
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;  // i is a compile-time constant at every use
}

template <bool kIsBf16>
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  if constexpr (kIsBf16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// Two floats as one 32-bit register of the 16-bit type, `lo` in the low half (the lower MMA index).
template <bool kIsBf16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (kIsBf16) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

// Writes n = kCombineDims consecutive outputs as one 8- or 16-byte store.
template <bool kIsBf16, int kN>
__device__ __forceinline__ void store_row_piece(void* dst, const float (&x)[kN]) {
  uint32_t w[kN / 2];
#pragma unroll
  for (int i = 0; i < kN / 2; ++i) w[i] = pack2<kIsBf16>(x[2 * i], x[2 * i + 1]);
  if constexpr (kN == 8) {
    *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
  } else {
    *reinterpret_cast<uint2*>(dst) = make_uint2(w[0], w[1]);
  }
}

__device__ __forceinline__ void wait_for_update() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Under programmatic dependent launch this returns once the update kernel has completed and
  // its writes are visible; without it, it returns at once.
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void let_update_start() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // The update launched after this grid (window >= 1) may start once every CTA has been here.
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// What a CTA reads of its pair's state before the update may change it.
struct PairMeta {
  int pos;      // the query's position
  int spare;    // the candidate slot not in use
  float tau;    // rounded to the score dtype, as the reference computes the gates
  int poisoned;
  int inactive;  // a masked-out row: no slot is attended and the output is zeros
};

template <int kHeadDim, bool kIsBf16>
__global__ void __maxnreg__(kMaxRegisters) decode_attention_kernel(const DecodeAttentionParams p) {
  using Traits = DecodeTraits<kHeadDim>;
  using Elem = uint16_t;  // storage of one fp16/bf16 value; arithmetic happens in the MMAs and in fp32
  __shared__ float s_o[kWarps][kHeads][kHeadDim];
  __shared__ float s_m[kWarps][kHeads];
  __shared__ float s_l[kWarps][kHeads];
  __shared__ int s_is_last;
  __shared__ PairMeta s_meta;

  const int split = blockIdx.x;
  const int hkv = blockIdx.y / p.head_chunks, chunk = blockIdx.y % p.head_chunks;
  const int b = blockIdx.z;
  const int64_t pair = static_cast<int64_t>(b) * p.kv_heads + hkv;
  const int64_t work = pair * p.head_chunks + chunk;  // index of this (pair, head chunk)
  const int head0 = hkv * p.group + chunk * kHeads;    // first query head of this CTA
  const int nheads = min(kHeads, p.group - chunk * kHeads);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;  // MMA fragment coordinates: group row, thread in group

  // ---- Q as the A operand of S = Q K^T: row g = head g (rows 8..15 and heads >= nheads zero).
  // Thread t holds the 16-byte pieces 4i + t of its head's row; piece i serves k-steps 2i, 2i+1
  // (words 0,1 and 2,3), which fixes the head-dim permutation that the key loads repeat. ----
  uint32_t qa[Traits::kKSteps][2];
  {
    const Elem* q = static_cast<const Elem*>(p.q) + b * p.q_batch_stride + static_cast<int64_t>(head0 + g) * p.q_head_stride;
#pragma unroll
    for (int i = 0; i < Traits::kKVecs; ++i) {
      const uint4 v = g < nheads ? load_stream(q + (4 * i + t) * kElemsPerVec) : make_uint4(0, 0, 0, 0);
      qa[2 * i][0] = v.x;
      qa[2 * i][1] = v.y;
      qa[2 * i + 1][0] = v.z;
      qa[2 * i + 1][1] = v.w;
    }
  }

  wait_for_update();  // window == 0 only; returns at once otherwise

  // Thread 0 reads the pair's state and stores it to shared memory: the store waits for the loads,
  // and the barrier after it for the store, so no CTA lets the update start before its values are
  // in hand (waiting only for the loads to be issued would not be enough).
  if (tid == 0) {
    const int len = p.lengths[pair];
    const float unew = p.token.score[pair];
    const int code = p.status[pair * 2];
    PairMeta m;
    m.pos = p.after_update ? len - 1 : len;
    m.spare = p.spare[pair];
    m.tau = static_cast<float>(p.tau[pair]);
    m.inactive = p.active != nullptr && !p.active[b];
    // A poisoned pair (overflow, non-finite score: see status codes) answers NaN, never a guess.
    // Beside the update, this step's own bad score has not reached the status yet: check it here.
    // A masked-out row's score is not an input (it may hold NaN), and its output is zeros.
    m.poisoned = !m.inactive && (code != kDecodeOk || !isfinite(unew) || len == INT32_MAX);
    s_meta = m;
  }
  __syncthreads();
  let_update_start();
  const PairMeta meta = s_meta;

  const int K = p.topk, W = p.window;
  // valid slots: [0, nvalid) except the spare; the window ring fills first, then the candidates
  const int nvalid = meta.inactive ? 0 : meta.pos < W ? meta.pos + 1 : W + min(meta.pos - W + 1, K + 1);
  const int spare_slot = W + meta.spare;
  const int own_slot = W > 0 ? meta.pos % W : -1;  // the query's own key replaces this ring slot
  const int s_begin = split * p.slots_per_split;
  const int s_end = min(s_begin + p.slots_per_split, nvalid);
  const float tau = meta.tau;
  const float* slot_score = p.slot_score + pair * (K + 1);
  const int64_t cache_offset = pair * p.num_slots * kHeadDim;
  const Elem* k_cache = static_cast<const Elem*>(p.k_slots) + cache_offset;
  const Elem* v_cache = static_cast<const Elem*>(p.v_slots) + cache_offset;
  const Elem* k_own = p.token.k_row(b, hkv);
  const Elem* v_own = p.token.v_row(b, hkv);
  auto valid = [&](int slot) { return slot < s_end && slot != spare_slot; };
  auto k_row = [&](int slot) { return slot == own_slot ? k_own : k_cache + slot * kHeadDim; };
  auto v_row = [&](int slot) { return slot == own_slot ? v_own : v_cache + slot * kHeadDim; };

  float row_max = -CUDART_INF_F;  // running max of head g (same in the 4 threads of group g)
  float row_sum = 0.0f;           // this thread's part of head g's softmax denominator
  float o[Traits::kMTiles][4];    // O^T: dims x heads; c0,c2 -> head 2t, c1,c3 -> head 2t+1
#pragma unroll
  for (int mt = 0; mt < Traits::kMTiles; ++mt) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.0f;

  // One tile's operands in registers: key rows t0 + 8j + g (pieces 4i + t), value rows
  // t0 + {2t, 2t+1, 2t+8, 2t+9} (pieces 8i + g), scores of the logit slots t0 + 8j + 2t + e.
  struct TileRegs {
    uint4 kr[2][Traits::kKVecs];
    uint4 vr[4][Traits::kVVecs];
    float u[2][2];
  };
  auto fetch = [&](int t0, TileRegs& r) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int slot = t0 + 8 * j + g;
      const bool ok = valid(slot);
      const Elem* row = k_row(slot);
#pragma unroll
      for (int i = 0; i < Traits::kKVecs; ++i)
        r.kr[j][i] = ok ? load_stream(row + (4 * i + t) * kElemsPerVec) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      // masked slots load zeros: P is 0 there, and 0 * (a row the update is rewriting) must stay 0
      const int slot = t0 + 2 * t + (q & 1) + 8 * (q >> 1);
      const bool ok = valid(slot);
      const Elem* row = v_row(slot);
#pragma unroll
      for (int i = 0; i < Traits::kVVecs; ++i)
        r.vr[q][i] = ok ? load_stream(row + (8 * i + g) * kElemsPerVec) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int slot = t0 + 8 * j + 2 * t + e;
        r.u[j][e] = (slot >= W && valid(slot)) ? slot_score[slot - W] : 0.0f;
      }
  };

  // Double-buffered: the next tile's loads are in flight while this one computes, so each warp
  // keeps its share of the DRAM pipe busy instead of alternating between loading and math.
  TileRegs cur, nxt;
  if (s_begin + warp * kTile < s_end) fetch(s_begin + warp * kTile, cur);
  for (int t0 = s_begin + warp * kTile; t0 < s_end; t0 += kWarps * kTile) {
    if (t0 + kWarps * kTile < s_end) fetch(t0 + kWarps * kTile, nxt);
    const auto& kr = cur.kr;
    const auto& vr = cur.vr;
    const auto& u = cur.u;

    // ---- S = Q K^T for 16 slots: two n-tiles of 8 ----
    float s[2][4];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < Traits::kKSteps; ++kk)
        mma_16816<kIsBf16>(s[j], qa[kk][0], 0u, qa[kk][1], 0u, word(kr[j][kk / 2], 2 * (kk % 2)),
                           word(kr[j][kk / 2], 2 * (kk % 2) + 1));
    }

    // ---- gated logits in base 2 and the online softmax of head g ----
    float x[2][2];
    float tile_max = -CUDART_INF_F;
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int slot = t0 + 8 * j + 2 * t + e;
        float log2_gate = 0.0f;  // window slot: gate 1
        if (slot >= W) {
          // u - tau is +inf while tau = -inf (every candidate selected): gate 1
          const float gate = fminf(fmaxf(u[j][e] - tau, 0.0f), 1.0f);
          log2_gate = gate > 0.0f ? __log2f(gate) : -CUDART_INF_F;
        }
        // select, not add: a masked slot's logit must not see the (zero-filled) key
        x[j][e] = valid(slot) ? fmaf(s[j][e], p.scale_log2, log2_gate) : -CUDART_INF_F;
        tile_max = fmaxf(tile_max, x[j][e]);
      }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 2));
    const float new_max = fmaxf(row_max, tile_max);
    const float ref_max = new_max == -CUDART_INF_F ? 0.0f : new_max;  // all masked so far: avoid inf - inf
    const float alpha = exp2f(row_max - ref_max);
    float pr[2][2];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) pr[j][e] = exp2f(x[j][e] - ref_max);
    row_sum = row_sum * alpha + (pr[0][0] + pr[0][1]) + (pr[1][0] + pr[1][1]);
    row_max = new_max;
    // P^T as the B operand: k = slots 2t, 2t+1 (n-tile 0) and 2t+8, 2t+9 (n-tile 1), n = head g
    const uint32_t pb0 = pack2<kIsBf16>(pr[0][0], pr[0][1]);
    const uint32_t pb1 = pack2<kIsBf16>(pr[1][0], pr[1][1]);

    // ---- O^T += V^T P^T; O's columns 2t, 2t+1 are heads whose max lives in lane groups 2t, 2t+1 ----
    const float alpha_even = __shfl_sync(kFullMask, alpha, 8 * t);
    const float alpha_odd = __shfl_sync(kFullMask, alpha, 8 * t + 4);
#pragma unroll
    for (int mt = 0; mt < Traits::kMTiles; ++mt) {
      o[mt][0] *= alpha_even;
      o[mt][1] *= alpha_odd;
      o[mt][2] *= alpha_even;
      o[mt][3] *= alpha_odd;
      // m-tile mt = rows (dims) of word w of value piece i: row g -> element 0, row g + 8 -> element 1
      const int i = mt / 4, w = mt % 4;
      const uint32_t v0 = word(vr[0][i], w), v1 = word(vr[1][i], w);
      const uint32_t v2 = word(vr[2][i], w), v3 = word(vr[3][i], w);
      mma_16816<kIsBf16>(o[mt], __byte_perm(v0, v1, kLowHalves), __byte_perm(v0, v1, kHighHalves),
                         __byte_perm(v2, v3, kLowHalves), __byte_perm(v2, v3, kHighHalves), pb0, pb1);
    }
    cur = nxt;
  }

  // ---- combine the 4 warps ----
  row_sum += __shfl_xor_sync(kFullMask, row_sum, 1);
  row_sum += __shfl_xor_sync(kFullMask, row_sum, 2);
  if (t == 0) {
    s_m[warp][g] = row_max;
    s_l[warp][g] = row_sum;
  }
#pragma unroll
  for (int mt = 0; mt < Traits::kMTiles; ++mt) {
    const int i = mt / 4, w = mt % 4;
    const int d = (8 * i + g) * kElemsPerVec + 2 * w;  // physical dim of row g; row g + 8 is d + 1
    *reinterpret_cast<float2*>(&s_o[warp][2 * t][d]) = make_float2(o[mt][0], o[mt][2]);
    *reinterpret_cast<float2*>(&s_o[warp][2 * t + 1][d]) = make_float2(o[mt][1], o[mt][3]);
  }
  __syncthreads();

  constexpr int kDims = Traits::kCombineDims;
  const int head = tid / kThreadsPerHead;              // head of the CTA this thread combines
  const int d0 = (tid % kThreadsPerHead) * kDims;      // its dims [d0, d0 + kDims)
  float cta_max = -CUDART_INF_F;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) cta_max = fmaxf(cta_max, s_m[w][head]);
  const float cta_ref = cta_max == -CUDART_INF_F ? 0.0f : cta_max;
  float cta_sum = 0.0f;
  float acc[kDims];
#pragma unroll
  for (int d = 0; d < kDims; ++d) acc[d] = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const float scale = exp2f(s_m[w][head] - cta_ref);
    cta_sum += scale * s_l[w][head];
#pragma unroll
    for (int d = 0; d < kDims; ++d) acc[d] += scale * s_o[w][head][d0 + d];
  }

  const bool poisoned = meta.poisoned;
  const bool inactive = meta.inactive;  // nothing attended: the sums are 0 and the output is 0
  Elem* out_row = static_cast<Elem*>(p.out) + b * p.out_batch_stride + static_cast<int64_t>(head0 + head) * p.out_head_stride + d0;
  if (p.num_splits == 1) {
    if (head < nheads) {
      const float inv = poisoned ? CUDART_NAN_F : inactive ? 0.0f : 1.0f / cta_sum;
#pragma unroll
      for (int d = 0; d < kDims; ++d) acc[d] *= inv;
      store_row_piece<kIsBf16, kDims>(out_row, acc);
    }
    return;
  }

  // ---- split-K: publish this CTA's partial; the last CTA of the work item combines ----
  const int64_t part = (work * p.num_splits + split) * kHeads + head;
  float* o_part = p.o_part + part * kHeadDim + d0;
#pragma unroll
  for (int d = 0; d < kDims; d += 4) *reinterpret_cast<float4*>(o_part + d) = make_float4(acc[d], acc[d + 1], acc[d + 2], acc[d + 3]);
  if (tid % kThreadsPerHead == 0) *reinterpret_cast<float2*>(p.ml_part + part * 2) = make_float2(cta_max, cta_sum);
  __threadfence();  // partials visible device-wide before the counter says so
  __syncthreads();
  if (tid == 0) s_is_last = atomicAdd(&p.counters[work], 1) == p.num_splits - 1;
  __syncthreads();
  if (!s_is_last) return;
  __threadfence();  // the other CTAs' partials are read after their counter increments

  const int64_t first = work * p.num_splits * kHeads + head;  // part index of split 0
  float all_max = -CUDART_INF_F;
  for (int sp = 0; sp < p.num_splits; ++sp) all_max = fmaxf(all_max, __ldcg(p.ml_part + (first + sp * kHeads) * 2));
  const float all_ref = all_max == -CUDART_INF_F ? 0.0f : all_max;
  float all_sum = 0.0f;
#pragma unroll
  for (int d = 0; d < kDims; ++d) acc[d] = 0.0f;
#pragma unroll 4
  for (int sp = 0; sp < p.num_splits; ++sp) {
    const int64_t idx = first + sp * kHeads;
    const float2 ml = __ldcg(reinterpret_cast<const float2*>(p.ml_part + idx * 2));
    const float scale = exp2f(ml.x - all_ref);
    all_sum += scale * ml.y;
    const float* src = p.o_part + idx * kHeadDim + d0;
#pragma unroll
    for (int d = 0; d < kDims; d += 4) {
      const float4 v = __ldcg(reinterpret_cast<const float4*>(src + d));
      acc[d] += scale * v.x;
      acc[d + 1] += scale * v.y;
      acc[d + 2] += scale * v.z;
      acc[d + 3] += scale * v.w;
    }
  }
  if (head < nheads) {
    const float inv = poisoned ? CUDART_NAN_F : inactive ? 0.0f : 1.0f / all_sum;
#pragma unroll
    for (int d = 0; d < kDims; ++d) acc[d] *= inv;
    store_row_piece<kIsBf16, kDims>(out_row, acc);
  }
  if (tid == 0) p.counters[work] = 0;  // ready for the next launch (stream order)
}

template <int kHeadDim, bool kIsBf16>
cudaError_t launch_typed(const DecodeAttentionParams& params, cudaStream_t stream) {
  // The SM's split between L1 and shared memory follows the kernels resident on it; the update that
  // runs beside this kernel needs room to join it mid-step (kDecodeSharedCarveout has the figures).
  static const cudaError_t carveout = cudaFuncSetAttribute(
      decode_attention_kernel<kHeadDim, kIsBf16>, cudaFuncAttributePreferredSharedMemoryCarveout, kDecodeSharedCarveout);
  if (carveout != cudaSuccess) return carveout;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(params.num_splits, params.kv_heads * params.head_chunks, params.batch);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = params.after_update ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&config, decode_attention_kernel<kHeadDim, kIsBf16>, params);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

template <int kHeadDim, bool kIsBf16>
int ctas_per_sm_typed() {
  int ctas = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, decode_attention_kernel<kHeadDim, kIsBf16>, kThreads, 0) != cudaSuccess)
    return 1;
  return ctas > 0 ? ctas : 1;
}

}  // namespace

cudaError_t launch_decode_attention(const DecodeAttentionParams& params, cudaStream_t stream) {
  if (params.head_dim == 128) {
    return params.is_bf16 ? launch_typed<128, true>(params, stream) : launch_typed<128, false>(params, stream);
  }
  if (params.head_dim == 64) {
    return params.is_bf16 ? launch_typed<64, true>(params, stream) : launch_typed<64, false>(params, stream);
  }
  return cudaErrorInvalidValue;  // the binding admits only 64 and 128
}

int decode_attention_ctas_per_sm(int head_dim, bool is_bf16) {
  if (head_dim == 128) return is_bf16 ? ctas_per_sm_typed<128, true>() : ctas_per_sm_typed<128, false>();
  if (head_dim == 64) return is_bf16 ? ctas_per_sm_typed<64, true>() : ctas_per_sm_typed<64, false>();
  return 1;
}

}  // namespace sparsek
