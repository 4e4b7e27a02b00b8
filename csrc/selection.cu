// SparseK selection on the GPU: threshold tau per query, end position per key, and the union of
// selected keys per query block. Bit-exact in the selection with sparsek/selection.py.
//
// Input: each row of scores sorted ascending by (score, index) (done by the binding with a
// stable sort), so "position" below means the rank in that order and the top-k of a candidate
// prefix is its highest present positions. A key is "present" for prefix length n when its
// index is < n.
//
// Both statistics we need per prefix length n are monotone in n (DESIGN section 1):
//   kth(n): sorted position of the K-th best present key (only moves up),
//   tau(n): the SparseK threshold (only moves up).
// So the prefix lengths are cut into chunks; one CTA per chunk computes the state at the chunk
// start from scratch in parallel, then one thread walks the chunk, inserting one key per step
// and moving three pointers (tau's two breakpoint fronts and kth) upwards. Every pointer moves
// over each sorted position at most once per chunk, so a chunk costs O(chunk + band) steps.
#include <cuda_runtime.h>
#include <math_constants.h>

#include "sparsek_params.h"

namespace sparsek {
namespace {

constexpr int kWalkThreads = 256;
constexpr int kWarps = kWalkThreads / 32;
constexpr int kMaxBisect = 80;          // float64 bisection of a unit interval needs < 60
constexpr int kListThreads = 32;        // one warp compacts one block's key list
constexpr int kEndThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

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

// f(t) = sum over present keys at positions [from, S) of clip(u - t, 0, 1).
__device__ double soft_mass(const float* sorted, const int* key_at, int from, int S, int n, double t, double* scratch) {
  double f = 0.0;
  for (int q = from + threadIdx.x; q < S; q += kWalkThreads) {
    if (key_at[q] < n) f += fmin(fmax((double)sorted[q] - t, 0.0), 1.0);
  }
  return block_sum(f, scratch);
}

// First sorted position whose value satisfies value > t (strict) or value >= t.
__device__ int first_above(const float* sorted, int S, double t, bool strict) {
  int lo = 0, hi = S;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    const double v = sorted[mid];
    if (strict ? (v > t) : (v >= t)) hi = mid; else lo = mid + 1;
  }
  return lo;
}

__global__ void __launch_bounds__(kWalkThreads, 4) chunk_walk_kernel(SelectParams p) {
  const int row = blockIdx.y;
  const int S = p.seq_len, K = p.topk;
  const int n0 = K + 1 + blockIdx.x * p.chunk;
  const int n_end = min(n0 + p.chunk, p.n_max + 1);
  const float* sorted = p.sorted + (size_t)row * S;
  const int* key_at = p.key_at + (size_t)row * S;
  const float* scores = p.scores + (size_t)row * S;
  const int* pos = p.pos + (size_t)row * S;
  float* tau_out = p.tau + (size_t)row * S;
  int* kth_out = p.kth + (size_t)row * (S + 1);

  __shared__ int s_count[kWarps];
  __shared__ int s_found[2];
  __shared__ double s_dscratch[kWarps];
  __shared__ long long s_lscratch[kWarps];
  __shared__ int s_from;

  // 1. The K-th and (K+1)-th best present keys of prefix n0, scanning down from the top in
  //    rounds of kWalkThreads positions (n0 > K guarantees both exist).
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int seen = 0;
  for (int base = S - 1; base >= 0 && seen <= K; base -= kWalkThreads) {
    const int q = base - threadIdx.x;
    const bool present = q >= 0 && key_at[q] < n0;
    const unsigned ballot = __ballot_sync(kFullMask, present);
    if (lane == 0) s_count[warp] = __popc(ballot);
    __syncthreads();
    int before = seen, total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      before += (w < warp) ? s_count[w] : 0;
      total += s_count[w];
    }
    const int rank = before + __popc(ballot & ((1u << lane) - 1u)) + 1;  // 1 = best
    if (present && rank == K) s_found[0] = q;
    if (present && rank == K + 1) s_found[1] = q;
    seen += total;
    __syncthreads();
  }
  const int kth0 = s_found[0];
  const double u_k = sorted[kth0], u_k1 = sorted[s_found[1]];

  // 2. tau(n0) lies in [u_(K+1) - 1, u_(K)): below, K+1 keys are saturated (f > K); at u_(K)
  //    at most K-1 keys are above it (f < K). Keys at or below u_(K+1) - 1 never contribute.
  if (threadIdx.x == 0) s_from = first_above(sorted, S, u_k1 - 1.0, true);
  __syncthreads();
  const int from = s_from;
  double lo = u_k1 - 1.0, hi = u_k;  // f(lo) > K >= f(hi)
  for (int it = 0; it < kMaxBisect; ++it) {
    const double mid = 0.5 * (lo + hi);
    if (mid <= lo || mid >= hi) break;
    if (soft_mass(sorted, key_at, from, S, n0, mid, s_dscratch) > K) lo = mid; else hi = mid;
  }
  // 3. Closed form on the linear piece around the bracket: f(t) = cU + sF - cF * t.
  const double mid = 0.5 * (lo + hi);
  long long cU = 0, cF = 0;
  double sF = 0.0;
  for (int q = from + threadIdx.x; q < S; q += kWalkThreads) {
    if (key_at[q] >= n0) continue;
    const double v = sorted[q];
    if (v >= mid + 1.0) ++cU;
    else if (v > mid) { ++cF; sF += v; }
  }
  cU = block_sum(cU, s_lscratch);
  cF = block_sum(cF, s_lscratch);
  sF = block_sum(sF, s_dscratch);
  const double tau0 = cF > 0 ? (sF - (double)(K - cU)) / (double)cF : hi;

