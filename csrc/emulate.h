// CPU emulation of the CUDA execution model, for testing the kernels' logic where there is no GPU
// (tests/test_cext.py builds csrc/*.cu with the host compiler and -DFASTPEFT_EMULATE).  Not part
// of the extension.  Each block runs as blockDim.x * blockDim.y std::threads meeting at a
// std::barrier for __syncthreads(); `__shared__` locals become function statics, which is
// shared memory as long as blocks run one after another (they do).  The grid is capped at 3 x 2
// blocks: every kernel is a grid-stride loop, so that still covers the work and exercises the
// loops.  Float atomics are std::atomic_ref.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <math.h>
#include <thread>
#include <vector>

#include <cuda_runtime.h>

namespace fastpeft::emulate {

struct Index {
  unsigned x, y, z;
};
inline thread_local Index thread_idx, block_idx;
inline thread_local dim3 block_dim, grid_dim;
inline thread_local std::barrier<>* block_barrier = nullptr;

template <typename Kernel, typename Args> void launch(Kernel kernel, dim3 grid, dim3 block, const Args& args) {
  const dim3 g(std::min(grid.x, 3u), std::min(grid.y, 2u), 1);
  for (unsigned by = 0; by < g.y; ++by) {
    for (unsigned bx = 0; bx < g.x; ++bx) {
      std::barrier<> barrier(block.x * block.y);
      std::vector<std::thread> threads;
      for (unsigned ty = 0; ty < block.y; ++ty) {
        for (unsigned tx = 0; tx < block.x; ++tx) {
          threads.emplace_back([&, tx, ty, bx, by] {
            thread_idx = {tx, ty, 0};
            block_idx = {bx, by, 0};
            block_dim = block;
            grid_dim = g;
            block_barrier = &barrier;
            kernel(args);
            barrier.arrive_and_drop();  // an exited thread no longer holds up __syncthreads
          });
        }
      }
      for (auto& t : threads) t.join();
    }
  }
}

}  // namespace fastpeft::emulate

#define threadIdx ::fastpeft::emulate::thread_idx
#define blockIdx ::fastpeft::emulate::block_idx
#define blockDim ::fastpeft::emulate::block_dim
#define gridDim ::fastpeft::emulate::grid_dim
#undef __shared__
#define __shared__ static
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __launch_bounds__
#define __launch_bounds__(...)
#define cudaGetLastError() cudaSuccess

inline void __syncthreads() { ::fastpeft::emulate::block_barrier->arrive_and_wait(); }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline int atomicExch(int* p, int v) { return std::atomic_ref<int>(*p).exchange(v); }
