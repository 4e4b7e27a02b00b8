// SparseK backward attention for sm_90a: dq, dk, dv and the score gradient's per-key term, one
// CTA per (batch, kv head, query block), mma.sync m16n8k16.
//
// The CTA walks the forward's tile plan (the block's window tiles, then its list of selected
// keys, 64 keys per tile) over its 128 rows = (query head of the GQA group) x (query of the
// block). Per tile, each of the 8 warps owns 16 rows:
//   S  = Q K^T, dP = dO V^T                       (recomputed; Q, dO resident in shared memory)
//   e  = exp(S * scale - lse)  (masked: 0)        P = g e,  gamma = e (dP - D),  dS = g gamma
//   dQ += dS K                                    (registers, written once at the end)
// then P and dS go to shared memory and, after one barrier, the warps re-partition by key:
//   dV_tile = P^T dO,  dK_tile = dS^T Q           (64 keys x D, summed over the CTA's 128 rows)
// and add them to global accumulators (one 16-byte float4 atomic per 4 values; or int64 fixed
// point in the deterministic mode, where integer sums do not depend on the order). The heads of a
// GQA group share one selection, so their rows meet in the same tile and their dK/dV contributions
// are summed on the tensor cores before any atomic.
//
// Score gradient (docs/semantics.md): for the soft selected keys (0 < u_j - tau_i < 1) gamma_ij
// is summed per key (column sums over the CTA's rows, one value per key and block) and per row
// (gamma_rows); the tau term, a range sum over the rows whose soft set holds the key, is left to
// the caller, which has the whole tau row.
//
// Why query-major with atomics instead of FA2's key-major dK/dV: a key's selecting queries are one
// run [j + W, end_j), but runs of neighbouring keys differ wildly in length (a high score is kept
// to the end of the sequence), so a tile of consecutive keys would visit nearly every later query
// block for a few live keys. The query block's list is already compact (at most K + Bq - 1 keys).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <algorithm>
#include <cstdint>

#include "ptx.h"
#include "sparsek_params.h"
#include "tile_plan.h"
#include "wgmma.h"

namespace sparsek {
namespace {

constexpr int kRows = kAttnRows;        // rows (query x head) per CTA
constexpr int kWarps = kRows / 16;      // one m16 row slice per warp
constexpr int kThreads = kWarps * 32;
constexpr int kTileN = 64;              // keys per tile
constexpr int kStages = 2;              // K/V tile t in use, t + 1 in flight
constexpr int kKeyWarps = kTileN / 16;  // dK/dV phase: warps along the keys of a tile ...
constexpr int kDWarps = kWarps / kKeyWarps;  // ... and along the head dim
constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFull = 0xffffffffu;
static_assert(kWarps == kKeyWarps * kDWarps, "the dK/dV phase uses every warp once");

template <int kD>
struct Traits {
  static constexpr int kChunks = kD / 8;                    // 16-byte chunks per row of Q, dO, K, V
  static constexpr int kLoadersPerRow = kThreads / kTileN;  // threads that copy one key row
  static constexpr int kChunksPerThread = kChunks / kLoadersPerRow;
  static constexpr int kDPerWarp = kD / kDWarps;            // head-dim columns per warp in the dK/dV phase
  static constexpr int kSmemBytes =
      (2 * kRows * kD + 2 * kStages * kTileN * kD + 2 * kRows * kTileN) * 2  // Q, dO, K, V, P, dS
      + kStages * kTileN * 4 * 4                                             // key, start, end, u
      + kWarps * kTileN * 4;                                                 // column sums of gamma
};

// Byte offset of 16-byte chunk `chunk` of row `row` in a row-major tile of kC chunks per row, the
// chunk index XOR-ed with row % 8: the 8 rows an ldmatrix reads (or a warp's fragment stores
// write) at one logical chunk land in 8 different bank groups.
template <int kC>
__device__ __forceinline__ uint32_t swz(int row, int chunk) {
  return static_cast<uint32_t>((row * kC + (chunk ^ (row & 7))) * 16);
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename Elem>
struct Mma;

// d (16 x 8, float) += a (16 x 16) b (16 x 8); PTX spells the input type in the opcode.
#define SPARSEK_MMA(ELEM, TYPE)                                                                          \
  template <>                                                                                            \
  struct Mma<ELEM> {                                                                                     \
    static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) { \
      asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE                                \
                   ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"              \
                   : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                      \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                      \
    }                                                                                                    \
  };
SPARSEK_MMA(__nv_bfloat16, "bf16")
SPARSEK_MMA(__half, "f16")
#undef SPARSEK_MMA

// acc (16 rows x 64 keys) = A (16 rows x kD, row-major tile at a_base) B^T, B (64 keys x kD,
// row-major tile at b_base): S = Q K^T and dP = dO V^T. `a_row0` is the warp's first row.
template <int kD, typename Elem>
__device__ __forceinline__ void gemm_rows_keys(float (&acc)[kTileN / 8][4], uint32_t a_base, int a_row0, uint32_t b_base,
                                               int lane) {
  constexpr int kC = kD / 8;
#pragma unroll
  for (int nb = 0; nb < kTileN / 8; ++nb) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.f;
  const int mi = lane >> 3, r8 = lane & 7;
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    uint32_t a[4];  // matrices: rows 0-7 / 8-15 x k low, then k high
    ldsm_x4(a, a_base + swz<kC>(a_row0 + 8 * (mi & 1) + r8, 2 * kk + (mi >> 1)));
#pragma unroll
    for (int nb2 = 0; nb2 < kTileN / 16; ++nb2) {
      uint32_t b[4];  // matrices: keys n0..n0+7 x k low / high, then keys n0+8.. x k low / high
      ldsm_x4(b, b_base + swz<kC>(16 * nb2 + 8 * (mi >> 1) + r8, 2 * kk + (mi & 1)));
      Mma<Elem>::run(acc[2 * nb2], a, b[0], b[1]);
      Mma<Elem>::run(acc[2 * nb2 + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 keys x kDPerWarp) = A^T B over the CTA's 128 rows: A (128 rows x 64 keys, P or dS),
// B (128 rows x kD, dO or Q); this warp's keys start at key0, its head-dim columns at d0.
template <int kD, typename Elem>
__device__ __forceinline__ void gemm_keys_dims(float (&acc)[Traits<kD>::kDPerWarp / 8][4], uint32_t a_base, uint32_t b_base,
                                               int key0, int d0, int lane) {
  constexpr int kC = kD / 8;
  constexpr int kNB = Traits<kD>::kDPerWarp / 8;
#pragma unroll
  for (int nb = 0; nb < kNB; ++nb) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.f;
  const int mi = lane >> 3, r8 = lane & 7;
#pragma unroll
  for (int kr = 0; kr < kRows / 16; ++kr) {
    uint32_t a[4];  // transposed: matrices rows k0..k0+7 x keys m0 / m0+8, then rows k0+8..
    ldsm_x4_t(a, a_base + swz<kTileN / 8>(16 * kr + 8 * (mi >> 1) + r8, key0 / 8 + (mi & 1)));
#pragma unroll
    for (int nd2 = 0; nd2 < kNB / 2; ++nd2) {
      uint32_t b[4];  // transposed: matrices rows k0.. / k0+8.. x d chunk n0, then chunk n0+1
      ldsm_x4_t(b, b_base + swz<kC>(16 * kr + 8 * (mi & 1) + r8, d0 / 8 + 2 * nd2 + (mi >> 1)));
      Mma<Elem>::run(acc[2 * nd2], a, b[0], b[1]);
      Mma<Elem>::run(acc[2 * nd2 + 1], a, b[2], b[3]);
    }
  }
}

// ---- the softmax gradient of one tile, shared by both kernels ----
// A thread holds two rows of the tile (the accumulator layout of mma.sync m16 and of wgmma:
// rows r_lo and r_lo + 8, columns 8 nb + 2 quad and + 1); `Rows` holds what the gradient needs of them.
struct Rows {
  int qi[2], head_of[2];  // query index and query head of each row
  float lse2[2];          // lse in base-2 units; +inf for a row beyond S or without keys (weight 0 everywhere)
  float dsum[2];          // D_i = dO_i . out_i
  float tau[2];
  // Soft means tau < u < tau + 1 exactly (as the selection counts |F_i|): tau + 1 rounded down,
  // and whether that rounding was exact, decide u < tau + 1 without a wider type.
  float tau1[2];
  bool tau1_exact[2];

  __device__ Rows(const AttnBwdParams& p, int b, int hkv, int bh, int i0, int r_lo) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = r_lo + 8 * h;
      qi[h] = i0 + r % p.block_q;
      head_of[h] = hkv * p.group + r / p.block_q;
      const size_t row = ((size_t)b * p.q_heads + head_of[h]) * p.seq_len + qi[h];
      const bool ok = qi[h] < p.seq_len;
      const float lse = ok ? p.lse[row] : CUDART_INF_F;
      lse2[h] = isfinite(lse) ? lse * kLog2e : CUDART_INF_F;
      dsum[h] = ok ? p.dsum[row] : 0.f;
      tau[h] = ok ? p.tau[(size_t)bh * p.seq_len + qi[h]] : 0.f;
      tau1[h] = __fadd_rd(tau[h], 1.f);
      tau1_exact[h] = tau1[h] == __fadd_ru(tau[h], 1.f);
    }
  }
};

// Window tile (keys j0 .. j0 + 63, gate 1): S becomes P = e, dP becomes dS = e (dP - D), where
// e = exp(s * scale - lse) for keys in the row's window (i - W < j <= i) and 0 elsewhere.
// `inside`: every pair of the tile is in its row's window (most window tiles), no test needed.
template <int kNB>
__device__ __forceinline__ void window_tile_grad(float (&s)[kNB][4], float (&dp)[kNB][4], const Rows& rows, int j0, int quad,
                                                 int window, float scale_log2, bool inside) {
#pragma unroll
  for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int h = c >> 1;
      const int behind = rows.qi[h] - (j0 + 8 * nb + 2 * quad + (c & 1));  // i - j
      // The exponential is taken for every element and selected afterwards: under the mask's
      // predicate ptxas reloads scale_log2 from the constant bank for each element.
      const float x = exp2f(fmaf(s[nb][c], scale_log2, -rows.lse2[h]));
      const float e = inside || static_cast<unsigned>(behind) < static_cast<unsigned>(window) ? x : 0.f;
      s[nb][c] = e;                                // P (gate 1)
      dp[nb][c] = e * (dp[nb][c] - rows.dsum[h]);  // dS
    }
  }
}

// List tile: key column cj is selected by row i when start_j <= i < end_j (start_j = j + W) and
// carries the gate g = clip(u_j - tau_i, 0, 1). S becomes P = g e, dP becomes dS = g gamma with
// gamma = e (dP - D); gamma of the soft selected entries (0 < u_j - tau_i < 1) is added to
// gamma_sum (per row) and col (per column, over this thread's two rows). `key(cj, start, end, u)`
// fetches a column's data.
template <int kNB, typename KeyData>
__device__ __forceinline__ void list_tile_grad(float (&s)[kNB][4], float (&dp)[kNB][4], float (&col)[kNB][2],
                                               float (&gamma_sum)[2], const Rows& rows, int quad, float scale_log2,
                                               KeyData key) {
#pragma unroll
  for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
      int start_j, end_j;
      float u_j;
      key(8 * nb + 2 * quad + e2, start_j, end_j, u_j);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int c = 2 * h + e2;
        const int i = rows.qi[h];
        const float tau = rows.tau[h];
        const bool sel = start_j <= i && i < end_j;
        const float x = exp2f(fmaf(s[nb][c], scale_log2, -rows.lse2[h]));  // unmasked, as in the window tile
        const float e = sel ? x : 0.f;
        const float gate = __saturatef(u_j - tau);
        const float gamma = e * (dp[nb][c] - rows.dsum[h]);
        const bool soft = sel && u_j > tau && (u_j < rows.tau1[h] || (u_j == rows.tau1[h] && !rows.tau1_exact[h]));
        if (soft) {
          gamma_sum[h] += gamma;
          col[nb][e2] += gamma;
        }
        s[nb][c] = gate * e;       // P
        dp[nb][c] = gate * gamma;  // dS
      }
    }
  }
}