  // 4. The walker's state at tau0 itself.
  cU = 0; cF = 0; sF = 0.0;
  for (int q = from + threadIdx.x; q < S; q += kWalkThreads) {
    if (key_at[q] >= n0) continue;
    const double v = sorted[q];
    if (v >= tau0 + 1.0) ++cU;
    else if (v > tau0) { ++cF; sF += v; }
  }
  cU = block_sum(cU, s_lscratch);
  cF = block_sum(cF, s_lscratch);
  sF = block_sum(sF, s_dscratch);
  if (threadIdx.x != 0) return;

  // 5. Walk the chunk. lo_p: first position above tau (keys below never matter again);
  //    hi_p: first position at or above tau + 1 (present keys from there on are saturated).
  int lo_p = first_above(sorted, S, tau0, true);
  int hi_p = first_above(sorted, S, tau0 + 1.0, false);
  double tau = tau0;
  int kth = kth0;
  for (int n = n0;; ++n) {
    tau_out[n + p.window - 1] = (float)tau;
    kth_out[n] = kth;
    if (n + 1 >= n_end) break;
    // Key n becomes a candidate: prefix length n + 1, present means key index <= n.
    const double x = scores[n];
    if (x > tau) {
      if (x >= tau + 1.0) ++cU; else { ++cF; sF += x; }
    }
    if (pos[n] > kth) {
      do { ++kth; } while (key_at[kth] > n);  // next present position up; stops at pos[n]
    }
    double f = (double)cU + sF - (double)cF * tau;
    while (f > K) {
      const double e1 = lo_p < S ? (double)sorted[lo_p] : CUDART_INF;        // a soft key hits 0
      const double e2 = hi_p < S ? (double)sorted[hi_p] - 1.0 : CUDART_INF;  // a saturated key turns soft
      const double t = fmin(e1, e2);
      if (!(t < CUDART_INF)) break;  // unreachable: f > 0 needs a present key above tau
      if ((double)cU + sF - (double)cF * t <= K) {  // root inside this linear piece (cF > 0)
        tau = (sF - (double)(K - cU)) / (double)cF;
        break;
      }
      tau = t;
      if (e1 <= e2) {
        if (key_at[lo_p] <= n) { --cF; sF -= (double)sorted[lo_p]; }
        ++lo_p;
      } else {
        if (key_at[hi_p] <= n) { --cU; ++cF; sF += (double)sorted[hi_p]; }
        ++hi_p;
      }
      f = (double)cU + sF - (double)cF * tau;
    }
  }
}

// tau = -inf for queries whose prefix fits in topk, and the end of every key's selected run:
// key j is selected for prefix lengths [j + 1, N_j), N_j = first n with kth(n) above pos(j).
__global__ void __launch_bounds__(kEndThreads) end_kernel(SelectParams p) {
  const int row = blockIdx.y;
  const int j = blockIdx.x * kEndThreads + threadIdx.x;
  const int S = p.seq_len, K = p.topk, W = p.window;
  if (j >= S) return;
  const int i = j;  // as a query: tau is -inf while n_i = i - W + 1 <= K
  if (i - W + 1 <= K || i - W + 1 > p.n_max) p.tau[(size_t)row * S + i] = -CUDART_INF_F;

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
__global__ void __launch_bounds__(kListThreads) block_lists_kernel(SelectParams p) {
  const int row = blockIdx.y, blk = blockIdx.x;
  const int S = p.seq_len, K = p.topk, W = p.window;
  const int i0 = blk * p.block_q, i1 = min(S, i0 + p.block_q);
  const int n = i0 - W + 1;
  const int lane = threadIdx.x;
  int* out = p.block_keys + ((size_t)row * p.n_blocks + blk) * p.cap;
  const int* key_at = p.key_at + (size_t)row * S;
  const int* end = p.end + (size_t)row * S;
  int count = 0;

  if (n >= 1 && n <= K) {  // every candidate of i0 is selected
    for (int j = lane; j < n; j += kListThreads) out[j] = j;
    count = n;
  } else if (n > K) {
    const int top = p.kth[(size_t)row * (S + 1) + n];
    for (int base = top; base < S && count < K; base += kListThreads) {
      const int q = base + lane;
      const int key = q < S ? key_at[q] : S;
      const bool take = key < n;
      const unsigned ballot = __ballot_sync(kFullMask, take);
      if (take) out[count + __popc(ballot & ((1u << lane) - 1u))] = key;
      count += __popc(ballot);
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

}  // namespace

cudaError_t launch_selection(const SelectParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.seq_len == 0) return cudaSuccess;
  if (p.n_chunks > 0) {
    chunk_walk_kernel<<<dim3(p.n_chunks, p.rows), kWalkThreads, 0, stream>>>(p);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  end_kernel<<<dim3((p.seq_len + kEndThreads - 1) / kEndThreads, p.rows), kEndThreads, 0, stream>>>(p);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  if (p.block_keys != nullptr) {
    block_lists_kernel<<<dim3(p.n_blocks, p.rows), kListThreads, 0, stream>>>(p);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace sparsek
