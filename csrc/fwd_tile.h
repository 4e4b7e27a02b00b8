// The per-tile work of the forward attention kernels' softmax warps, shared by v5
// (attention_fwd.cu) and the warp-specialised v7 (attention_fwd_ws.cu): which rows a thread
// holds, the masks and gates of a tile, the online softmax, the rescale of O, P packed as the A
// operand of O += P V, and the epilogue. Each thread holds two rows of the wgmma accumulator
// layout (r_lo and r_lo + 8) and, per row, 2 of every 8 columns of S.
#pragma once

#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>

#include "ptx.h"
#include "sparsek_params.h"
#include "wgmma.h"

namespace sparsek {

constexpr int kFwdTileN = 64;  // keys per tile: the N of S = Q K^T, the K of O += P V

// One softmax warpgroup's wgmma operands in shared memory: its 64 rows of Q (of kRows), and the
// K and V tiles of the stage ring. Q and K are K-major (a row's D elements contiguous): 8-row
// groups 1024 B apart (stride), the leading offset unused under the 128-byte swizzle; a k-step of
// 16 elements advances 32 B within a panel. V is MN-major for O += P V (keys are its K): 8-key
// groups 1024 B apart (stride), the 64-column panels of D a tile's panel apart (leading).
//
// kDescAdd: build each k-step's descriptor by adding its byte offset / 16 to the low word of one
// base descriptor per operand, instead of masking and shifting the address again for every
// k-step. Exact because shared-memory addresses stay below 2^18, so the 14-bit start-address
// field never carries into the fields above it. (v7 uses it; v5 keeps the per-k-step form until
// the two have been timed against each other on a GPU.)
template <int kD, typename Elem, int kRows, bool kDescAdd = false>
struct FwdOperands {
  static constexpr uint32_t kPanelBytes = kPanel * 2;
  static constexpr uint32_t kGroupBytes = 8 * kPanelBytes;
  static constexpr uint32_t kTilePanelBytes = kFwdTileN * kPanelBytes;
  static constexpr uint32_t kTileBytes = kFwdTileN * kD * 2;
  uint32_t q_addr, k_addr, v_addr;

  __device__ __forceinline__ FwdOperands(const Elem* sQ, const Elem* sK, const Elem* sV, int wg)
      : q_addr(smem_addr(sQ) + wg * 64 * kPanelBytes), k_addr(smem_addr(sK)), v_addr(smem_addr(sV)) {}

  // The descriptor of `base` + `offset` bytes (offset a multiple of 16).
  static __device__ __forceinline__ uint64_t at(uint32_t base, uint32_t offset, uint32_t lead, uint32_t stride) {
    if constexpr (kDescAdd) {
      const uint64_t d = smem_desc(base, lead, stride);
      const uint32_t lo = static_cast<uint32_t>(d) + (offset >> 4);
      return (d & 0xFFFFFFFF00000000ull) | lo;
    } else {
      return smem_desc(base + offset, lead, stride);
    }
  }
  __device__ __forceinline__ uint64_t q(int kk) const {
    return at(q_addr, (kk / 4) * (kRows * kPanelBytes) + (kk % 4) * 32, 16, kGroupBytes);
  }
  __device__ __forceinline__ uint64_t k(int stage, int kk) const {
    return at(k_addr, stage * kTileBytes + (kk / 4) * kTilePanelBytes + (kk % 4) * 32, 16, kGroupBytes);
  }
  __device__ __forceinline__ uint64_t v(int stage, int kk) const {
    return at(v_addr, stage * kTileBytes + kk * 16 * kPanelBytes, kTilePanelBytes, kGroupBytes);
  }
  // S = Q K^T: this warpgroup's 64 rows x the 64 keys of the tile in `stage` (issued, not waited).
  __device__ __forceinline__ void qk(float (&s)[kFwdTileN / 8][4], int stage) const {
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) Wgmma<Elem>::ss_n64(s, q(kk), k(stage, kk), kk > 0);
  }
  // O += P V for the tile in `stage`, P (64 rows x 64 keys) in A-fragment registers.
  __device__ __forceinline__ void pv(float (&acc)[kD / 8][4], const uint32_t (&pa)[kFwdTileN / 16][4], int stage) const {
#pragma unroll
    for (int kk = 0; kk < kFwdTileN / 16; ++kk) {
      if constexpr (kD == 128) {
        Wgmma<Elem>::rs_n128(acc, pa[kk], v(stage, kk));
      } else {
        Wgmma<Elem>::rs_n64(acc, pa[kk], v(stage, kk));
      }
    }
  }
  // The last tile's O += P V, after the loop: issued and waited for.
  __device__ __forceinline__ void last_pv(float (&acc)[kD / 8][4], uint32_t (&pa)[kFwdTileN / 16][4], int stage) const {
    wgmma_fence();
    pv(acc, pa, stage);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(acc);
  }
};

