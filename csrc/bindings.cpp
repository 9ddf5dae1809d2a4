// fastpeft._C: the pybind11 module over the CUDA kernels.  No libtorch: tensors arrive as device
// pointers (tensor.data_ptr()), sizes and strides in elements, dtype codes (0 float32,
// 1 float16, 2 bfloat16) and the caller's CUDA stream as an integer.  Every argument is checked
// here, before anything is launched: a bad size, dtype code, pointer or stride raises ValueError
// (nothing is written); a failed launch raises RuntimeError.  fastpeft/_cext.py is the caller.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "fastpeft.h"

namespace py = pybind11;
using fastpeft::kBFloat16;
using fastpeft::kFloat16;
using fastpeft::kFloat32;

#ifndef FASTPEFT_SASS_ARCHS
#define FASTPEFT_SASS_ARCHS ""  // e.g. "80,90": set by setup.py from FASTPEFT_CUDA_ARCH_LIST
#endif
#ifndef FASTPEFT_PTX_ARCHS
#define FASTPEFT_PTX_ARCHS ""  // e.g. "90": archs whose PTX is embedded too (the "+PTX" entries)
#endif

namespace {

constexpr int64_t kMaxExtent = std::numeric_limits<int64_t>::max() / 4;

struct Checker {
  const char* fn;

  template <typename... Args> [[noreturn]] void fail(Args&&... parts) const {
    std::ostringstream msg;
    msg << fn << ": ";
    (msg << ... << parts);
    throw py::value_error(msg.str());
  }

  static size_t itemsize(int code) { return code == kFloat32 ? 4 : 2; }

  void dtype(int code, const char* what) const {
    if (code != kFloat32 && code != kFloat16 && code != kBFloat16)
      fail("dtype code ", code, " for ", what, " is not one of 0 (float32), 1 (float16), 2 (bfloat16)");
  }

  void ptr(std::uintptr_t p, const char* what, size_t align) const {
    if (p == 0) fail("null pointer for ", what);
    if (p % align != 0) fail("pointer for ", what, " is not aligned to its ", align, "-byte elements");
  }

  void positive(int64_t x, const char* what) const {
    if (x <= 0) fail(what, " must be positive, got ", x);
  }

  void nonnegative(int64_t x, const char* what) const {
    if (x < 0) fail(what, " must be >= 0, got ", x);
  }

  void unit(int64_t stride, const char* what) const {
    if (stride != 1) fail(what, " is ", stride, "; the hidden dimension must be contiguous (stride 1)");
  }

  // A stride is in range when it is >= `min_stride` and the furthest element it reaches over
  // `count` steps, plus `tail` more elements, stays addressable in int64.
  void stride(int64_t s, const char* what, int64_t count, int64_t tail, int64_t min_stride = 0) const {
    if (s < 0) fail(what, " is ", s, "; negative strides are not supported");
    if (s < min_stride) fail(what, " is ", s, " but must be at least ", min_stride, " (rows would overlap)");
    if (count > 1 && s > (kMaxExtent - tail) / (count - 1))
      fail(what, " is ", s, ", out of range: ", count, " steps of it overflow the address range");
  }

