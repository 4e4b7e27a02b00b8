// SparseK decode: the cache update of one step, one CTA per (batch, kv head) pair.
//
// For the new token at position p (= lengths[pair]), with x = p + 1 - window when window >= 1 (the
// key that leaves the window when token p + 1 arrives: the state always holds the next query's
// selection) and x = p when window == 0 (the new token is a candidate of its own query):
//   1. x becomes a candidate. While there are fewer than topk candidates it takes the next
//      candidate slot; afterwards it moves into the spare slot if it beats the weakest live slot in
//      the order "score, then position" (it is the newest candidate, so it wins ties), and the
//      weakest slot becomes the spare.
//   2. tau is updated exactly: the new threshold solves sum_{u in soft + {x}} clip(u - t, 0, 1) = topk
//      with t >= tau_old (tau never decreases), walking the breakpoints of that piecewise-linear
//      function upward from tau_old; then every score <= the new tau is dropped from the soft set
//      for good (its gate is 0 now and at every later step).
//   3. The new key and value go into the window ring (slot p % window).
// With window >= 1 this runs concurrently with the step's attention kernel, which has read tau,
// the spare and lengths before letting this grid start, and never reads the spare slot or ring
// slot p % window (csrc/decode_params.h). docs/decode.md has the proofs and the bound on the soft set.

#include <cstdint>

#include <cuda_runtime.h>
#include <math_constants.h>

#include "decode_params.h"

namespace sparsek {
namespace {

// Threads per CTA. Run first (window == 0), 256: 1024 measured slower on the H200 (update 28.7 vs
// 17.4 us cold at decode-32k-b16: wider block reductions). Run beside the attention (window >= 1),
// 64: the attention's two CTAs per SM leave 4096 registers free, and this kernel (48 registers)
// fits there only as two warps, so every SM can host one update CTA from the start.
constexpr int kFirstThreads = 256;
constexpr int kBesideThreads = 64;
constexpr int kVecBytes = 16;  // one uint4 per thread-move of a key/value row
constexpr int kMaxWarps = kFirstThreads / 32;
// Soft-set entries each thread holds per compaction round (strided, so reads stay coalesced).
// 8 made ptxas spill the array next to the walk's doubles; 4 keeps it in registers.
constexpr int kCompactPerThread = 4;
constexpr unsigned kFullMask = 0xffffffffu;
// Shared memory for the staged state (candidate scores and positions, the soft set): 48 KiB at
// topk 2048 and the default soft_capacity. The shared configuration both kernels ask for (100 KiB,
// kDecodeSharedCarveout) holds two attention CTAs and 64 KiB more. Larger states work on global
// memory: correct, but each of their loops is then a chain of round trips (measured beside the
// attention at decode-32k-b16 on an H200: 70 us unstaged against the attention's 53, so the step
// waits for it; staged, it ends inside the attention).
constexpr int kMaxStageBytes = 64 * 1024;

// One 4-byte asynchronous copy global -> shared (no register round trip, no wait until
// cp_async_wait_all): a thread issues all of its copies back to back, so a staged array costs one
// memory round trip instead of one per loop iteration.
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(gmem) : "memory");
}

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // window == 0: lets the attention kernel (launched with programmatic stream serialization) become
  // resident now; it still waits in griddepcontrol.wait until this grid has finished and flushed
  // memory. Nothing follows the concurrent update that could use it; it is harmless there.
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The weakest top-k slot: lowest score, and among equal scores the lowest position.
struct WeakestSlot {
  float score;
  int pos;
  int slot;
};

__device__ __forceinline__ bool weaker(const WeakestSlot& a, const WeakestSlot& b) {
  return a.score < b.score || (a.score == b.score && a.pos < b.pos);
}

__device__ __forceinline__ WeakestSlot warp_weakest(WeakestSlot w) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    WeakestSlot other;
    other.score = __shfl_xor_sync(kFullMask, w.score, offset);
    other.pos = __shfl_xor_sync(kFullMask, w.pos, offset);
    other.slot = __shfl_xor_sync(kFullMask, w.slot, offset);
    if (weaker(other, w)) w = other;
  }
  return w;
}