// P and dS (this thread's two rows of the tile) to shared memory, 128 rows x 64 keys each in the
// swizzled panel layout the dV/dK products read; dS also as the A fragments of dQ += dS K (a
// k-step of 16 keys is two n8 blocks).
template <typename Elem, int kNB>
__device__ __forceinline__ void store_p_ds(const float (&s)[kNB][4], const float (&dp)[kNB][4], Elem* sP, Elem* sDS, int r_lo,
                                           int quad, uint32_t (&ds_frag)[kNB / 2][4]) {
#pragma unroll
  for (int nb = 0; nb < kNB; ++nb) {
    const uint32_t p_lo = pack2<Elem>(s[nb][0], s[nb][1]), p_hi = pack2<Elem>(s[nb][2], s[nb][3]);
    const uint32_t d_lo = pack2<Elem>(dp[nb][0], dp[nb][1]), d_hi = pack2<Elem>(dp[nb][2], dp[nb][3]);
    const uint32_t in_chunk = 4 * quad;
    *reinterpret_cast<uint32_t*>(sP + (swz<kNB>(r_lo, nb) + in_chunk) / 2) = p_lo;
    *reinterpret_cast<uint32_t*>(sP + (swz<kNB>(r_lo + 8, nb) + in_chunk) / 2) = p_hi;
    *reinterpret_cast<uint32_t*>(sDS + (swz<kNB>(r_lo, nb) + in_chunk) / 2) = d_lo;
    *reinterpret_cast<uint32_t*>(sDS + (swz<kNB>(r_lo + 8, nb) + in_chunk) / 2) = d_hi;
    ds_frag[nb / 2][(nb & 1) * 2 + 0] = d_lo;
    ds_frag[nb / 2][(nb & 1) * 2 + 1] = d_hi;
  }
}

// Adds a warp's 16 keys x kDPerWarp tile to the global accumulator rows of its keys. Each pair of
// lanes swaps two values so that every lane holds 4 consecutive columns of one key row: one
// 16-byte atomic instead of two 8-byte ones.
template <int kD, int kNB>
__device__ __forceinline__ void add_tile(const float (&acc)[kNB][4], void* base, const int* keys, int key0, int d0, int lane,
                                         bool deterministic, const double* fixed_scale) {
  const int g = lane >> 2, t = lane & 3, odd = t & 1;
  const int key = keys[key0 + g + 8 * odd];
  const int col0 = d0 + 2 * (t & ~1);
  const double fixed = deterministic ? *fixed_scale : 0.0;
#pragma unroll
  for (int nb = 0; nb < kNB; ++nb) {
    // even lanes keep row g (c0, c1) and take the partner's; odd lanes keep row g + 8 (c2, c3)
    const float send0 = odd ? acc[nb][0] : acc[nb][2];
    const float send1 = odd ? acc[nb][1] : acc[nb][3];
    const float recv0 = __shfl_xor_sync(kFull, send0, 1);
    const float recv1 = __shfl_xor_sync(kFull, send1, 1);
    const float4 v = odd ? make_float4(recv0, recv1, acc[nb][2], acc[nb][3]) : make_float4(acc[nb][0], acc[nb][1], recv0, recv1);
    if (key < 0) continue;  // padding row of the tile
    const size_t off = static_cast<size_t>(key) * kD + col0 + 8 * nb;
    if (deterministic) {
      unsigned long long* dst = static_cast<unsigned long long*>(base) + off;
      atomicAdd(dst + 0, static_cast<unsigned long long>(__double2ll_rn(static_cast<double>(v.x) * fixed)));
      atomicAdd(dst + 1, static_cast<unsigned long long>(__double2ll_rn(static_cast<double>(v.y) * fixed)));
      atomicAdd(dst + 2, static_cast<unsigned long long>(__double2ll_rn(static_cast<double>(v.z) * fixed)));
      atomicAdd(dst + 3, static_cast<unsigned long long>(__double2ll_rn(static_cast<double>(v.w) * fixed)));
    } else {
      atomicAdd(reinterpret_cast<float4*>(static_cast<float*>(base) + off), v);
    }
  }
}

