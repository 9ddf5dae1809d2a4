// Grouped LoRA kernels for mixed-adapter batches (fastpeft/ops/grouped_lora.py, backend "cuda").
//
// A GroupPlan sorts the batch's tokens by adapter: `order` (L sorted positions -> token index in
// x / out) and `offsets` (G+1 segment bounds into the sorted positions).  The adapters are one
// stacked table, each rank zero-padded to R.  The base projection is not here: the caller runs it
// once for the whole batch (cuBLAS) and the expand / decode kernels add the low-rank term in place.
//
//   shrink:  S[m, r] = scale_g · Σ_k X[order[m], k] · W[g, r, k]       (g: the segment of m)
//   expand:  OUT[order[m], n] += scale_g · Σ_r S[m, r] · L[g, r, n]
//   decode:  Y[t, n] += scale_g · Σ_r (Σ_k X[t, k] · A[g, r, k]) · L[g, r, n],  g = slot[t] (-1: skip)
//
// fp32 accumulation, fixed summation order (deterministic), every row written by one block or
// thread (no atomics).  Grid-stride loops throughout.  An index out of range (a token past T, a
// slot past G, offsets not increasing) is never followed: its row is skipped and *bad_index set.

#include "common.cuh"

namespace fastpeft {

namespace {

// The segment g with offsets[g] <= m < offsets[g+1], or -1 (binary search; offsets are G+1 values).
__device__ __forceinline__ int64_t segment_of(const int64_t* offsets, int64_t G, int64_t m) {
  int64_t lo = 0, hi = G;  // invariant: offsets[lo] <= m < offsets[hi] when m is in range
  if (m < offsets[0] || m >= offsets[G]) return -1;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (offsets[mid] <= m) lo = mid; else hi = mid;
  }
  return lo;
}

// Sum of `v` over the block (blockDim.x == kThreads), every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (int(threadIdx.x) < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  const float out = red[0];
  __syncthreads();
  return out;
}

}  // namespace

// One block per sorted position m; the block's threads split K, one block reduction per rank.
// HBM: the token's X row R times (cached), W_g once per row; writes S (L × R fp32).
template <typename x_t, typename w_t>
__global__ void __launch_bounds__(kThreads) grouped_shrink_kernel(const GroupedShrinkArgs a) {
  __shared__ float red[kThreads];
  const x_t* x = static_cast<const x_t*>(a.x);
  const w_t* w = static_cast<const w_t*>(a.w);
  for (int64_t m = blockIdx.x; m < a.L; m += gridDim.x) {
    const int64_t g = segment_of(a.offsets, a.G, m);
    const int64_t t = a.order[m];
    const bool ok = g >= 0 && t >= 0 && t < a.T;
    if (!ok) {
      if (threadIdx.x == 0) flag_bad_index(a.bad_index);
      for (int64_t r = threadIdx.x; r < a.R; r += blockDim.x) a.s[m * a.stride_sm + r] = 0.f;
      continue;
    }
    const float scale = a.scale != nullptr ? a.scale[g] : 1.f;
    const x_t* xr = x + t * a.stride_xm;
    const w_t* wg = w + g * a.stride_wg;
    for (int64_t r = 0; r < a.R; ++r) {
      float acc = 0.f;
      for (int64_t k = threadIdx.x; k < a.K; k += blockDim.x)
        acc = fmaf(to_float(xr[k * a.stride_xk]), to_float(wg[r * a.stride_wr + k * a.stride_wk]), acc);
      acc = block_sum(acc, red);
      if (threadIdx.x == 0) a.s[m * a.stride_sm + r] = acc * scale;
    }
  }
}