  // count0 * count1 * ... stays well inside int64
  void extent(std::initializer_list<int64_t> sizes, const char* what) const {
    int64_t total = 1;
    for (int64_t s : sizes) {
      if (s != 0 && total > kMaxExtent / s) fail(what, " has too many elements to index with int64");
      total *= s;
    }
  }
};

bool aligned16(std::initializer_list<std::uintptr_t> ptrs) {
  for (auto p : ptrs)
    if (p % 16 != 0) return false;
  return true;
}

bool multiple_of(int64_t w, std::initializer_list<int64_t> values) {
  for (auto v : values)
    if (v % w != 0) return false;
  return true;
}

void raise_if_failed(cudaError_t err, const char* fn) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(fn) + ": kernel launch failed: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// ---- soft_prompt_embed -------------------------------------------------------------------------

void soft_prompt_fwd(std::uintptr_t out, int out_dtype, std::uintptr_t weight, std::uintptr_t input_ids,
                     std::uintptr_t table, int table_dtype, std::uintptr_t prompt_index, std::uintptr_t bad_index,
                     int64_t B, int64_t T, int64_t P, int64_t H, int64_t V, int64_t N, int64_t ids_stride_b,
                     int64_t ids_stride_t, int64_t weight_stride_v, int64_t weight_stride_h, int64_t table_stride_n,
                     int64_t table_stride_p, int64_t table_stride_h, int64_t pidx_stride, std::uintptr_t stream,
                     std::uintptr_t slots, int64_t slots_stride_b, int64_t slots_stride_t) {
  const Checker c{"soft_prompt_fwd"};
  c.dtype(out_dtype, "the embedding weight / output");
  c.dtype(table_dtype, "the prompt table");
  c.positive(B, "batch size B");
  c.nonnegative(T, "sequence length T");
  c.positive(P, "num_virtual_tokens P");
  c.positive(H, "hidden size H");
  c.positive(V, "vocabulary size V");
  c.positive(N, "num_prompts N");
  if (slots != 0)
    c.extent({B, T, H}, "the output (B, T, H)");
  else
    c.extent({B, P + T, H}, "the output (B, P+T, H)");
  c.ptr(out, "out", Checker::itemsize(out_dtype));
  c.ptr(weight, "embedding_weight", Checker::itemsize(out_dtype));
  c.ptr(table, "prompt_table", Checker::itemsize(table_dtype));
  if (T > 0) c.ptr(input_ids, "input_ids", 8);
  if (prompt_index == 0 && N != 1)
    c.fail("inconsistent sizes: prompt_index is null (one shared prompt) but num_prompts N is ", N,
           "; a per-task table of ", N, " prompts needs prompt_index");
  if (prompt_index != 0) c.ptr(prompt_index, "prompt_index", 8);
  if (bad_index != 0 && bad_index % 4 != 0) c.fail("pointer for bad_index is not aligned to 4 bytes");
  c.unit(weight_stride_h, "embedding_weight's hidden stride");
  c.unit(table_stride_h, "prompt_table's hidden stride");
  c.stride(weight_stride_v, "embedding_weight's row stride", V, H, H);
  c.stride(table_stride_p, "prompt_table's token stride", P, H, H);
  c.stride(table_stride_n, "prompt_table's prompt stride", N, (P - 1) * table_stride_p + H);
  c.stride(ids_stride_t, "input_ids' token stride", T, 1);
  c.stride(ids_stride_b, "input_ids' batch stride", B, (T - 1) * ids_stride_t + 1);
  c.stride(pidx_stride, "prompt_index's stride", B, 1);
  if (slots != 0) {  // templated: a slot map (B, T) of int64, -1 at a word
    if (T > 0) c.ptr(slots, "slots", 8);
    c.stride(slots_stride_t, "slots' token stride", T, 1);
    c.stride(slots_stride_b, "slots' batch stride", B, (T - 1) * slots_stride_t + 1);
  }

  fastpeft::SoftPromptFwdArgs a{};
  a.out = reinterpret_cast<void*>(out);
  a.weight = reinterpret_cast<const void*>(weight);
  a.table = reinterpret_cast<const void*>(table);
  a.input_ids = reinterpret_cast<const int64_t*>(input_ids);
  a.prompt_index = reinterpret_cast<const int64_t*>(prompt_index);
  a.bad_index = reinterpret_cast<int*>(bad_index);
  a.B = B, a.T = T, a.P = P, a.H = H, a.V = V, a.N = N;
  a.ids_stride_b = ids_stride_b, a.ids_stride_t = ids_stride_t;
  a.weight_stride_v = weight_stride_v;
  a.table_stride_n = table_stride_n, a.table_stride_p = table_stride_p;
  a.pidx_stride = pidx_stride;
  a.slots = reinterpret_cast<const int64_t*>(slots);
  a.slots_stride_b = slots_stride_b, a.slots_stride_t = slots_stride_t;
  const int64_t w = 16 / Checker::itemsize(out_dtype);
  const bool vec = aligned16({out, weight, table}) && multiple_of(w, {H, weight_stride_v, table_stride_n, table_stride_p});
  raise_if_failed(fastpeft::launch_soft_prompt_fwd(a, out_dtype, table_dtype, vec, as_stream(stream)), c.fn);
}

void soft_prompt_table_bwd(std::uintptr_t d_table, int table_dtype, std::uintptr_t dout, int dout_dtype,
                           std::uintptr_t prompt_index, int64_t B, int64_t S, int64_t P, int64_t H, int64_t N,
                           int64_t dout_stride_b, int64_t dout_stride_s, int64_t dout_stride_h, int64_t pidx_stride,
                           std::uintptr_t stream, std::uintptr_t positions, std::uintptr_t bad_index,
                           int64_t pos_stride_b, int64_t pos_stride_p) {
  const Checker c{"soft_prompt_table_bwd"};
  c.dtype(table_dtype, "the prompt table gradient");
  c.dtype(dout_dtype, "dout");
  c.positive(B, "batch size B");
  c.positive(S, "dout's sequence length S");
  c.positive(P, "num_virtual_tokens P");
  c.positive(H, "hidden size H");
  c.positive(N, "num_prompts N");
  if (S < P)
    c.fail("inconsistent sizes: dout has ", S, " positions per row, fewer than the ", P, " prompt tokens");
  c.extent({N, P, H}, "d_table (N, P, H)");
  c.extent({B, S, H}, "dout (B, S, H)");
  c.ptr(d_table, "d_table", Checker::itemsize(table_dtype));
  c.ptr(dout, "dout", Checker::itemsize(dout_dtype));
  if (prompt_index == 0 && N != 1)
    c.fail("inconsistent sizes: prompt_index is null (one shared prompt) but num_prompts N is ", N);
  if (prompt_index != 0) c.ptr(prompt_index, "prompt_index", 8);
  c.unit(dout_stride_h, "dout's hidden stride");
  c.stride(dout_stride_s, "dout's sequence stride", S, H, H);
  c.stride(dout_stride_b, "dout's batch stride", B, (S - 1) * dout_stride_s + H);
  c.stride(pidx_stride, "prompt_index's stride", B, 1);
  if (bad_index != 0 && bad_index % 4 != 0) c.fail("pointer for bad_index is not aligned to 4 bytes");
  if (positions != 0) {  // templated: virtual token p of row b sits at dout position positions[b, p]
    c.ptr(positions, "positions", 8);
    c.stride(pos_stride_p, "positions' token stride", P, 1);
    c.stride(pos_stride_b, "positions' batch stride", B, (P - 1) * pos_stride_p + 1);
  }

  fastpeft::SoftPromptTableBwdArgs a{};
  a.d_table = reinterpret_cast<void*>(d_table);
  a.dout = reinterpret_cast<const void*>(dout);
  a.prompt_index = reinterpret_cast<const int64_t*>(prompt_index);
  a.B = B, a.S = S, a.P = P, a.H = H, a.N = N;
  a.dout_stride_b = dout_stride_b, a.dout_stride_s = dout_stride_s;
  a.pidx_stride = pidx_stride;
  a.positions = reinterpret_cast<const int64_t*>(positions);
  a.bad_index = reinterpret_cast<int*>(bad_index);
  a.pos_stride_b = pos_stride_b, a.pos_stride_p = pos_stride_p;
  const int64_t w = 16 / Checker::itemsize(dout_dtype);
  const bool vec = aligned16({d_table, dout}) && multiple_of(w, {H, dout_stride_b, dout_stride_s});
  raise_if_failed(fastpeft::launch_soft_prompt_table_bwd(a, dout_dtype, table_dtype, vec, as_stream(stream)), c.fn);
}

// Shared checks of the two word-embedding backwards.
void check_weight_bwd(const Checker& c, std::uintptr_t d_weight, int weight_dtype, std::uintptr_t dout, int dout_dtype,
                      std::uintptr_t bad_index, int64_t B, int64_t S, int64_t T, int64_t P, int64_t H, int64_t V,
                      int64_t dout_stride_b, int64_t dout_stride_s, int64_t dout_stride_h, std::uintptr_t slots,
                      int64_t slots_stride_b, int64_t slots_stride_t) {
  c.dtype(weight_dtype, "the embedding gradient");
  c.dtype(dout_dtype, "dout");
  c.positive(B, "batch size B");
  c.nonnegative(T, "sequence length T");
  c.nonnegative(P, "num_virtual_tokens P");
  c.positive(H, "hidden size H");
  c.positive(V, "vocabulary size V");
  if (S != P + T)
    c.fail("inconsistent sizes: dout has ", S, " positions per row but P + T = ", P, " + ", T, " = ", P + T);
  c.extent({V, H}, "d_weight (V, H)");
  c.extent({B, S, H}, "dout (B, S, H)");
  c.ptr(d_weight, "d_weight", Checker::itemsize(weight_dtype));
  c.ptr(dout, "dout", Checker::itemsize(dout_dtype));
  if (bad_index != 0 && bad_index % 4 != 0) c.fail("pointer for bad_index is not aligned to 4 bytes");
  c.unit(dout_stride_h, "dout's hidden stride");
  c.stride(dout_stride_s, "dout's sequence stride", S, H, H);
  c.stride(dout_stride_b, "dout's batch stride", B, (S - 1) * dout_stride_s + H);
  if (slots != 0) {  // templated: the words sit among the virtual tokens, at dout positions 0..T-1
    if (P != 0) c.fail("inconsistent sizes: with a slot map (templated) P must be 0 (dout has T positions), got ", P);
    if (T > 0) c.ptr(slots, "slots", 8);
    c.stride(slots_stride_t, "slots' token stride", T, 1);
    c.stride(slots_stride_b, "slots' batch stride", B, (T - 1) * slots_stride_t + 1);
  }
}

void soft_prompt_weight_bwd(std::uintptr_t d_weight, std::uintptr_t dout, int dout_dtype, std::uintptr_t input_ids,
                            std::uintptr_t bad_index, int64_t B, int64_t S, int64_t T, int64_t P, int64_t H,
                            int64_t V, int64_t ids_stride_b, int64_t ids_stride_t, int64_t dout_stride_b,
                            int64_t dout_stride_s, int64_t dout_stride_h, std::uintptr_t stream,
                            std::uintptr_t slots, int64_t slots_stride_b, int64_t slots_stride_t) {
  const Checker c{"soft_prompt_weight_bwd"};
  check_weight_bwd(c, d_weight, kFloat32, dout, dout_dtype, bad_index, B, S, T, P, H, V, dout_stride_b,
                   dout_stride_s, dout_stride_h, slots, slots_stride_b, slots_stride_t);
  if (T > 0) c.ptr(input_ids, "input_ids", 8);
  c.stride(ids_stride_t, "input_ids' token stride", T, 1);
  c.stride(ids_stride_b, "input_ids' batch stride", B, (T - 1) * ids_stride_t + 1);
  if (T == 0) return;  // no word positions: d_weight stays as the caller zeroed it

  fastpeft::SoftPromptWeightBwdArgs a{};
  a.d_weight = reinterpret_cast<void*>(d_weight);
  a.dout = reinterpret_cast<const void*>(dout);
  a.input_ids = reinterpret_cast<const int64_t*>(input_ids);
  a.bad_index = reinterpret_cast<int*>(bad_index);
  a.B = B, a.T = T, a.P = P, a.H = H, a.V = V;
  a.ids_stride_b = ids_stride_b, a.ids_stride_t = ids_stride_t;
  a.dout_stride_b = dout_stride_b, a.dout_stride_s = dout_stride_s;
  a.slots = reinterpret_cast<const int64_t*>(slots);
  a.slots_stride_b = slots_stride_b, a.slots_stride_t = slots_stride_t;
  const int64_t w = 16 / Checker::itemsize(dout_dtype);
  const bool vec = aligned16({d_weight, dout}) && multiple_of(w, {H, dout_stride_b, dout_stride_s});
  raise_if_failed(fastpeft::launch_soft_prompt_weight_bwd_atomic(a, dout_dtype, vec, as_stream(stream)), c.fn);
}

void soft_prompt_weight_bwd_sorted(std::uintptr_t d_weight, int weight_dtype, std::uintptr_t dout, int dout_dtype,
                                   std::uintptr_t sorted_ids, std::uintptr_t order, std::uintptr_t bad_index,
                                   int64_t B, int64_t S, int64_t T, int64_t P, int64_t H, int64_t V,
                                   int64_t dout_stride_b, int64_t dout_stride_s, int64_t dout_stride_h,
                                   std::uintptr_t stream, std::uintptr_t slots, int64_t slots_stride_b,
                                   int64_t slots_stride_t) {
  const Checker c{"soft_prompt_weight_bwd_sorted"};
  check_weight_bwd(c, d_weight, weight_dtype, dout, dout_dtype, bad_index, B, S, T, P, H, V, dout_stride_b,
                   dout_stride_s, dout_stride_h, slots, slots_stride_b, slots_stride_t);
  if (T == 0) return;
  c.ptr(sorted_ids, "sorted_ids", 8);
  c.ptr(order, "order", 8);

  fastpeft::SoftPromptWeightBwdArgs a{};
  a.d_weight = reinterpret_cast<void*>(d_weight);
  a.dout = reinterpret_cast<const void*>(dout);
  a.sorted_ids = reinterpret_cast<const int64_t*>(sorted_ids);
  a.order = reinterpret_cast<const int64_t*>(order);
  a.bad_index = reinterpret_cast<int*>(bad_index);
  a.B = B, a.T = T, a.P = P, a.H = H, a.V = V;
  a.dout_stride_b = dout_stride_b, a.dout_stride_s = dout_stride_s;
  a.slots = reinterpret_cast<const int64_t*>(slots);
  a.slots_stride_b = slots_stride_b, a.slots_stride_t = slots_stride_t;
  const int64_t w = 16 / Checker::itemsize(dout_dtype);
  const bool vec = aligned16({d_weight, dout}) && multiple_of(w, {H, dout_stride_b, dout_stride_s});
  raise_if_failed(fastpeft::launch_soft_prompt_weight_bwd_sorted(a, dout_dtype, weight_dtype, vec, as_stream(stream)),
                  c.fn);
}

// ---- IA3 ---------------------------------------------------------------------------------------

void ia3_scale_grad(std::uintptr_t out, int out_dtype, std::uintptr_t a_ptr, std::uintptr_t b_ptr, int in_dtype,
                    int64_t M, int64_t N, int64_t a_stride_m, int64_t a_stride_n, int64_t b_stride_m,
                    int64_t b_stride_n, std::uintptr_t stream) {
  const Checker c{"ia3_scale_grad"};
  c.dtype(out_dtype, "dl (the output)");
  c.dtype(in_dtype, "a and b");
  c.nonnegative(M, "M (rows summed over)");
  c.positive(N, "N (columns, the size of dl)");
  c.extent({M, N}, "a (M, N)");
  c.ptr(out, "out", Checker::itemsize(out_dtype));
  c.ptr(a_ptr, "a", Checker::itemsize(in_dtype));
  c.ptr(b_ptr, "b", Checker::itemsize(in_dtype));
  c.stride(a_stride_n, "a's column stride", N, 1);
  c.stride(a_stride_m, "a's row stride", M, (N - 1) * a_stride_n + 1);
  c.stride(b_stride_n, "b's column stride", N, 1);
  c.stride(b_stride_m, "b's row stride", M, (N - 1) * b_stride_n + 1);

  fastpeft::ColumnDotArgs a{};
  a.out = reinterpret_cast<void*>(out);
  a.a = reinterpret_cast<const void*>(a_ptr);
  a.b = reinterpret_cast<const void*>(b_ptr);
  a.M = M, a.N = N;
  a.a_stride_m = a_stride_m, a.a_stride_n = a_stride_n, a.b_stride_m = b_stride_m, a.b_stride_n = b_stride_n;
  raise_if_failed(fastpeft::launch_column_dot(a, in_dtype, out_dtype, as_stream(stream)), c.fn);
}

// ---- grouped LoRA (mixed-adapter batches) -------------------------------------------------------

void require_grouped(const void* launcher, const Checker& c) {
  if (launcher == nullptr)
    throw std::runtime_error(std::string(c.fn) + ": this build of the extension left out csrc/grouped_lora.cu");
}

// Checks shared by the three grouped entry points: sizes, the rank bound, index pointers.
void check_grouped(const Checker& c, int64_t T, int64_t G, int64_t R, std::uintptr_t scale, bool scale_required,
                   std::uintptr_t bad_index) {
  c.nonnegative(T, "T (tokens in the batch)");
  c.positive(G, "G (adapters in the table)");
  c.positive(R, "R (the table's padded rank)");
  if (R > fastpeft::kMaxGroupedRank) c.fail("R (the table's padded rank) is ", R, "; the kernels take at most ",
                                            fastpeft::kMaxGroupedRank);
  if (scale_required || scale != 0) c.ptr(scale, "scale", 4);
  if (bad_index != 0 && bad_index % 4 != 0) c.fail("pointer for bad_index is not aligned to 4 bytes");
}

void grouped_lora_shrink(std::uintptr_t s, std::uintptr_t x, int x_dtype, std::uintptr_t w, int w_dtype,
                         std::uintptr_t order, std::uintptr_t offsets, std::uintptr_t scale, std::uintptr_t bad_index,
                         int64_t T, int64_t L, int64_t G, int64_t R, int64_t K, int64_t stride_xm, int64_t stride_xk,
                         int64_t stride_wg, int64_t stride_wr, int64_t stride_wk, int64_t stride_sm,
                         std::uintptr_t stream) {
  const Checker c{"grouped_lora_shrink"};
  c.dtype(x_dtype, "x");
  c.dtype(w_dtype, "the adapter table");
  check_grouped(c, T, G, R, scale, false, bad_index);
  c.nonnegative(L, "L (sorted token positions)");
  c.positive(K, "K (in_features)");
  if (L > T) c.fail("inconsistent sizes: L = ", L, " sorted positions but the batch has only T = ", T, " tokens");
  c.extent({T, K}, "x (T, K)");
  c.extent({G, R, K}, "the table (G, R, K)");
  c.extent({L, R}, "s (L, R)");
  c.ptr(s, "s", 4);
  c.ptr(x, "x", Checker::itemsize(x_dtype));
  c.ptr(w, "w (the adapter table)", Checker::itemsize(w_dtype));
  c.ptr(order, "order", 8);
  c.ptr(offsets, "offsets", 8);
  c.stride(stride_xk, "x's feature stride", K, 1);
  c.stride(stride_xm, "x's token stride", T, (K - 1) * stride_xk + 1);
  c.stride(stride_wk, "w's feature stride", K, 1);
  c.stride(stride_wr, "w's rank stride", R, (K - 1) * stride_wk + 1);
  c.stride(stride_wg, "w's adapter stride", G, (R - 1) * stride_wr + (K - 1) * stride_wk + 1);
  c.stride(stride_sm, "s's row stride", L, R, R);
  if (L == 0) return;

  fastpeft::GroupedShrinkArgs a{};
  a.s = reinterpret_cast<float*>(s);
  a.x = reinterpret_cast<const void*>(x);
  a.w = reinterpret_cast<const void*>(w);
  a.order = reinterpret_cast<const int64_t*>(order);
  a.offsets = reinterpret_cast<const int64_t*>(offsets);
  a.scale = reinterpret_cast<const float*>(scale);
  a.bad_index = reinterpret_cast<int*>(bad_index);
  a.T = T, a.L = L, a.G = G, a.R = R, a.K = K;
  a.stride_xm = stride_xm, a.stride_xk = stride_xk, a.stride_wg = stride_wg, a.stride_wr = stride_wr;
  a.stride_wk = stride_wk, a.stride_sm = stride_sm;
  require_grouped(reinterpret_cast<const void*>(&fastpeft::launch_grouped_shrink), c);
  raise_if_failed(fastpeft::launch_grouped_shrink(a, x_dtype, w_dtype, as_stream(stream)), c.fn);
}

void grouped_lora_expand(std::uintptr_t out, int out_dtype, std::uintptr_t s, std::uintptr_t l, int l_dtype,
                         std::uintptr_t order, std::uintptr_t offsets, std::uintptr_t scale, std::uintptr_t bad_index,
                         int64_t T, int64_t L, int64_t G, int64_t R, int64_t N, int64_t stride_sm, int64_t stride_lg,
                         int64_t stride_lr, int64_t stride_ln, int64_t stride_om, int64_t stride_on,
                         std::uintptr_t stream) {
  const Checker c{"grouped_lora_expand"};
  c.dtype(out_dtype, "out");
  c.dtype(l_dtype, "the adapter table");
  check_grouped(c, T, G, R, scale, false, bad_index);
  c.nonnegative(L, "L (sorted token positions)");
  c.positive(N, "N (out_features)");
  if (L > T) c.fail("inconsistent sizes: L = ", L, " sorted positions but the batch has only T = ", T, " tokens");
  c.extent({T, N}, "out (T, N)");
  c.extent({G, R, N}, "the table (G, R, N)");
  c.ptr(out, "out", Checker::itemsize(out_dtype));
  c.ptr(s, "s", 4);
  c.ptr(l, "l (the adapter table)", Checker::itemsize(l_dtype));
  c.ptr(order, "order", 8);
  c.ptr(offsets, "offsets", 8);
  c.stride(stride_sm, "s's row stride", L, R, R);
  c.stride(stride_ln, "l's output stride", N, 1);
  c.stride(stride_lr, "l's rank stride", R, (N - 1) * stride_ln + 1);
  c.stride(stride_lg, "l's adapter stride", G, (R - 1) * stride_lr + (N - 1) * stride_ln + 1);
  c.stride(stride_on, "out's feature stride", N, 1, 1);
  c.stride(stride_om, "out's token stride", T, (N - 1) * stride_on + 1, (N - 1) * stride_on + 1);
  if (L == 0) return;

  fastpeft::GroupedExpandArgs a{};
  a.out = reinterpret_cast<void*>(out);
  a.s = reinterpret_cast<const float*>(s);
  a.l = reinterpret_cast<const void*>(l);
  a.order = reinterpret_cast<const int64_t*>(order);
  a.offsets = reinterpret_cast<const int64_t*>(offsets);
  a.scale = reinterpret_cast<const float*>(scale);
  a.bad_index = reinterpret_cast<int*>(bad_index);
  a.T = T, a.L = L, a.G = G, a.R = R, a.N = N;
  a.stride_sm = stride_sm, a.stride_lg = stride_lg, a.stride_lr = stride_lr, a.stride_ln = stride_ln;
  a.stride_om = stride_om, a.stride_on = stride_on;
  require_grouped(reinterpret_cast<const void*>(&fastpeft::launch_grouped_expand), c);
  raise_if_failed(fastpeft::launch_grouped_expand(a, l_dtype, out_dtype, as_stream(stream)), c.fn);
}

void grouped_lora_decode(std::uintptr_t y, std::uintptr_t x, int x_dtype, std::uintptr_t a_ptr, std::uintptr_t l,
                         int w_dtype, std::uintptr_t slot, std::uintptr_t scale, std::uintptr_t bad_index, int64_t T,
                         int64_t G, int64_t R, int64_t K, int64_t N, int64_t stride_xm, int64_t stride_xk,
                         int64_t stride_ag, int64_t stride_ar, int64_t stride_ak, int64_t stride_lg,
                         int64_t stride_lr, int64_t stride_ln, int64_t stride_ym, int64_t stride_yn,
                         std::uintptr_t stream) {
  const Checker c{"grouped_lora_decode"};
  c.dtype(x_dtype, "x and y");
  c.dtype(w_dtype, "the adapter table");
  check_grouped(c, T, G, R, scale, true, bad_index);
  c.positive(K, "K (in_features)");
  c.positive(N, "N (out_features)");
  c.extent({T, K}, "x (T, K)");
  c.extent({T, N}, "y (T, N)");
  c.extent({G, R, K + N}, "the table");
  c.ptr(y, "y", Checker::itemsize(x_dtype));
  c.ptr(x, "x", Checker::itemsize(x_dtype));
  c.ptr(a_ptr, "a (the adapter table's A)", Checker::itemsize(w_dtype));
  c.ptr(l, "l (the adapter table's B)", Checker::itemsize(w_dtype));
  c.ptr(slot, "slot", 4);
  c.stride(stride_xk, "x's feature stride", K, 1);
  c.stride(stride_xm, "x's token stride", T, (K - 1) * stride_xk + 1);
  c.stride(stride_ak, "a's feature stride", K, 1);
  c.stride(stride_ar, "a's rank stride", R, (K - 1) * stride_ak + 1);
  c.stride(stride_ag, "a's adapter stride", G, (R - 1) * stride_ar + (K - 1) * stride_ak + 1);
  c.stride(stride_ln, "l's output stride", N, 1);
  c.stride(stride_lr, "l's rank stride", R, (N - 1) * stride_ln + 1);
  c.stride(stride_lg, "l's adapter stride", G, (R - 1) * stride_lr + (N - 1) * stride_ln + 1);
  c.stride(stride_yn, "y's feature stride", N, 1, 1);
  c.stride(stride_ym, "y's token stride", T, (N - 1) * stride_yn + 1, N);
  if (T == 0) return;

  fastpeft::GroupedDecodeArgs a{};
  a.y = reinterpret_cast<void*>(y);
  a.x = reinterpret_cast<const void*>(x);
  a.a = reinterpret_cast<const void*>(a_ptr);
  a.l = reinterpret_cast<const void*>(l);
  a.slot = reinterpret_cast<const int32_t*>(slot);
  a.scale = reinterpret_cast<const float*>(scale);
  a.bad_index = reinterpret_cast<int*>(bad_index);
  a.T = T, a.G = G, a.R = R, a.K = K, a.N = N;
  a.stride_xm = stride_xm, a.stride_xk = stride_xk, a.stride_ag = stride_ag, a.stride_ar = stride_ar;
  a.stride_ak = stride_ak, a.stride_lg = stride_lg, a.stride_lr = stride_lr, a.stride_ln = stride_ln;
  a.stride_ym = stride_ym, a.stride_yn = stride_yn;
  require_grouped(reinterpret_cast<const void*>(&fastpeft::launch_grouped_decode), c);
  raise_if_failed(fastpeft::launch_grouped_decode(a, x_dtype, w_dtype, as_stream(stream)), c.fn);
}

// ---- build facts -------------------------------------------------------------------------------

std::vector<int> parse_archs(const std::string& s) {
  std::vector<int> archs;
  size_t start = 0;
  while (start < s.size()) {
    size_t end = s.find(',', start);
    if (end == std::string::npos) end = s.size();
    if (end > start) archs.push_back(std::stoi(s.substr(start, end - start)));
    start = end + 1;
  }
  return archs;
}

// (count, None) or (0, "why no device is usable"), without raising: info() calls this on
// machines with no GPU or no driver.
// The torch path's dropout keep-mask on the CPU (host code, no GPU involved): out[i] = 1 when
// mix(mix(i ^ s) ^ mix(s + K)) < threshold, else 0, for i < n (row-major over the (M, K) input); the
// same bits as fastpeft.ops._random.hash_keep_reference (aten) and the compiled graph's fused ops.
inline uint32_t hash_mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x2C1B3C6Du;
  return x ^ (x >> 16);
}

