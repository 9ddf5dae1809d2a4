// soft_prompt_embed kernels: the (B, P+T, H) input embeddings with a soft prompt in front, or
// (templated, a slot map given) the (B, T, H) embeddings with the prompt's tokens at the template's
// positions, written in one pass, and their two backwards (prompt table; word embeddings).
//
// Layout: every row is H contiguous elements (hidden stride 1).  VEC=true moves 16 bytes of
// the output / gradient type per thread per step; the host picks it only when H and every row
// stride are multiples of that width and every base pointer is 16-byte aligned.

#include "common.cuh"

namespace fastpeft {

// out[b, s] = s < P ? cast(table[prompt_index[b] (0 when shared), s]) : weight[input_ids[b, s-P]]
// Templated (a.slots): out[b, t] = slots[b, t] >= 0 ? cast(table[n, slots[b, t]]) : weight[input_ids[b, t]];
// the id at a prompt position (a marker) is never read.
// One row per threadIdx.y; threadIdx.x strides over the row's vectors.  Saves nothing: the
// backward needs only input_ids and prompt_index.  An out-of-range index zeroes its row and
// raises *bad_index instead of reading outside the table.
template <typename out_t, typename tab_t, bool VEC>
__global__ void __launch_bounds__(kThreads) soft_prompt_fwd_kernel(const SoftPromptFwdArgs a) {
  constexpr int W = vec_width<out_t, VEC>();
  const int64_t nvec = a.H / W;
  const int64_t S = a.slots ? a.T : a.P + a.T;
  const int64_t rows = a.B * S;
  out_t* out = static_cast<out_t*>(a.out);
  const out_t* weight = static_cast<const out_t*>(a.weight);
  const tab_t* table = static_cast<const tab_t*>(a.table);

  for (int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += int64_t(gridDim.x) * blockDim.y) {
    const int64_t b = row / S, s = row - b * S;
    out_t* dst = out + row * a.H;
    bool ok;
    // the virtual token at this position (-1: a word) and the word's position in input_ids
    const int64_t slot = a.slots ? a.slots[b * a.slots_stride_b + s * a.slots_stride_t] : (s < a.P ? s : -1);
    const int64_t t = a.slots ? s : s - a.P;
    if (slot >= 0) {
      const int64_t n = a.prompt_index ? a.prompt_index[b * a.pidx_stride] : 0;
      ok = n >= 0 && n < a.N && slot < a.P;
      if (ok) {
        const tab_t* src = table + n * a.table_stride_n + slot * a.table_stride_p;
        for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
          const Pack<tab_t, W> x = load_pack<tab_t, W>(src + j * W);
          Pack<out_t, W> y;
#pragma unroll
          for (int k = 0; k < W; ++k) y.v[k] = Cast<out_t, tab_t>::apply(x.v[k]);
          store_pack<out_t, W>(dst + j * W, y);
        }
      }
    } else {
      const int64_t id = a.input_ids[b * a.ids_stride_b + t * a.ids_stride_t];
      ok = id >= 0 && id < a.V;
      if (ok) {
        const out_t* src = weight + id * a.weight_stride_v;
        for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x)
          store_pack<out_t, W>(dst + j * W, load_pack<out_t, W>(src + j * W));
      }
    }
    if (!ok) {
      if (threadIdx.x == 0) flag_bad_index(a.bad_index);
      Pack<out_t, W> zero;
#pragma unroll
      for (int k = 0; k < W; ++k) zero.v[k] = from_float<out_t>(0.f);
      for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) store_pack<out_t, W>(dst + j * W, zero);
    }
  }
}