// One thread per output element (m, n), n fastest: L_g rows are read coalesced.
// HBM: S (broadcast within a warp), L_g, the segment's OUT rows read and written once.
template <typename l_t, typename out_t>
__global__ void __launch_bounds__(kThreads) grouped_expand_kernel(const GroupedExpandArgs a) {
  const l_t* l = static_cast<const l_t*>(a.l);
  out_t* out = static_cast<out_t*>(a.out);
  const int64_t total = a.L * a.N;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i / a.N, n = i - m * a.N;
    const int64_t g = segment_of(a.offsets, a.G, m);
    const int64_t t = a.order[m];
    if (g < 0 || t < 0 || t >= a.T) {
      if (n == 0) flag_bad_index(a.bad_index);
      continue;
    }
    const float* sr = a.s + m * a.stride_sm;
    const l_t* lg = l + g * a.stride_lg + n * a.stride_ln;
    float acc = 0.f;
    for (int64_t r = 0; r < a.R; ++r) acc = fmaf(sr[r], to_float(lg[r * a.stride_lr]), acc);
    if (a.scale != nullptr) acc *= a.scale[g];
    out_t* dst = out + t * a.stride_om + n * a.stride_on;
    *dst = from_float<out_t>(to_float(*dst) + acc);
  }
}

// Decode (BGMV): one block per token, shrink into shared memory, then the block's threads expand
// over N.  No S in HBM; base rows (slot -1) cost one load.
template <typename x_t, typename w_t>
__global__ void __launch_bounds__(kThreads) grouped_decode_kernel(const GroupedDecodeArgs a) {
  __shared__ float red[kThreads];
  __shared__ float s[kMaxGroupedRank];
  const x_t* x = static_cast<const x_t*>(a.x);
  const w_t* aw = static_cast<const w_t*>(a.a);
  const w_t* l = static_cast<const w_t*>(a.l);
  x_t* y = static_cast<x_t*>(a.y);
  for (int64_t t = blockIdx.x; t < a.T; t += gridDim.x) {
    const int64_t g = a.slot[t];
    if (g < 0) continue;
    if (g >= a.G) {
      if (threadIdx.x == 0) flag_bad_index(a.bad_index);
      continue;
    }
    const x_t* xr = x + t * a.stride_xm;
    const w_t* ag = aw + g * a.stride_ag;
    for (int64_t r = 0; r < a.R; ++r) {
      float acc = 0.f;
      for (int64_t k = threadIdx.x; k < a.K; k += blockDim.x)
        acc = fmaf(to_float(xr[k * a.stride_xk]), to_float(ag[r * a.stride_ar + k * a.stride_ak]), acc);
      acc = block_sum(acc, red);
      if (threadIdx.x == 0) s[r] = acc * a.scale[g];
    }
    __syncthreads();
    const w_t* lg = l + g * a.stride_lg;
    for (int64_t n = threadIdx.x; n < a.N; n += blockDim.x) {
      float acc = 0.f;
      for (int64_t r = 0; r < a.R; ++r) acc = fmaf(s[r], to_float(lg[r * a.stride_lr + n * a.stride_ln]), acc);
      x_t* dst = y + t * a.stride_ym + n * a.stride_yn;
      *dst = from_float<x_t>(to_float(*dst) + acc);
    }
    __syncthreads();
  }
}

cudaError_t launch_grouped_shrink(const GroupedShrinkArgs& a, int x_dtype, int w_dtype, cudaStream_t stream) {
  return dispatch_float(x_dtype, [&](auto x_tag) {
    using x_t = decltype(x_tag);
    return dispatch_float(w_dtype, [&](auto w_tag) {
      using w_t = decltype(w_tag);
      FASTPEFT_LAUNCH(grid_for(a.L, 1), kThreads, stream, a, grouped_shrink_kernel<x_t, w_t>);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_grouped_expand(const GroupedExpandArgs& a, int l_dtype, int out_dtype, cudaStream_t stream) {
  return dispatch_float(l_dtype, [&](auto l_tag) {
    using l_t = decltype(l_tag);
    return dispatch_float(out_dtype, [&](auto out_tag) {
      using out_t = decltype(out_tag);
      FASTPEFT_LAUNCH(grid_for(a.L * a.N, kThreads), kThreads, stream, a, grouped_expand_kernel<l_t, out_t>);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_grouped_decode(const GroupedDecodeArgs& a, int x_dtype, int w_dtype, cudaStream_t stream) {
  return dispatch_float(x_dtype, [&](auto x_tag) {
    using x_t = decltype(x_tag);
    return dispatch_float(w_dtype, [&](auto w_tag) {
      using w_t = decltype(w_tag);
      FASTPEFT_LAUNCH(grid_for(a.T, 1), kThreads, stream, a, grouped_decode_kernel<x_t, w_t>);
      return cudaGetLastError();
    });
  });
}

}  // namespace fastpeft
