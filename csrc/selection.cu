// SparseK selection on the GPU: threshold tau per query, end position per key, and the union of
// selected keys per query block. Bit-exact in the selection with sparsek/selection.py.
//
// Input: each row of scores sorted ascending by (score, index) (done by the binding with a
// stable sort), so "position" below means the rank in that order and the top-k of a candidate
// prefix is its highest present positions. A key is "present" for prefix length n when its
// index is < n.
//
// Both statistics we need per prefix length n are monotone in n (docs/semantics.md, "Facts the
// kernels rely on"):
//   kth(n): sorted position of the K-th best present key (only moves up),
//   tau(n): the SparseK threshold (only moves up).
// So the prefix lengths are cut into chunks; one CTA per chunk computes the state at a start
// from scratch in parallel, then a thread walks from there, inserting one key per step and
// moving three pointers (tau's two breakpoint fronts and kth) upwards. Every pointer moves over
// each sorted position at most once per walk, so a walk costs O(length + band) steps. The serial
// walk (chunk_walk_kernel) has one walker per chunk; the segmented walk (chunk_segwalk_kernel,
// the default) starts one walker per warp, each on its own segment of the chunk.
#include <cuda_runtime.h>
#include <math_constants.h>

#include <map>
#include <mutex>
#include <tuple>

#include "sparsek_params.h"
#include "selection_api.h"