template <int kD, typename Elem>
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_kernel(const AttnBwdParams p) {
  using T = Traits<kD>;
  constexpr int kC = T::kChunks;
  constexpr int kTileBytes = kTileN * kD * 2;

  extern __shared__ __align__(128) unsigned char smem[];
  Elem* sQ = reinterpret_cast<Elem*>(smem);
  Elem* sDO = sQ + kRows * kD;
  Elem* sK = sDO + kRows * kD;
  Elem* sV = sK + kStages * kTileN * kD;
  Elem* sP = sV + kStages * kTileN * kD;
  Elem* sDS = sP + kRows * kTileN;
  int* sKey = reinterpret_cast<int*>(sDS + kRows * kTileN);  // [stage][key row]: key index, -1 = padding
  int* sStart = sKey + kStages * kTileN;                      // j + W
  int* sEnd = sStart + kStages * kTileN;
  float* sU = reinterpret_cast<float*>(sEnd + kStages * kTileN);
  float* sColSum = sU + kStages * kTileN;  // [warp][key]: column sums of gamma over the warp's rows

  const int blk = blockIdx.x;
  const int bh = blockIdx.y + p.bh_offset;
  const int b = bh / p.kv_heads, hkv = bh % p.kv_heads;
  const int S = p.seq_len, W = p.window;
  const int i0 = blk * p.block_q, i1 = min(S, i0 + p.block_q);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, quad = lane & 3;

  const Elem* k_base = static_cast<const Elem*>(p.k) + b * p.k_batch_stride + hkv * p.k_head_stride;
  const Elem* v_base = static_cast<const Elem*>(p.v) + b * p.v_batch_stride + hkv * p.v_head_stride;
  const float* scores = p.scores + (size_t)bh * S;
  const int* ends = p.end + (size_t)bh * S;

  const TilePlan<kTileN> plan(p.block_keys, p.block_count, bh, blk, p.n_blocks, p.cap, i0, i1, W);
  const int w0 = plan.w0, n_win = plan.n_win, count = plan.count, n_tiles = plan.n_tiles;

  const int my_row = tid / T::kLoadersPerRow, my_part = tid % T::kLoadersPerRow;
  auto tile_key = [&](int t) { return plan.key(t, my_row); };
  const uint32_t k_addr = smem_addr(sK), v_addr = smem_addr(sV);
  auto load_tile = [&](int t, int stage, int j) {
    const bool ok = j >= 0;
    const int64_t jj = ok ? j : 0;
    const Elem* ksrc = k_base + jj * p.k_row_stride;
    const Elem* vsrc = v_base + jj * p.v_row_stride;
#pragma unroll
    for (int c = 0; c < T::kChunksPerThread; ++c) {
      const int ch = my_part * T::kChunksPerThread + c;
      cp_async16(k_addr + stage * kTileBytes + swz<kC>(my_row, ch), ksrc + ch * 8, ok);
      cp_async16(v_addr + stage * kTileBytes + swz<kC>(my_row, ch), vsrc + ch * 8, ok);
    }
    if (my_part == 0) {
      const int m = stage * kTileN + my_row;
      sKey[m] = j;
      if (t >= n_win) {  // window tiles need no per-key data
        if (ok) {
          sStart[m] = j + W;
          cp_async4(&sEnd[m], ends + j);
          cp_async4(&sU[m], scores + j);
        } else {
          sStart[m] = S;  // padding: selected by no row (i < S)
          sEnd[m] = -1;
          sU[m] = 0.f;
        }
      }
    }
  };

  // ---- prologue: Q and dO rows (zero beyond S) with tile 0 ----
  const Elem* dout = static_cast<const Elem*>(p.dout);
  const Elem* q_base = static_cast<const Elem*>(p.q) + b * p.q_batch_stride;
  for (int c = tid; c < kRows * kC; c += kThreads) {
    const int r = c / kC, ch = c % kC;
    const int i = i0 + r % p.block_q, head = hkv * p.group + r / p.block_q;
    const bool ok = i < S;
    const int64_t ii = ok ? i : 0;
    cp_async16(smem_addr(sQ) + swz<kC>(r, ch), q_base + head * p.q_head_stride + ii * p.q_row_stride + ch * 8, ok);
    cp_async16(smem_addr(sDO) + swz<kC>(r, ch), dout + (((size_t)b * p.q_heads + head) * S + ii) * kD + ch * 8, ok);
  }
  if (n_tiles > 0) load_tile(0, 0, tile_key(0));
  cp_async_commit();
  int key_next = tile_key(1);

  // Per-thread rows (mma accumulator layout): rows r_lo = 16 warp + lane / 4 and r_lo + 8.
  const int r_lo = warp * 16 + g;
  const Rows rows(p, b, hkv, bh, i0, r_lo);

  float dq[kD / 8][4];
#pragma unroll
  for (int nd = 0; nd < kD / 8; ++nd) dq[nd][0] = dq[nd][1] = dq[nd][2] = dq[nd][3] = 0.f;
  float gamma_sum[2] = {0.f, 0.f};

  const uint32_t q_addr = smem_addr(sQ), do_addr = smem_addr(sDO);
  const uint32_t p_addr = smem_addr(sP), ds_addr = smem_addr(sDS);
  const int key0 = 16 * (warp % kKeyWarps), d0 = T::kDPerWarp * (warp / kKeyWarps);

  for (int t = 0; t < n_tiles; ++t) {
    const int stage = t % kStages;
    cp_async_wait<0>();  // tile t (and Q, dO) has landed
    // Also frees the other stage (tile t - 1's S, dP and dQ are done) and sP / sDS / sColSum
    // (tile t - 1's dK/dV phase is done).
    __syncthreads();
    if (t + 1 < n_tiles) load_tile(t + 1, (t + 1) % kStages, key_next);
    cp_async_commit();
    key_next = tile_key(t + 2);

    float s[kTileN / 8][4], dp[kTileN / 8][4];
    gemm_rows_keys<kD, Elem>(s, q_addr, warp * 16, k_addr + stage * kTileBytes, lane);
    gemm_rows_keys<kD, Elem>(dp, do_addr, warp * 16, v_addr + stage * kTileBytes, lane);

    const bool listed = t >= n_win;
    float col[kTileN / 8][2] = {};  // gamma of the soft selected entries, summed over this thread's two rows
    if (!listed) {
      const int j0 = w0 + t * kTileN;
      const bool inside = j0 + kTileN - 1 <= i0 && j0 > i1 - 1 - W;  // see window_tile_grad
      window_tile_grad(s, dp, rows, j0, quad, W, p.scale_log2, inside);
    } else {
      const int* start = sStart + stage * kTileN;
      const int* end = sEnd + stage * kTileN;
      const float* u = sU + stage * kTileN;
      list_tile_grad(s, dp, col, gamma_sum, rows, quad, p.scale_log2, [&](int cj, int& start_j, int& end_j, float& u_j) {
        start_j = start[cj];
        end_j = end[cj];
        u_j = u[cj];
      });
    }

    // P and dS to shared memory (for the key-major phase); dS as A fragments for dQ += dS K.
    uint32_t ds_frag[kTileN / 16][4];
    store_p_ds<Elem>(s, dp, sP, sDS, r_lo, quad, ds_frag);
    {
      const int mi = lane >> 3, r8 = lane & 7;
#pragma unroll
      for (int kk = 0; kk < kTileN / 16; ++kk) {
#pragma unroll
        for (int nd2 = 0; nd2 < kD / 16; ++nd2) {
          uint32_t bk[4];  // K as B (keys x d), transposed: keys k0.. / k0+8.. x chunk n0, then n0+1
          ldsm_x4_t(bk, k_addr + stage * kTileBytes + swz<kC>(16 * kk + 8 * (mi & 1) + r8, 2 * nd2 + (mi >> 1)));
          Mma<Elem>::run(dq[2 * nd2], ds_frag[kk], bk[0], bk[1]);
          Mma<Elem>::run(dq[2 * nd2 + 1], ds_frag[kk], bk[2], bk[3]);
        }
      }
    }
    if (listed) {  // column sums over the warp's 16 rows: lanes of one quad position share columns
#pragma unroll
      for (int nb = 0; nb < kTileN / 8; ++nb) {
#pragma unroll
        for (int e2 = 0; e2 < 2; ++e2) {
          float v = col[nb][e2];
          v += __shfl_xor_sync(kFull, v, 4);
          v += __shfl_xor_sync(kFull, v, 8);
          v += __shfl_xor_sync(kFull, v, 16);
          if (g == 0) sColSum[warp * kTileN + 8 * nb + 2 * quad + e2] = v;
        }
      }
    }
    __syncthreads();  // P, dS and the column sums of every warp are in shared memory

    // ---- key-major phase: this warp's 16 keys x kDPerWarp columns of dV and dK ----
    {
      float acc[T::kDPerWarp / 8][4];
      const int* keys = sKey + stage * kTileN;
      gemm_keys_dims<kD, Elem>(acc, p_addr, do_addr, key0, d0, lane);
      add_tile<kD, T::kDPerWarp / 8>(acc, static_cast<char*>(p.dv_acc) + (size_t)blockIdx.y * S * kD * (p.deterministic ? 8 : 4), keys, key0, d0, lane,
                   p.deterministic, p.fixed_scale + 1);
      gemm_keys_dims<kD, Elem>(acc, ds_addr, q_addr, key0, d0, lane);
      add_tile<kD, T::kDPerWarp / 8>(acc, static_cast<char*>(p.dk_acc) + (size_t)blockIdx.y * S * kD * (p.deterministic ? 8 : 4), keys, key0, d0, lane,
                   p.deterministic, p.fixed_scale);
    }
    if (listed && tid < kTileN) {
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) v += sColSum[w * kTileN + tid];  // fixed order
      const int pos = (t - n_win) * kTileN + tid;
      if (pos < count) {
        if (p.deterministic) {
          p.du_part[((size_t)bh * p.n_blocks + blk) * p.cap + pos] = v;
        } else {
          atomicAdd(p.du + (size_t)bh * S + sKey[stage * kTileN + tid], v);
        }
      }
    }
  }
  cp_async_wait<0>();

  // ---- epilogue: dq rows and the per-row sums of gamma ----
  Elem* dq_out = static_cast<Elem*>(p.dq);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float gs = gamma_sum[h];
    gs += __shfl_xor_sync(kFull, gs, 1);
    gs += __shfl_xor_sync(kFull, gs, 2);
    if (rows.qi[h] >= S) continue;
    const size_t row = ((size_t)b * p.q_heads + rows.head_of[h]) * S + rows.qi[h];
    Elem* dst = dq_out + row * kD;