template <typename T> void keep_loop(T* dst, int64_t n, uint32_t s, uint32_t salt, uint64_t t, T one) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t x = hash_mix(hash_mix(static_cast<uint32_t>(i) ^ s) ^ salt);
    dst[i] = static_cast<uint64_t>(x) < t ? one : T(0);
  }
}

// out_dtype: 0 float32, 1 float16, 2 bfloat16, 3 float64, 4 uint8 (1.0 / 0.0, or 1 / 0)
void dropout_keep(std::uintptr_t out, int out_dtype, int64_t n, int64_t seed, int64_t threshold) {
  const Checker c{"dropout_keep"};
  if (n < 0 || n >= (int64_t(1) << 31)) c.fail("n must be in [0, 2**31), got ", n);
  if (out_dtype < 0 || out_dtype > 4)
    c.fail("out_dtype ", out_dtype, " is not one of 0 (float32), 1 (float16), 2 (bfloat16), 3 (float64), 4 (uint8)");
  if (threshold < 0 || threshold > (int64_t(1) << 32)) c.fail("threshold must be in [0, 2**32], got ", threshold);
  if (n == 0) return;
  static const size_t sizes[] = {4, 2, 2, 8, 1};
  c.ptr(out, "out", sizes[out_dtype]);
  const uint32_t s = static_cast<uint32_t>(seed) & 0x7FFFFFFFu;
  const uint32_t salt = hash_mix(s + 0x3C6EF372u);
  const uint64_t t = static_cast<uint64_t>(threshold);
  switch (out_dtype) {
    case 0: keep_loop(reinterpret_cast<uint32_t*>(out), n, s, salt, t, uint32_t(0x3F800000u)); break;
    case 1: keep_loop(reinterpret_cast<uint16_t*>(out), n, s, salt, t, uint16_t(0x3C00u)); break;
    case 2: keep_loop(reinterpret_cast<uint16_t*>(out), n, s, salt, t, uint16_t(0x3F80u)); break;
    case 3: keep_loop(reinterpret_cast<uint64_t*>(out), n, s, salt, t, uint64_t(0x3FF0000000000000ull)); break;
    default: keep_loop(reinterpret_cast<uint8_t*>(out), n, s, salt, t, uint8_t(1)); break;
  }
}

