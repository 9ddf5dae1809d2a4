// Host-side interface of the fastpeft._C kernels: dtype codes, argument structs and launchers.
// No libtorch: tensors arrive as device pointers plus sizes and strides (in elements, int64);
// bindings.cpp validates every argument before calling a launcher.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fastpeft {

// dtype codes shared with fastpeft/_cext.py (DTYPE_CODES)
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kThreads = 256;  // every kernel launches 256-thread blocks

// out (B, P+T, H) contiguous  <-  table (N, P, H) rows picked by prompt_index (or shared when
// prompt_index is null) and weight (V, H) rows picked by input_ids (B, T).  Templated (slots not
// null): out (B, T, H), out[b, t] = table[n, slots[b, t]] where slots[b, t] >= 0, else weight[input_ids[b, t]].
struct SoftPromptFwdArgs {
  void* out;
  const void* weight;
  const void* table;
  const int64_t* input_ids;
  const int64_t* prompt_index;  // null: one shared prompt
  const int64_t* slots;         // null: the prompt is prepended; else (B, T), -1 at a word
  int* bad_index;               // null or a device int set to 1 when an index is out of range
  int64_t B, T, P, H, V, N;
  int64_t ids_stride_b, ids_stride_t;
  int64_t weight_stride_v;
  int64_t table_stride_n, table_stride_p;
  int64_t pidx_stride;
  int64_t slots_stride_b, slots_stride_t;
};

// d_table (N, P, H) or (P, H) contiguous  <-  prompt part of dout (B, S = P+T, H); templated
// (positions not null): dout (B, S = T, H) with virtual token p of row b at position positions[b, p]
struct SoftPromptTableBwdArgs {
  void* d_table;
  const void* dout;
  const int64_t* prompt_index;  // null: shared prompt, sum over every row
  const int64_t* positions;     // null: token p at position p; else (B, P)
  int* bad_index;               // null or a device int set to 1 when a position is out of range
  int64_t B, S, P, H, N;
  int64_t dout_stride_b, dout_stride_s;
  int64_t pidx_stride;
  int64_t pos_stride_b, pos_stride_p;
};

// d_weight (V, H) contiguous  <-  word part of dout (positions P..P+T-1; templated: P = 0 and the
// positions whose slot is >= 0 skipped), scattered by input_ids
struct SoftPromptWeightBwdArgs {
  void* d_weight;
  const void* dout;
  const int64_t* input_ids;    // atomic mode: (B, T) ids with strides
  const int64_t* sorted_ids;   // sorted mode: ids flattened and stably sorted
  const int64_t* order;        // sorted mode: flat position b*T + t of each sorted id
  const int64_t* slots;        // templated (P = 0): (B, T), a position with slots >= 0 is skipped
  int* bad_index;
  int64_t B, T, P, H, V;
  int64_t ids_stride_b, ids_stride_t;
  int64_t dout_stride_b, dout_stride_s;
  int64_t slots_stride_b, slots_stride_t;
};

// dl (N,) = sum_m a[m, n] * b[m, n] in fp32
struct ColumnDotArgs {
  void* out;
  const void* a;
  const void* b;
  int64_t M, N;
  int64_t a_stride_m, a_stride_n, b_stride_m, b_stride_n;
};

// Grouped LoRA (csrc/grouped_lora.cu): tokens sorted by adapter (order, L positions) in G segments
// (offsets, G+1 int64), adapters stacked with ranks zero-padded to R (<= kMaxGroupedRank).
constexpr int64_t kMaxGroupedRank = 256;

// s (L, R) fp32  <-  scale[g] (null: 1) · x[order[m]] · w[g]ᵀ, w viewed (G, R, K)
struct GroupedShrinkArgs {
  float* s;
  const void* x;
  const void* w;
  const int64_t* order;
  const int64_t* offsets;
  const float* scale;
  int* bad_index;
  int64_t T, L, G, R, K;
  int64_t stride_xm, stride_xk, stride_wg, stride_wr, stride_wk, stride_sm;
};

// out[order[m]] += scale[g] (null: 1) · s[m] · l[g], l viewed (G, R, N)
struct GroupedExpandArgs {
  void* out;
  const float* s;
  const void* l;
  const int64_t* order;
  const int64_t* offsets;
  const float* scale;
  int* bad_index;
  int64_t T, L, G, R, N;
  int64_t stride_sm, stride_lg, stride_lr, stride_ln, stride_om, stride_on;
};

// y[t] += scale[g] · (x[t] · a[g]ᵀ) · l[g] for g = slot[t] >= 0; a (G, R, K), l (G, R, N) views
struct GroupedDecodeArgs {
  void* y;
  const void* x;
  const void* a;
  const void* l;
  const int32_t* slot;
  const float* scale;
  int* bad_index;
  int64_t T, G, R, K, N;
  int64_t stride_xm, stride_xk, stride_ag, stride_ar, stride_ak, stride_lg, stride_lr, stride_ln;
  int64_t stride_ym, stride_yn;
};

// Launchers: return the launch status (cudaGetLastError) for the host side to raise on.
cudaError_t launch_soft_prompt_fwd(const SoftPromptFwdArgs& a, int out_dtype, int table_dtype, bool vec,
                                   cudaStream_t stream);
cudaError_t launch_soft_prompt_table_bwd(const SoftPromptTableBwdArgs& a, int dout_dtype, int table_dtype, bool vec,
                                         cudaStream_t stream);
cudaError_t launch_soft_prompt_weight_bwd_atomic(const SoftPromptWeightBwdArgs& a, int dout_dtype, bool vec,
                                                 cudaStream_t stream);
cudaError_t launch_soft_prompt_weight_bwd_sorted(const SoftPromptWeightBwdArgs& a, int dout_dtype, int weight_dtype,
                                                 bool vec, cudaStream_t stream);
cudaError_t launch_column_dot(const ColumnDotArgs& a, int in_dtype, int out_dtype, cudaStream_t stream);
// Weak: a build that leaves csrc/grouped_lora.cu out (a test's explicit source list) still links;
// the entry points then raise instead of launching (bindings.cpp checks for a null address).
#if defined(__GNUC__) || defined(__clang__)
#define FASTPEFT_OPTIONAL __attribute__((weak))
#else
#define FASTPEFT_OPTIONAL
#endif
FASTPEFT_OPTIONAL cudaError_t launch_grouped_shrink(const GroupedShrinkArgs& a, int x_dtype, int w_dtype,
                                                    cudaStream_t stream);
FASTPEFT_OPTIONAL cudaError_t launch_grouped_expand(const GroupedExpandArgs& a, int l_dtype, int out_dtype,
                                                    cudaStream_t stream);
FASTPEFT_OPTIONAL cudaError_t launch_grouped_decode(const GroupedDecodeArgs& a, int x_dtype, int w_dtype,
                                                    cudaStream_t stream);

}  // namespace fastpeft