namespace sparsek {
namespace {

constexpr int kWalkThreads = 256;
constexpr int kWarps = kWalkThreads / 32;
constexpr int kMaxBisect = 80;          // float64 bisection of a unit interval needs < 60
constexpr int kListThreads = 32;        // one warp compacts one block's key list
constexpr int kListWarps = 4;           // blocks per CTA: 32-thread CTAs would cap an SM at 32 warps
constexpr int kEndThreads = 256;
constexpr int kMaxBand = 12288;        // keys a walker keeps in shared memory (144 KB)
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kSanitizeThreads = 256;
constexpr int kPoisonThreads = 256;
constexpr int kPoisonCtasPerRow = 4;   // a finite row costs these CTAs one load each

template <typename T>
__device__ T block_sum(T v, T* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // scratch may still be read by the previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  return total;
}

// The sorted positions a walker reads, indexed in ascending order. GlobalBand is the whole row in
// global memory; SharedBand is the compact copy in shared memory of the keys that matter for
// the chunk (present by its end, score above the floor), stored in descending order.
struct GlobalBand {
  const float* sorted;
  const int* key_at;
  const int* pos;
  int size;
  __device__ float value(int a) const { return sorted[a]; }
  __device__ int key(int a) const { return key_at[a]; }
  __device__ int global_pos(int a) const { return a; }
  __device__ int index_of(int j) const { return pos[j]; }  // band index of key j, -1 if absent
};

struct SharedBand {
  const float* val;  // descending
  const int* idx;
  const int* gpos;
  const int* chunk_slot;  // descending slot of key n0 + c, -1 when below the floor
  int n0;
  int size;
  __device__ float value(int a) const { return val[size - 1 - a]; }
  __device__ int key(int a) const { return idx[size - 1 - a]; }
  __device__ int global_pos(int a) const { return gpos[size - 1 - a]; }
  __device__ int index_of(int j) const {
    const int d = chunk_slot[j - n0];
    return d < 0 ? -1 : size - 1 - d;
  }
};

// First band index whose value satisfies value > t (strict) or value >= t.
template <class Band>
__device__ int band_first_above(const Band& band, double t, bool strict) {
  int lo = 0, hi = band.size;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    const double v = band.value(mid);
    if (strict ? (v > t) : (v >= t)) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// The serial walk over prefix lengths [n0, n_end) from the state at n0: tau, the K-th best
// band index, and the saturated count / soft count / soft sum of the present keys.
//   lo: first band index above tau (keys below never matter again, tau only grows);
//   hi: first band index at or above tau + 1 (present keys from there on are saturated).
// Inserting key n can only raise f(tau) = cU + sF - cF * tau; tau then moves up through the
// breakpoints (a soft key reaching 0, a saturated key turning soft) until f = K again.
template <class Band>
__device__ void walk_chunk(const Band& band, const float* scores, float* tau_out, int* kth_out, int window, int K,
                           int n0, int n_end, double tau, int kth, long long cU, long long cF, double sF) {
  int lo = band_first_above(band, tau, true);
  int hi = band_first_above(band, tau + 1.0, false);
  for (int n = n0;; ++n) {
    tau_out[n + window - 1] = (float)tau;
    kth_out[n] = band.global_pos(kth);
    if (n + 1 >= n_end) break;
    // Key n becomes a candidate: prefix length n + 1, present means key index <= n.
    const double x = scores[n];
    if (x > tau) {
      if (x >= tau + 1.0) ++cU; else { ++cF; sF += x; }
    }
    if (band.index_of(n) > kth) {
      do { ++kth; } while (band.key(kth) > n);  // next present index up; stops at key n
    }
    double f = (double)cU + sF - (double)cF * tau;
    while (f > K) {
      const double e1 = lo < band.size ? (double)band.value(lo) : CUDART_INF;        // a soft key hits 0
      const double e2 = hi < band.size ? (double)band.value(hi) - 1.0 : CUDART_INF;  // a saturated key turns soft
      const double t = fmin(e1, e2);
      if (!(t < CUDART_INF)) break;  // unreachable: f > 0 needs a present key above tau
      if ((double)cU + sF - (double)cF * t <= K) {  // root inside this linear piece (cF > 0)
        tau = (sF - (double)(K - cU)) / (double)cF;
        break;
      }
      tau = t;
      if (e1 <= e2) {
        if (band.key(lo) <= n) { --cF; sF -= (double)band.value(lo); }
        ++lo;
      } else {
        if (band.key(hi) <= n) { --cU; ++cF; sF += (double)band.value(hi); }
        ++hi;
      }
      f = (double)cU + sF - (double)cF * tau;
    }
    // The root can land exactly on the next soft score (a gate of exactly 0): drop such keys
    // now, so that lo stays "first above tau" and a later key equal to tau is not miscounted.
    while (lo < band.size && (double)band.value(lo) <= tau) {
      if (band.key(lo) <= n) { --cF; sF -= (double)band.value(lo); }
      ++lo;
    }
  }
}

// What the top-down scan of a chunk found (step 1 of both chunk kernels).
struct ChunkScan {
  int seen_end;  // keys present by the chunk end down to the stop: the band's size when it fits
  int from;      // lowest sorted position scanned
  int kth_slot;  // descending band slot of the K-th best key present at n0
  int kth0;      // sorted position of that key
  int k1;        // sorted position of the (K+1)-th best key present at n0
};

// 1. One pass down from the top. Keys present at n0 (index < n0) give the K-th and (K+1)-th best;
//    keys present by the chunk end (index < n_end) go to the shared band, descending. The pass
//    stops once the scores fall to u_(K+1) - 1: tau(n0) lies in [u_(K+1) - 1, u_(K)) (below it
//    K+1 keys are saturated; at u_(K) at most K-1 keys are above) and tau only grows, so lower
//    keys never contribute during this chunk.
//    With stop_over_cap the pass also stops once more than band_cap keys are in the band: the
//    caller then only needs to know that the band does not fit (seen_end > band_cap).
__device__ ChunkScan scan_band(const float* sorted, const int* key_at, int S, int K, int n0, int n_end, float* band_val,
                               int* band_idx, int* band_pos, int* chunk_slot, int chunk, int band_cap,
                               bool stop_over_cap = false) {
  __shared__ int s_count0[kWarps], s_count_end[kWarps];
  __shared__ int s_found[2];
  __shared__ int s_kth_slot;
  for (int c = threadIdx.x; c < chunk; c += kWalkThreads) chunk_slot[c] = -1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int seen0 = 0, seen_end = 0;
  int from = 0;
  __syncthreads();
  for (int base = S - 1; base >= 0; base -= kWalkThreads) {
    const int q = base - threadIdx.x;
    const int key = q >= 0 ? key_at[q] : S;
    const bool present0 = key < n0, present_end = key < n_end;
    const unsigned b0 = __ballot_sync(kFullMask, present0);
    const unsigned b_end = __ballot_sync(kFullMask, present_end);
    if (lane == 0) {
      s_count0[warp] = __popc(b0);
      s_count_end[warp] = __popc(b_end);
    }
    __syncthreads();
    int before0 = seen0, before_end = seen_end, total0 = 0, total_end = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      before0 += (w < warp) ? s_count0[w] : 0;
      before_end += (w < warp) ? s_count_end[w] : 0;
      total0 += s_count0[w];
      total_end += s_count_end[w];
    }
    const unsigned below = (1u << lane) - 1u;
    if (present0) {
      const int rank = before0 + __popc(b0 & below) + 1;  // 1 = best
      if (rank == K) {
        s_found[0] = q;
        s_kth_slot = before_end + __popc(b_end & below);  // present at n0, so also by n_end
      }
      if (rank == K + 1) s_found[1] = q;
    }
    if (present_end) {
      const int slot = before_end + __popc(b_end & below);
      if (slot < band_cap) {
        band_val[slot] = sorted[q];
        band_idx[slot] = key;
        band_pos[slot] = q;
        if (key >= n0) chunk_slot[key - n0] = slot;
      }
    }
    seen0 += total0;
    seen_end += total_end;
    from = max(base - kWalkThreads + 1, 0);
    __syncthreads();
    if (stop_over_cap && seen_end > band_cap) break;  // seen_end is the same in every thread
    if (seen0 > K && (double)sorted[from] <= (double)sorted[s_found[1]] - 1.0) break;
  }
  return {seen_end, from, s_kth_slot, s_found[0], s_found[1]};
}

// Steps 2-5 of the walk: the state at n0 by bisection, then one thread walks the chunk. in_shared:
// the band fits in shared memory (else the walk reads the row in global memory).
__device__ void solve_and_walk(const SelectParams& p, int row, int n0, int n_end, const ChunkScan& scan, bool in_shared,
                               const float* band_val, const int* band_idx, const int* band_pos, const int* chunk_slot) {
  __shared__ double s_dscratch[kWarps];
  __shared__ long long s_lscratch[kWarps];
  const int S = p.seq_len, K = p.topk;
  const float* sorted = p.sorted + (size_t)row * S;
  const int* key_at = p.key_at + (size_t)row * S;
  const float* scores = p.scores + (size_t)row * S;
  const int* pos = p.pos + (size_t)row * S;
  float* tau_out = p.tau + (size_t)row * S;
  int* kth_out = p.kth + (size_t)row * (S + 1);
  const int seen_end = scan.seen_end, from = scan.from;
  const double u_k = sorted[scan.kth0], u_k1 = sorted[scan.k1];

  // f(t) = sum of clip(u - t, 0, 1) over the keys present at n0, as counts and a sum:
  // saturated (u >= t + 1), soft (t < u < t + 1) and the soft keys' scores.
  auto for_present0 = [&](auto&& fn) {
    if (in_shared) {
      for (int d = threadIdx.x; d < seen_end; d += kWalkThreads) {
        if (band_idx[d] < n0) fn((double)band_val[d]);
      }
    } else {
      for (int q = from + threadIdx.x; q < S; q += kWalkThreads) {
        if (key_at[q] < n0) fn((double)sorted[q]);
      }
    }
  };
  auto masses = [&](double t, long long& cU, long long& cF, double& sF) {
    long long u = 0, c = 0;
    double sum = 0.0;
    for_present0([&](double v) {
      if (v >= t + 1.0) ++u;
      else if (v > t) { ++c; sum += v; }
    });
    cU = block_sum(u, s_lscratch);
    cF = block_sum(c, s_lscratch);
    sF = block_sum(sum, s_dscratch);
  };

  // 2. Bisection for the piece where f crosses K ...
  double lo = u_k1 - 1.0, hi = u_k;  // f(lo) > K >= f(hi)
  for (int it = 0; it < kMaxBisect; ++it) {
    const double mid = 0.5 * (lo + hi);
    if (mid <= lo || mid >= hi) break;
    double f = 0.0;
    for_present0([&](double v) { f += fmin(fmax(v - mid, 0.0), 1.0); });
    if (block_sum(f, s_dscratch) > K) lo = mid; else hi = mid;
  }
  // 3. ... then the closed form on that linear piece: f(t) = cU + sF - cF * t.
  long long cU, cF;
  double sF;
  masses(0.5 * (lo + hi), cU, cF, sF);
  const double tau0 = cF > 0 ? (sF - (double)(K - cU)) / (double)cF : hi;
  // 4. The walker's state at tau0 itself.
  masses(tau0, cU, cF, sF);
  if (threadIdx.x != 0) return;

  // 5. Walk the chunk.
  if (in_shared) {
    const SharedBand band{band_val, band_idx, band_pos, chunk_slot, n0, seen_end};
    walk_chunk(band, scores, tau_out, kth_out, p.window, K, n0, n_end, tau0, seen_end - 1 - scan.kth_slot, cU, cF, sF);
  } else {
    const GlobalBand band{sorted, key_at, pos, S};
    walk_chunk(band, scores, tau_out, kth_out, p.window, K, n0, n_end, tau0, scan.kth0, cU, cF, sF);
  }
}

// The walk: one CTA per chunk of p.chunk prefix lengths, one thread walking it serially.
__global__ void __launch_bounds__(kWalkThreads, 1) chunk_walk_kernel(SelectParams p, int band_cap) {
  const int row = blockIdx.y;
  const int S = p.seq_len;
  const int n0 = p.topk + 1 + blockIdx.x * p.chunk;
  const int n_end = min(n0 + p.chunk, p.n_max + 1);
  extern __shared__ __align__(16) unsigned char s_band_raw[];
  float* band_val = reinterpret_cast<float*>(s_band_raw);
  int* band_idx = reinterpret_cast<int*>(band_val + band_cap);
  int* band_pos = band_idx + band_cap;
  int* chunk_slot = band_pos + band_cap;  // p.chunk entries
  const ChunkScan scan = scan_band(p.sorted + (size_t)row * S, p.key_at + (size_t)row * S, S, p.topk, n0, n_end, band_val,
                                   band_idx, band_pos, chunk_slot, p.chunk, band_cap);
  solve_and_walk(p, row, n0, n_end, scan, scan.seen_end <= band_cap, band_val, band_idx, band_pos, chunk_slot);
}

// ---- the segmented walk: one segment of the chunk per warp, walked concurrently ----
//
// The serial walk spends most of its time in one thread stepping through the whole chunk. Here
// the chunk's prefix lengths are cut into kWarps segments; the CTA computes the walker's state at
// each segment start, then lane 0 of every warp walks its own segment with walk_chunk: eight
// walks at once, each an eighth as long. A segment start n_s costs two passes over the band
// instead of the walk's float bisection:
//   1. prefix counts and sums, in band order (descending score), of the keys present at n_s
//      (index < n_s). With them f(t) = sum of clip(u - t, 0, 1) over the present keys costs
//      two binary searches at any t (the saturated and the soft range are runs of the band);
//   2. f's breakpoints are the band's scores v and v - 1 (keys below the band lie under the
//      floor, which every tau of the chunk exceeds). A 128-ary search per family finds
//        a1 = last slot with f(v_a1) <= K        (slot 0, the top score, always qualifies),
//        b1 = last slot with f(v_b1 - 1) <= K    (-1 if none; the last slot never qualifies),
//      so f is linear on (max(v_(a1+1), v_(b1+1) - 1), min(v_a1, v_b1 - 1)) and crosses K
//      there: the reference's closed form on that piece gives tau in float64.
// kth(n_s), the K-th best present key, is the first slot with K present keys at or above it.
// Integers (kth, so end and the block lists) come out exactly those of the serial walk; tau is
// summed in another order and may differ in the last bit.

// Keys a segmented CTA keeps in shared memory: 24 bytes each (score, index, sorted position,
// prefix count, prefix sum in float64) plus 4 per prefix length of the chunk, within the 227 KB
// an SM gives one CTA at the largest chunk (2048). A chunk whose band is larger walks serially
// with the band in global memory instead (same results, slower).
constexpr int kSegMaxBand = 9216;
// A band this small (70 KB a CTA at chunk 1024) lets three CTAs share an SM where a 4,096-key
// band (seed) holds two. The bands of scores like the suite's reach about 4.5 x topk (seed:
// topk 512, at most 2,311 keys), so the small band is tried first only for topk <= 512; its
// overflow, e.g. every chunk of a flat scorer, goes to a second launch with the large band
// (seg_band_plan; docs/perf-notes.md, selection v3.2).
constexpr int kSegSmallBand = 2816;
constexpr int kSmallBandTopkFactor2 = 11;  // small band tried while 11 / 2 x topk fits in it
constexpr int kSearchGroup = kWalkThreads / 2;  // threads per breakpoint family in the search

struct SegSmem {
  double* sum;      // (cap + 1) prefix sums of the present keys' scores, band order
  float* band_val;  // (cap) descending
  int* band_idx;    // (cap)
  int* band_pos;    // (cap) sorted position of each band key
  int* cnt;         // (cap + 1) prefix counts of the present keys
  int* chunk_slot;  // (chunk) band slot of key n0 + c, -1 below the floor

