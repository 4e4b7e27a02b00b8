// The one torch binding of the CUDA kernels: schemas (TORCH_LIBRARY), tensor checks, params
// structs filled from tensors, and the CUDA implementations (TORCH_LIBRARY_IMPL). The kernel
// .cu files include only CUDA headers and the params headers, so they build without torch.

#include <torch/library.h>
#include <c10/cuda/CUDAStream.h>

#include <string>
#include <type_traits>

// Error messages are built as one std::string here and handed to TORCH_CHECK whole. Streaming
// numbers into c10::str's ostringstream inside this extension crashed (SIGSEGV in
// ostream::_M_insert<long>) on the H200 machine, where the extension's g++ and the libstdc++
// loaded by torch differ; string appends do not touch the stream's locale facets.
namespace sparsek_msg {
inline void append(std::string& out, const char* x) { out += x; }
inline void append(std::string& out, const std::string& x) { out += x; }
inline void append(std::string& out, const c10::Device& x) { out += x.str(); }
inline void append(std::string& out, c10::ScalarType x) { out += c10::toString(x); }
inline void append(std::string& out, c10::IntArrayRef x) {  // as torch prints sizes: [2, 8, 1, 64]
  out += "[";
  for (size_t i = 0; i < x.size(); ++i) out += (i ? ", " : "") + std::to_string(x[i]);
  out += "]";
}
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
inline void append(std::string& out, T x) {
  if constexpr (std::is_same_v<T, bool>) out += x ? "true" : "false";
  else out += std::to_string(x);
}
template <typename... Args>
std::string build(const Args&... args) {
  std::string out;
  (append(out, args), ...);
  return out;
}
}  // namespace sparsek_msg

// ---- prefill: selection + attention (owned by the prefill kernels) ----

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <vector>

#include "selection_api.h"
#include "sparsek_params.h"

#define SPARSEK_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, sparsek_msg::build("sparsek_cuda: ", __VA_ARGS__))
#define SPARSEK_CHECK_CUDA(name, t) \
  SPARSEK_CHECK((t).is_cuda(), name " must be a CUDA tensor, got device ", (t).device())

namespace {

// The segmented walk is the default (1.5x the serial walk's selection at long-64k on an H100,
// docs/perf-notes.md, selection v3); SPARSEK_SELECT=walk runs the serial walk, which gives the
// same selection. Read per call so one process can time both.
sparsek::SelectAlgo select_algo() {
  const char* name = std::getenv("SPARSEK_SELECT");
  if (name == nullptr || *name == '\0') return sparsek::SelectAlgo::kSegmented;
  const std::string value(name);
  SPARSEK_CHECK(value == "segmented" || value == "walk", "SPARSEK_SELECT must be 'segmented' or 'walk', got '", value, "'");
  return value == "walk" ? sparsek::SelectAlgo::kWalk : sparsek::SelectAlgo::kSegmented;
}

// An integer override from the environment: nothing when unset or empty, else lo <= value <= hi
// or an error naming the variable, the range and what it got.
std::optional<long> env_int(const char* variable, long lo, long hi) {
  const char* text = std::getenv(variable);
  if (text == nullptr || *text == '\0') return std::nullopt;
  char* rest = nullptr;
  const long n = std::strtol(text, &rest, 10);
  SPARSEK_CHECK(*rest == '\0' && n >= lo && n <= hi, variable, " must be an integer in [", lo, ", ", hi, "], got '", text,
                "'");
  return n;
}

// Prefix lengths walked by one CTA of the selection. Each CTA first scans the row's band (up to
// S sorted positions) to rebuild its start state, so the scans cost O(S^2 / chunk) per row.
// - The serial walk then costs O(chunk) in one thread: the chunk grows with S, within [256, 2048].
// - The segmented walk (eight walkers per CTA, each after its own start state) took 1024 as the
//   fastest of 256..2048 at seed, long-16k and long-64k on an H100 (docs/perf-notes.md, selection
//   v3.1); it is halved, down to 256, while the grid would leave SMs idle (long-16k: 512).
// SPARSEK_SELECT_CHUNK=N (8 <= N <= 2048) overrides both rules, for measuring them.
int64_t select_chunk(sparsek::SelectAlgo algo, int64_t S, int64_t rows, int64_t n_prefix, int device) {
  if (const std::optional<long> forced = env_int("SPARSEK_SELECT_CHUNK", 8, 2048)) return *forced;
  int64_t chunk = 256;
  if (algo == sparsek::SelectAlgo::kWalk) {
    while (chunk < 2048 && chunk * 128 < S) chunk *= 2;
    return chunk;
  }
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) sms = 132;  // an H100's
  chunk = 1024;
  while (chunk > 256 && rows * ((n_prefix + chunk - 1) / chunk) < sms) chunk /= 2;
  return chunk;
}

// The forward attention kernel: 7 (attention_fwd_ws.cu, the default: a producer warpgroup and
// two consumer warpgroups taking turns; docs/perf-notes.md, v7.1 and v7.2) or 5 (attention_fwd.cu, kept
// for comparison), chosen with SPARSEK_FWD_KERNEL and read per call so one process can time both.
int forward_kernel() {
  const char* name = std::getenv("SPARSEK_FWD_KERNEL");
  if (name == nullptr || *name == '\0') return 7;
  const std::string value(name);
  SPARSEK_CHECK(value == "5" || value == "7", "SPARSEK_FWD_KERNEL must be 7 (the default, warp-specialised) or 5 (the previous kernel), got '",
                value, "'");
  return value == "7" ? 7 : 5;
}