// The gather of one key row into a stage of the ring, by the threads that share the row: this
// thread's kPieces 16-byte pieces of K and of V, the row's chunks first, first + kStride, ...
// (at the swizzled byte offsets piece_off, fixed for a thread and computed from the same chunks),
// zero-filled for padding (j < 0); and, on a list tile, the key's start (j + W), end and score at
// slot m of the per-key arrays (padding: selected by no row). kStride 1 gives each thread a
// contiguous run of the row; kStride = the row's thread count interleaves them, so the threads of
// a row cover adjacent 16-byte pieces in each copy instruction (one 128-byte line per row instead
// of two: half the L2 requests per byte when two threads share a row).
template <int kStride, int kPieces, typename Elem>
__device__ __forceinline__ void gather_key_row(const AttnParams& p, const Elem* k_base, const Elem* v_base, const int* ends,
                                               const float* scores, const uint32_t (&piece_off)[kPieces], uint32_t kdst,
                                               uint32_t vdst, int first, int j, bool list_tile, int* sStart, int* sEnd, float* sU,
                                               int m) {
  const bool ok = j >= 0;
  const int64_t jj = ok ? j : 0;
  const Elem* ksrc = k_base + jj * p.k_row_stride + first * 8;
  const Elem* vsrc = v_base + jj * p.v_row_stride + first * 8;
#pragma unroll
  for (int c = 0; c < kPieces; ++c) {
    cp_async16(kdst + piece_off[c], ksrc + c * kStride * 8, ok);
    cp_async16(vdst + piece_off[c], vsrc + c * kStride * 8, ok);
  }
  if (first == 0 && list_tile) {  // the row's thread with chunk 0; window tiles need no per-key data
    if (ok) {
      sStart[m] = j + p.window;
      cp_async4(&sEnd[m], ends + j);
      cp_async4(&sU[m], scores + j);
    } else {
      sStart[m] = p.seq_len;  // i < S for every row
      sEnd[m] = -1;
      sU[m] = 0.f;
    }
  }
}

// The two rows of this thread: query index, query head and tau (0 past the end of the sequence).
struct FwdRows {
  int qi[2];
  int head_of[2];
  float tau[2];

  __device__ __forceinline__ FwdRows(const AttnParams& p, int r_lo, int i0, int hkv, int bh) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = r_lo + 8 * h;
      qi[h] = i0 + r % p.block_q;
      head_of[h] = hkv * p.group + r / p.block_q;
      tau[h] = qi[h] < p.seq_len ? p.tau[(size_t)bh * p.seq_len + qi[h]] : 0.f;
    }
  }
};

// Window tile of keys [j0, j0 + 64): -inf outside each row's window (i - W < j <= i); most
// window tiles lie inside every row's window and skip the test. Returns the rows' maxima.
__device__ __forceinline__ void mask_window_tile(float (&s)[kFwdTileN / 8][4], float (&tile_max)[2], const FwdRows& rows, int j0,
                                                 int i0, int i1, int W, int quad) {
  if (!(j0 + kFwdTileN - 1 <= i0 && j0 > i1 - 1 - W)) {
#pragma unroll
    for (int nb = 0; nb < kFwdTileN / 8; ++nb) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int behind = rows.qi[c >> 1] - (j0 + 8 * nb + 2 * quad + (c & 1));  // i - j
        if (static_cast<unsigned>(behind) >= static_cast<unsigned>(W)) s[nb][c] = -CUDART_INF_F;
      }
    }
  }