  static size_t bytes(int cap, int chunk) {
    return (size_t)(cap + 1) * (sizeof(double) + sizeof(int)) + (size_t)cap * (sizeof(float) + 2 * sizeof(int)) +
           (size_t)chunk * sizeof(int);
  }
  __device__ static SegSmem carve(unsigned char* raw, int cap) {
    SegSmem s;
    s.sum = reinterpret_cast<double*>(raw);
    s.band_val = reinterpret_cast<float*>(s.sum + cap + 1);
    s.band_idx = reinterpret_cast<int*>(s.band_val + cap);
    s.band_pos = s.band_idx + cap;
    s.cnt = s.band_pos + cap;
    s.chunk_slot = s.cnt + cap + 1;
    return s;
  }
};

// Saturated count, soft count and soft sum of the present keys at threshold t.
struct Masses {
  long long cU, cF;
  double sF;
};

__device__ Masses masses_at(const SegSmem& s, int m, double t) {
  // Slots with v >= t + 1 (saturated) and with v > t (saturated or soft), v descending.
  const double t1 = t + 1.0;
  int lo = 0, hi = m;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if ((double)s.band_val[mid] >= t1) lo = mid + 1; else hi = mid;
  }
  const int a_sat = lo;
  hi = m;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if ((double)s.band_val[mid] > t) lo = mid + 1; else hi = mid;
  }
  const int a_zero = lo;
  return {s.cnt[a_sat], s.cnt[a_zero] - s.cnt[a_sat], s.sum[a_zero] - s.sum[a_sat]};
}

