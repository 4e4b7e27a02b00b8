// The selection's launchers beyond launch_selection (sparsek_params.h): which algorithm fills
// tau and kth, and the device-side handling of non-finite scores (no host synchronisation, so a
// forward can be captured in a CUDA graph). Plain CUDA types only, like sparsek_params.h.
#pragma once

#include <cuda_runtime.h>

#include "sparsek_params.h"

namespace sparsek {

// How tau and kth are computed per prefix length (end and the block lists follow from kth):
//   kWalk:      one CTA per chunk bisects the chunk's start state, then one thread walks the chunk;
//   kSegmented: one CTA per chunk computes the start state of one segment per warp from prefix
//               sums, then the warps walk their segments concurrently (the default).
// Both give the same kth (integers, so the same end and lists) and tau to float64 rounding.
enum class SelectAlgo : int { kWalk = 0, kSegmented = 1 };

// The segmented walk's shared bands: every chunk first runs with first_cap keys; when second_cap
// is not 0, a chunk whose band is larger is deferred to a second launch with second_cap keys
// (needs SelectParams::overflow, 2 + rows * n_chunks int32 starting zeroed; without it the
// launch uses the larger band alone). A band larger than the last cap walks serially in global
// memory. Host-side; queries the current device's occupancy.
struct SegBandPlan {
  int first_cap;
  int second_cap;
};
SegBandPlan seg_band_plan(const SelectParams& p);

// launch_selection with a chosen algorithm. nonfinite (rows) int32 or null: a row marked 1 gets
// tau = NaN everywhere (its selection, made from sanitised scores, means nothing).
cudaError_t launch_selection_with(const SelectParams& p, SelectAlgo algo, const int* nonfinite, cudaStream_t stream);

// clean (rows, S) = scores with NaN and +-inf replaced by 0; nonfinite[row] = 1 where the row had
// one. nonfinite must start zeroed.
cudaError_t launch_sanitize_scores(const float* scores, float* clean, int* nonfinite, int rows, int seq_len,
                                   cudaStream_t stream);

// NaN over out (rows, out_per_row) 16-bit elements and lse (rows, lse_per_row) of every row
// whose tau (rows, S) starts with NaN: one row per (batch, kv head), its GQA group's heads
// contiguous in a (B, Hq, S, D) output.
cudaError_t launch_poison_rows(const float* tau, int rows, int seq_len, void* out, long long out_per_row, float* lse,
                               long long lse_per_row, cudaStream_t stream);

}  // namespace sparsek