// ---- the torch path's dropout applied in one pass (CPU) -------------------------------------------
// keep(i) as in dropout_keep; x and dst contiguous, float32 (code 0) or bfloat16 (code 2), arithmetic in
// float32 and rounded once to the storage dtype (what aten's float32 / bfloat16 mul and addcmul compute)
inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even; NaN stays a (quiet) NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

struct KeepHash {
  uint32_t s, salt;
  uint64_t t;
  KeepHash(int64_t seed, int64_t threshold)
      : s(static_cast<uint32_t>(seed) & 0x7FFFFFFFu), salt(hash_mix(s + 0x3C6EF372u)),
        t(static_cast<uint64_t>(threshold)) {}
  bool operator()(int64_t i) const {
    return static_cast<uint64_t>(hash_mix(hash_mix(static_cast<uint32_t>(i) ^ s) ^ salt)) < t;
  }
};

void check_dropout_args(const Checker& c, int dtype, int64_t n, int64_t threshold) {
  if (n < 0 || n >= (int64_t(1) << 31)) c.fail("n must be in [0, 2**31), got ", n);
  if (dtype != 0 && dtype != 2) c.fail("dtype ", dtype, " is not 0 (float32) or 2 (bfloat16)");
  if (threshold < 0 || threshold > (int64_t(1) << 32)) c.fail("threshold must be in [0, 2**32], got ", threshold);
}