// Sums of the piecewise-linear f(t) = sum clip(u - t, 0, 1) on the piece just above t:
// saturated keys (u > t + 1), soft keys (t < u <= t + 1) with their score sum, and the next
// breakpoint above t (u - 1 of a saturated key, u of a soft key).
struct PieceSums {
  int saturated;
  int soft;
  double soft_sum;
  double next_break;
};

__device__ __forceinline__ void add_to_piece(PieceSums& s, float score, double t) {
  const double u = static_cast<double>(score);
  if (u > t) {
    // u - 1 > t, not u > t + 1: the breakpoint is computed as u - 1.0 below, so at t = u - 1.0 the
    // key must count as soft, else rounding keeps t on the same breakpoint until the round cap
    if (u - 1.0 > t) {
      s.saturated += 1;
      s.next_break = fmin(s.next_break, u - 1.0);
    } else {
      s.soft += 1;
      s.soft_sum += u;
      s.next_break = fmin(s.next_break, u);
    }
  }
}

struct UpdateShared {
  WeakestSlot weakest[kMaxWarps];
  PieceSums piece[kMaxWarps];
  int scan[kMaxWarps];
};

// Reduces per-thread piece sums over the block; every thread gets the total.
template <int kWarps>
__device__ PieceSums block_piece_sums(PieceSums s, UpdateShared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    s.saturated += __shfl_xor_sync(kFullMask, s.saturated, offset);
    s.soft += __shfl_xor_sync(kFullMask, s.soft, offset);
    s.soft_sum += __shfl_xor_sync(kFullMask, s.soft_sum, offset);
    s.next_break = fmin(s.next_break, __shfl_xor_sync(kFullMask, s.next_break, offset));
  }
  if (lane == 0) sh.piece[warp] = s;
  __syncthreads();
  PieceSums total = sh.piece[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) {
    total.saturated += sh.piece[w].saturated;
    total.soft += sh.piece[w].soft;
    total.soft_sum += sh.piece[w].soft_sum;
    total.next_break = fmin(total.next_break, sh.piece[w].next_break);
  }
  __syncthreads();  // sh.piece is reused by the next call
  return total;
}

