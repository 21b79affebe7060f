// Kernels with deliberate bugs, each of a kind the emulator must report (test_cuda_emu.py
// checks that it does): compiled and rewritten like csrc/kernels, with emu.h's primitives
// standing in for device_utils.cuh's cp.async wrappers.
#include <cuda_runtime.h>

#include <cstdint>

namespace {

// Reads a neighbour's shared memory slot with no barrier in between.
__global__ void missing_barrier(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = s[(threadIdx.x + 1) % 64];
}

// Half a warp at __syncthreads, the other half at a full-warp collective.
__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncwarp();
  }
  out[threadIdx.x] = 1.0f;
}

// A full-mask shuffle after half the warp has returned.
__global__ void exited_lane(float* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// Uses more dynamic shared memory than allowed without cudaFuncSetAttribute.
__global__ void big_dynamic_smem(float* out) {
  extern __shared__ float dyn[];
  dyn[threadIdx.x] = 1.0f;
  out[threadIdx.x] = dyn[threadIdx.x];
}

// Reads the destination of a cp.async before waiting for it.
__global__ void cp_async_unwaited(const float* in, float* out) {
  __shared__ __align__(16) float s[4];
  if (threadIdx.x == 0) {
    ::emu::cp_async16(s, in, 16);
    ::emu::cp_async_commit();
    out[0] = s[0];
    ::emu::cp_async_wait(0);
    out[1] = s[0];
  }
}

// Reads one element past the end of its input.
__global__ void past_the_end(const float* in, float* out, int n) { out[threadIdx.x] = in[n + threadIdx.x]; }

// Writes one element past the end of a static shared array.
__global__ void past_the_shared_end(float* out) {
  __shared__ float s[32];
  s[threadIdx.x + 1] = 1.0f;
  out[threadIdx.x] = 0.0f;
}

// Declares at most 64 threads per block.
__global__ void __launch_bounds__(64) bounded(float* out) { out[threadIdx.x] = 1.0f; }

}  // namespace

extern "C" int emu_selftest(int which, const float* in, float* out, int n) {
  switch (which) {
    case 0: missing_barrier<<<1, 64>>>(out); break;
    case 1: divergent_barrier<<<1, 32>>>(out); break;
    case 2: exited_lane<<<1, 32>>>(out); break;
    case 3: big_dynamic_smem<<<1, 32, 64 * 1024>>>(out); break;
    case 4: cp_async_unwaited<<<1, 32>>>(in, out); break;
    case 5: past_the_end<<<1, 32>>>(in, out, n); break;
    case 6: past_the_shared_end<<<1, 32>>>(out); break;
    case 7: bounded<<<1, 128>>>(out); break;
    default: return -1;
  }
  return static_cast<int>(cudaGetLastError());
}