#pragma unroll
  for (int nb = 0; nb < kFwdTileN / 8; ++nb) {
#pragma unroll
    for (int c = 0; c < 4; ++c) tile_max[c >> 1] = fmaxf(tile_max[c >> 1], s[nb][c]);
  }
}

// List tile with per-key start (j + W), end and score in shared memory: -inf where row i does not
// select the key (j + W <= i < end_j), and the gates clip(u_j - tau_i, 0, 1), one saturating add
// each (a masked entry's weight is exp2(-inf) = 0 whatever its gate). Returns the rows' maxima.
// kPairLoads: read a thread's two adjacent columns of each array with one 8-byte load (the arrays
// start 8-byte aligned and the pair's first column is even): 24 shared loads per tile instead of
// 48. (v7 uses it; v5 keeps single loads until the two have been timed against each other.)
template <bool kPairLoads = false>
__device__ __forceinline__ void mask_list_tile(float (&s)[kFwdTileN / 8][4], float (&gate)[kFwdTileN / 8][4], float (&tile_max)[2],
                                               const FwdRows& rows, const int* start, const int* end, const float* u, int quad) {
#pragma unroll
  for (int nb = 0; nb < kFwdTileN / 8; ++nb) {
    int start_pair[2], end_pair[2];
    float u_pair[2];
    const int col0 = 8 * nb + 2 * quad;
    if constexpr (kPairLoads) {
      const int2 st = *reinterpret_cast<const int2*>(start + col0);
      const int2 en = *reinterpret_cast<const int2*>(end + col0);
      const float2 uu = *reinterpret_cast<const float2*>(u + col0);
      start_pair[0] = st.x, start_pair[1] = st.y, end_pair[0] = en.x, end_pair[1] = en.y, u_pair[0] = uu.x, u_pair[1] = uu.y;
    } else {
#pragma unroll
      for (int e = 0; e < 2; ++e) start_pair[e] = start[col0 + e], end_pair[e] = end[col0 + e], u_pair[e] = u[col0 + e];
    }
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int start_j = start_pair[e], end_j = end_pair[e];
      const float u_j = u_pair[e];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int i = rows.qi[h];
        if (!(start_j <= i && i < end_j)) s[nb][2 * h + e] = -CUDART_INF_F;
        gate[nb][2 * h + e] = __saturatef(u_j - rows.tau[h]);
        tile_max[h] = fmaxf(tile_max[h], s[nb][2 * h + e]);
      }
    }
  }
}

// Online softmax of one tile, in base 2: the running max m_run (already scaled by scale_log2),
// the rescale factor alpha of the previous O and l, the weights exp2(s * scale_log2 - m) written
// over s (times the gate on list tiles), and the running sum l_run. Each row lives in the 4
// threads of a quad. Masking worked on the raw logits (scale > 0 keeps the max where it is).
__device__ __forceinline__ void softmax_tile(float (&s)[kFwdTileN / 8][4], const float (&gate)[kFwdTileN / 8][4], bool gated,
                                             float (&tile_max)[2], float (&m_run)[2], float (&l_run)[2], float (&alpha)[2],
                                             float scale_log2) {
  float m_scaled[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
    tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
    const float m_new = fmaxf(m_run[h], tile_max[h] * scale_log2);
    const float m_use = m_new == -CUDART_INF_F ? 0.f : m_new;  // a row with nothing valid yet
    alpha[h] = exp2f(m_run[h] - m_use);                        // 0 when m_run is -inf
    m_run[h] = m_new;
    m_scaled[h] = -m_use;
  }
  float row_sum[2] = {0.f, 0.f};
#pragma unroll
  for (int nb = 0; nb < kFwdTileN / 8; ++nb) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int h = c >> 1;
      float w = exp2f(fmaf(s[nb][c], scale_log2, m_scaled[h]));
      if (gated) w *= gate[nb][c];
      s[nb][c] = w;
      row_sum[h] += w;
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) l_run[h] = l_run[h] * alpha[h] + row_sum[h];
}

