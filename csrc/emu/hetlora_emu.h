// hetlora_emu: runs the torch-free CUDA kernels of csrc/cuda on the CPU, for tests.
//
// The machines that build this project have nvcc but no GPU, so the .cu kernels would
// otherwise only ever be compiled.  This header, with the shim cuda_runtime.h / cuda_fp16.h
// / cuda_bf16.h beside it, lets g++ compile a .cu file unchanged except for one textual
// step (tests/cuda_emu.py turns `k<<<grid, block, smem, stream>>>(args)` into
// `Launch(grid, block, smem, stream)(k, args)`).  Each launch runs synchronously: block
// after block, every CUDA thread of a block a fiber (ucontext) with its own threadIdx, so
// __syncthreads and warp shuffles really wait for the other threads.
//
// What it checks beyond the results: a shuffle whose full mask names an exited or absent
// lane, a lane that exits while its warp waits in a shuffle, a barrier no thread can pass
// (deadlock), and launch configurations CUDA would refuse.  Such a launch fails with
// cudaErrorLaunchFailure and hetlora_emu_message() says why.  The order in which ready
// threads run is selectable (ascending, descending, seeded random), so a kernel that
// depends on scheduling gives different results under different orders.
//
// Not modelled: memory coherence between threads without a barrier, timing, shared-memory
// capacity, and the speed of anything.
#pragma once

#include <math.h>  // the float overloads of sqrt & co. in the global namespace, as in CUDA

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The values are CUDA's own.
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

typedef struct CUstream_st* cudaStream_t;

cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t err);

namespace hetlora_emu {

const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
void sync_threads();
uint64_t shfl_xor_bits(unsigned member_mask, uint64_t bits, int lane_mask, int width);
void launch(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& thread_body);

// `kernel<<<grid, block, smem, stream>>>(args...)` becomes `Launch(grid, block, smem, stream)(kernel, args...)`.
struct Launch {
  dim3 grid, block;
  size_t shared_bytes;
  Launch(dim3 g, dim3 b, size_t smem = 0, cudaStream_t = nullptr) : grid(g), block(b), shared_bytes(smem) {}
  template <typename Kernel, typename... Args>
  void operator()(Kernel kernel, Args... args) const {
    // every thread gets its own copy of the parameters, as kernel parameters are per thread
    launch(grid, block, shared_bytes, [&]() { kernel(args...); });
  }
};

}  // namespace hetlora_emu

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// one block runs at a time on the calling thread, and its threads are fibers of that thread
#define __shared__ static
#define threadIdx (::hetlora_emu::thread_idx())
#define blockIdx (::hetlora_emu::block_idx())
#define blockDim (::hetlora_emu::block_dim())
#define gridDim (::hetlora_emu::grid_dim())

inline void __syncthreads() { ::hetlora_emu::sync_threads(); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = ::hetlora_emu::shfl_xor_bits(mask, bits, lane_mask, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