// Keys of the row a segmented-walk CTA keeps in shared memory (24 bytes each) in its first
// launch. The rule (0 here, seg_band_plan in selection.cu): every key up to 9,216, except for
// topk <= 512, where 2,816 keys come first (three CTAs per SM at seed instead of two) and the
// chunks whose band is larger go to a second launch with the full band (the same selection).
// SPARSEK_SELECT_BAND=N (256 <= N <= 9216) sets the first launch's band, for measuring that
// trade; N >= min(S, 9216) is the single launch of before (docs/perf-notes.md, selection v3.2).
int select_band() { return static_cast<int>(env_int("SPARSEK_SELECT_BAND", 256, 9216).value_or(0)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> select_cuda(
    const at::Tensor& scores,  // (B, H, S) float32
    int64_t topk, int64_t window, int64_t block_q, bool poison) {
  SPARSEK_CHECK_CUDA("scores", scores);
  SPARSEK_CHECK(scores.dim() == 3, "scores must be (B, H, S), got ", scores.sizes());
  SPARSEK_CHECK(scores.scalar_type() == at::kFloat, "scores must be float32, got ", scores.scalar_type());
  SPARSEK_CHECK(topk >= 1, "topk must be >= 1, got ", topk);
  SPARSEK_CHECK(window >= 0, "window must be >= 0, got ", window);
  SPARSEK_CHECK(block_q >= 0, "block_q must be >= 0, got ", block_q);
  const int64_t B = scores.size(0), H = scores.size(1), S = scores.size(2);
  SPARSEK_CHECK(S < std::numeric_limits<int>::max() / 2, "sequence length ", S, " is too long for int32 indices");
  const c10::cuda::CUDAGuard guard(scores.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor raw = scores.contiguous();
  const auto iopt = raw.options().dtype(at::kInt);

  // Non-finite scores are found on the device, without a host synchronisation (the op stays
  // capturable in a CUDA graph): the selection runs on a copy with them replaced by 0, and their
  // rows come out with tau = NaN, which poison_rows turns into NaN attention outputs.
  at::Tensor nonfinite = at::zeros({B * H}, iopt);
  at::Tensor u = at::empty_like(raw);
  cudaError_t err = sparsek::launch_sanitize_scores(raw.data_ptr<float>(), u.data_ptr<float>(), nonfinite.data_ptr<int>(),
                                                    static_cast<int>(B * H), static_cast<int>(S), stream);
  TORCH_CHECK(err == cudaSuccess, sparsek_msg::build("sparsek_cuda: scores check launch failed: ", cudaGetErrorString(err)));

  // A stable ascending sort keeps equal scores in index order: the larger index ranks higher,
  // which is the tie rule of the top-k.
  auto [sorted, order] = at::sort(u, /*stable=*/true, /*dim=*/-1, /*descending=*/false);
  const at::Tensor key_at = order.to(at::kInt);
  at::Tensor pos = at::empty_like(key_at);
  pos.scatter_(-1, order, at::arange(S, iopt).expand({B, H, S}));

  const int64_t k_eff = std::min<int64_t>(topk, S);
  const int64_t n_max = std::max<int64_t>(0, S - window);
  const sparsek::SelectAlgo algo = select_algo();
  const int64_t chunk = select_chunk(algo, S, B * H, std::max<int64_t>(n_max - k_eff, 0), scores.get_device());
  const int64_t n_chunks = n_max > k_eff ? (n_max - k_eff + chunk - 1) / chunk : 0;
  const int64_t n_blocks = block_q > 0 ? (S + block_q - 1) / block_q : 0;
  const int64_t cap = block_q > 0 ? k_eff + block_q - 1 : 0;

  at::Tensor tau = at::empty({B, H, S}, u.options());
  at::Tensor end = at::empty({B, H, S}, iopt);
  at::Tensor kth = at::empty({B, H, S + 1}, iopt);
  at::Tensor keys = at::empty({B * H, n_blocks, cap}, iopt);
  at::Tensor count = at::empty({B * H, n_blocks}, iopt);
  if (poison) {  // tests: every element the kernels should write starts as garbage
    tau.fill_(std::numeric_limits<float>::quiet_NaN());
    end.fill_(-7);
    count.fill_(-7);
  }

  sparsek::SelectParams p = {};
  p.scores = u.data_ptr<float>();
  p.sorted = sorted.data_ptr<float>();
  p.key_at = key_at.data_ptr<int>();
  p.pos = pos.data_ptr<int>();
  p.kth = kth.data_ptr<int>();
  p.tau = tau.data_ptr<float>();
  p.end = end.data_ptr<int>();
  p.block_keys = n_blocks > 0 ? keys.data_ptr<int>() : nullptr;
  p.block_count = n_blocks > 0 ? count.data_ptr<int>() : nullptr;
  p.rows = static_cast<int>(B * H);
  p.seq_len = static_cast<int>(S);
  p.topk = static_cast<int>(k_eff);  // topk >= S selects every candidate, like topk = S
  p.window = static_cast<int>(std::min<int64_t>(window, S));
  p.n_max = static_cast<int>(n_max);
  p.chunk = static_cast<int>(chunk);
  p.n_chunks = static_cast<int>(n_chunks);
  p.block_q = static_cast<int>(block_q);
  p.n_blocks = static_cast<int>(n_blocks);
  p.cap = static_cast<int>(cap);
  p.band_cap = select_band();
  at::Tensor overflow;  // the two-launch plan's list of deferred chunks (tens of KB at most)
  if (algo == sparsek::SelectAlgo::kSegmented && n_chunks > 0 && sparsek::seg_band_plan(p).second_cap > 0) {
    overflow = at::zeros({2 + B * H * n_chunks}, iopt);
    p.overflow = overflow.data_ptr<int>();
  }
  err = sparsek::launch_selection_with(p, algo, nonfinite.data_ptr<int>(), stream);
  TORCH_CHECK(err == cudaSuccess, sparsek_msg::build("sparsek_cuda: selection launch failed: ", cudaGetErrorString(err)));
  return {tau, end, keys, count};
}

// NaN over out and lse of every (batch, kv head) whose tau select marked with NaN (non-finite
// scores), in place: the attention kernel itself never sees a NaN gate (its gates saturate).
void poison_rows_cuda(const at::Tensor& tau,  // (B, Hkv, S) float32, from select
                      at::Tensor& out,        // (B, Hq, S, D) float16/bfloat16, contiguous
                      at::Tensor& lse) {      // (B, Hq, S) float32, contiguous
  SPARSEK_CHECK_CUDA("tau", tau);
  SPARSEK_CHECK(tau.dim() == 3 && tau.scalar_type() == at::kFloat && tau.is_contiguous(), "tau must be contiguous float32 (B, Hkv, S)");
  const int64_t B = tau.size(0), Hkv = tau.size(1), S = tau.size(2);
  SPARSEK_CHECK(out.dim() == 4 && out.size(0) == B && out.size(2) == S && out.size(1) % std::max<int64_t>(Hkv, 1) == 0 &&
                    out.is_contiguous() && out.element_size() == 2 && out.device() == tau.device(),
                "out must be a contiguous 16-bit (B, Hq, S, D) tensor on ", tau.device(), ", got ", out.sizes());
  SPARSEK_CHECK(lse.sizes() == at::IntArrayRef({B, out.size(1), S}) && lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                    lse.device() == tau.device(),
                "lse must be contiguous float32 (B, Hq, S), got ", lse.sizes());
  const c10::cuda::CUDAGuard guard(tau.device());
  const int64_t rows = B * Hkv;
  const int64_t per_row = rows > 0 ? out.numel() / rows : 0;
  const cudaError_t err = sparsek::launch_poison_rows(tau.data_ptr<float>(), static_cast<int>(rows), static_cast<int>(S),
                                                      out.data_ptr(), per_row, lse.data_ptr<float>(),
                                                      rows > 0 ? lse.numel() / rows : 0, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, sparsek_msg::build("sparsek_cuda: poison launch failed: ", cudaGetErrorString(err)));
}

// Rows must be 16-byte aligned with a contiguous last dim for the 16-byte cp.async copies.
at::Tensor rows_aligned(const at::Tensor& t) {
  const bool ok = t.stride(3) == 1 && (t.stride(2) * t.element_size()) % 16 == 0 &&
                  (t.stride(1) * t.element_size()) % 16 == 0 && (t.stride(0) * t.element_size()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return ok ? t : t.contiguous();
}

struct AttnShape {
  int64_t B, Hq, S, D, Hkv, group, n_blocks;
};

// The checks shared by the forward and the backward attention: shapes, dtypes, devices, the GQA
// packing and the selection's outputs.
AttnShape check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& scores,
                          const at::Tensor& tau, const at::Tensor& end, const at::Tensor& block_keys,
                          const at::Tensor& block_count, double scale, int64_t block_q) {
  for (const auto* t : {&q, &k, &v, &scores, &tau, &end, &block_keys, &block_count}) {
    SPARSEK_CHECK((*t).is_cuda() && (*t).device() == q.device(), "all inputs must be on ", q.device());
  }
  SPARSEK_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes(), "q must be (B, Hq, S, D) and k, v (B, Hkv, S, D); got ",
                q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), S = q.size(2), D = q.size(3), Hkv = k.size(1);
  SPARSEK_CHECK(k.size(0) == B && k.size(2) == S && k.size(3) == D, "k must be (", B, ", Hkv, ", S, ", ", D, "), got ", k.sizes());
  SPARSEK_CHECK(D == 64 || D == 128, "head dim must be 64 or 128, got ", D);
  SPARSEK_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, "q must be float16 or bfloat16, got ", q.scalar_type());
  SPARSEK_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "k and v must have q's dtype ", q.scalar_type());
  // The kernel masks raw logits and scales in the exponent, which keeps the max only for scale > 0.
  SPARSEK_CHECK(scale > 0.0 && std::isfinite(scale), "scale must be a finite float > 0, got ", scale);
  SPARSEK_CHECK(Hkv >= 1 && Hq % Hkv == 0, "Hq=", Hq, " must be a multiple of Hkv=", Hkv);
  const int64_t group = Hq / Hkv;
  SPARSEK_CHECK(sparsek::kAttnRows % group == 0 && block_q == sparsek::kAttnRows / group, "GQA group ", group,
                " must divide ", sparsek::kAttnRows, " and block_q must be ", sparsek::kAttnRows, " / group, got ", block_q);
  const int64_t n_blocks = (S + block_q - 1) / block_q;
  SPARSEK_CHECK(scores.sizes() == at::IntArrayRef({B, Hkv, S}) && scores.scalar_type() == at::kFloat, "scores must be float32 (B, Hkv, S)");
  SPARSEK_CHECK(tau.sizes() == scores.sizes() && tau.scalar_type() == at::kFloat && tau.is_contiguous(), "tau must be contiguous float32 (B, Hkv, S)");
  SPARSEK_CHECK(end.sizes() == scores.sizes() && end.scalar_type() == at::kInt && end.is_contiguous(), "end must be contiguous int32 (B, Hkv, S)");
  SPARSEK_CHECK(block_keys.dim() == 3 && block_keys.size(0) == B * Hkv && block_keys.size(1) == n_blocks && block_keys.is_contiguous() &&
                    block_keys.scalar_type() == at::kInt,
                "block_keys must be contiguous int32 (B*Hkv, ", n_blocks, ", cap), got ", block_keys.sizes());
  SPARSEK_CHECK(block_count.sizes() == at::IntArrayRef({B * Hkv, n_blocks}) && block_count.is_contiguous() &&
                    block_count.scalar_type() == at::kInt,
                "block_count must be contiguous int32 (B*Hkv, ", n_blocks, ")");
  return {B, Hq, S, D, Hkv, group, n_blocks};
}