// The loops below run the element index as a 32-bit counter (n < 2**31) and compare the hash as a 32-bit
// value, which lets the compiler vectorise them (SSE2 in the portable build: 4 lanes); a threshold of 2**32
// keeps everything.
inline uint32_t keep_threshold32(int64_t threshold) { return static_cast<uint32_t>(threshold); }

// x86-64 with GCC: an AVX2 clone of each hot loop beside the portable one, picked at load time by the CPU
// (function multi-versioning; the wheel stays baseline x86-64)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTPEFT_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FASTPEFT_CPU_CLONES
#endif

FASTPEFT_CPU_CLONES void mul_keep_f32(float* o, const float* a, int32_t m, uint32_t s, uint32_t salt, uint32_t t) {
  for (int32_t i = 0; i < m; ++i) {
    const uint32_t h = hash_mix(hash_mix(static_cast<uint32_t>(i) ^ s) ^ salt);
    const float k = h < t ? 1.0f : 0.0f;
    o[i] = a[i] * k;
  }
}

FASTPEFT_CPU_CLONES void addcmul_keep_f32(float* d, const float* a, int32_t m, uint32_t s, uint32_t salt, uint32_t t,
                                          bool all, float v) {
  for (int32_t i = 0; i < m; ++i) {
    const uint32_t h = hash_mix(hash_mix(static_cast<uint32_t>(i) ^ s) ^ salt);
    const float k = (all || h < t) ? 1.0f : 0.0f;
    d[i] += v * a[i] * k;
  }
}