// d_table[n, p, h] = sum_{b : prompt_index[b] == n (every b when shared)} dout[b, pos(b, p), h], in fp32,
// pos(b, p) = p (prepended) or positions[b, p] (templated; out of range: flagged, the row skipped).
// A block owns BX (p, h-vector) columns of one n; threadIdx.y strides over b and the partial
// sums meet in shared memory in a fixed order: deterministic, no atomics, every output element
// written exactly once (zeros for prompts no row uses).
template <typename g_t, typename tab_t, bool VEC>
__global__ void __launch_bounds__(kThreads) soft_prompt_table_bwd_kernel(const SoftPromptTableBwdArgs a) {
  constexpr int W = vec_width<g_t, VEC>();
  __shared__ float partial[kThreads * W];
  const int64_t nvec = a.H / W;
  const int64_t cols = a.P * nvec;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const g_t* dout = static_cast<const g_t*>(a.dout);
  tab_t* d_table = static_cast<tab_t*>(a.d_table);

  for (int64_t n = blockIdx.y; n < a.N; n += gridDim.y) {
    for (int64_t base = int64_t(blockIdx.x) * blockDim.x; base < cols; base += int64_t(gridDim.x) * blockDim.x) {
      const int64_t col = base + threadIdx.x;
      const bool active = col < cols;
      float acc[W];
#pragma unroll
      for (int k = 0; k < W; ++k) acc[k] = 0.f;
      if (active) {
        const int64_t p = col / nvec, j = col - p * nvec;
        for (int64_t b = threadIdx.y; b < a.B; b += blockDim.y) {
          if (a.prompt_index && a.prompt_index[b * a.pidx_stride] != n) continue;
          int64_t pos = p;
          if (a.positions) {
            pos = a.positions[b * a.pos_stride_b + p * a.pos_stride_p];
            if (pos < 0 || pos >= a.S) {
              flag_bad_index(a.bad_index);
              continue;
            }
          }
          const Pack<g_t, W> x = load_pack<g_t, W>(dout + b * a.dout_stride_b + pos * a.dout_stride_s + j * W);
#pragma unroll
          for (int k = 0; k < W; ++k) acc[k] += to_float(x.v[k]);
        }
      }
#pragma unroll
      for (int k = 0; k < W; ++k) partial[tid * W + k] = acc[k];
      __syncthreads();
      if (threadIdx.y == 0 && active) {
        for (int y = 1; y < int(blockDim.y); ++y) {
#pragma unroll
          for (int k = 0; k < W; ++k) acc[k] += partial[(y * blockDim.x + threadIdx.x) * W + k];
        }
        Pack<tab_t, W> out;
#pragma unroll
        for (int k = 0; k < W; ++k) out.v[k] = from_float<tab_t>(acc[k]);
        // col * W == p * H + j * W because nvec * W == H
        store_pack<tab_t, W>(d_table + n * a.P * a.H + col * W, out);
      }
      __syncthreads();
    }
  }
}

// d_weight[input_ids[b, t], h] += dout[b, P + t, h] with fp32 atomics into a zeroed fp32 buffer
// (templated: P = 0, and a position whose slot is >= 0 is a virtual token: skipped, its id unread).
// Fast; the summation order of repeated ids varies from run to run (not bitwise reproducible).
template <typename g_t, bool VEC>
__global__ void __launch_bounds__(kThreads) soft_prompt_weight_bwd_atomic_kernel(const SoftPromptWeightBwdArgs a) {
  constexpr int W = vec_width<g_t, VEC>();
  const int64_t nvec = a.H / W;
  const int64_t rows = a.B * a.T;
  const g_t* dout = static_cast<const g_t*>(a.dout);
  float* d_weight = static_cast<float*>(a.d_weight);

  for (int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += int64_t(gridDim.x) * blockDim.y) {
    const int64_t b = row / a.T, t = row - b * a.T;
    if (a.slots && a.slots[b * a.slots_stride_b + t * a.slots_stride_t] >= 0) continue;
    const int64_t id = a.input_ids[b * a.ids_stride_b + t * a.ids_stride_t];
    if (id < 0 || id >= a.V) {
      if (threadIdx.x == 0) flag_bad_index(a.bad_index);
      continue;
    }
    const g_t* src = dout + b * a.dout_stride_b + (a.P + t) * a.dout_stride_s;
    float* dst = d_weight + id * a.H;
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      const Pack<g_t, W> x = load_pack<g_t, W>(src + j * W);
#pragma unroll
      for (int k = 0; k < W; ++k) atomicAdd(dst + j * W + k, to_float(x.v[k]));
    }
  }
}