__device__ bool f_at_most(const SegSmem& s, int m, double t, int K) {
  const Masses r = masses_at(s, m, t);
  return (double)r.cU + r.sF - (double)r.cF * t <= (double)K;
}

// Exclusive prefix count and sum over the band of the keys present at n (index < n): each
// thread sums a contiguous run of slots, a block scan gives the runs' offsets. Ends with a
// barrier, so the arrays are published.
__device__ void prefix_present(const SegSmem& s, int m, int n) {
  __shared__ int s_wc[kWarps];
  __shared__ double s_ws[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int per = (m + kWalkThreads - 1) / kWalkThreads;
  const int a0 = min(m, threadIdx.x * per), a1 = min(m, a0 + per);
  int c = 0;
  double sum = 0.0;
  for (int a = a0; a < a1; ++a) {
    if (s.band_idx[a] < n) { ++c; sum += (double)s.band_val[a]; }
  }
  int ci = c;  // inclusive scan within the warp
  double si = sum;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int cn = __shfl_up_sync(kFullMask, ci, o);
    const double sn = __shfl_up_sync(kFullMask, si, o);
    if (lane >= o) { ci += cn; si += sn; }
  }
  if (lane == 31) { s_wc[warp] = ci; s_ws[warp] = si; }
  __syncthreads();
  int c_run = ci - c;
  double s_run = si - sum;
  for (int w = 0; w < warp; ++w) { c_run += s_wc[w]; s_run += s_ws[w]; }
  for (int a = a0; a < a1; ++a) {
    s.cnt[a] = c_run;
    s.sum[a] = s_run;
    if (s.band_idx[a] < n) { ++c_run; s_run += (double)s.band_val[a]; }
  }
  if (threadIdx.x == kWalkThreads - 1) {
    int c_all = 0;
    double s_all = 0.0;
    for (int w = 0; w < kWarps; ++w) { c_all += s_wc[w]; s_all += s_ws[w]; }
    s.cnt[m] = c_all;
    s.sum[m] = s_all;
  }
  __syncthreads();
}