// Exclusive prefix over the block of one count per thread; also returns the block total.
template <int kWarps>
__device__ int block_exclusive_scan(int count, int& total, UpdateShared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int inclusive = count;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int other = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == 31) sh.scan[warp] = inclusive;
  __syncthreads();
  int warp_base = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) warp_base += sh.scan[w];
    total += sh.scan[w];
  }
  __syncthreads();  // sh.scan is reused by the next call
  return warp_base + inclusive - count;
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) decode_update_kernel(const DecodeUpdateParams p) {
  constexpr int kWarps = kThreads / 32;
  allow_dependent_launch();
  __shared__ UpdateShared sh;
  // staged copies (p.stage): candidate scores (K + 1), candidate positions (K + 1), soft set (C)
  extern __shared__ float staged[];

  const int h = blockIdx.x, b = blockIdx.y;
  // A masked-out row (a free serving slot) keeps its state; its inputs may hold anything (NaN).
  if (p.active != nullptr && !p.active[b]) return;
  const int64_t pair = static_cast<int64_t>(b) * p.kv_heads + h;
  const int tid = threadIdx.x;
  int* status = p.status + pair * 2;
  const int K = p.topk, W = p.window;
  float* slot_score = p.slot_score + pair * (K + 1);
  int* slot_pos = p.slot_pos + pair * (K + 1);
  float* soft_global = p.soft + pair * p.soft_capacity;

  // Beside the attention every DRAM round trip is slow (its queues are full), so the update is a
  // short chain of them: the candidate slots are staged into shared memory first (they depend on
  // nothing), then the pair's state arrives, then the soft set and the moved rows are fetched at
  // once. Everything after works on shared memory.
  const float* scores = slot_score;
  const int* positions = slot_pos;
  float* soft = soft_global;
  if (p.stage) {
    float* s_scores = staged;
    int* s_positions = reinterpret_cast<int*>(staged + K + 1);
    for (int s = tid; s <= K; s += kThreads) {
      cp_async4(s_scores + s, slot_score + s);
      cp_async4(s_positions + s, slot_pos + s);
    }
    scores = s_scores;
    positions = s_positions;
    soft = staged + 2 * (K + 1);
  }
  const int state = status[0];
  const int pos = p.lengths[pair];
  const int spare = p.spare[pair];
  const float score_new = p.token.score[pair];
  const double tau_old = p.tau[pair];
  const int count = p.soft_count[pair];
  if (p.stage) {
    const int n = min(count, p.soft_capacity);  // a corrupted count must not write past the buffer
    for (int i = tid; i < n; i += kThreads) cp_async4(soft + i, soft_global + i);
  }

  const int64_t row_bytes = static_cast<int64_t>(p.head_dim) * p.elem_bytes;
  const int row_vecs = static_cast<int>(row_bytes / kVecBytes);
  char* k_slots = static_cast<char*>(p.k_slots) + pair * p.num_slots * row_bytes;
  char* v_slots = static_cast<char*>(p.v_slots) + pair * p.num_slots * row_bytes;
  char* k_cand = k_slots + W * row_bytes;  // candidate slot c is row W + c
  char* v_cand = v_slots + W * row_bytes;
  const char* k_new = reinterpret_cast<const char*>(p.token.k_row(b, h));
  const char* v_new = reinterpret_cast<const char*>(p.token.v_row(b, h));

  // The key that becomes a candidate now. window >= 2: it sits in ring slot (p + 1) % window, which
  // this step does not overwrite (token p goes to slot p % window); window <= 1: the new token.
  const int x_pos = W > 0 ? pos - (W - 1) : pos;    // (no int overflow at pos = INT32_MAX)
  const int x_ring = W > 1 ? (pos % W + 1) % W : -1;  // (pos + 1) % W
  const char* kx = x_ring >= 0 ? k_slots + x_ring * row_bytes : k_new;
  const char* vx = x_ring >= 0 ? v_slots + x_ring * row_bytes : v_new;
  const float ux = x_pos < 0 ? 0.0f : (x_ring >= 0 ? p.win_score[pair * W + x_ring] : score_new);
  const int ring = W > 0 ? pos % W : -1;  // the new token's ring slot

  // The piece of a row this thread moves (16 bytes of K or V), read now: the leaving key and the
  // new token. A key and a value row of D = 128 two-byte elements are 32 pieces: one per thread.
  static_assert(2 * 128 * 2 / kVecBytes <= kThreads, "one 16-byte piece of the moved rows per thread");
  const bool mover = tid < 2 * row_vecs;
  const bool is_v = tid >= row_vecs;
  const int vec = is_v ? tid - row_vecs : tid;
  uint4 moved = make_uint4(0, 0, 0, 0), incoming = make_uint4(0, 0, 0, 0);
  if (mover) {
    if (x_pos >= 0) moved = reinterpret_cast<const uint4*>(is_v ? vx : kx)[vec];
    if (W > 0) incoming = reinterpret_cast<const uint4*>(is_v ? v_new : k_new)[vec];
  }

  if (p.stage) cp_async_wait_all();
  __syncthreads();  // the staged arrays are complete for every thread

  WeakestSlot weakest = {CUDART_INF_F, INT32_MAX, -1};  // beaten by every slot
  for (int s = tid; s <= K; s += kThreads) {
    const WeakestSlot cand = {scores[s], positions[s], s};
    if (s != spare && weaker(cand, weakest)) weakest = cand;
  }

  // A poisoned pair stays frozen: its outputs are NaN until the caller rebuilds the cache.
  if (state != kDecodeOk) return;
  // Checked here rather than on the host, which would cost a synchronisation per step.
  const int bad = pos == INT32_MAX ? kDecodePositionOverflow : (isfinite(score_new) ? kDecodeOk : kDecodeNonFiniteScore);
  if (bad != kDecodeOk) {
    if (tid == 0) {
      status[1] = pos;
      status[0] = bad;
    }
    return;
  }

  int dst = -1;          // candidate slot the leaving key moves into
  int new_spare = spare;
  if (x_pos >= 0) {
    if (x_pos < K) {
      // Fewer than topk candidates so far: all are selected, tau stays -inf, and the soft set
      // holds every candidate score (soft_capacity > topk is checked by the binding).
      dst = x_pos;
      if (tid == 0) {
        soft_global[x_pos] = ux;
        p.soft_count[pair] = x_pos + 1;
      }
    } else {
      // ---- top-k: does x beat the weakest live key? ----
      weakest = warp_weakest(weakest);
      if ((tid & 31) == 0) sh.weakest[tid >> 5] = weakest;
      __syncthreads();
      weakest = sh.weakest[0];
#pragma unroll
      for (int w = 1; w < kWarps; ++w)
        if (weaker(sh.weakest[w], weakest)) weakest = sh.weakest[w];
      // x is newer than every candidate, so it wins a tie on the score
      if (ux >= weakest.score) {
        dst = spare;
        new_spare = weakest.slot;
      }

      // ---- tau: smallest t >= tau_old with f(t) = topk over soft + {x} ----
      if (static_cast<double>(ux) > tau_old) {
        double t = tau_old;  // may be -inf (first step past topk candidates): the walk handles it
        double tau_new = t;
        // Each round moves t to the next breakpoint, so 2 * (count + 1) rounds always suffice;
        // the cap only guards against a corrupted state.
        const int max_rounds = 2 * (count + 1) + 2;
        bool solved = false;
        for (int round = 0; round < max_rounds; ++round) {
          PieceSums s = {0, 0, 0.0, CUDART_INF};
          for (int i = tid; i < count; i += kThreads) add_to_piece(s, soft[i], t);
          if (tid == 0) add_to_piece(s, ux, t);
          s = block_piece_sums<kWarps>(s, sh);
          if (s.soft > 0) {
            // f is linear on (t, next_break]: f(t') = saturated + soft_sum - soft * t'. Written as
            // (sum - integer) / count like the reference (sparsek/selection.py): a single soft key at
            // a flat root gives its own score back exactly, and the two agree to rounding.
            const double root = (s.soft_sum - static_cast<double>(K - s.saturated)) / s.soft;
            if (root <= s.next_break) {
              tau_new = fmax(root, t);
              solved = true;
              break;
            }
          }
          if (isinf(s.next_break)) {  // f is constant above t: only rounding can bring us here
            tau_new = t;
            solved = true;
            break;
          }
          t = s.next_break;
        }
        if (!solved) {
          if (tid == 0) {
            status[1] = count;
            status[0] = kDecodeSolverStuck;
          }
          return;
        }

        // ---- drop every score <= tau_new, in place, x appended last ----
        int kept_total = 0;
        for (int base = 0; base < count; base += kThreads * kCompactPerThread) {
          float vals[kCompactPerThread];
          int keep = 0;
#pragma unroll
          for (int e = 0; e < kCompactPerThread; ++e) {
            const int i = base + e * kThreads + tid;
            vals[e] = i < count ? soft[i] : 0.0f;
            if (i < count && static_cast<double>(vals[e]) > tau_new) ++keep;
          }
          int round_total;
          const int offset = block_exclusive_scan<kWarps>(keep, round_total, sh);  // also orders reads before writes
          int out = kept_total + offset;
#pragma unroll
          for (int e = 0; e < kCompactPerThread; ++e) {
            const int i = base + e * kThreads + tid;
            if (i < count && static_cast<double>(vals[e]) > tau_new) soft[out++] = vals[e];
          }
          kept_total += round_total;
          __syncthreads();  // this round's writes land below the next round's reads
        }
        const bool keep_x = static_cast<double>(ux) > tau_new;
        const int new_count = kept_total + (keep_x ? 1 : 0);
        // Only when nothing was dropped (kept_total == count == soft_capacity), so the compaction
        // above only permuted the set: refusing here leaves the pair's state as it was before the
        // step. The Python cache grows the soft set before a step could get here; this catches
        // steps it could not see (CUDA graph replays past what reserve() made room for).
        if (new_count > p.soft_capacity) {
          if (tid == 0) {
            status[1] = new_count;
            status[0] = kDecodeSoftOverflow;
          }
          return;
        }
        if (p.stage) {  // the compacted set back to global memory (the loop above ended on a barrier)
          for (int i = tid; i < kept_total; i += kThreads) soft_global[i] = soft[i];
        }
        if (tid == 0) {
          if (keep_x) soft_global[kept_total] = ux;
          p.soft_count[pair] = new_count;
          p.tau[pair] = tau_new;
        }
      }
    }
  }

  // Every thread has read win_score, slot_score, slot_pos and soft before they change below.
  __syncthreads();

  // ---- move rows: the leaving key into its candidate slot, the new token into the ring ----
  if (mover) {
    if (dst >= 0) reinterpret_cast<uint4*>((is_v ? v_cand : k_cand) + static_cast<int64_t>(dst) * row_bytes)[vec] = moved;
    if (W > 0) reinterpret_cast<uint4*>((is_v ? v_slots : k_slots) + static_cast<int64_t>(ring) * row_bytes)[vec] = incoming;
  }
  if (tid == 0) {
    if (dst >= 0) {
      slot_score[dst] = ux;
      slot_pos[dst] = x_pos;
    }
    p.spare[pair] = new_spare;
    if (W > 0) p.win_score[pair * W + ring] = score_new;
    p.lengths[pair] = pos + 1;
  }
}

}  // namespace