FASTPEFT_CPU_CLONES void dequant_block_f32(float* o, const uint8_t* p, const float* cb, int64_t start, int64_t end,
                                           float a) {
  for (int64_t i = start; i < end; ++i) {
    const uint8_t b = p[i >> 1];
    o[i] = cb[(i & 1) ? (b & 0xF) : (b >> 4)] * a;
  }
}

// What both dropout loops check and derive before their pass: the arguments, and the hash's seed, salt and
// 32-bit threshold (all: a threshold of 2**32 keeps every element)
struct DropoutPass {
  KeepHash keep;
  uint32_t s, salt, t;
  bool all;
  int32_t m;
  DropoutPass(const char* fn, std::uintptr_t dst, std::uintptr_t src, int dtype, int64_t n, int64_t seed,
              int64_t threshold)
      : keep(seed, threshold), s(keep.s), salt(keep.salt), t(keep_threshold32(threshold)),
        all(threshold >= (int64_t(1) << 32)), m(static_cast<int32_t>(n)) {
    const Checker c{fn};
    check_dropout_args(c, dtype, n, threshold);
    if (n == 0) return;
    c.ptr(dst, "destination", dtype == 0 ? 4 : 2);
    c.ptr(src, "source", dtype == 0 ? 4 : 2);
  }
};

