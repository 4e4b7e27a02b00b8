// Parameters of the SparseK decode kernels (csrc/decode_update.cu, csrc/decode_attention.cu).
//
// Plain structs of raw pointers, element strides and sizes: the only things that cross from the
// torch binding (csrc/binding.cpp) into device code. This header includes only CUDA headers.
//
// The decode cache of one (batch b, kv head h) pair, all arrays contiguous, pair = b * Hkv + h.
// After L tokens it holds what query L needs, except token L itself:
//
//   k_slots, v_slots (B, Hkv, NS, D), NS = window + topk + 1 slots:
//     [0, window)               the window ring: the key at position p lives in slot p % window
//     [window, window+topk+1)   candidate slots c = 0..topk: topk live ones and one spare; while
//                               there are <= topk candidates, candidate position c lives in slot c
//                               and the spare is slot topk
//   The candidates are the positions <= L - window when window >= 1 (the key that leaves the window
//   when token L arrives is one already), <= L - 1 when window == 0.
//   slot_score (B, Hkv, topk + 1) f32  score of each candidate slot (the spare's is stale)
//   slot_pos   (B, Hkv, topk + 1) i32  position of each candidate slot (tie rule of the top-k)
//   spare      (B, Hkv) i32            the candidate slot not in use
//   win_score  (B, Hkv, window) f32    score of each window slot (needed when it leaves the window)
//   soft       (B, Hkv, C) f32         every candidate score u > tau, unordered; C = soft_capacity,
//                                      the tensor's size (the Python cache grows it between steps,
//                                      before a step could need more: the kernels never resize)
//   soft_count (B, Hkv) i32            how many entries of `soft` are in use
//   tau        (B, Hkv) f64            the exact SparseK threshold of the current candidates
//   lengths    (B, Hkv) i32            tokens seen (the next token's position)
//   status     (B, Hkv, 2) i32         {code, detail}; code != 0 poisons the pair (outputs NaN)
//
// A step for the token at p = L, window >= 1: the attention kernel reads (L, tau, spare, status),
// lets the update kernel start (programmatic dependent launch), and attends the window (token p
// from the inputs in place of ring slot p % window) and the live candidates. The update runs
// concurrently: it makes position p + 1 - window a candidate (into the spare slot, and the evicted
// slot becomes the spare), advances tau and writes token p into ring slot p % window. Nothing the
// attention reads after its start is written by the update. window == 0: token p is a candidate of
// its own query, so the update runs first and the attention waits for it.
//
// docs/decode.md derives the layout, the bound on the soft set and the update algorithm.

#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace sparsek {

// status codes (status[pair][0]); detail = status[pair][1]
constexpr int kDecodeOk = 0;
// detail: soft entries needed (> soft_capacity). The step is refused, not half-done: the pair's
// state is the one before the step (the soft set at most permuted), only the status changes.
constexpr int kDecodeSoftOverflow = 1;
constexpr int kDecodeSolverStuck = 2;   // detail: soft entries when the threshold walk gave up
constexpr int kDecodePositionOverflow = 3;  // detail: the position (int32 positions ran out)
constexpr int kDecodeNonFiniteScore = 4;    // detail: the position of the token with that score

// The attention kernel packs up to this many query heads of one GQA group into the N = 8
// columns of an m16n8k16 MMA; larger groups are split over blockIdx.y (head chunks).
constexpr int kDecodeHeadsPerCta = 8;
// Slots per MMA tile: the K dimension of the P.V MMA.
constexpr int kDecodeTileSlots = 16;
constexpr int kDecodeAttentionWarps = 4;
constexpr int kDecodeAttentionThreads = kDecodeAttentionWarps * 32;
// Upper bound on splits over the slots; bounds the partial-result workspace.
constexpr int kDecodeMaxSplits = 64;
// L1/shared split (percent of the SM's 228 KiB) asked for by both decode kernels: 44% selects the
// 100 KiB shared configuration, room for two attention CTAs (2 x 17 KiB) and one staged update
// (48 KiB at topk 2048). Measured on an H200 at decode-32k-b16 (step / attention alone, us):
// driver default 81.9 / 54.5 (the update cannot join an SM until it drains: it starts 45 us late),
// 44% 55.5 / 54.6 (the update starts 2 us in and ends inside the attention), 100% 75.3 / 63.2 (the
// attention's loads starve for L1, which holds in-flight requests even without allocation).
constexpr int kDecodeSharedCarveout = 44;

// The step's new token, read by both kernels: its key and value rows (16-bit elements, rows
// contiguous and 16-byte aligned, strides in elements) and its score.
struct DecodeNewToken {
  const void* k;  // (B, Hkv, 1, D)
  const void* v;  // (B, Hkv, 1, D)
  int64_t k_batch_stride, k_head_stride;
  int64_t v_batch_stride, v_head_stride;
  const float* score;  // (B, Hkv) contiguous

  __host__ __device__ const uint16_t* k_row(int b, int h) const {
    return static_cast<const uint16_t*>(k) + b * k_batch_stride + h * k_head_stride;
  }
  __host__ __device__ const uint16_t* v_row(int b, int h) const {
    return static_cast<const uint16_t*>(v) + b * v_batch_stride + h * v_head_stride;
  }
};