// The fields the forward and backward params share (same names in AttnParams and AttnBwdParams):
// q, k, v with their strides, the selection's tensors, the shape and the softmax scale in base 2.
template <typename Params>
void fill_common(Params& p, const AttnShape& shape, const at::Tensor& qa, const at::Tensor& ka, const at::Tensor& va,
                 const at::Tensor& u, const at::Tensor& tau, const at::Tensor& end, const at::Tensor& block_keys,
                 const at::Tensor& block_count, int64_t window, double scale, int64_t block_q) {
  p.q = qa.data_ptr();
  p.k = ka.data_ptr();
  p.v = va.data_ptr();
  p.scores = u.data_ptr<float>();
  p.tau = tau.data_ptr<float>();
  p.end = end.data_ptr<int>();
  p.block_keys = block_keys.data_ptr<int>();
  p.block_count = block_count.data_ptr<int>();
  p.q_batch_stride = qa.stride(0);
  p.q_head_stride = qa.stride(1);
  p.q_row_stride = qa.stride(2);
  p.k_batch_stride = ka.stride(0);
  p.k_head_stride = ka.stride(1);
  p.k_row_stride = ka.stride(2);
  p.v_batch_stride = va.stride(0);
  p.v_head_stride = va.stride(1);
  p.v_row_stride = va.stride(2);
  p.batch = static_cast<int>(shape.B);
  p.q_heads = static_cast<int>(shape.Hq);
  p.kv_heads = static_cast<int>(shape.Hkv);
  p.group = static_cast<int>(shape.group);
  p.seq_len = static_cast<int>(shape.S);
  p.window = static_cast<int>(std::min<int64_t>(window, shape.S));
  p.block_q = static_cast<int>(block_q);
  p.n_blocks = static_cast<int>(shape.n_blocks);
  p.cap = static_cast<int>(block_keys.size(2));
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.is_bf16 = qa.scalar_type() == at::kBFloat16;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(
    const at::Tensor& q,            // (B, Hq, S, D)
    const at::Tensor& k,            // (B, Hkv, S, D)
    const at::Tensor& v,            // (B, Hkv, S, D)
    const at::Tensor& scores,       // (B, Hkv, S) float32
    const at::Tensor& tau,          // (B, Hkv, S) float32
    const at::Tensor& end,          // (B, Hkv, S) int32
    const at::Tensor& block_keys,   // (B * Hkv, n_blocks, cap) int32
    const at::Tensor& block_count,  // (B * Hkv, n_blocks) int32
    int64_t window, double scale, int64_t block_q, bool poison) {
  const AttnShape shape = check_attention(q, k, v, scores, tau, end, block_keys, block_count, scale, block_q);
  const auto [B, Hq, S, D, Hkv, group, n_blocks] = shape;
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qa = rows_aligned(q), ka = rows_aligned(k), va = rows_aligned(v);
  const at::Tensor u = scores.contiguous();
  at::Tensor out = at::empty({B, Hq, S, D}, q.options());
  at::Tensor lse = at::empty({B, Hq, S}, q.options().dtype(at::kFloat));
  if (poison) {
    out.fill_(std::numeric_limits<float>::quiet_NaN());
    lse.fill_(std::numeric_limits<float>::quiet_NaN());
  }

  sparsek::AttnParams p = {};
  fill_common(p, shape, qa, ka, va, u, tau, end, block_keys, block_count, window, scale, block_q);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = forward_kernel() == 7 ? sparsek::launch_attention_fwd_ws(p, static_cast<int>(D), stream)
                                                : sparsek::launch_attention_fwd(p, static_cast<int>(D), stream);
  TORCH_CHECK(err == cudaSuccess, sparsek_msg::build("sparsek_cuda: attention launch failed: ", cudaGetErrorString(err)));
  return {out, lse};
}

// Backward attention. Returns dq, dk and dv (the inputs' dtype), the per-key term of d scores
// (deterministic: per block and list place, (B*Hkv, n_blocks, cap); otherwise summed,
// (B, Hkv, S)) and gamma's per-row sums (B, Hq, S). The caller finishes d scores
// (sparsek/_cuda.py). kernel: 2 = warpgroup MMA, 1 = the mma.sync version (for comparison);
// acc_budget: bytes of dk/dv accumulators per launch chunk; streams: how many streams the chunks
// take turns over (float32 accumulators only; 1 = the current stream alone).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& dout,         // (B, Hq, S, D)
    const at::Tensor& q,            // (B, Hq, S, D)
    const at::Tensor& k,            // (B, Hkv, S, D)
    const at::Tensor& v,            // (B, Hkv, S, D)
    const at::Tensor& out,          // (B, Hq, S, D)
    const at::Tensor& lse,          // (B, Hq, S) float32
    const at::Tensor& scores,       // (B, Hkv, S) float32
    const at::Tensor& tau,          // (B, Hkv, S) float32
    const at::Tensor& end,          // (B, Hkv, S) int32
    const at::Tensor& block_keys,   // (B * Hkv, n_blocks, cap) int32
    const at::Tensor& block_count,  // (B * Hkv, n_blocks) int32
    int64_t window, double scale, int64_t block_q, bool deterministic,
    const std::optional<at::Tensor>& fixed_scale,  // (2,) float64: dk, dv (deterministic only)
    bool poison, int64_t kernel, int64_t acc_budget, int64_t streams) {
  const AttnShape shape = check_attention(q, k, v, scores, tau, end, block_keys, block_count, scale, block_q);
  const auto [B, Hq, S, D, Hkv, group, n_blocks] = shape;
  for (const auto* t : {&dout, &out, &lse}) {
    SPARSEK_CHECK((*t).is_cuda() && (*t).device() == q.device(), "all inputs must be on ", q.device());
  }
  SPARSEK_CHECK(dout.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type(), "grad_out must be ", q.scalar_type(), " ",
                q.sizes(), ", got ", dout.scalar_type(), " ", dout.sizes());
  SPARSEK_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(), "out must be ", q.scalar_type(), " ", q.sizes(),
                ", got ", out.scalar_type(), " ", out.sizes());
  SPARSEK_CHECK(lse.sizes() == at::IntArrayRef({B, Hq, S}) && lse.scalar_type() == at::kFloat, "lse must be float32 ",
                at::IntArrayRef({B, Hq, S}), ", got ", lse.scalar_type(), " ", lse.sizes());
  SPARSEK_CHECK(kernel >= 1 && kernel <= 6,
                "kernel must be 1 (mma.sync), 2 (warpgroup MMA, v2.9), 3 (v2.12), 4 (v2.12b), 5 (v2.13, a reducer warpgroup) or 6 "
                "(v2.14, CTA pairs), got ", kernel);
  SPARSEK_CHECK(acc_budget > 0, "acc_budget must be positive, got ", acc_budget);
  SPARSEK_CHECK(streams >= 1 && streams <= 8, "streams must be in [1, 8], got ", streams);
  if (deterministic) {
    SPARSEK_CHECK(fixed_scale.has_value() && fixed_scale->is_cuda() && fixed_scale->device() == q.device() &&
                      fixed_scale->scalar_type() == at::kDouble && fixed_scale->numel() == 2 && fixed_scale->is_contiguous(),
                  "deterministic mode needs fixed_scale: a contiguous float64 CUDA tensor of 2 elements");
  }
  const c10::cuda::CUDAGuard guard(q.device());
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream();
  const cudaStream_t stream = current.stream();
  const at::Tensor qa = rows_aligned(q), ka = rows_aligned(k), va = rows_aligned(v);
  const at::Tensor dout_c = dout.contiguous(), out_c = out.contiguous(), lse_c = lse.contiguous(), u = scores.contiguous();

  at::Tensor dsum = at::empty({B, Hq, S}, q.options().dtype(at::kFloat));
  sparsek::BwdDotParams dot = {};
  dot.dout = dout_c.data_ptr();
  dot.out = out_c.data_ptr();
  dot.dsum = dsum.data_ptr<float>();
  dot.rows = B * Hq * S;
  dot.head_dim = static_cast<int>(D);
  dot.is_bf16 = q.scalar_type() == at::kBFloat16;
  cudaError_t err = sparsek::launch_bwd_dot(dot, stream);
  TORCH_CHECK(err == cudaSuccess, sparsek_msg::build("sparsek_cuda: backward dot launch failed: ", cudaGetErrorString(err)));

  // dk and dv are summed in float32 (int64 fixed point when deterministic) accumulators. The
  // (batch, kv head) pairs run in chunks whose accumulators fit in acc_budget bytes (at least one
  // pair per chunk); each chunk's sums are converted into dk and dv before its accumulators take
  // the next chunk, so they never grow with B * Hkv (512 MiB at long-64k otherwise). With
  // streams > 1 (float32 only) the chunks take turns over that many streams, each with its own
  // accumulators: one stream's launch fills the SMs another's partly empty last wave leaves, and
  // a chunk's conversion runs beside the next chunk's launch (docs/perf-notes.md, v2.8).
  const int64_t BH = B * Hkv;
  const int64_t acc_bytes_per_bh = 2 * S * D * (deterministic ? 8 : 4);
  const int64_t chunk = std::clamp<int64_t>(acc_budget / std::max<int64_t>(acc_bytes_per_bh, 1), 1, std::max<int64_t>(BH, 1));
  const int64_t n_chunks = (BH + chunk - 1) / chunk;
  const int64_t lanes = deterministic ? 1 : std::clamp<int64_t>(streams, 1, std::max<int64_t>(n_chunks, 1));
  const auto acc_opts = q.options().dtype(deterministic ? at::kLong : at::kFloat);
  at::Tensor dq = at::empty({B, Hq, S, D}, q.options());
  at::Tensor dk = at::empty({B, Hkv, S, D}, k.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dv = at::empty({B, Hkv, S, D}, v.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dk_acc = at::zeros({lanes, chunk, S, D}, acc_opts);  // (lanes, chunk, S, D)
  at::Tensor dv_acc = at::zeros({lanes, chunk, S, D}, acc_opts);
  const int64_t cap = block_keys.size(2);
  at::Tensor du = deterministic ? at::zeros({B * Hkv, n_blocks, cap}, q.options().dtype(at::kFloat))
                                : at::zeros({B, Hkv, S}, q.options().dtype(at::kFloat));
  at::Tensor gamma_rows = at::empty({B, Hq, S}, q.options().dtype(at::kFloat));
  if (poison) {
    dq.fill_(std::numeric_limits<float>::quiet_NaN());
    gamma_rows.fill_(std::numeric_limits<float>::quiet_NaN());
  }

  sparsek::AttnBwdParams p = {};
  fill_common(p, shape, qa, ka, va, u, tau, end, block_keys, block_count, window, scale, block_q);
  p.dout = dout_c.data_ptr();
  p.lse = lse_c.data_ptr<float>();
  p.dsum = dsum.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.fixed_scale = deterministic ? fixed_scale->data_ptr<double>() : nullptr;
  p.du = deterministic ? nullptr : du.data_ptr<float>();
  p.du_part = deterministic ? du.data_ptr<float>() : nullptr;
  p.gamma_rows = gamma_rows.data_ptr<float>();
  p.scale = static_cast<float>(scale);
  p.deterministic = deterministic;
  p.kernel = static_cast<int>(kernel);
  const at::Tensor dk_rows = dk.view({BH, S, D}), dv_rows = dv.view({BH, S, D});

  // Stream i of `lanes` runs chunks i, i + lanes, ...; the side streams start after everything
  // queued so far on the current stream and the current stream waits for all of them at the end,
  // so callers (and the caching allocator, whose blocks belong to the current stream) see one
  // ordered stream.
  std::vector<c10::cuda::CUDAStream> lane_streams;
  if (lanes > 1) {
    at::cuda::CUDAEvent inputs_ready;
    inputs_ready.record(current);
    for (int64_t i = 0; i < lanes; ++i) {
      lane_streams.push_back(c10::cuda::getStreamFromPool(false, q.device().index()));
      inputs_ready.block(lane_streams.back());
    }
  } else {
    lane_streams.push_back(current);
  }
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t c0 = c * chunk, n = std::min(chunk, BH - c0), lane = c % lanes;
    const cudaStream_t lane_stream = lane_streams[static_cast<size_t>(lane)].stream();
    at::Tensor dk_part = dk_acc.select(0, lane).narrow(0, 0, n), dv_part = dv_acc.select(0, lane).narrow(0, 0, n);
    p.dk_acc = dk_part.data_ptr();
    p.dv_acc = dv_part.data_ptr();
    p.bh_offset = static_cast<int>(c0);
    err = sparsek::launch_attention_bwd(p, static_cast<int>(D), static_cast<int>(n), lane_stream);
    TORCH_CHECK(err == cudaSuccess, sparsek_msg::build("sparsek_cuda: backward attention launch failed: ", cudaGetErrorString(err)));
    const bool reused = c + lanes < n_chunks;
    if (deterministic) {  // one rounding from the exact integer sums: value = acc / fixed_scale
      dk_rows.narrow(0, c0, n).copy_(dk_part.to(at::kDouble).mul_(scale).div_(fixed_scale->select(0, 0)));
      dv_rows.narrow(0, c0, n).copy_(dv_part.to(at::kDouble).div_(fixed_scale->select(0, 1)));
      if (reused) {
        dk_part.zero_();
        dv_part.zero_();
      }
    } else {  // dk = acc * scale and dv = acc rounded once into their dtype, zeros written back if reused
      sparsek::BwdConvertParams cv = {};
      cv.dk_acc = dk_part.data_ptr<float>();
      cv.dv_acc = dv_part.data_ptr<float>();
      cv.dk = dk_rows[c0].data_ptr();
      cv.dv = dv_rows[c0].data_ptr();
      cv.elems = n * S * D;
      cv.scale = static_cast<float>(scale);
      cv.zero = reused;
      cv.is_bf16 = q.scalar_type() == at::kBFloat16;
      err = sparsek::launch_bwd_convert(cv, lane_stream);
      TORCH_CHECK(err == cudaSuccess, sparsek_msg::build("sparsek_cuda: backward conversion launch failed: ", cudaGetErrorString(err)));
    }
  }
  if (lanes > 1) {
    for (const c10::cuda::CUDAStream& lane_stream : lane_streams) {
      at::cuda::CUDAEvent done;  // destroying it after the wait is queued leaves the wait in place
      done.record(lane_stream);
      done.block(current);
    }
  }
  return {dq, dk, dv, du, gamma_rows};
}

}  // namespace

