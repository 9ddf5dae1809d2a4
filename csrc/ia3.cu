// IA3 scaling-vector gradient: column sums of an elementwise product.
//
// dl[n] = sum_m a[m, n] * b[m, n] in fp32 (a = dy, b = the unscaled output z for an output
// scaling; a = dy·W, b = x for a feed-forward input scaling).  Any strides: the operands may be
// views.  Not yet dispatched by any op (fastpeft/ops/ia3.py owns that choice).

#include "common.cuh"

namespace fastpeft {

// A block owns blockDim.x consecutive columns; threadIdx.y strides over m and the partial sums
// meet in shared memory in a fixed order: deterministic, no atomics.
template <typename in_t, typename out_t>
__global__ void __launch_bounds__(kThreads) column_dot_kernel(const ColumnDotArgs args) {
  __shared__ float partial[kThreads];
  const in_t* a = static_cast<const in_t*>(args.a);
  const in_t* b = static_cast<const in_t*>(args.b);
  out_t* out = static_cast<out_t*>(args.out);
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;

  for (int64_t base = int64_t(blockIdx.x) * blockDim.x; base < args.N; base += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = base + threadIdx.x;
    const bool active = n < args.N;
    float acc = 0.f;
    if (active) {
      for (int64_t m = threadIdx.y; m < args.M; m += blockDim.y)
        acc = fmaf(to_float(a[m * args.a_stride_m + n * args.a_stride_n]),
                   to_float(b[m * args.b_stride_m + n * args.b_stride_n]), acc);
    }
    partial[tid] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && active) {
      for (int y = 1; y < int(blockDim.y); ++y) acc += partial[y * blockDim.x + threadIdx.x];
      out[n] = from_float<out_t>(acc);
    }
    __syncthreads();
  }
}

cudaError_t launch_column_dot(const ColumnDotArgs& a, int in_dtype, int out_dtype, cudaStream_t stream) {
  return dispatch_float(in_dtype, [&](auto in_tag) {
    using in_t = decltype(in_tag);
    return dispatch_float(out_dtype, [&](auto out_tag) {
      using out_t = decltype(out_tag);
      const dim3 block(64, kThreads / 64);
      FASTPEFT_LAUNCH(grid_for(a.N, block.x), block, stream, a, column_dot_kernel<in_t, out_t>);
      return cudaGetLastError();
    });
  });
}

}  // namespace fastpeft