// What walk_chunk starts from: tau, the masses of the present keys at tau, and the K-th best
// present key as an ascending band index.
struct WalkerState {
  double tau, sF;
  long long cU, cF;
  int kth;
};

// The walker's state at the prefix length whose prefix arrays prefix_present just built. Every
// thread calls it; ends with a barrier.
__device__ void segment_state(const SegSmem& s, int m, int K, WalkerState* out) {
  __shared__ int s_votes[kWarps];
  __shared__ int s_b1;
  constexpr int kGroupWarps = kSearchGroup / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int family = threadIdx.x / kSearchGroup;  // 0: a1 over the scores, 1: b1 over the scores - 1
  const int rank = threadIdx.x % kSearchGroup;
  // The predicate holds at lo (or lo is the sentinel -1) and fails at hi (or hi is past the
  // candidates); each round tests kSearchGroup evenly spaced slots strictly between them.
  int lo = family == 0 ? 0 : -1;
  int hi = family == 0 ? m : m - 1;
  while (__syncthreads_or(hi - lo > 1)) {  // the barrier also orders the last round's vote reads
    const int open = hi - lo - 1;
    const int step = max(1, (open + kSearchGroup - 1) / kSearchGroup);
    const int x = lo + (rank + 1) * step;
    bool pred = false;
    if (open > 0 && x < hi) {
      const double v = (double)s.band_val[x];
      pred = f_at_most(s, m, family == 0 ? v : v - 1.0, K);
    }
    const unsigned votes = __ballot_sync(kFullMask, pred);
    if (lane == 0) s_votes[warp] = __popc(votes);
    __syncthreads();
    if (open > 0) {  // the predicate is monotone, so the true candidates are the first `yes`
      int yes = 0;
#pragma unroll
      for (int w = 0; w < kGroupWarps; ++w) yes += s_votes[family * kGroupWarps + w];
      const int new_lo = lo + yes * step;
      hi = min(new_lo + step, hi);
      lo = new_lo;
    }
  }
  if (threadIdx.x == kSearchGroup) s_b1 = lo;
  __syncthreads();
  if (threadIdx.x == 0) {
    const int a1 = lo, b1 = s_b1;
    double b_hi = (double)s.band_val[a1];
    if (b1 >= 0) b_hi = fmin(b_hi, (double)s.band_val[b1] - 1.0);
    double b_lo = (double)s.band_val[b1 + 1] - 1.0;
    if (a1 + 1 < m) b_lo = fmax(b_lo, (double)s.band_val[a1 + 1]);
    Masses r = masses_at(s, m, 0.5 * (b_lo + b_hi));
    const double tau = r.cF > 0 ? (r.sF - (double)(K - r.cU)) / (double)r.cF : b_hi;
    r = masses_at(s, m, tau);
    int klo = -1, khi = m - 1;  // the first slot with K present keys at or above it
    while (khi - klo > 1) {
      const int mid = (klo + khi) >> 1;
      if (s.cnt[mid + 1] >= K) khi = mid; else klo = mid;
    }
    *out = {tau, r.sF, r.cU, r.cF, m - 1 - khi};
  }
  __syncthreads();
}

// One chunk of the segmented walk (chunk index x of row `row`) with s holding band_cap keys.
// A band larger than band_cap walks serially in global memory, unless `defer`: then the chunk
// writes nothing and returns false, for the second launch to take it.
__device__ bool segwalk_chunk(const SelectParams& p, int row, int x, const SegSmem& s, int band_cap, bool defer) {
  __shared__ WalkerState s_state[kWarps];
  const int S = p.seq_len, K = p.topk;
  const int n0 = K + 1 + x * p.chunk;
  const int n_end = min(n0 + p.chunk, p.n_max + 1);
  const ChunkScan scan = scan_band(p.sorted + (size_t)row * S, p.key_at + (size_t)row * S, S, K, n0, n_end, s.band_val,
                                   s.band_idx, s.band_pos, s.chunk_slot, p.chunk, band_cap, defer);
  const int m = scan.seen_end;
  if (m > band_cap) {
    if (defer) return false;
    solve_and_walk(p, row, n0, n_end, scan, false, nullptr, nullptr, nullptr, nullptr);  // the row in global memory
    return true;
  }
  const int seg = (p.chunk + kWarps - 1) / kWarps;  // prefix lengths per segment
  for (int w = 0; w < kWarps && n0 + w * seg < n_end; ++w) {
    prefix_present(s, m, n0 + w * seg);
    segment_state(s, m, K, &s_state[w]);
  }
  const int warp = threadIdx.x >> 5;
  const int ns = n0 + warp * seg;
  if ((threadIdx.x & 31) == 0 && ns < n_end) {
    const WalkerState st = s_state[warp];
    const SharedBand band{s.band_val, s.band_idx, s.band_pos, s.chunk_slot, n0, m};
    walk_chunk(band, p.scores + (size_t)row * S, p.tau + (size_t)row * S, p.kth + (size_t)row * (S + 1), p.window, K,
               ns, min(ns + seg, n_end), st.tau, st.kth, st.cU, st.cF, st.sF);
  }
  return true;
}