// Deterministic d_weight: ids arrive flattened and stably sorted (with their flat positions
// b*T + t in `order`); the first occurrence of each id sums its whole run in sorted order in
// fp32 and writes the row once, in the weight dtype.  Rows of unused ids keep the zeros the
// caller allocated.  Bitwise reproducible; a very frequent id is summed by one block.  Templated
// (a.slots): positions whose slot is >= 0 are skipped wherever their (marker) id sorted to.
template <typename g_t, typename w_t, bool VEC>
__global__ void __launch_bounds__(kThreads) soft_prompt_weight_bwd_sorted_kernel(const SoftPromptWeightBwdArgs a) {
  constexpr int W = vec_width<g_t, VEC>();
  const int64_t nvec = a.H / W;
  const int64_t rows = a.B * a.T;
  const g_t* dout = static_cast<const g_t*>(a.dout);
  w_t* d_weight = static_cast<w_t*>(a.d_weight);

  for (int64_t i = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; i < rows; i += int64_t(gridDim.x) * blockDim.y) {
    const int64_t id = a.sorted_ids[i];
    if (i > 0 && a.sorted_ids[i - 1] == id) continue;  // not the first of its run
    const bool id_ok = id >= 0 && id < a.V;
    if (!id_ok && !a.slots) {
      if (threadIdx.x == 0) flag_bad_index(a.bad_index);
      continue;
    }
    if (!id_ok) {  // templated: an out-of-range id is an error only at a word position
      for (int64_t r = i; r < rows && a.sorted_ids[r] == id; ++r) {
        const int64_t pos = a.order[r];
        if (pos < 0 || pos >= rows) {
          if (threadIdx.x == 0) flag_bad_index(a.bad_index);
          continue;
        }
        const int64_t b = pos / a.T, t = pos - b * a.T;
        if (a.slots[b * a.slots_stride_b + t * a.slots_stride_t] < 0 && threadIdx.x == 0) flag_bad_index(a.bad_index);
      }
      continue;
    }
    w_t* dst = d_weight + id * a.H;
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      float acc[W];
#pragma unroll
      for (int k = 0; k < W; ++k) acc[k] = 0.f;
      for (int64_t r = i; r < rows && a.sorted_ids[r] == id; ++r) {
        const int64_t pos = a.order[r];
        if (pos < 0 || pos >= rows) {
          flag_bad_index(a.bad_index);
          continue;
        }
        const int64_t b = pos / a.T, t = pos - b * a.T;
        if (a.slots && a.slots[b * a.slots_stride_b + t * a.slots_stride_t] >= 0) continue;  // a virtual token
        const Pack<g_t, W> x = load_pack<g_t, W>(dout + b * a.dout_stride_b + (a.P + t) * a.dout_stride_s + j * W);
#pragma unroll
        for (int k = 0; k < W; ++k) acc[k] += to_float(x.v[k]);
      }
      Pack<w_t, W> out;
#pragma unroll
      for (int k = 0; k < W; ++k) out.v[k] = from_float<w_t>(acc[k]);
      store_pack<w_t, W>(dst + j * W, out);
    }
  }
}

// ---- launchers ---------------------------------------------------------------------------------

// Block shape for "one row per threadIdx.y": x covers a row's vectors (a warp at least).
static dim3 row_block(int64_t nvec) {
  int64_t tx = (nvec + 31) / 32 * 32;
  if (tx > kThreads) tx = kThreads;
  return dim3(unsigned(tx), unsigned(kThreads / tx));
}