#pragma unroll
    for (int nd = 0; nd < kD / 8; ++nd) {
      *reinterpret_cast<uint32_t*>(dst + 8 * nd + 2 * quad) = pack2<Elem>(dq[nd][2 * h] * p.scale, dq[nd][2 * h + 1] * p.scale);
    }
    if (quad == 0) p.gamma_rows[row] = gs;
  }
}

// ---- v2: warpgroup MMA (wgmma) ----
// The same tile plan, masks and accumulators as above; the products run as wgmma. Each of the
// two warpgroups owns 64 of the 128 rows for S = Q K^T and dP = dO V^T (both operands from shared
// memory) and for dQ += dS K (dS from registers, K from shared memory through the transpose flag).
// After P and dS are in shared memory, warpgroup 0 forms the tile's dV = P^T dO and warpgroup 1
// its dK = dS^T Q over all 128 rows (64 keys x D each, both operands MN-major), so the dK/dV work
// per tile is split evenly and no ldmatrix or mma.sync remains. The tile's du atomics are issued
// while those products run, and its dK/dV reductions in the next iteration, while the next tile's
// S and dP run (v2.4). Q, dO, K and V use the forward's 128-byte swizzled layout; P and dS
// (128 rows x 64 keys) are one panel of that layout, which is also the layout v1 writes them in.
namespace wg {

constexpr int kStages = 3;  // K/V ring: tile t in use, t + 1 and t + 2 in flight
constexpr int kWgRows = 64;
// dK/dV reductions go through shared memory in slices of 32 columns (128 bytes of a key's float32
// row), so that each warp's 16-byte reductions cover 4 whole 128-byte lines instead of one 32-byte
// sector in each of 16 lines: 1.13x faster at long-64k on an H100 (docs/perf-notes.md, v2.1). A
// slice row is padded to 40 floats: the accumulator-layout stores (rows g, columns 2 * quad) and
// the row reads are both free of bank conflicts.
constexpr int kSliceCols = 32;
constexpr int kSliceStride = 40;

template <int kD>
struct Traits {
  static constexpr int kChunks = kD / 8;
  static constexpr int kLoadersPerRow = kThreads / kTileN;
  static constexpr int kChunksPerThread = kChunks / kLoadersPerRow;
  static constexpr int kTileElems = kTileN * kD;
  static constexpr int kSmemBytes = kAlign + (2 * kRows * kD + 2 * kStages * kTileElems + 2 * kRows * kTileN) * 2  // Q, dO, K, V, P, dS
                                    + kStages * kTileN * (4 + 16)  // key; start, end, u as one 16-byte record
                                    + kWarps * kTileN * 4       // column sums of gamma
                                    + 2 * kTileN * kSliceStride * 4  // one reduction slice per warpgroup
                                    + 4 * 8;                         // v2.13: the slices' full / empty mbarriers
};

// v2.13: a third warpgroup (the reducer) issues the dK/dV reductions from the staged slices, so the
// two compute warpgroups only store each slice and go on; the reducer's REDs wait for the memory
// pipe instead of theirs. Launched with 384 threads (168 registers each), then setmaxnreg moves
// the registers to the compute warpgroups: 2 x 128 x 240 + 128 x 32 = 65,536.
constexpr int kReducerThreads = 128;
constexpr int kComputeRegs = 240;
constexpr int kReducerRegs = 32;
static_assert(kThreads * kComputeRegs + kReducerThreads * kReducerRegs <= 65536, "register file");
constexpr int kComputeBarrier = 3;  // named barrier of the 256 compute threads (1 and 2: the warpgroups')

// v2.14: two CTAs of neighbouring query blocks 2c and 2c + 1 form a cluster and walk the same
// tiles, those of the 2 block_q queries of both: the window of [i0(2c), i1(2c + 1)) and block 2c's
// list followed by its tail, the keys j = i1(2c) - W + t (t < block 2c + 1's queries) whose run is
// non-empty (block 2c + 1's queries select them, block 2c's list does not hold them;
// docs/perf-notes.md, v2.14). Each CTA's reducer sends one of the two streams for both CTAs,
// rank 0 dV and rank 1 dK: warpgroup w of CTA q stages its slice into buffer q of CTA w (its own
// buffer when w = q, else with st.async into the partner's, which completes the partner's `full`
// barrier), and the reducer adds its two buffers, so a key row of a tile goes to the
// accumulators once per pair instead of once per CTA.
constexpr int kTailMax = kRows;  // the tail's keys (block_q <= kRows), then its length
constexpr int kPairSmemBytes = (kTailMax + 4) * 4;
constexpr uint32_t kSliceBytes = kTileN * kSliceCols * 4;  // one staged slice, as st.async delivers it

// Adds a warpgroup's 64 keys x kD float32 tile (wgmma accumulator layout: warp w % 4 holds key rows
// 16 (w % 4) + g and + 8, columns 8 nd + 2 quad and + 1) to the accumulator rows of its keys, one
// 32-column slice at a time through `slice` (64 x kSliceStride floats, this warpgroup's own).
// `bar` is the warpgroup's named barrier. Padding keys (-1) add nothing.
constexpr int kSliceChunks = kSliceCols / 4;                  // 16-byte chunks of a slice row
constexpr int kSliceReds = kTileN * kSliceChunks / 128;         // reductions per thread and slice

// The keys of the slice rows thread `wtid` of a warpgroup adds (the same rows in every slice):
// read before the K/V stage that holds them is reloaded.
__device__ __forceinline__ void slice_keys(int (&keys)[kSliceReds], const int* stage_keys, int wtid) {
  const int* first = stage_keys + static_cast<unsigned>(wtid) / kSliceChunks;
#pragma unroll
  for (int i = 0; i < kSliceReds; ++i) keys[i] = first[i * (128 / kSliceChunks)];
}

// Writes 32-column slice r of a warpgroup's 64 keys x kD float32 tile (wgmma accumulator layout:
// warp w % 4 holds key rows 16 (w % 4) + g and + 8, columns 8 nd + 2 quad and + 1) to `slice`
// (64 x kSliceStride floats, the warpgroup's own).
template <int kD>
__device__ __forceinline__ void stage_slice(const float (&acc)[kD / 8][4], float* slice, int r, int key0, int g, int quad) {
#pragma unroll
  for (int n = 0; n < kSliceCols / 8; ++n) {
    const int nd = r * (kSliceCols / 8) + n, col = 8 * n + 2 * quad;
    *reinterpret_cast<float2*>(slice + (key0 + g) * kSliceStride + col) = make_float2(acc[nd][0], acc[nd][1]);
    *reinterpret_cast<float2*>(slice + (key0 + g + 8) * kSliceStride + col) = make_float2(acc[nd][2], acc[nd][3]);
  }
}

// stage_slice into another CTA's slice buffer (`remote`: its cluster_map address), each 8-byte
// store completing on the mbarrier at `remote_bar` of that CTA (v2.14).
template <int kD>
__device__ __forceinline__ void stage_slice_remote(const float (&acc)[kD / 8][4], uint32_t remote, uint32_t remote_bar, int r,
                                                   int key0, int g, int quad) {
#pragma unroll
  for (int n = 0; n < kSliceCols / 8; ++n) {
    const int nd = r * (kSliceCols / 8) + n, col = 8 * n + 2 * quad;
    st_async_f2(remote + 4 * ((key0 + g) * kSliceStride + col), acc[nd][0], acc[nd][1], remote_bar);
    st_async_f2(remote + 4 * ((key0 + g + 8) * kSliceStride + col), acc[nd][2], acc[nd][3], remote_bar);
  }
}

// Adds staged slice r to the accumulator rows of the tile's keys (`keys`: this thread's rows, see
// slice_keys). Thread wtid adds chunk wtid % 8 of rows wtid / 8 + 16 i. Padding keys (-1) add nothing.
template <int kD>
__device__ __forceinline__ void reduce_slice(const float* slice, float* dst, const int (&keys)[kSliceReds], int r, int wtid) {
  const unsigned row0 = static_cast<unsigned>(wtid) / kSliceChunks, chunk = static_cast<unsigned>(wtid) % kSliceChunks;
  const float* src = slice + row0 * kSliceStride + 4 * chunk;  // one base address, immediate offsets
#pragma unroll
  for (int i = 0; i < kSliceReds; ++i) {
    if (keys[i] >= 0) {
      atomicAdd(reinterpret_cast<float4*>(dst + static_cast<size_t>(keys[i]) * kD + r * kSliceCols + 4 * chunk),
                *reinterpret_cast<const float4*>(src + i * (128 / kSliceChunks) * kSliceStride));
    }
  }
}

// kEarlySlices: how many of tile t - 1's reduction slices go out while tile t's S and dP run; the rest
// wait until tile t's dQ product is issued, so the reductions go out in two bursts a softmax
// gradient apart. 0 means all of them early (v2.9); v2.12 takes half of them early, v2.12b one.
// kReducer (v2.13): the compute warpgroups hand each staged slice to the reducer warpgroup
// through two mbarriers per warpgroup (full: staged; empty: read) instead of sending it
// themselves; the deterministic mode never launches it (its int64 adds stay in the compute
// warpgroups, launch() below).
// kPair (v2.14, with kReducer): the CTA pairs above; launched in clusters of two along x.
template <int kD, typename Elem, int kEarlySlices, bool kReducer, bool kPair = false>
__global__ void __launch_bounds__(kReducer ? kThreads + kReducerThreads : kThreads, 1) attention_bwd_kernel(const AttnBwdParams p) {
  using T = Traits<kD>;
  constexpr int kC = T::kChunks;
  constexpr int kSlices = kD / kSliceCols;
  constexpr int kEarly = kEarlySlices == 0 ? kSlices : kEarlySlices;  // slices reduced while S and dP run
  static_assert(kEarly >= 1 && kEarly <= kSlices, "slice 0 is staged before the tile's barrier: it goes early");
  static_assert(kReducer || !kPair, "the pair's streams are sent by the reducers");
  constexpr uint32_t kPanelBytes = kPanel * 2;
  constexpr uint32_t kTileBytes = T::kTileElems * 2;
  constexpr uint32_t kGroupBytes = 8 * kPanelBytes;          // 8 swizzled rows
  constexpr uint32_t kTilePanelBytes = kTileN * kPanelBytes;  // one 64-column panel of a K/V tile
  constexpr uint32_t kRowsPanelBytes = kRows * kPanelBytes;   // one 64-column panel of Q / dO; all of P / dS

  extern __shared__ unsigned char smem_raw[];
  // The swizzle is a function of the absolute shared address: start the operands on a 1024 B line.
  const uint32_t raw_addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  unsigned char* smem = smem_raw + ((kAlign - (raw_addr & (kAlign - 1))) & (kAlign - 1));
  Elem* sQ = reinterpret_cast<Elem*>(smem);
  Elem* sDO = sQ + kRows * kD;
  Elem* sK = sDO + kRows * kD;
  Elem* sV = sK + kStages * T::kTileElems;
  Elem* sP = sV + kStages * T::kTileElems;
  Elem* sDS = sP + kRows * kTileN;
  int* sKey = reinterpret_cast<int*>(sDS + kRows * kTileN);  // [stage][key row]: key index, -1 = padding
  // [stage][key row]: {j + W, end_j, u_j (bits), unused}, so the softmax gradient reads a listed
  // key's three values with two loads instead of three.
  int4* sMeta = reinterpret_cast<int4*>(sKey + kStages * kTileN);
  float* sColSum = reinterpret_cast<float*>(sMeta + kStages * kTileN);  // [warp][key]: column sums of gamma over the warp's rows
  float* sSlice = sColSum + kWarps * kTileN;  // [warpgroup][key][kSliceStride]: dK/dV reduction slices
  uint64_t* slice_full = reinterpret_cast<uint64_t*>(sSlice + 2 * kTileN * kSliceStride);  // [warpgroup], v2.13
  uint64_t* slice_empty = slice_full + 2;                                                    // [warpgroup], v2.13
  int* sTail = reinterpret_cast<int*>(slice_empty + 2);  // v2.14: [kTailMax] the tail's keys, then its length

  const int blk = blockIdx.x;
  const int bh = blockIdx.y + p.bh_offset;
  const int b = bh / p.kv_heads, hkv = bh % p.kv_heads;
  const int S = p.seq_len, W = p.window;
  const int i0 = blk * p.block_q, i1 = min(S, i0 + p.block_q);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, quad = lane & 3;
  // The warpgroup, read through a shuffle so that ptxas knows it is warp-uniform: from `warp / 4`
  // it built every Q / dO wgmma descriptor (which depends on it) in vector registers and moved it
  // into uniform registers with two R2UR per k-step; now they are built in uniform registers.
  const int wgi = __shfl_sync(0xffffffffu, warp / 4, 0);

  const Elem* k_base = static_cast<const Elem*>(p.k) + b * p.k_batch_stride + hkv * p.k_head_stride;
  const Elem* v_base = static_cast<const Elem*>(p.v) + b * p.v_batch_stride + hkv * p.v_head_stride;
  const float* scores = p.scores + (size_t)bh * S;
  const int* ends = p.end + (size_t)bh * S;

  // The tiles: this block's, or with kPair the pair's (block blk_plan's list, the window of the
  // pair's queries [ip0, ip1), then the tail).
  const int blk_plan = kPair ? (blk & ~1) : blk;
  const int ip0 = kPair ? blk_plan * p.block_q : i0, ip1 = kPair ? min(S, ip0 + 2 * p.block_q) : i1;
  const TilePlan<kTileN> plan(p.block_keys, p.block_count, bh, blk_plan, p.n_blocks, p.cap, ip0, ip1, W);

  if constexpr (kReducer) {
    if constexpr (kPair) {
      if (warp == 0) {  // the tail, ascending, so both CTAs of the pair build the same one
        const int i_mid = min(S, ip0 + p.block_q), n_cand = ip1 - i_mid;
        int n = 0;
        for (int base = 0; base < n_cand; base += 32) {
          const int t = base + lane, j = i_mid - W + t;
          const bool take = t < n_cand && j >= 0 && ends[j] > j + W;
          const unsigned ballot = __ballot_sync(kFull, take);
          if (take) sTail[n + __popc(ballot & ((1u << lane) - 1u))] = j;
          n += __popc(ballot);
        }
        if (lane == 0) sTail[kTailMax] = n;
      }
    }
    if (tid == 0) {
      for (int w = 0; w < 2; ++w) {
        // kPair: slice_full[0] is this CTA's reducer's: the arrivals of warpgroup `rank` here, one
        // of them expecting the bytes of the partner's warpgroup `rank`.
        mbar_init(&slice_full[w], 128);   // every thread of the compute warpgroup, once its part is stored
        mbar_init(&slice_empty[w], 128);  // every reducer thread (kPair: of CTA w), once its part is read
      }
      if constexpr (kPair) fence_mbar_init_cluster();
    }
    if constexpr (kPair) {
      cluster_sync();  // the partner's barriers are initialised before anyone arrives on them
    } else {
      __syncthreads();  // the only CTA-wide barrier: the compute warpgroups meet on kComputeBarrier
    }
  }
  const int w0 = plan.w0, n_win = plan.n_win;
  const int count = kPair ? plan.count + sTail[kTailMax] : plan.count;
  const int n_tiles = kPair ? n_win + (count + kTileN - 1) / kTileN : plan.n_tiles;

  if constexpr (kReducer) {
    if (wgi == 2 && kPair) {
      // ---- v2.14's reducer: stream `rank` of both CTAs (0: dV, 1: dK), every slice of every tile ----
      regs_lower<kReducerRegs>();
      const int rtid = tid - kThreads;
      const unsigned row0 = static_cast<unsigned>(rtid) / kSliceChunks, chunk = static_cast<unsigned>(rtid) % kSliceChunks;
      const int rank = blk & 1;  // the cluster's rank along x: blockIdx.x % 2
      // Buffer `rank` holds this CTA's slice, the other one the partner's.
      const float* const src = sSlice + row0 * kSliceStride + 4 * chunk;
      const uint32_t empty_there = cluster_map(smem_addr(&slice_empty[rank]), rank ^ 1);
      int keys[kSliceReds];
      const uint32_t n_slices = static_cast<uint32_t>(n_tiles) * kSlices;
      for (uint32_t k = 0; k < n_slices; ++k) {
        const uint32_t r = k % kSlices;
        mbar_wait(&slice_full[0], k & 1);
        // The tile's keys, the same in both CTAs; this CTA's stage is reloaded only after its
        // warpgroup `rank` has handed over slice 1 of the tile, which waits for this slice's `empty`.
        if (r == 0) slice_keys(keys, sKey + (k / kSlices % kStages) * kTileN, rtid);
        float* const dst = static_cast<float*>(rank == 0 ? p.dv_acc : p.dk_acc) + (size_t)blockIdx.y * S * kD + r * kSliceCols + 4 * chunk;
        // Two halves of the thread's rows: the first half's sums go out before the second half
        // is read, so that 32 registers hold the loop (all eight loads at once spilled).
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          float4 v[kSliceReds / 2];
#pragma unroll
          for (int h = 0; h < kSliceReds / 2; ++h) {
            const int off = (half * kSliceReds / 2 + h) * (128 / kSliceChunks) * kSliceStride;
            v[h] = *reinterpret_cast<const float4*>(src + off);
            const float4 o = *reinterpret_cast<const float4*>(src + kTileN * kSliceStride + off);
            v[h].x += o.x;
            v[h].y += o.y;
            v[h].z += o.z;
            v[h].w += o.w;
          }
          if (half == 1) {
            mbar_arrive(&slice_empty[rank]);  // release: both buffers are read before they are written again
            mbar_arrive_remote(empty_there);
          }
#pragma unroll
          for (int h = 0; h < kSliceReds / 2; ++h) {
            const int key = keys[half * kSliceReds / 2 + h];
            if (key >= 0) atomicAdd(reinterpret_cast<float4*>(dst + static_cast<size_t>(key) * kD), v[h]);
          }
        }
      }
      cluster_sync();  // no CTA leaves while the other may still read its slices or arrive on its barriers
      return;
    }
    if (wgi == 2) {
      // ---- the reducer: every slice of every tile, warpgroup 0's (dV) then 1's (dK) ----
      regs_lower<kReducerRegs>();
      const int rtid = tid - kThreads;
      const unsigned row0 = static_cast<unsigned>(rtid) / kSliceChunks, chunk = static_cast<unsigned>(rtid) % kSliceChunks;
      const float* const src0 = sSlice + row0 * kSliceStride + 4 * chunk;
      // One loop counter (32 registers hold little more than a slice): k = kSlices t + r, the
      // slices taken from each warpgroup so far; the accumulators' bases come from the
      // parameter bank at each use.
      int keys[kSliceReds];
      const uint32_t n_slices = static_cast<uint32_t>(n_tiles) * kSlices;
      for (uint32_t k = 0; k < n_slices; ++k) {
        const uint32_t r = k % kSlices;
#pragma unroll
        for (int w = 0; w < 2; ++w) {
          mbar_wait(&slice_full[w], k & 1);
          // Tile k / kSlices's keys, while its stage still holds them: the stage is reloaded only
          // after warpgroup 0 has staged slice 1 of that tile, which waits for this slice's `empty`.
          if (r == 0 && w == 0) slice_keys(keys, sKey + (k / kSlices % kStages) * kTileN, rtid);
          float4 v[kSliceReds];
#pragma unroll
          for (int i = 0; i < kSliceReds; ++i) {
            v[i] = *reinterpret_cast<const float4*>(src0 + w * kTileN * kSliceStride + i * (128 / kSliceChunks) * kSliceStride);
          }
          mbar_arrive(&slice_empty[w]);  // release: the reads above are done before the slice is restaged
          float* const dst = static_cast<float*>(w == 0 ? p.dv_acc : p.dk_acc) + (size_t)blockIdx.y * S * kD + r * kSliceCols + 4 * chunk;
#pragma unroll
          for (int i = 0; i < kSliceReds; ++i) {
            if (keys[i] >= 0) atomicAdd(reinterpret_cast<float4*>(dst + static_cast<size_t>(keys[i]) * kD), v[i]);
          }
        }
      }
      return;
    }
    regs_raise<kComputeRegs>();
  }
  // The compute threads' CTA-wide barrier (the reducer takes no part in it).
  auto compute_sync = [] {
    if constexpr (kReducer) {
      named_barrier_sync(kComputeBarrier, kThreads);
    } else {
      __syncthreads();
    }
  };