// One tile's masks, gates and online softmax: a window tile of keys [j0, j0 + 64), else a list
// tile whose per-key start, end and score are at start, end, u. alpha: the rescale factor of the
// previous O. kPairLoads: see mask_list_tile.
template <bool kPairLoads = false>
__device__ __forceinline__ void tile_softmax(float (&s)[kFwdTileN / 8][4], float (&gate)[kFwdTileN / 8][4], float (&m_run)[2],
                                             float (&l_run)[2], float (&alpha)[2], const FwdRows& rows, bool window_tile, int j0,
                                             int i0, int i1, int W, const int* start, const int* end, const float* u, int quad,
                                             float scale_log2) {
  float tile_max[2] = {-CUDART_INF_F, -CUDART_INF_F};
  if (window_tile) {
    mask_window_tile(s, tile_max, rows, j0, i0, i1, W, quad);
  } else {
    mask_list_tile<kPairLoads>(s, gate, tile_max, rows, start, end, u, quad);
  }
  softmax_tile(s, gate, !window_tile, tile_max, m_run, l_run, alpha, scale_log2);
}

// O *= alpha per row; skipped when no row of the warp moved (the running max settles after the
// first tiles).
template <int kDBlocks>
__device__ __forceinline__ void rescale_out(float (&o)[kDBlocks][4], const float (&alpha)[2]) {
  if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
    for (int nd = 0; nd < kDBlocks; ++nd) {
      o[nd][0] *= alpha[0];
      o[nd][1] *= alpha[0];
      o[nd][2] *= alpha[1];
      o[nd][3] *= alpha[1];
    }
  }
}

// The weights as the A fragments of O += P V: a k-step of 16 keys is two n8 blocks of S.
template <typename Elem>
__device__ __forceinline__ void pack_p(uint32_t (&pa)[kFwdTileN / 16][4], const float (&s)[kFwdTileN / 8][4]) {
#pragma unroll
  for (int kk = 0; kk < kFwdTileN / 16; ++kk) {
    pa[kk][0] = pack2<Elem>(s[2 * kk][0], s[2 * kk][1]);
    pa[kk][1] = pack2<Elem>(s[2 * kk][2], s[2 * kk][3]);
    pa[kk][2] = pack2<Elem>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    pa[kk][3] = pack2<Elem>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
  }
}

// Epilogue: out = O / l for this thread's rows (those before the end of the sequence) and
// lse = ln(sum of weights) in natural log; a row with no weight gets 0 and -inf.
template <int kD, typename Elem>
__device__ __forceinline__ void write_rows(const AttnParams& p, const float (&o)[kD / 8][4], const float (&l_run)[2],
                                           const float (&m_run)[2], const FwdRows& rows, int b, int quad) {
  constexpr float kLn2 = 0.69314718055994531f;
  Elem* out = static_cast<Elem*>(p.out);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = l_run[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int i = rows.qi[h];
    if (i >= p.seq_len) continue;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const size_t row_off = ((size_t)b * p.q_heads + rows.head_of[h]) * p.seq_len + i;
    Elem* dst = out + row_off * kD;
#pragma unroll
    for (int nd = 0; nd < kD / 8; ++nd) {
      *reinterpret_cast<uint32_t*>(dst + 8 * nd + 2 * quad) = pack2<Elem>(o[nd][2 * h] * inv, o[nd][2 * h + 1] * inv);
    }
    if (quad == 0) p.lse[row_off] = l > 0.f ? (m_run[h] + log2f(l)) * kLn2 : -CUDART_INF_F;
  }
}

}  // namespace sparsek
