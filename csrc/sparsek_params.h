// Plain parameter structs: the only things that cross from the torch binding into device code.
// Raw pointers, sizes, strides in elements. Kernel files include this header and CUDA headers
// only, so they compile with plain nvcc (no torch).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace sparsek {

// Selection over rows of scores: one row = one (batch, kv head), all tensors contiguous.
// Prefix length n = number of candidates of query i = n + window - 1.
struct SelectParams {
  const float* scores;   // (rows, S)
  const float* sorted;   // (rows, S) scores in ascending (score, index) order
  const int* key_at;     // (rows, S) key index at each sorted position
  const int* pos;        // (rows, S) sorted position of each key
  int* kth;              // (rows, S + 1) workspace: sorted position of the K-th best candidate per n
  float* tau;            // (rows, S) out: threshold per query (-inf while n <= topk)
  int* end;              // (rows, S) out: key j is selected by queries [j + window, end[j])
  int* block_keys;       // (rows, n_blocks, cap) out: union of selected keys per query block
  int* block_count;      // (rows, n_blocks) out
  int rows;
  int seq_len;
  int topk;
  int window;
  int n_max;      // candidates of the last query: max(0, S - window)
  int chunk;      // prefix lengths walked per CTA
  int n_chunks;   // ceil((n_max - topk) / chunk), 0 when every prefix fits in topk
  int block_q;    // queries per attention block
  int n_blocks;   // ceil(S / block_q)
  int cap;        // topk + block_q - 1: most keys a block can select
  int band_cap;   // segmented walk: keys of the first launch's shared band; 0: the rule (seg_band_plan)
  int* overflow;  // (2 + rows * n_chunks) zeroed workspace of the two-launch plan, or null
};

// Forward attention over the window and the selected keys of each query block.
struct AttnParams {
  const void* q;          // (B, Hq, S, D)
  const void* k;          // (B, Hkv, S, D)
  const void* v;          // (B, Hkv, S, D)
  const float* scores;    // (B, Hkv, S) contiguous
  const float* tau;       // (B, Hkv, S) contiguous
  const int* end;         // (B, Hkv, S) contiguous
  const int* block_keys;  // (B * Hkv, n_blocks, cap)
  const int* block_count; // (B * Hkv, n_blocks)
  void* out;              // (B, Hq, S, D) contiguous
  float* lse;             // (B, Hq, S) contiguous, natural log
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int batch;
  int q_heads;
  int kv_heads;
  int group;       // q_heads / kv_heads, packed into the rows of one CTA
  int seq_len;
  int window;
  int block_q;     // queries per CTA = kRows / group
  int n_blocks;
  int cap;
  float scale_log2;  // softmax scale * log2(e)
  bool is_bf16;
};

// Backward attention: one CTA per (batch, kv head, query block), the forward's tile plan.
// dq is owned by the CTA; dk and dv are summed over query blocks in global accumulators; the
// score gradient's per-key term is summed over blocks, its tau term is left to the caller as
// per-row sums (gamma_rows).
struct AttnBwdParams {
  const void* q;          // (B, Hq, S, D)
  const void* k;          // (B, Hkv, S, D)
  const void* v;          // (B, Hkv, S, D)
  const void* dout;       // (B, Hq, S, D) contiguous
  const float* lse;       // (B, Hq, S) contiguous, natural log (from the forward)
  const float* dsum;      // (B, Hq, S) contiguous: rowsum(dout * out)
  const float* scores;    // (B, Hkv, S) contiguous
  const float* tau;       // (B, Hkv, S) contiguous
  const int* end;         // (B, Hkv, S) contiguous
  const int* block_keys;  // (B * Hkv, n_blocks, cap)
  const int* block_count; // (B * Hkv, n_blocks)
  void* dq;               // (B, Hq, S, D) contiguous, q's dtype
  // (gridDim.y, S, D) contiguous accumulators of dk / scale and dv for the (batch, kv head) pairs
  // bh_offset .. bh_offset + gridDim.y - 1 of this launch: float32 summed with atomics, or, when
  // deterministic, int64 fixed point (value * fixed_scale[0 or 1], rounded), whose sums do not
  // depend on the order of the additions. The host launches the pairs in chunks so that the
  // accumulators stay small (docs/perf-notes.md, backward memory).
  void* dk_acc;
  void* dv_acc;
  int bh_offset;
  const double* fixed_scale;  // [2] device: fixed-point scales of dk_acc and dv_acc (deterministic only)
  // Per-key term of d scores: sum over rows of gamma for the soft selected keys. Not
  // deterministic: atomically added to du (B * Hkv, S). Deterministic: each block writes its
  // column sums to du_part (B * Hkv, n_blocks, cap), at the key's place in the block's list.
  float* du;
  float* du_part;
  float* gamma_rows;      // (B, Hq, S) out: sum of gamma over the soft selected keys of each row
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int batch;
  int q_heads;
  int kv_heads;
  int group;
  int seq_len;
  int window;
  int block_q;
  int n_blocks;
  int cap;
  float scale;       // softmax scale (dq = scale * dS K)
  float scale_log2;  // scale * log2(e)
  bool is_bf16;
  bool deterministic;
  int kernel;        // 2: warpgroup MMA (default), 1: the mma.sync version (kept for comparison)
};

// rowsum(dout * out) per row, in float32: the D_i of dS = P (dP - D_i).
struct BwdDotParams {
  const void* dout;  // (rows, D) contiguous
  const void* out;   // (rows, D) contiguous
  float* dsum;       // (rows,)
  int64_t rows;
  int head_dim;
  bool is_bf16;
};

// The end of one backward chunk: dk = dk_acc * scale and dv = dv_acc in the inputs' dtype (each
// float32 value rounded once) and, when the chunk's accumulators are used again, zeros written
// back over them, all in one pass.
struct BwdConvertParams {
  float* dk_acc;     // (elems,) float32, the chunk's accumulators
  float* dv_acc;     // (elems,) float32
  void* dk;          // (elems,) Elem, the chunk's rows of dk
  void* dv;          // (elems,) Elem
  int64_t elems;     // pairs x S x D, a multiple of 4
  float scale;       // softmax scale (dk = scale * dS^T Q)
  bool zero;         // write zeros back (a later chunk adds into the same accumulators)
  bool is_bf16;
};

// Host launchers (defined in the .cu files). Each checks the launch and returns its error.
cudaError_t launch_selection(const SelectParams& p, cudaStream_t stream);
cudaError_t launch_attention_fwd(const AttnParams& p, int head_dim, cudaStream_t stream);
// The warp-specialised forward (v7.2, attention_fwd_ws.cu, the default): same inputs and outputs.
cudaError_t launch_attention_fwd_ws(const AttnParams& p, int head_dim, cudaStream_t stream);
cudaError_t launch_bwd_dot(const BwdDotParams& p, cudaStream_t stream);
cudaError_t launch_bwd_convert(const BwdConvertParams& p, cudaStream_t stream);
// Launches the (batch, kv head) pairs bh_offset .. bh_offset + bh_count - 1.
cudaError_t launch_attention_bwd(const AttnBwdParams& p, int head_dim, int bh_count, cudaStream_t stream);

// Rows of the attention tile, shared by the host (block_q = kAttnRows / group) and the kernel.
constexpr int kAttnRows = 128;

}  // namespace sparsek