  const int my_row = tid / T::kLoadersPerRow, my_part = tid % T::kLoadersPerRow;
  const uint32_t k_addr = smem_addr(sK), v_addr = smem_addr(sV);
  auto tile_key = [&](int t) {
    if constexpr (kPair) {  // list places past block blk_plan's own list: the tail
      const int idx = (t - n_win) * kTileN + my_row;
      if (t >= n_win && idx >= plan.count) return idx < count ? sTail[idx - plan.count] : -1;
    }
    return plan.key(t, my_row);
  };
  auto load_tile = [&](int t, int stage, int j) {
    uint32_t piece_off[T::kChunksPerThread];  // byte offset of my piece c within a tile
#pragma unroll
    for (int c = 0; c < T::kChunksPerThread; ++c) piece_off[c] = 2 * sw128<kTileN>(my_row, my_part * T::kChunksPerThread + c);
    const bool ok = j >= 0;
    const int64_t jj = ok ? j : 0;
    const Elem* ksrc = k_base + jj * p.k_row_stride + my_part * T::kChunksPerThread * 8;
    const Elem* vsrc = v_base + jj * p.v_row_stride + my_part * T::kChunksPerThread * 8;
    const uint32_t kdst = k_addr + stage * kTileBytes, vdst = v_addr + stage * kTileBytes;
#pragma unroll
    for (int c = 0; c < T::kChunksPerThread; ++c) {
      cp_async16(kdst + piece_off[c], ksrc + c * 8, ok);
      cp_async16(vdst + piece_off[c], vsrc + c * 8, ok);
    }
    if (my_part == 0) {
      const int m = stage * kTileN + my_row;
      sKey[m] = j;
      if (t >= n_win) {  // window tiles need no per-key data
        if (ok) {
          int* meta = reinterpret_cast<int*>(sMeta + m);
          meta[0] = j + W;
          cp_async4(meta + 1, ends + j);
          cp_async4(meta + 2, scores + j);
        } else {
          sMeta[m] = make_int4(S, -1, 0, 0);  // padding: selected by no row (i < S)
        }
      }
    }
  };