// out[i] = x[i] * keep(i) (out may be x)
void dropout_mul(std::uintptr_t out, std::uintptr_t x, int dtype, int64_t n, int64_t seed, int64_t threshold) {
  const DropoutPass d("dropout_mul", out, x, dtype, n, seed, threshold);
  if (d.m == 0) return;
  if (dtype == 0) {
    float* o = reinterpret_cast<float*>(out);
    const float* a = reinterpret_cast<const float*>(x);
    if (d.all) {
      for (int32_t i = 0; i < d.m; ++i) o[i] = a[i] * 1.0f;
      return;
    }
    mul_keep_f32(o, a, d.m, d.s, d.salt, d.t);
  } else {
    uint16_t* o = reinterpret_cast<uint16_t*>(out);
    const uint16_t* a = reinterpret_cast<const uint16_t*>(x);
    for (int32_t i = 0; i < d.m; ++i) o[i] = float_to_bf16(bf16_to_float(a[i]) * (d.keep(i) ? 1.0f : 0.0f));
  }
}

// dst[i] += value * src[i] * keep(i)
void dropout_addcmul(std::uintptr_t dst, std::uintptr_t src, int dtype, int64_t n, int64_t seed, int64_t threshold,
                     double value) {
  const DropoutPass d("dropout_addcmul", dst, src, dtype, n, seed, threshold);
  if (d.m == 0) return;
  const float v = static_cast<float>(value);
  if (dtype == 0) {
    addcmul_keep_f32(reinterpret_cast<float*>(dst), reinterpret_cast<const float*>(src), d.m, d.s, d.salt, d.t,
                     d.all, v);
  } else {
    uint16_t* o = reinterpret_cast<uint16_t*>(dst);
    const uint16_t* a = reinterpret_cast<const uint16_t*>(src);
    for (int32_t i = 0; i < d.m; ++i)
      o[i] = float_to_bf16(bf16_to_float(o[i]) + v * bf16_to_float(a[i]) * (d.keep(i) ? 1.0f : 0.0f));
  }
}

// ---- 4-bit dequantisation on the CPU (the QLoRA layer's torch path) ------------------------------
// out[i] = code[q_i] * absmax_b in float32, rounded once to out's dtype (0 float32, 2 bfloat16), q_i the high
// nibble of packed[i / 2] for even i, the low one for odd i (bitsandbytes' layout), b = i / blocksize.
// absmax_b is absmax[b] (float32), or with double quantisation (absmax_q != 0) the decoded
// nested_code[absmax_q[b]] * nested_absmax[b / nested_blocksize] + offset, each step in float32 as aten does.
void dequant_4bit(std::uintptr_t out, int out_dtype, std::uintptr_t packed, std::uintptr_t code,
                  std::uintptr_t absmax, int64_t n, int64_t blocksize, std::uintptr_t absmax_q,
                  std::uintptr_t nested_code, std::uintptr_t nested_absmax, int64_t nested_blocksize, double offset) {
  const Checker c{"dequant_4bit"};
  if (n < 0) c.fail("n must be >= 0, got ", n);
  if (out_dtype != 0 && out_dtype != 2) c.fail("out_dtype ", out_dtype, " is not 0 (float32) or 2 (bfloat16)");
  if (blocksize <= 0 || (blocksize & 1)) c.fail("blocksize must be a positive even number, got ", blocksize);
  const bool nested = absmax_q != 0;
  if (nested && nested_blocksize <= 0) c.fail("nested_blocksize must be positive, got ", nested_blocksize);
  if (n == 0) return;
  c.ptr(out, "out", out_dtype == 0 ? 4 : 2);
  c.ptr(packed, "packed", 1);
  c.ptr(code, "code", 4);
  if (nested) {
    c.ptr(nested_code, "nested_code", 4);
    c.ptr(nested_absmax, "nested_absmax", 4);
  } else {
    c.ptr(absmax, "absmax", 4);
  }
  const uint8_t* p = reinterpret_cast<const uint8_t*>(packed);
  const float* cb = reinterpret_cast<const float*>(code);
  const float* am = reinterpret_cast<const float*>(absmax);
  const uint8_t* aq = reinterpret_cast<const uint8_t*>(absmax_q);
  const float* ncb = reinterpret_cast<const float*>(nested_code);
  const float* nam = reinterpret_cast<const float*>(nested_absmax);
  const float off = static_cast<float>(offset);
  for (int64_t start = 0, blk = 0; start < n; start += blocksize, ++blk) {
    const int64_t end = std::min(n, start + blocksize);
    float a;
    if (nested) {
      const float decoded = ncb[aq[blk]] * nam[blk / nested_blocksize];
      a = decoded + off;
    } else {
      a = am[blk];
    }
    if (out_dtype == 0) {
      dequant_block_f32(reinterpret_cast<float*>(out), p, cb, start, end, a);
    } else {
      uint16_t* o = reinterpret_cast<uint16_t*>(out);
      for (int64_t i = start; i < end; ++i) {
        const uint8_t b = p[i >> 1];
        o[i] = float_to_bf16(cb[(i & 1) ? (b & 0xF) : (b >> 4)] * a);
      }
    }
  }
}

py::tuple device_count() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear it so a later launch check does not report it
    return py::make_tuple(0, std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err));
  }
  return py::make_tuple(n, py::none());
}

}  // namespace

#ifndef FASTPEFT_MODULE_NAME
#define FASTPEFT_MODULE_NAME _C  // tests build a CPU-emulated copy under another name
#endif