TORCH_LIBRARY(sparsek_cuda, m) {
  m.def("select(Tensor scores, int topk, int window, int block_q, bool poison=False) -> (Tensor tau, Tensor end, Tensor block_keys, Tensor block_count)");
  m.def("poison_rows(Tensor tau, Tensor(a!) out, Tensor(b!) lse) -> ()");
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor scores, Tensor tau, Tensor end, Tensor block_keys, "
      "Tensor block_count, int window, float scale, int block_q, bool poison=False) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor scores, Tensor tau, "
      "Tensor end, Tensor block_keys, Tensor block_count, int window, float scale, int block_q, bool deterministic, "
      "Tensor? fixed_scale=None, bool poison=False, int kernel=2, int acc_budget=268435456, int streams=1) -> (Tensor dq, "
      "Tensor dk, Tensor dv, Tensor du, Tensor gamma_rows)");
}

TORCH_LIBRARY_IMPL(sparsek_cuda, CUDA, m) {
  m.impl("select", &select_cuda);
  m.impl("poison_rows", &poison_rows_cuda);
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}


// ---- decode (owned by the decode kernels) ----

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>

#include "decode_params.h"

// Errors name the argument, the value and what was expected (ValueError / TypeError in Python).
#define DECODE_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, sparsek_msg::build("sparsek decode: ", __VA_ARGS__))
#define DECODE_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, sparsek_msg::build("sparsek decode: ", __VA_ARGS__))