  // ---- prologue: Q and dO rows (zero beyond S) with tile 0, then tile 1 ----
  const Elem* dout = static_cast<const Elem*>(p.dout);
  const Elem* q_base = static_cast<const Elem*>(p.q) + b * p.q_batch_stride;
  for (int c = tid; c < kRows * kC; c += kThreads) {
    const int r = c / kC, ch = c % kC;
    const int i = i0 + r % p.block_q, head = hkv * p.group + r / p.block_q;
    const bool ok = i < S;
    const int64_t ii = ok ? i : 0;
    const int off = sw128<kRows>(r, ch);
    cp_async16(smem_addr(sQ + off), q_base + head * p.q_head_stride + ii * p.q_row_stride + ch * 8, ok);
    cp_async16(smem_addr(sDO + off), dout + (((size_t)b * p.q_heads + head) * S + ii) * kD + ch * 8, ok);
  }
  if (n_tiles > 0) load_tile(0, 0, tile_key(0));
  cp_async_commit();
  if (n_tiles > 1) load_tile(1, 1, tile_key(1));
  cp_async_commit();
  int key_next = tile_key(2);

  // Per-thread rows (wgmma accumulator layout): warp w holds rows 16w .. 16w + 15, this thread
  // rows r_lo = 16w + lane/4 and r_lo + 8.
  const int r_lo = warp * 16 + g;
  const Rows rows(p, b, hkv, bh, i0, r_lo);

  // Descriptors (see the forward kernel): A operands of S and dP are this warpgroup's 64 rows of Q
  // / dO (K-major); B operands K / V tiles (K-major). dQ += dS K reads the K tile MN-major (keys
  // are the reduction). dV = P^T dO and dK = dS^T Q read P / dS and dO / Q MN-major, the 128 rows
  // being the reduction: a k-step of 16 rows is 16 swizzled 128-byte rows further.
  const uint32_t q_addr = smem_addr(sQ), do_addr = smem_addr(sDO);
  const uint32_t p_addr = smem_addr(sP), ds_addr = smem_addr(sDS);
  auto rows_kmajor = [&](uint32_t base, int kk) {
    return smem_desc(base + wgi * kWgRows * kPanelBytes + (kk / 4) * kRowsPanelBytes + (kk % 4) * 32, 16, kGroupBytes);
  };
  auto tile_kmajor = [&](uint32_t tile, int kk) {
    return smem_desc(tile + (kk / 4) * kTilePanelBytes + (kk % 4) * 32, 16, kGroupBytes);
  };
  auto tile_mn = [&](uint32_t tile, int kk) { return smem_desc(tile + kk * 16 * kPanelBytes, kTilePanelBytes, kGroupBytes); };
  auto rows_mn = [&](uint32_t base, int kr) { return smem_desc(base + kr * 16 * kPanelBytes, kRowsPanelBytes, kGroupBytes); };
  // Warpgroup 0 forms dV = P^T dO, warpgroup 1 dK = dS^T Q.
  const uint32_t kv_a = wgi == 0 ? p_addr : ds_addr, kv_b = wgi == 0 ? do_addr : q_addr;
  char* kv_acc = static_cast<char*>(wgi == 0 ? p.dv_acc : p.dk_acc) + (size_t)blockIdx.y * S * kD * (p.deterministic ? 8 : 4);
  const double* kv_fixed = p.fixed_scale + (wgi == 0 ? 1 : 0);
  const int key0 = 16 * (warp % 4);

  float dq[kD / 8][4];
#pragma unroll
  for (int nd = 0; nd < kD / 8; ++nd) dq[nd][0] = dq[nd][1] = dq[nd][2] = dq[nd][3] = 0.f;
  float gamma_sum[2] = {0.f, 0.f};