// The overflow workspace (p.overflow, int32): the number of deferred chunks, the next one the
// second launch hands out, then the deferred chunks as row * n_chunks + x.
constexpr int kOverflowCount = 0, kOverflowNext = 1, kOverflowList = 2;

// One CTA per chunk. With p.overflow set (the two-launch plan), a chunk whose band exceeds
// band_cap is appended to the overflow list instead of walked.
__global__ void __launch_bounds__(kWalkThreads, 1) chunk_segwalk_kernel(SelectParams p, int band_cap) {
  extern __shared__ __align__(16) unsigned char s_seg_raw[];
  const SegSmem s = SegSmem::carve(s_seg_raw, band_cap);
  const bool walked = segwalk_chunk(p, blockIdx.y, blockIdx.x, s, band_cap, p.overflow != nullptr);
  if (!walked && threadIdx.x == 0) {
    p.overflow[kOverflowList + atomicAdd(&p.overflow[kOverflowCount], 1)] = blockIdx.y * p.n_chunks + blockIdx.x;
  }
}

// The second launch: persistent CTAs with the larger band take the deferred chunks one at a
// time (in whatever order the first launch appended them: each chunk writes only its own prefix
// lengths, so the results do not depend on it).
__global__ void __launch_bounds__(kWalkThreads, 1) chunk_segwalk_overflow_kernel(SelectParams p, int band_cap) {
  extern __shared__ __align__(16) unsigned char s_seg_raw[];
  __shared__ int s_item;
  const SegSmem s = SegSmem::carve(s_seg_raw, band_cap);
  const int count = p.overflow[kOverflowCount];  // final: the first launch has completed
  for (;;) {
    if (threadIdx.x == 0) s_item = atomicAdd(&p.overflow[kOverflowNext], 1);
    __syncthreads();
    const int item = s_item;
    if (item >= count) return;
    const int entry = p.overflow[kOverflowList + item];
    segwalk_chunk(p, entry / p.n_chunks, entry % p.n_chunks, s, band_cap, false);
    __syncthreads();  // s_item and the band are rewritten by the next chunk
  }
}

// tau = -inf for queries whose prefix fits in topk, and the end of every key's selected run:
// key j is selected for prefix lengths [j + 1, N_j), N_j = first n with kth(n) above pos(j).
// A row flagged in `nonfinite` (scores with a NaN or an infinity) gets tau = NaN everywhere: its
// selection was made from sanitised scores and means nothing, and poison_rows_kernel reads the
// NaN to poison the row's attention output.
__global__ void __launch_bounds__(kEndThreads) end_kernel(SelectParams p, const int* nonfinite) {
  const int row = blockIdx.y;
  const int j = blockIdx.x * kEndThreads + threadIdx.x;
  const int S = p.seq_len, K = p.topk, W = p.window;
  if (j >= S) return;
  const int i = j;  // as a query: tau is -inf while n_i = i - W + 1 <= K
  if (nonfinite != nullptr && nonfinite[row] != 0) p.tau[(size_t)row * S + i] = CUDART_NAN_F;
  else if (i - W + 1 <= K || i - W + 1 > p.n_max) p.tau[(size_t)row * S + i] = -CUDART_INF_F;

  const int* kth = p.kth + (size_t)row * (S + 1);
  const int pj = p.pos[(size_t)row * S + j];
  // kth(n) is -1 (nothing beaten) for n <= K; when every prefix fits in topk, nothing is ever
  // beaten and the run lasts to the end of the sequence.
  int lo = min(K + 1, p.n_max + 1), hi = p.n_max + 1;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (kth[mid] > pj) hi = mid; else lo = mid + 1;
  }
  const int n_end = max(lo, j + 1);
  p.end[(size_t)row * S + j] = min(n_end - 1 + W, S);
}