namespace sparsek_decode_binding {

// A cache tensor: on the device of q, the given dtype and shape, contiguous.
void check_state(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape, const at::Device& device) {
  DECODE_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
  DECODE_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  DECODE_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  DECODE_CHECK(t.is_contiguous(), name, " must be contiguous (strides ", t.strides(), ")");
}

// A (B, H, 1, D) row tensor that the kernels read or write with 16-byte accesses.
void check_rows(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape, const at::Device& device) {
  DECODE_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
  DECODE_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  DECODE_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  const int64_t es = t.element_size();
  DECODE_CHECK(t.stride(3) == 1 && (t.stride(0) * es) % 16 == 0 && (t.stride(1) * es) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0,
               name, " must have a contiguous last dim and 16-byte aligned rows, got strides ", t.strides());
}

struct DecodeShape {
  int64_t B, Hkv, NS, D, topk, window;
  at::ScalarType dtype;
  at::Device device;
};

// Validates the cache tensors against k_slots, which fixes B, Hkv, NS, D and the dtype.
DecodeShape check_cache(const at::Tensor& k_slots, const at::Tensor& v_slots, const at::Tensor& slot_score, const at::Tensor& spare,
                        const at::Tensor& tau, const at::Tensor& lengths, const at::Tensor& status, int64_t topk, int64_t window) {
  DECODE_CHECK(k_slots.is_cuda(), "k_slots must be a CUDA tensor, got device ", k_slots.device());
  DECODE_CHECK(k_slots.dim() == 4, "k_slots must be (B, Hkv, window + topk + 1, D), got ", k_slots.sizes());
  DECODE_CHECK(topk >= 1, "topk must be >= 1, got ", topk);
  DECODE_CHECK(window >= 0, "window must be >= 0, got ", window);
  const DecodeShape s = {k_slots.size(0), k_slots.size(1), k_slots.size(2), k_slots.size(3), topk, window,
                         k_slots.scalar_type(), k_slots.device()};
  DECODE_CHECK(s.NS == topk + window + 1, "k_slots must have window + topk + 1 = ", topk + window + 1,
               " slots (the window, the top-k and a spare), got ", s.NS);
  DECODE_CHECK(s.NS < (int64_t{1} << 30), "window + topk + 1 = ", s.NS, " is too large for int32 slot indices");
  DECODE_CHECK(s.D == 64 || s.D == 128, "head dim must be 64 or 128, got ", s.D);
  DECODE_CHECK_TYPE(s.dtype == at::kHalf || s.dtype == at::kBFloat16, "k_slots must be float16 or bfloat16, got ", s.dtype);
  check_state(k_slots, "k_slots", s.dtype, {s.B, s.Hkv, s.NS, s.D}, s.device);
  check_state(v_slots, "v_slots", s.dtype, {s.B, s.Hkv, s.NS, s.D}, s.device);
  check_state(slot_score, "slot_score", at::kFloat, {s.B, s.Hkv, topk + 1}, s.device);
  check_state(spare, "spare", at::kInt, {s.B, s.Hkv}, s.device);
  check_state(tau, "tau", at::kDouble, {s.B, s.Hkv}, s.device);
  check_state(lengths, "lengths", at::kInt, {s.B, s.Hkv}, s.device);
  check_state(status, "status", at::kInt, {s.B, s.Hkv, 2}, s.device);
  return s;
}

int64_t pick_splits(int64_t requested, int64_t work_items, int64_t num_slots, int64_t head_dim, bool is_bf16) {
  DECODE_CHECK(requested >= 0 && requested <= sparsek::kDecodeMaxSplits, "num_splits must be in [0, ", sparsek::kDecodeMaxSplits,
               "] (0: automatic), got ", requested);
  const int64_t tiles = (num_slots + sparsek::kDecodeTileSlots - 1) / sparsek::kDecodeTileSlots;
  if (requested > 0) return std::min(requested, tiles);  // every split gets at least one tile
  // occupancy per (head dim, dtype), computed once per process
  static std::array<int, 4> ctas_per_sm = {0, 0, 0, 0};
  int& ctas = ctas_per_sm[(head_dim == 128 ? 2 : 0) + (is_bf16 ? 1 : 0)];
  if (ctas == 0) ctas = sparsek::decode_attention_ctas_per_sm(static_cast<int>(head_dim), is_bf16);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return sparsek::decode_num_splits(static_cast<int>(work_items), static_cast<int>(num_slots), sms * ctas);
}

// The new token's row tensors and score, checked, as both kernels take them.
sparsek::DecodeNewToken new_token(const DecodeShape& s, const at::Tensor& k_new, const at::Tensor& v_new,
                                  const at::Tensor& score_new) {
  check_rows(k_new, "k_new", s.dtype, {s.B, s.Hkv, 1, s.D}, s.device);
  check_rows(v_new, "v_new", s.dtype, {s.B, s.Hkv, 1, s.D}, s.device);
  check_state(score_new, "score_new", at::kFloat, {s.B, s.Hkv}, s.device);
  sparsek::DecodeNewToken token = {};
  token.k = k_new.data_ptr();
  token.v = v_new.data_ptr();
  token.k_batch_stride = k_new.stride(0);
  token.k_head_stride = k_new.stride(1);
  token.v_batch_stride = v_new.stride(0);
  token.v_head_stride = v_new.stride(1);
  token.score = score_new.data_ptr<float>();
  return token;
}

// The step's row mask, checked: (B,) bool, or nullptr when every row steps.
const bool* active_rows(const DecodeShape& s, const std::optional<at::Tensor>& active) {
  if (!active.has_value()) return nullptr;
  check_state(*active, "active", at::kBool, {s.B}, s.device);
  return active->data_ptr<bool>();
}

// The update's launch parameters, every argument checked (nothing is launched here).
// concurrent: to be launched right after the step's attention kernel, beside it (window >= 1).
sparsek::DecodeUpdateParams plan_update(const DecodeShape& s, const sparsek::DecodeNewToken& token, at::Tensor& k_slots,
                                        at::Tensor& v_slots, at::Tensor& slot_score, at::Tensor& slot_pos, at::Tensor& spare,
                                        at::Tensor& win_score, at::Tensor& soft, at::Tensor& soft_count, at::Tensor& tau,
                                        at::Tensor& lengths, at::Tensor& status, const bool* active, bool concurrent) {
  check_state(slot_pos, "slot_pos", at::kInt, {s.B, s.Hkv, s.topk + 1}, s.device);
  check_state(win_score, "win_score", at::kFloat, {s.B, s.Hkv, s.window}, s.device);
  DECODE_CHECK(soft.dim() == 3, "soft must be (B, Hkv, soft_capacity), got ", soft.sizes());
  const int64_t capacity = soft.size(2);
  // the first step past topk candidates holds topk + 1 scores before it drops any
  DECODE_CHECK(capacity > s.topk, "soft_capacity must be > topk = ", s.topk, ", got ", capacity);
  check_state(soft, "soft", at::kFloat, {s.B, s.Hkv, capacity}, s.device);
  check_state(soft_count, "soft_count", at::kInt, {s.B, s.Hkv}, s.device);
  DECODE_CHECK(s.B * s.Hkv * std::max(capacity, s.NS * s.D) < (int64_t{1} << 62), "cache too large");

  sparsek::DecodeUpdateParams params = {};
  params.k_slots = k_slots.data_ptr();
  params.v_slots = v_slots.data_ptr();
  params.slot_score = slot_score.data_ptr<float>();
  params.slot_pos = slot_pos.data_ptr<int>();
  params.spare = spare.data_ptr<int>();
  params.win_score = s.window > 0 ? win_score.data_ptr<float>() : nullptr;
  params.soft = soft.data_ptr<float>();
  params.soft_count = soft_count.data_ptr<int>();
  params.tau = tau.data_ptr<double>();
  params.lengths = lengths.data_ptr<int>();
  params.status = status.data_ptr<int>();
  params.token = token;
  params.active = active;
  params.batch = static_cast<int>(s.B);
  params.kv_heads = static_cast<int>(s.Hkv);
  params.head_dim = static_cast<int>(s.D);
  params.elem_bytes = static_cast<int>(k_slots.element_size());
  params.topk = static_cast<int>(s.topk);
  params.window = static_cast<int>(s.window);
  params.num_slots = static_cast<int>(s.NS);
  params.soft_capacity = static_cast<int>(capacity);
  params.concurrent = concurrent;
  return params;
}

void launch_update(const sparsek::DecodeUpdateParams& params) {
  const cudaError_t err = sparsek::launch_decode_update(params, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, sparsek_msg::build("sparsek decode: update launch failed: ", cudaGetErrorString(err)));
}

// The attention launch's sizes, validated before anything is launched.
struct AttentionPlan {
  int64_t Hq, group, head_chunks, work_items, splits, slots_per_split;
  bool is_bf16;
};

AttentionPlan plan_attention(const DecodeShape& s, const at::Tensor& q, const at::Tensor& counters, double scale,
                             int64_t num_splits) {
  DECODE_CHECK(q.dim() == 4 && q.size(0) == s.B && q.size(2) == 1 && q.size(3) == s.D,
               "q must be (B=", s.B, ", Hq, 1, D=", s.D, "), got ", q.sizes());
  AttentionPlan plan = {};
  plan.Hq = q.size(1);
  DECODE_CHECK(plan.Hq >= s.Hkv && plan.Hq % s.Hkv == 0, "query heads Hq=", plan.Hq, " must be a multiple of kv heads Hkv=",
               s.Hkv);
  check_rows(q, "q", s.dtype, {s.B, plan.Hq, 1, s.D}, s.device);
  DECODE_CHECK(scale > 0.0, "scale must be > 0, got ", scale);
  plan.group = plan.Hq / s.Hkv;
  plan.head_chunks = (plan.group + sparsek::kDecodeHeadsPerCta - 1) / sparsek::kDecodeHeadsPerCta;
  plan.work_items = s.B * s.Hkv * plan.head_chunks;
  DECODE_CHECK(s.B <= 65535 && s.Hkv * plan.head_chunks <= 65535, "batch ", s.B, " and kv heads x head chunks ",
               s.Hkv * plan.head_chunks, " must each be <= 65535 (CUDA grid limits)");
  check_state(counters, "counters", at::kInt, {plan.work_items}, s.device);
  plan.is_bf16 = s.dtype == at::kBFloat16;
  plan.splits = pick_splits(num_splits, plan.work_items, s.NS, s.D, plan.is_bf16);
  const int64_t tiles = (s.NS + sparsek::kDecodeTileSlots - 1) / sparsek::kDecodeTileSlots;
  plan.slots_per_split = (tiles + plan.splits - 1) / plan.splits * sparsek::kDecodeTileSlots;
  return plan;
}

at::Tensor launch_attention(const DecodeShape& s, const AttentionPlan& plan, const at::Tensor& q,
                            const sparsek::DecodeNewToken& token, const at::Tensor& k_slots,
                            const at::Tensor& v_slots, const at::Tensor& slot_score, const at::Tensor& spare, const at::Tensor& tau,
                            const at::Tensor& lengths, const at::Tensor& status, const bool* active, at::Tensor& counters,
                            double scale) {
  const int64_t Hq = plan.Hq, group = plan.group, head_chunks = plan.head_chunks, work_items = plan.work_items;
  const int64_t splits = plan.splits, slots_per_split = plan.slots_per_split;
  const bool is_bf16 = plan.is_bf16;

  at::Tensor out = at::empty({s.B, Hq, 1, s.D}, q.options());
  at::Tensor o_part, ml_part;
  if (splits > 1) {
    const auto fopt = q.options().dtype(at::kFloat);
    o_part = at::empty({work_items, splits, sparsek::kDecodeHeadsPerCta, s.D}, fopt);
    ml_part = at::empty({work_items, splits, sparsek::kDecodeHeadsPerCta, 2}, fopt);
  }

  sparsek::DecodeAttentionParams params = {};
  params.q = q.data_ptr();
  params.q_batch_stride = q.stride(0);
  params.q_head_stride = q.stride(1);
  params.k_slots = k_slots.data_ptr();
  params.v_slots = v_slots.data_ptr();
  params.slot_score = slot_score.data_ptr<float>();
  params.spare = spare.data_ptr<int>();
  params.tau = tau.data_ptr<double>();
  params.lengths = lengths.data_ptr<int>();
  params.status = status.data_ptr<int>();
  params.token = token;
  params.active = active;
  params.out = out.data_ptr();
  params.out_batch_stride = out.stride(0);
  params.out_head_stride = out.stride(1);
  params.o_part = splits > 1 ? o_part.data_ptr<float>() : nullptr;
  params.ml_part = splits > 1 ? ml_part.data_ptr<float>() : nullptr;
  params.counters = counters.data_ptr<int>();
  params.batch = static_cast<int>(s.B);
  params.q_heads = static_cast<int>(Hq);
  params.kv_heads = static_cast<int>(s.Hkv);
  params.head_dim = static_cast<int>(s.D);
  params.topk = static_cast<int>(s.topk);
  params.window = static_cast<int>(s.window);
  params.num_slots = static_cast<int>(s.NS);
  params.group = static_cast<int>(group);
  params.head_chunks = static_cast<int>(head_chunks);
  params.num_splits = static_cast<int>(splits);
  params.slots_per_split = static_cast<int>(slots_per_split);
  params.scale_log2 = static_cast<float>(scale * 1.4426950408889634);  // log2(e)
  params.is_bf16 = is_bf16;
  params.after_update = s.window == 0;  // else it runs first and the update beside it
  const cudaError_t err = sparsek::launch_decode_attention(params, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, sparsek_msg::build("sparsek decode: attention launch failed: ", cudaGetErrorString(err)));
  return out;
}

// One decode step. window >= 1: the attention over the state (which holds this query's selection)
// and, beside it, the update that prepares the next query's; window == 0: the update (the new token
// is a candidate of its own query), then the attention.
at::Tensor decode_step_cuda(const at::Tensor& q,          // (B, Hq, 1, D)
                            const at::Tensor& k_new,      // (B, Hkv, 1, D)
                            const at::Tensor& v_new,      // (B, Hkv, 1, D)
                            const at::Tensor& score_new,  // (B, Hkv) float32
                            at::Tensor k_slots, at::Tensor v_slots, at::Tensor slot_score, at::Tensor slot_pos, at::Tensor spare,
                            at::Tensor win_score, at::Tensor soft, at::Tensor soft_count, at::Tensor tau, at::Tensor lengths,
                            at::Tensor status, at::Tensor counters, int64_t topk, int64_t window, double scale, int64_t num_splits,
                            const std::optional<at::Tensor>& active) {  // (B,) bool or None: every row steps
  const DecodeShape s = check_cache(k_slots, v_slots, slot_score, spare, tau, lengths, status, topk, window);
  const c10::cuda::CUDAGuard guard(s.device);
  // every argument is checked before anything is launched: a refused step changes nothing
  const AttentionPlan plan = plan_attention(s, q, counters, scale, num_splits);
  const sparsek::DecodeNewToken token = new_token(s, k_new, v_new, score_new);
  const bool* rows = active_rows(s, active);
  const sparsek::DecodeUpdateParams update = plan_update(s, token, k_slots, v_slots, slot_score, slot_pos, spare, win_score,
                                                         soft, soft_count, tau, lengths, status, rows, /*concurrent=*/window > 0);
  if (window == 0) {
    launch_update(update);
    return launch_attention(s, plan, q, token, k_slots, v_slots, slot_score, spare, tau, lengths, status, rows, counters,
                            scale);
  }
  at::Tensor out =
      launch_attention(s, plan, q, token, k_slots, v_slots, slot_score, spare, tau, lengths, status, rows, counters, scale);
  launch_update(update);
  return out;
}

// The update alone (tests and the step-split measurement): waits for all earlier work in the
// stream, like any kernel launch.
void decode_update_cuda(const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& score_new, at::Tensor k_slots,
                        at::Tensor v_slots, at::Tensor slot_score, at::Tensor slot_pos, at::Tensor spare, at::Tensor win_score,
                        at::Tensor soft, at::Tensor soft_count, at::Tensor tau, at::Tensor lengths, at::Tensor status, int64_t topk,
                        int64_t window) {
  const DecodeShape s = check_cache(k_slots, v_slots, slot_score, spare, tau, lengths, status, topk, window);
  const c10::cuda::CUDAGuard guard(s.device);
  const sparsek::DecodeNewToken token = new_token(s, k_new, v_new, score_new);
  launch_update(plan_update(s, token, k_slots, v_slots, slot_score, slot_pos, spare, win_score, soft, soft_count, tau, lengths,
                            status, /*active=*/nullptr, /*concurrent=*/false));
}

// The attention alone, without an update: window >= 1, query position = lengths (before the
// step's update); window == 0, lengths already count the query (after it).
at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& score_new,
                                 const at::Tensor& k_slots, const at::Tensor& v_slots, const at::Tensor& slot_score,
                                 const at::Tensor& spare, const at::Tensor& tau, const at::Tensor& lengths, const at::Tensor& status,
                                 at::Tensor counters, int64_t topk, int64_t window, double scale, int64_t num_splits) {
  const DecodeShape s = check_cache(k_slots, v_slots, slot_score, spare, tau, lengths, status, topk, window);
  const c10::cuda::CUDAGuard guard(s.device);
  const AttentionPlan plan = plan_attention(s, q, counters, scale, num_splits);
  const sparsek::DecodeNewToken token = new_token(s, k_new, v_new, score_new);
  return launch_attention(s, plan, q, token, k_slots, v_slots, slot_score, spare, tau, lengths, status, /*active=*/nullptr,
                          counters, scale);
}

}  // namespace sparsek_decode_binding