  // S = Q K^T and dP = dO V^T of tile t, this warpgroup's 64 rows; issued, not waited for.
  float s[kTileN / 8][4], dp[kTileN / 8][4];
  auto issue_s_dp = [&](int t) {
    uint32_t q_rows = q_addr, do_rows = do_addr;
    // Opaque copies: the descriptors are recomputed per tile from these two registers (a few
    // integer adds) instead of being hoisted out of the loop as 32 live registers.
    asm volatile("" : "+r"(q_rows), "+r"(do_rows));
    const uint32_t k_tile = k_addr + (t % kStages) * kTileBytes, v_tile = v_addr + (t % kStages) * kTileBytes;
    wgmma_fence();
    Wgmma<Elem>::ss_n64_init(s, rows_kmajor(q_rows, 0), tile_kmajor(k_tile, 0));
#pragma unroll
    for (int kk = 1; kk < kD / 16; ++kk) Wgmma<Elem>::ss_n64(s, rows_kmajor(q_rows, kk), tile_kmajor(k_tile, kk), 1);
    Wgmma<Elem>::ss_n64_init(dp, rows_kmajor(do_rows, 0), tile_kmajor(v_tile, 0));
#pragma unroll
    for (int kk = 1; kk < kD / 16; ++kk) Wgmma<Elem>::ss_n64(dp, rows_kmajor(do_rows, kk), tile_kmajor(v_tile, kk), 1);
    wgmma_commit();
  };
  // Tile t - 1's dV or dK (64 keys x kD float32) between its products and its reductions, which
  // run in iteration t while the tensor cores work on tile t's S and dP. Waited-for accumulators
  // cross the loop's back edge here, not S / dP: ptxas spilled ~20 registers at D128 when S / dP
  // were issued at the end of an iteration and consumed in the next.
  float acc[kD / 8][4];
  float* const slice = sSlice + wgi * kTileN * kSliceStride;
  float* const kv_dst = reinterpret_cast<float*>(kv_acc);
  const int wtid = tid % 128, bar = 1 + wgi;
  uint32_t handed = 0;  // v2.13: slices this warpgroup has handed to the reducer
  // v2.14: the reducer of the CTA of rank wgi takes this warpgroup's slices, in buffer `rank` of that CTA.
  const int rank = blk & 1;
  const uint32_t slice_there = kPair ? cluster_map(smem_addr(sSlice + rank * kTileN * kSliceStride), wgi) : 0;
  const uint32_t full_there = kPair ? cluster_map(smem_addr(&slice_full[0]), wgi) : 0;
  auto hand_over = [&](int r) {
    if constexpr (kPair) {
      if (handed > 0) mbar_wait(&slice_empty[wgi], (handed - 1) & 1);  // read by the reducer of CTA wgi
      if (wgi == rank) {  // slice = buffer rank of this CTA
        stage_slice<kD>(acc, slice, r, key0, g, quad);
        if (wtid == 0) {
          mbar_arrive_expect_tx(&slice_full[0], kSliceBytes);  // and the partner's slice, sent with st.async
        } else {
          mbar_arrive(&slice_full[0]);
        }
      } else {
        stage_slice_remote<kD>(acc, slice_there, full_there, r, key0, g, quad);
      }
    } else {
      if (handed > 0) mbar_wait(&slice_empty[wgi], (handed - 1) & 1);  // the reducer has read the last one
      stage_slice<kD>(acc, slice, r, key0, g, quad);
      mbar_arrive(&slice_full[wgi]);
    }
    ++handed;
  };
  // Slices r0 .. r1 - 1 of the previous tile's accumulator (slice 0 was staged before the barrier
  // that precedes the first call; the others are staged here); keys from the previous tile's
  // stage, which is reloaded only after the next softmax barrier.
  auto reduce_slices = [&](int prev_stage, int r0, int r1) {
    if constexpr (kReducer) {  // slice 0 was handed over at the end of the previous tile
#pragma unroll
      for (int r = r0 > 0 ? r0 : 1; r < r1; ++r) hand_over(r);
      return;
    }
    int red_keys[kSliceReds];
    slice_keys(red_keys, sKey + prev_stage * kTileN, wtid);
#pragma unroll
    for (int r = r0; r < r1; ++r) {
      if (r > 0) {
        named_barrier_sync(bar, 128);  // every warp of the warpgroup has read the slice before
        stage_slice<kD>(acc, slice, r, key0, g, quad);
        named_barrier_sync(bar, 128);
      }
      reduce_slice<kD>(slice, kv_dst, red_keys, r, wtid);
    }
    // The next barrier of the loop orders the next slice 0 after these reads.
  };

  // Per tile t (v2.4): S and dP issued; tile t - 1's dK/dV reductions while they run; the
  // softmax gradient, dQ; tile t + 2 loaded into tile t - 1's stage; dV / dK, then slice 0 of
  // the accumulator staged (docs/perf-notes.md).
  for (int t = 0; t < n_tiles; ++t) {
    const int stage = t % kStages;
    const uint32_t k_tile = k_addr + stage * kTileBytes;
    cp_async_wait<1>();  // tile t (and Q, dO) has landed; tile t + 1 may still be in flight
    fence_proxy_async();
    // Tile t is visible to every thread; every warpgroup is done with sP / sDS / sColSum (written
    // again by tile t) and has staged slice 0 of tile t - 1.
    compute_sync();
    issue_s_dp(t);
    if (t > 0 && !p.deterministic) reduce_slices((t - 1) % kStages, 0, kEarly);
    wgmma_wait<0>();
    fence_regs(s);
    fence_regs(dp);

    const bool listed = t >= n_win;
    float col[kTileN / 8][2] = {};  // gamma of the soft selected entries, summed over this thread's two rows
    if (!listed) {
      const int j0 = w0 + t * kTileN;
      const bool inside = j0 + kTileN - 1 <= i0 && j0 > i1 - 1 - W;  // see window_tile_grad
      window_tile_grad(s, dp, rows, j0, quad, W, p.scale_log2, inside);
    } else {
      const int4* meta = sMeta + stage * kTileN;
      list_tile_grad(s, dp, col, gamma_sum, rows, quad, p.scale_log2, [&](int cj, int& start_j, int& end_j, float& u_j) {
        const int2 range = *reinterpret_cast<const int2*>(meta + cj);  // 16 bytes would cost 4 registers
        start_j = range.x;
        end_j = range.y;
        u_j = reinterpret_cast<const float*>(meta + cj)[2];
      });
    }

    // P and dS to shared memory (for dV and dK); dS as A fragments for dQ += dS K.
    uint32_t ds_frag[kTileN / 16][4];
    store_p_ds<Elem>(s, dp, sP, sDS, r_lo, quad, ds_frag);
    // dQ += dS K on the tensor cores while the column sums and the barrier below proceed.
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kTileN / 16; ++kk) {
      if constexpr (kD == 128) {
        Wgmma<Elem>::rs_n128(dq, ds_frag[kk], tile_mn(k_tile, kk));
      } else {
        Wgmma<Elem>::rs_n64(dq, ds_frag[kk], tile_mn(k_tile, kk));
      }
    }
    wgmma_commit();
    // v2.12: the last slices of tile t - 1 while dQ runs; its stage is reloaded only after the
    // barrier below, and acc is written again only by this tile's dV / dK.
    if constexpr (kEarly < kSlices) {
      if (t > 0 && !p.deterministic) reduce_slices((t - 1) % kStages, kEarly, kSlices);
    }
    if (listed) {  // column sums over the warp's 16 rows: lanes of one quad position share columns
#pragma unroll
      for (int nb = 0; nb < kTileN / 8; ++nb) {
#pragma unroll
        for (int e2 = 0; e2 < 2; ++e2) {
          float v = col[nb][e2];
          v += __shfl_xor_sync(kFull, v, 4);
          v += __shfl_xor_sync(kFull, v, 8);
          v += __shfl_xor_sync(kFull, v, 16);
          if (g == 0) sColSum[warp * kTileN + 8 * nb + 2 * quad + e2] = v;
        }
      }
    }
    fence_proxy_async();  // the P / dS stores above are read by wgmma (the async proxy)
    // P, dS and the column sums of every warp are in shared memory; every warp is done with tile
    // t - 1 (its reductions read their keys from that stage), so the stage is loaded again here,
    // where only dq and ds_frag hold accumulator registers.
    compute_sync();
    if (t + 2 < n_tiles) load_tile(t + 2, (t + 2) % kStages, key_next);
    cp_async_commit();  // possibly empty: keeps the group count uniform
    key_next = tile_key(t + 3);