PYBIND11_MODULE(FASTPEFT_MODULE_NAME, m) {
  m.doc() = "fastpeft CUDA kernels (pointer-based; see fastpeft/_cext.py for the tensor wrappers)";
  using py::arg;

  m.def("soft_prompt_fwd", &soft_prompt_fwd,
        "out[b] = [cast(table[prompt_index[b]]) ; weight[input_ids[b]]]; with slots (templated) out[b, t] = "
        "slots[b, t] >= 0 ? cast(table[prompt_index[b], slots[b, t]]) : weight[input_ids[b, t]]",
        arg("out"), arg("out_dtype"), arg("weight"), arg("input_ids"), arg("table"), arg("table_dtype"),
        arg("prompt_index"), arg("bad_index"), arg("B"), arg("T"), arg("P"), arg("H"), arg("V"), arg("N"),
        arg("ids_stride_b"), arg("ids_stride_t"), arg("weight_stride_v"), arg("weight_stride_h"),
        arg("table_stride_n"), arg("table_stride_p"), arg("table_stride_h"), arg("pidx_stride"), arg("stream"),
        arg("slots") = std::uintptr_t(0), arg("slots_stride_b") = int64_t(0), arg("slots_stride_t") = int64_t(0));
  m.def("soft_prompt_table_bwd", &soft_prompt_table_bwd,
        "d_table = prompt part of dout summed over rows (shared) or scattered by prompt_index; deterministic",
        arg("d_table"), arg("table_dtype"), arg("dout"), arg("dout_dtype"), arg("prompt_index"), arg("B"), arg("S"),
        arg("P"), arg("H"), arg("N"), arg("dout_stride_b"), arg("dout_stride_s"), arg("dout_stride_h"),
        arg("pidx_stride"), arg("stream"), arg("positions") = std::uintptr_t(0), arg("bad_index") = std::uintptr_t(0),
        arg("pos_stride_b") = int64_t(0), arg("pos_stride_p") = int64_t(0));
  m.def("soft_prompt_weight_bwd", &soft_prompt_weight_bwd,
        "d_weight (fp32, zeroed by the caller) += word part of dout scattered by input_ids (fp32 atomics)",
        arg("d_weight"), arg("dout"), arg("dout_dtype"), arg("input_ids"), arg("bad_index"), arg("B"), arg("S"),
        arg("T"), arg("P"), arg("H"), arg("V"), arg("ids_stride_b"), arg("ids_stride_t"), arg("dout_stride_b"),
        arg("dout_stride_s"), arg("dout_stride_h"), arg("stream"), arg("slots") = std::uintptr_t(0),
        arg("slots_stride_b") = int64_t(0), arg("slots_stride_t") = int64_t(0));
  m.def("soft_prompt_weight_bwd_sorted", &soft_prompt_weight_bwd_sorted,
        "deterministic d_weight from stably sorted ids and their flat positions (zeroed by the caller)",
        arg("d_weight"), arg("weight_dtype"), arg("dout"), arg("dout_dtype"), arg("sorted_ids"), arg("order"),
        arg("bad_index"), arg("B"), arg("S"), arg("T"), arg("P"), arg("H"), arg("V"), arg("dout_stride_b"),
        arg("dout_stride_s"), arg("dout_stride_h"), arg("stream"), arg("slots") = std::uintptr_t(0),
        arg("slots_stride_b") = int64_t(0), arg("slots_stride_t") = int64_t(0));
  m.def("ia3_scale_grad", &ia3_scale_grad, "dl[n] = sum_m a[m, n] * b[m, n] in fp32; deterministic", arg("out"),
        arg("out_dtype"), arg("a"), arg("b"), arg("in_dtype"), arg("M"), arg("N"), arg("a_stride_m"),
        arg("a_stride_n"), arg("b_stride_m"), arg("b_stride_n"), arg("stream"));
  m.def("grouped_lora_shrink", &grouped_lora_shrink,
        "s[m] = scale[g] * x[order[m]] . w[g]^T for m in segment g (fp32 s); grouped LoRA shrink", arg("s"), arg("x"),
        arg("x_dtype"), arg("w"), arg("w_dtype"), arg("order"), arg("offsets"), arg("scale"), arg("bad_index"),
        arg("T"), arg("L"), arg("G"), arg("R"), arg("K"), arg("stride_xm"), arg("stride_xk"), arg("stride_wg"),
        arg("stride_wr"), arg("stride_wk"), arg("stride_sm"), arg("stream"));
  m.def("grouped_lora_expand", &grouped_lora_expand,
        "out[order[m]] += scale[g] * s[m] . l[g] for m in segment g; grouped LoRA expand", arg("out"),
        arg("out_dtype"), arg("s"), arg("l"), arg("l_dtype"), arg("order"), arg("offsets"), arg("scale"),
        arg("bad_index"), arg("T"), arg("L"), arg("G"), arg("R"), arg("N"), arg("stride_sm"), arg("stride_lg"),
        arg("stride_lr"), arg("stride_ln"), arg("stride_om"), arg("stride_on"), arg("stream"));
  m.def("grouped_lora_decode", &grouped_lora_decode,
        "y[t] += scale[g] * (x[t] . a[g]^T) . l[g], g = slot[t] (-1 skips); fused BGMV decode", arg("y"), arg("x"),
        arg("x_dtype"), arg("a"), arg("l"), arg("w_dtype"), arg("slot"), arg("scale"), arg("bad_index"), arg("T"),
        arg("G"), arg("R"), arg("K"), arg("N"), arg("stride_xm"), arg("stride_xk"), arg("stride_ag"),
        arg("stride_ar"), arg("stride_ak"), arg("stride_lg"), arg("stride_lr"), arg("stride_ln"), arg("stride_ym"),
        arg("stride_yn"), arg("stream"));
  m.def("device_count", &device_count, "(number of CUDA devices, None) or (0, reason)");
  m.def("dropout_keep", &dropout_keep, "CPU: out[i] = 1 if hash(seed, i) < threshold else 0, i < n, in out_dtype",
        arg("out"), arg("out_dtype"), arg("n"), arg("seed"), arg("threshold"));
  m.def("dequant_4bit", &dequant_4bit,
        "CPU: out[i] = code[4-bit code i of packed] * absmax[i / blocksize], float32 or bfloat16",
        arg("out"), arg("out_dtype"), arg("packed"), arg("code"), arg("absmax"), arg("n"), arg("blocksize"),
        arg("absmax_q") = std::uintptr_t(0), arg("nested_code") = std::uintptr_t(0),
        arg("nested_absmax") = std::uintptr_t(0), arg("nested_blocksize") = int64_t(256), arg("offset") = 0.0);
  m.def("dropout_mul", &dropout_mul, "CPU: out[i] = x[i] * keep(i) (dropout_keep's mask), float32 or bfloat16",
        arg("out"), arg("x"), arg("dtype"), arg("n"), arg("seed"), arg("threshold"));
  m.def("dropout_addcmul", &dropout_addcmul, "CPU: dst[i] += value * src[i] * keep(i), float32 or bfloat16",
        arg("dst"), arg("src"), arg("dtype"), arg("n"), arg("seed"), arg("threshold"), arg("value"));

  py::dict codes;
  codes["float32"] = int(kFloat32);
  codes["float16"] = int(kFloat16);
  codes["bfloat16"] = int(kBFloat16);
  m.attr("DTYPE_CODES") = codes;
  m.attr("CUDA_ARCHS") = parse_archs(FASTPEFT_SASS_ARCHS);  // SASS compiled in, e.g. [80, 86, 89, 90]
  m.attr("PTX_ARCHS") = parse_archs(FASTPEFT_PTX_ARCHS);    // PTX embedded for JIT on newer GPUs
  m.attr("CUDA_RUNTIME_VERSION") = int(CUDART_VERSION);  // the statically linked runtime, e.g. 13000
}