// Union of the selected keys of queries [i0, i1): the top-k of query i0 (its present keys at or
// above kth) plus the keys that become candidates inside the block and are ever selected.
__global__ void __launch_bounds__(kListThreads * kListWarps) block_lists_kernel(SelectParams p) {
  const int row = blockIdx.y, blk = blockIdx.x * kListWarps + (threadIdx.x >> 5);
  if (blk >= p.n_blocks) return;  // whole warps leave: the ballots below stay full-warp
  const int S = p.seq_len, K = p.topk, W = p.window;
  const int i0 = blk * p.block_q, i1 = min(S, i0 + p.block_q);
  const int n = i0 - W + 1;
  const int lane = threadIdx.x & 31;
  int* out = p.block_keys + ((size_t)row * p.n_blocks + blk) * p.cap;
  const int* key_at = p.key_at + (size_t)row * S;
  const int* end = p.end + (size_t)row * S;
  int count = 0;

  if (n >= 1 && n <= K) {  // every candidate of i0 is selected
    for (int j = lane; j < n; j += kListThreads) out[j] = j;
    count = n;
  } else if (n > K) {
    // The K present keys at or above kth(n): scan whichever is shorter, the n candidates in
    // index order (keep pos >= kth) or the sorted positions from kth up (keep index < n).
    const int top = p.kth[(size_t)row * (S + 1) + n];
    const int* pos = p.pos + (size_t)row * S;
    if (n <= S - top) {
      for (int base = 0; base < n && count < K; base += kListThreads) {
        const int j = base + lane;
        const bool take = j < n && pos[j] >= top;
        const unsigned ballot = __ballot_sync(kFullMask, take);
        if (take) out[count + __popc(ballot & ((1u << lane) - 1u))] = j;
        count += __popc(ballot);
      }
    } else {
      for (int base = top; base < S && count < K; base += kListThreads) {
        const int q = base + lane;
        const int key = q < S ? key_at[q] : S;
        const bool take = key < n;
        const unsigned ballot = __ballot_sync(kFullMask, take);
        if (take) out[count + __popc(ballot & ((1u << lane) - 1u))] = key;
        count += __popc(ballot);
      }
    }
  }
  // Keys whose run starts inside the block: j + W in (i0, i1), run non-empty.
  const int j_lo = max(0, i0 - W + 1), j_hi = min(S, i1 - W);
  for (int base = j_lo; base < j_hi; base += kListThreads) {
    const int j = base + lane;
    const bool take = j < j_hi && end[j] > j + W;
    const unsigned ballot = __ballot_sync(kFullMask, take);
    if (take) out[count + __popc(ballot & ((1u << lane) - 1u))] = j;
    count += __popc(ballot);
  }
  if (lane == 0) p.block_count[(size_t)row * p.n_blocks + blk] = count;
}


// ---- non-finite scores, without a host synchronisation ----
// Bit tests rather than isfinite/isnan: the kernels build with --use_fast_math.
__device__ __forceinline__ bool is_finite_bits(float x) { return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u; }
__device__ __forceinline__ bool is_nan_bits(float x) { return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u; }

// clean = scores with every NaN or infinity replaced by 0, and nonfinite[row] = 1 for a row that
// had one (nonfinite starts zeroed): the selection then runs on finite numbers (no pointer of
// either walk can run off on a NaN) and the row's outputs are poisoned afterwards.
__global__ void __launch_bounds__(kSanitizeThreads) sanitize_kernel(const float* scores, float* clean, int* nonfinite, int S) {
  const int row = blockIdx.y;
  const int j = blockIdx.x * kSanitizeThreads + threadIdx.x;
  bool bad = false;
  if (j < S) {
    const float x = scores[(size_t)row * S + j];
    bad = !is_finite_bits(x);
    clean[(size_t)row * S + j] = bad ? 0.f : x;
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) nonfinite[row] = 1;
}

// NaN over the attention output and lse of every row whose tau is NaN (end_kernel's mark of
// non-finite scores; a finite row has tau = -inf at query 0, which has no candidate beyond topk).
// CTAs of a finite row read one float and leave.
__global__ void __launch_bounds__(kPoisonThreads) poison_rows_kernel(const float* tau, int S, uint16_t* out,
                                                                    long long out_per_row, float* lse,
                                                                    long long lse_per_row) {
  const int row = blockIdx.y;
  if (!is_nan_bits(tau[(size_t)row * S])) return;
  // 0x7fff is a quiet NaN in both float16 and bfloat16.
  constexpr uint16_t kNaN16 = 0x7fff;
  const long long stride = (long long)gridDim.x * kPoisonThreads;
  for (long long e = (long long)blockIdx.x * kPoisonThreads + threadIdx.x; e < out_per_row; e += stride) {
    out[row * out_per_row + e] = kNaN16;
  }
  for (long long e = (long long)blockIdx.x * kPoisonThreads + threadIdx.x; e < lse_per_row; e += stride) {
    lse[row * lse_per_row + e] = CUDART_NAN_F;
  }
}

// CTAs of `kernel` (a segmented-walk kernel) that fit on one SM of the current device with a
// band of band_cap keys; 0 if none or the query fails. Remembered per (kernel, device, bytes):
// every selection call asks, and the answer never changes. Leaves the kernel's dynamic shared
// memory attribute at the bytes asked about, so a launch sets its own first.
int seg_occupancy(const void* kernel, int band_cap, int chunk) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, size_t>, int> known;
  const size_t smem = SegSmem::bytes(band_cap, chunk);
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  const auto key = std::make_tuple(kernel, device, smem);
  const std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = known.find(key); it != known.end()) return it->second;
  int per_sm = 0;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kWalkThreads, smem) != cudaSuccess) {
    return 0;
  }
  known.emplace(key, per_sm);
  return per_sm;
}

}  // namespace