struct DecodeUpdateParams {
  // cache state (see the header comment), all contiguous
  void* k_slots;       // (B, Hkv, NS, D)
  void* v_slots;       // (B, Hkv, NS, D)
  float* slot_score;   // (B, Hkv, topk + 1)
  int* slot_pos;       // (B, Hkv, topk + 1)
  int* spare;          // (B, Hkv)
  float* win_score;    // (B, Hkv, window)
  float* soft;         // (B, Hkv, soft_capacity)
  int* soft_count;     // (B, Hkv)
  double* tau;         // (B, Hkv)
  int* lengths;        // (B, Hkv)
  int* status;         // (B, Hkv, 2)

  DecodeNewToken token;
  // (B,) or nullptr (every row steps): a row that is false (a free serving slot) is left exactly
  // as it is, and its inputs, which may hold anything, are never read
  const bool* active;

  int batch, kv_heads, head_dim;
  int elem_bytes;  // 2 (fp16/bf16): the update only moves rows, it never does arithmetic on them
  int topk, window, num_slots, soft_capacity;
  // window >= 1: launched right after the attention kernel of the same step, with programmatic
  // dependent launch, and runs concurrently with it (it never waits for it)
  bool concurrent;
  // set by the launcher: the candidate slots and the soft set fit in shared memory and are staged
  bool stage;
};

struct DecodeAttentionParams {
  const void* q;  // (B, Hq, 1, D), rows contiguous and 16-byte aligned
  int64_t q_batch_stride, q_head_stride;
  const void* k_slots;  // (B, Hkv, NS, D) contiguous
  const void* v_slots;  // (B, Hkv, NS, D) contiguous
  const float* slot_score;  // (B, Hkv, topk + 1)
  const int* spare;         // (B, Hkv)
  const double* tau;        // (B, Hkv)
  const int* lengths;       // (B, Hkv): tokens seen; the query's position, or one past it after the update
  const int* status;        // (B, Hkv, 2)
  // the query's own key and value (window >= 1: they replace ring slot p % window) and score (a
  // non-finite score poisons this step's output too)
  DecodeNewToken token;
  // (B,) or nullptr (every row steps): a row that is false attends nothing, reads none of its
  // inputs' values into a result and writes zeros (the update leaves its state alone)
  const bool* active;
  void* out;  // (B, Hq, 1, D), rows contiguous and 16-byte aligned
  int64_t out_batch_stride, out_head_stride;

  // split-K workspace; unused when num_splits == 1
  float* o_part;    // (B * Hkv * head_chunks, num_splits, kDecodeHeadsPerCta, D) unnormalised
  float* ml_part;   // (B * Hkv * head_chunks, num_splits, kDecodeHeadsPerCta, 2): max, sum
  int* counters;    // (B * Hkv * head_chunks), zero before and after every launch

  int batch, q_heads, kv_heads, head_dim;
  int topk, window, num_slots;
  int group;        // Hq / Hkv query heads per kv head
  int head_chunks;  // ceil(group / kDecodeHeadsPerCta)
  int num_splits, slots_per_split;  // slots_per_split is a multiple of kDecodeTileSlots
  float scale_log2;  // softmax scale * log2(e): the kernel works in base 2
  bool is_bf16;      // else fp16
  // window == 0: launched after the update with programmatic dependent launch, and waits for it
  // (lengths then count the query); window >= 1: launched first, lets the update start once it has
  // read the state it needs
  bool after_update;
};

// Splits over the slots of each (pair, head chunk): CTAs are equal-sized, so pick the split count
// whose grid wastes the least of the last wave (memory-bound CTAs that run alone in a partial wave
// leave bandwidth unused), preferring fewer splits (less combine traffic) among near-ties.
// `resident` = CTAs that fit on the device at once (SMs x occupancy).
inline int decode_num_splits(int work_items, int num_slots, int resident) {
  if (work_items <= 0 || num_slots <= 0 || resident <= 0) return 1;
  const int tiles = (num_slots + kDecodeTileSlots - 1) / kDecodeTileSlots;
  // at least one tile per warp, else the CTA's fixed costs dominate
  int max_splits = tiles / kDecodeAttentionWarps;
  if (max_splits < 1) max_splits = 1;
  if (max_splits > kDecodeMaxSplits) max_splits = kDecodeMaxSplits;
  int best = 1;
  double best_cost = 0.0;
  for (int s = 1; s <= max_splits; ++s) {
    const long long ctas = static_cast<long long>(work_items) * s;
    const long long waves = (ctas + resident - 1) / resident;
    // time ~ waves x per-CTA work (1/s), plus 1% per split for the partial results and combine
    const double cost = static_cast<double>(waves) / s * (1.0 + 0.01 * s);
    if (s == 1 || cost < best_cost * 0.98) {
      best = s;
      best_cost = cost;
    }
  }
  return best;
}

// Host launchers (csrc/decode_update.cu, csrc/decode_attention.cu). Each checks the launch with
// cudaGetLastError and returns the error; none synchronises.
cudaError_t launch_decode_update(const DecodeUpdateParams& params, cudaStream_t stream);
cudaError_t launch_decode_attention(const DecodeAttentionParams& params, cudaStream_t stream);
// CTAs of the attention kernel that fit on one SM (occupancy), for decode_num_splits.
int decode_attention_ctas_per_sm(int head_dim, bool is_bf16);

}  // namespace sparsek