cudaError_t launch_decode_update(const DecodeUpdateParams& params, cudaStream_t stream) {
  DecodeUpdateParams staged = params;
  const int64_t stage_bytes = (2 * (static_cast<int64_t>(params.topk) + 1) + params.soft_capacity) * 4;
  staged.stage = stage_bytes <= kMaxStageBytes;
  // opt in to more than 48 KiB of dynamic shared memory, once per kernel and process
  static const cudaError_t opt_in = [] {
    const cudaError_t a = cudaFuncSetAttribute(decode_update_kernel<kBesideThreads>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxStageBytes);
    const cudaError_t b = cudaFuncSetAttribute(decode_update_kernel<kFirstThreads>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxStageBytes);
    // the same L1/shared split as the attention kernel it shares SMs with
    const cudaError_t c = cudaFuncSetAttribute(decode_update_kernel<kBesideThreads>,
                                               cudaFuncAttributePreferredSharedMemoryCarveout, kDecodeSharedCarveout);
    return a != cudaSuccess ? a : b != cudaSuccess ? b : c;
  }();
  if (opt_in != cudaSuccess) return opt_in;

  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(params.kv_heads, params.batch);
  config.blockDim = dim3(params.concurrent ? kBesideThreads : kFirstThreads);
  config.dynamicSmemBytes = staged.stage ? static_cast<size_t>(stage_bytes) : 0;
  config.stream = stream;
  // Concurrent: starts as soon as every CTA of the attention kernel launched just before has read
  // the state (griddepcontrol.launch_dependents there), and never waits for that grid to finish.
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = params.concurrent ? 1 : 0;
  const cudaError_t err = params.concurrent ? cudaLaunchKernelEx(&config, decode_update_kernel<kBesideThreads>, staged)
                                            : cudaLaunchKernelEx(&config, decode_update_kernel<kFirstThreads>, staged);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

}  // namespace sparsek