SegBandPlan seg_band_plan(const SelectParams& p) {
  const int large = p.seq_len < kSegMaxBand ? p.seq_len : kSegMaxBand;
  if (p.band_cap > 0) {  // SPARSEK_SELECT_BAND: this band first, the overflow to the large one
    return p.band_cap < large ? SegBandPlan{p.band_cap, large} : SegBandPlan{large, 0};
  }
  if (large <= kSegSmallBand || (long long)kSmallBandTopkFactor2 * p.topk > 2LL * kSegSmallBand) return {large, 0};
  // Only where the small band really fits more CTAs on an SM (registers or the chunk may not allow it).
  const auto kernel = reinterpret_cast<const void*>(chunk_segwalk_kernel);
  if (seg_occupancy(kernel, kSegSmallBand, p.chunk) <= seg_occupancy(kernel, large, p.chunk)) return {large, 0};
  return {kSegSmallBand, large};
}

cudaError_t launch_selection_with(const SelectParams& p, SelectAlgo algo, const int* nonfinite, cudaStream_t stream) {
  if (p.rows == 0 || p.seq_len == 0) return cudaSuccess;
  if (algo == SelectAlgo::kSegmented && p.n_chunks > 0) {
    SegBandPlan plan = seg_band_plan(p);
    SelectParams first = p;
    if (plan.second_cap == 0 || p.overflow == nullptr) {  // one launch with the large band
      plan = {plan.second_cap > 0 ? plan.second_cap : plan.first_cap, 0};
      first.overflow = nullptr;
    }
    const size_t smem = SegSmem::bytes(plan.first_cap, p.chunk);
    if (cudaError_t e = cudaFuncSetAttribute(chunk_segwalk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        e != cudaSuccess) {
      return e;
    }
    chunk_segwalk_kernel<<<dim3(p.n_chunks, p.rows), kWalkThreads, smem, stream>>>(first, plan.first_cap);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    if (plan.second_cap > 0) {
      // As many persistent CTAs as fit at once (they loop over the deferred chunks), at most one
      // per chunk.
      const auto kernel = reinterpret_cast<const void*>(chunk_segwalk_overflow_kernel);
      const int per_sm = seg_occupancy(kernel, plan.second_cap, p.chunk);
      if (per_sm == 0) return cudaErrorInvalidConfiguration;
      int device = 0, sms = 0;
      if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
      if (cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device); e != cudaSuccess) return e;
      const long long chunks = (long long)p.n_chunks * p.rows;
      const int ctas = (int)(chunks < (long long)per_sm * sms ? chunks : (long long)per_sm * sms);
      const size_t smem2 = SegSmem::bytes(plan.second_cap, p.chunk);
      if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem2);
          e != cudaSuccess) {
        return e;
      }
      chunk_segwalk_overflow_kernel<<<ctas, kWalkThreads, smem2, stream>>>(p, plan.second_cap);
      if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    }
  } else if (algo == SelectAlgo::kWalk && p.n_chunks > 0) {
    // The shared band holds at most every key of the row (12 bytes each) plus the chunk's slots;
    // past kMaxBand keys a chunk that needs more walks in global memory instead.
    const int band_cap = p.seq_len < kMaxBand ? p.seq_len : kMaxBand;
    const size_t smem = (size_t)band_cap * (sizeof(float) + 2 * sizeof(int)) + (size_t)p.chunk * sizeof(int);
    if (cudaError_t e = cudaFuncSetAttribute(chunk_walk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        e != cudaSuccess) {
      return e;
    }
    chunk_walk_kernel<<<dim3(p.n_chunks, p.rows), kWalkThreads, smem, stream>>>(p, band_cap);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  end_kernel<<<dim3((p.seq_len + kEndThreads - 1) / kEndThreads, p.rows), kEndThreads, 0, stream>>>(p, nonfinite);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  if (p.block_keys != nullptr) {
    block_lists_kernel<<<dim3((p.n_blocks + kListWarps - 1) / kListWarps, p.rows), kListThreads * kListWarps, 0, stream>>>(p);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

cudaError_t launch_selection(const SelectParams& p, cudaStream_t stream) {
  return launch_selection_with(p, SelectAlgo::kSegmented, nullptr, stream);
}

cudaError_t launch_sanitize_scores(const float* scores, float* clean, int* nonfinite, int rows, int seq_len, cudaStream_t stream) {
  if (rows == 0 || seq_len == 0) return cudaSuccess;
  sanitize_kernel<<<dim3((seq_len + kSanitizeThreads - 1) / kSanitizeThreads, rows), kSanitizeThreads, 0, stream>>>(
      scores, clean, nonfinite, seq_len);
  return cudaGetLastError();
}

cudaError_t launch_poison_rows(const float* tau, int rows, int seq_len, void* out, long long out_per_row, float* lse,
                               long long lse_per_row, cudaStream_t stream) {
  if (rows == 0 || seq_len == 0) return cudaSuccess;
  const dim3 grid(kPoisonCtasPerRow, rows);
  poison_rows_kernel<<<grid, kPoisonThreads, 0, stream>>>(tau, seq_len, static_cast<uint16_t*>(out), out_per_row, lse,
                                                         lse_per_row);
  return cudaGetLastError();
}

}  // namespace sparsek