cudaError_t launch_soft_prompt_fwd(const SoftPromptFwdArgs& a, int out_dtype, int table_dtype, bool vec,
                                   cudaStream_t stream) {
  return dispatch_float(out_dtype, [&](auto out_tag) {
    using out_t = decltype(out_tag);
    return dispatch_float(table_dtype, [&](auto tab_tag) {
      using tab_t = decltype(tab_tag);
      const int W = vec ? int(16 / sizeof(out_t)) : 1;
      const dim3 block = row_block(a.H / W);
      const unsigned grid = grid_for(a.B * (a.slots ? a.T : a.P + a.T), block.y);
      if (vec)
        FASTPEFT_LAUNCH(grid, block, stream, a, soft_prompt_fwd_kernel<out_t, tab_t, true>);
      else
        FASTPEFT_LAUNCH(grid, block, stream, a, soft_prompt_fwd_kernel<out_t, tab_t, false>);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_soft_prompt_table_bwd(const SoftPromptTableBwdArgs& a, int dout_dtype, int table_dtype, bool vec,
                                         cudaStream_t stream) {
  return dispatch_float(dout_dtype, [&](auto g_tag) {
    using g_t = decltype(g_tag);
    return dispatch_float(table_dtype, [&](auto tab_tag) {
      using tab_t = decltype(tab_tag);
      const int W = vec ? int(16 / sizeof(g_t)) : 1;
      const unsigned ty = a.B >= 8 ? 8 : a.B >= 4 ? 4 : a.B >= 2 ? 2 : 1;
      const dim3 block(kThreads / ty, ty);
      const dim3 grid(grid_for(a.P * (a.H / W), block.x), unsigned(a.N < 65535 ? a.N : 65535));
      if (vec)
        FASTPEFT_LAUNCH(grid, block, stream, a, soft_prompt_table_bwd_kernel<g_t, tab_t, true>);
      else
        FASTPEFT_LAUNCH(grid, block, stream, a, soft_prompt_table_bwd_kernel<g_t, tab_t, false>);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_soft_prompt_weight_bwd_atomic(const SoftPromptWeightBwdArgs& a, int dout_dtype, bool vec,
                                                 cudaStream_t stream) {
  return dispatch_float(dout_dtype, [&](auto g_tag) {
    using g_t = decltype(g_tag);
    const int W = vec ? int(16 / sizeof(g_t)) : 1;
    const dim3 block = row_block(a.H / W);
    const unsigned grid = grid_for(a.B * a.T, block.y);
    if (vec)
      FASTPEFT_LAUNCH(grid, block, stream, a, soft_prompt_weight_bwd_atomic_kernel<g_t, true>);
    else
      FASTPEFT_LAUNCH(grid, block, stream, a, soft_prompt_weight_bwd_atomic_kernel<g_t, false>);
    return cudaGetLastError();
  });
}

cudaError_t launch_soft_prompt_weight_bwd_sorted(const SoftPromptWeightBwdArgs& a, int dout_dtype, int weight_dtype,
                                                 bool vec, cudaStream_t stream) {
  return dispatch_float(dout_dtype, [&](auto g_tag) {
    using g_t = decltype(g_tag);
    return dispatch_float(weight_dtype, [&](auto w_tag) {
      using w_t = decltype(w_tag);
      const int W = vec ? int(16 / sizeof(g_t)) : 1;
      const dim3 block = row_block(a.H / W);
      const unsigned grid = grid_for(a.B * a.T, block.y);
      if (vec)
        FASTPEFT_LAUNCH(grid, block, stream, a, soft_prompt_weight_bwd_sorted_kernel<g_t, w_t, true>);
      else
        FASTPEFT_LAUNCH(grid, block, stream, a, soft_prompt_weight_bwd_sorted_kernel<g_t, w_t, false>);
      return cudaGetLastError();
    });
  });
}

}  // namespace fastpeft