    // ---- this warpgroup's half of the key-major products: 64 keys x D of dV or dK ----
    wgmma_fence();
    if constexpr (kD == 128) {
      Wgmma<Elem>::ss_n128_tt_init(acc, rows_mn(kv_a, 0), rows_mn(kv_b, 0));
    } else {
      Wgmma<Elem>::ss_n64_tt_init(acc, rows_mn(kv_a, 0), rows_mn(kv_b, 0));
    }
#pragma unroll
    for (int kr = 1; kr < kRows / 16; ++kr) {
      if constexpr (kD == 128) {
        Wgmma<Elem>::ss_n128_tt(acc, rows_mn(kv_a, kr), rows_mn(kv_b, kr), 1);
      } else {
        Wgmma<Elem>::ss_n64_tt(acc, rows_mn(kv_a, kr), rows_mn(kv_b, kr), 1);
      }
    }
    wgmma_commit();
    if (listed && tid < kTileN) {  // the tile's per-key score terms while the tensor cores work
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) v += sColSum[w * kTileN + tid];  // fixed order
      const int pos = (t - n_win) * kTileN + tid;
      if (pos < count) {
        if (p.deterministic) {
          p.du_part[((size_t)bh * p.n_blocks + blk) * p.cap + pos] = v;
        } else {
          atomicAdd(p.du + (size_t)bh * S + sKey[stage * kTileN + tid], v);
        }
      }
    }
    wgmma_wait<0>();  // dQ and this tile's dV / dK done: ds_frag and the K stage are free
    fence_regs(acc);
    fence_regs(dq);
    fence_regs(ds_frag);
    if (p.deterministic) {
      add_tile<kD, kD / 8>(acc, kv_acc, sKey + stage * kTileN, key0, 0, lane, true, kv_fixed);
    } else {
      if constexpr (kReducer) {
        hand_over(0);
      } else {
        stage_slice<kD>(acc, slice, 0, key0, g, quad);
      }
      // The rest of the accumulator is read in the next iteration while S / dP are in flight.
      // ptxas does not track across the loop's back edge which wgmma defined it and would wait for
      // S / dP first (warning C7517); an explicit move marks these registers as not wgmma's.
      release_regs<kSliceCols / 8>(acc);
    }
  }
  if (n_tiles > 0 && !p.deterministic) {
    if constexpr (!kReducer) named_barrier_sync(bar, 128);  // slice 0 of the last tile is staged
    reduce_slices((n_tiles - 1) % kStages, 0, kSlices);
  }
  cp_async_wait<0>();
  wgmma_wait<0>();  // nothing is in flight after the last tile; tells ptxas so before dq is read

  // ---- epilogue: dq rows and the per-row sums of gamma ----
  Elem* dq_out = static_cast<Elem*>(p.dq);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float gs = gamma_sum[h];
    gs += __shfl_xor_sync(kFull, gs, 1);
    gs += __shfl_xor_sync(kFull, gs, 2);
    if (rows.qi[h] >= S) continue;
    const size_t row = ((size_t)b * p.q_heads + rows.head_of[h]) * S + rows.qi[h];
    Elem* dst = dq_out + row * kD;
#pragma unroll
    for (int nd = 0; nd < kD / 8; ++nd) {
      *reinterpret_cast<uint32_t*>(dst + 8 * nd + 2 * quad) = pack2<Elem>(dq[nd][2 * h] * p.scale, dq[nd][2 * h + 1] * p.scale);
    }
    if (quad == 0) p.gamma_rows[row] = gs;
  }
  if constexpr (kPair) cluster_sync();  // the partner's reducer may still read this CTA's slices
}

}  // namespace wg

// rowsum(dout * out) for every row: D / 8 threads per row, each one 16-byte chunk of both.
template <int kD, typename Elem>
__global__ void __launch_bounds__(256) bwd_dot_kernel(const BwdDotParams p) {
  constexpr int kPerRow = kD / 8;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kPerRow;
  const int part = threadIdx.x % kPerRow;
  float acc = 0.f;
  if (row < p.rows) {
    const uint4 a = *reinterpret_cast<const uint4*>(static_cast<const Elem*>(p.dout) + row * kD + part * 8);
    const uint4 c = *reinterpret_cast<const uint4*>(static_cast<const Elem*>(p.out) + row * kD + part * 8);
    const Elem* x = reinterpret_cast<const Elem*>(&a);
    const Elem* y = reinterpret_cast<const Elem*>(&c);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc = fmaf(to_float(x[e]), to_float(y[e]), acc);
  }
#pragma unroll
  for (int o = kPerRow / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(kFull, acc, o);
  if (row < p.rows && part == 0) p.dsum[row] = acc;
}

// float32 product rounded to nearest, never flushed (the build uses fast math, whose multiplies
// flush subnormals): the same rounding as the float32 tensor multiply it replaces.
__device__ __forceinline__ float mul_rn(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;\n" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// One pass over a chunk's accumulators, four elements per thread and step: 8 B read, 4 B written
// and, when zero is set, 8 B of zeros written back. The separate fill, scale and copy kernels it
// replaces moved the same bytes at about half the copy rate on an H100 (docs/perf-notes.md,
// backward v2.8).
template <typename Elem>
__global__ void __launch_bounds__(256) bwd_convert_kernel(const BwdConvertParams p) {
  const int64_t n4 = p.elems / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n4; i += stride) {
    float4* ka = reinterpret_cast<float4*>(p.dk_acc) + i;
    float4* va = reinterpret_cast<float4*>(p.dv_acc) + i;
    const float4 a = *ka, b = *va;
    reinterpret_cast<uint2*>(p.dk)[i] =
        make_uint2(pack2<Elem>(mul_rn(a.x, p.scale), mul_rn(a.y, p.scale)), pack2<Elem>(mul_rn(a.z, p.scale), mul_rn(a.w, p.scale)));
    reinterpret_cast<uint2*>(p.dv)[i] = make_uint2(pack2<Elem>(b.x, b.y), pack2<Elem>(b.z, b.w));
    if (p.zero) {
      *ka = make_float4(0.f, 0.f, 0.f, 0.f);
      *va = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
}

template <int kD, typename Elem>
cudaError_t launch(const AttnBwdParams& p, int bh_count, cudaStream_t stream) {
  const dim3 grid(p.n_blocks, bh_count);
  if (p.kernel == 1) return launch_with_smem(attention_bwd_kernel<kD, Elem>, grid, kThreads, Traits<kD>::kSmemBytes, stream, p);
  constexpr int kSlices = kD / wg::kSliceCols;
  constexpr int kSmem = wg::Traits<kD>::kSmemBytes;
  if (p.kernel == 3) return launch_with_smem(wg::attention_bwd_kernel<kD, Elem, kSlices / 2, false>, grid, kThreads, kSmem, stream, p);
  if (p.kernel == 4) return launch_with_smem(wg::attention_bwd_kernel<kD, Elem, 1, false>, grid, kThreads, kSmem, stream, p);
  if (p.kernel == 5 && !p.deterministic) {  // v2.13; its deterministic mode is v2.9's
    return launch_with_smem(wg::attention_bwd_kernel<kD, Elem, kSlices / 2, true>, grid, kThreads + wg::kReducerThreads, kSmem, stream, p);
  }
  if (p.kernel == 6 && !p.deterministic) {  // v2.14: pairs of blocks (a phantom CTA completes an odd count)
    const dim3 pairs(2 * ((p.n_blocks + 1) / 2), bh_count);
    return launch_clusters_with_smem(wg::attention_bwd_kernel<kD, Elem, kSlices / 2, true, true>, pairs, 2,
                                     kThreads + wg::kReducerThreads, kSmem + wg::kPairSmemBytes, stream, p);
  }
  return launch_with_smem(wg::attention_bwd_kernel<kD, Elem, 0, false>, grid, kThreads, kSmem, stream, p);
}

template <int kD, typename Elem>
cudaError_t launch_dot(const BwdDotParams& p, cudaStream_t stream) {
  constexpr int kThreadsDot = 256;
  const int64_t rows_per_block = kThreadsDot / (kD / 8);
  const int64_t blocks = (p.rows + rows_per_block - 1) / rows_per_block;
  bwd_dot_kernel<kD, Elem><<<static_cast<unsigned>(blocks), kThreadsDot, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_bwd_dot(const BwdDotParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.head_dim == 128) return p.is_bf16 ? launch_dot<128, __nv_bfloat16>(p, stream) : launch_dot<128, __half>(p, stream);
  if (p.head_dim == 64) return p.is_bf16 ? launch_dot<64, __nv_bfloat16>(p, stream) : launch_dot<64, __half>(p, stream);
  return cudaErrorInvalidValue;
}

cudaError_t launch_bwd_convert(const BwdConvertParams& p, cudaStream_t stream) {
  if (p.elems == 0) return cudaSuccess;
  if (p.elems % 4 != 0) return cudaErrorInvalidValue;
  constexpr int kThreadsConvert = 256;
  const int64_t blocks = std::min<int64_t>((p.elems / 4 + kThreadsConvert - 1) / kThreadsConvert, 1 << 16);
  if (p.is_bf16) {
    bwd_convert_kernel<__nv_bfloat16><<<static_cast<unsigned>(blocks), kThreadsConvert, 0, stream>>>(p);
  } else {
    bwd_convert_kernel<__half><<<static_cast<unsigned>(blocks), kThreadsConvert, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t launch_attention_bwd(const AttnBwdParams& p, int head_dim, int bh_count, cudaStream_t stream) {
  if (p.n_blocks == 0 || bh_count == 0) return cudaSuccess;
  if (head_dim == 128) return p.is_bf16 ? launch<128, __nv_bfloat16>(p, bh_count, stream) : launch<128, __half>(p, bh_count, stream);
  if (head_dim == 64) return p.is_bf16 ? launch<64, __nv_bfloat16>(p, bh_count, stream) : launch<64, __half>(p, bh_count, stream);
  return cudaErrorInvalidValue;
}

}  // namespace sparsek