TORCH_LIBRARY_FRAGMENT(sparsek_cuda, m) {
  m.def(
      "decode_step(Tensor q, Tensor k_new, Tensor v_new, Tensor score_new, Tensor(a!) k_slots, Tensor(b!) v_slots, "
      "Tensor(c!) slot_score, Tensor(d!) slot_pos, Tensor(e!) spare, Tensor(f!) win_score, Tensor(g!) soft, "
      "Tensor(h!) soft_count, Tensor(i!) tau, Tensor(j!) lengths, Tensor(k!) status, Tensor(l!) counters, int topk, "
      "int window, float scale, int num_splits=0, Tensor? active=None) -> Tensor");
  m.def(
      "decode_update(Tensor k_new, Tensor v_new, Tensor score_new, Tensor(a!) k_slots, Tensor(b!) v_slots, "
      "Tensor(c!) slot_score, Tensor(d!) slot_pos, Tensor(e!) spare, Tensor(f!) win_score, Tensor(g!) soft, "
      "Tensor(h!) soft_count, Tensor(i!) tau, Tensor(j!) lengths, Tensor(k!) status, int topk, int window) -> ()");
  m.def(
      "decode_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor score_new, Tensor k_slots, Tensor v_slots, "
      "Tensor slot_score, Tensor spare, Tensor tau, Tensor lengths, Tensor status, Tensor(a!) counters, int topk, "
      "int window, float scale, int num_splits=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsek_cuda, CUDA, m) {
  m.impl("decode_step", &sparsek_decode_binding::decode_step_cuda);
  m.impl("decode_update", &sparsek_decode_binding::decode_update_cuda);
  m.impl("decode_attention", &sparsek_decode_binding::decode_attention_cuda);
}
