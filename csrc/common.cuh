// Device helpers shared by the fastpeft._C kernels: float conversion, packed 16-byte
// loads/stores, dtype dispatch.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fastpeft.h"

// Kernel launch.  With FASTPEFT_EMULATE (tests only: csrc/emulate.h, built by tests/test_cext.py
// with the host compiler) every block runs on CPU threads, so the kernels' logic is tested on
// machines without a GPU.
#ifdef FASTPEFT_EMULATE
#include "emulate.h"
#define FASTPEFT_LAUNCH(grid, block, stream, args, ...) \
  ::fastpeft::emulate::launch(__VA_ARGS__, dim3(grid), dim3(block), args)
#else
#define FASTPEFT_LAUNCH(grid, block, stream, args, ...) __VA_ARGS__<<<grid, block, 0, stream>>>(args)
#endif

namespace fastpeft {

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Casting through float is exact for fp16/bf16 -> float and rounds to nearest-even going back,
// which is what torch's .to() does; same-type copies move the bits untouched.
template <typename D, typename S> struct Cast {
  static __device__ __forceinline__ D apply(S x) { return from_float<D>(to_float<S>(x)); }
};
template <typename T> struct Cast<T, T> {
  static __device__ __forceinline__ T apply(T x) { return x; }
};

// N elements moved as one (or two) vector memory operations: N * sizeof(T) is 8, 16 or 32
// bytes, aligned to at most 16 (a 32-byte pack becomes two 16-byte loads).
template <typename T, int N> struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

template <typename T, int N> __device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  if constexpr (N == 1) {
    Pack<T, 1> r;
    r.v[0] = p[0];
    return r;
  } else {
    return *reinterpret_cast<const Pack<T, N>*>(p);
  }
}

template <typename T, int N> __device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& x) {
  if constexpr (N == 1) {
    p[0] = x.v[0];
  } else {
    *reinterpret_cast<Pack<T, N>*>(p) = x;
  }
}

// Elements per 16-byte vector of T, or 1 on the scalar path.
template <typename T, bool VEC> __host__ __device__ constexpr int vec_width() { return VEC ? int(16 / sizeof(T)) : 1; }

__device__ __forceinline__ void flag_bad_index(int* flag) {
  if (flag != nullptr) atomicExch(flag, 1);
}

// Calls f(T{}) with T the element type of dtype code `code`.
template <typename F> cudaError_t dispatch_float(int code, F&& f) {
  switch (code) {
    case kFloat32: return f(float{});
    case kFloat16: return f(__half{});
    case kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Blocks for a grid-stride loop over `units` work items with `per_block` items per block; capped
// so huge problems loop instead of asking for an oversized grid.
inline unsigned grid_for(int64_t units, int64_t per_block) {
  int64_t blocks = (units + per_block - 1) / per_block;
  if (blocks < 1) blocks = 1;
  if (blocks > (int64_t(1) << 20)) blocks = int64_t(1) << 20;
  return unsigned(blocks);
}

}  // namespace fastpeft
