// Kernels with deliberate bugs, each of a kind the emulator must report (test_cuda_emu.py
// checks that it does): compiled and rewritten like csrc/kernels, with emu.h's primitives
// standing in for device_utils.cuh's cp.async wrappers.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace {

// Reads a neighbour's shared memory slot (in the same warp) with no barrier in between.
__global__ void missing_barrier(float* out) {
  __shared__ float s[32];
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = s[(threadIdx.x + 1) % 32];
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

// Warp 1 writes shared memory that warp 0 reads, with only warp collectives in between.
__global__ void race_between_warps(float* out) {
  __shared__ float s[1];
  const float v = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
  if (threadIdx.x == 32) s[0] = v;
  const float w = __shfl_xor_sync(0xffffffffu, 2.0f, 1);
  if (threadIdx.x == 0) out[0] = s[0] + w;
}

// Block 1 returns before the grid sync that block 0 waits at.
__global__ void grid_sync_after_exit(float* out) {
  if (blockIdx.x == 1) return;
  cooperative_groups::this_grid().sync();
  out[blockIdx.x] = 1.0f;
}

// A cp.async into a buffer that other threads are still reading (no barrier before the issue).
__global__ void cp_async_overwrites(const float* in, float* out) {
  __shared__ __align__(16) float s[4];
  if (threadIdx.x == 0) s[0] = -1.0f;
  __syncthreads();
  if (threadIdx.x == 0) ::emu::cp_async16(s, in, 16), ::emu::cp_async_commit();
  out[threadIdx.x] = s[0];
  if (threadIdx.x == 0) ::emu::cp_async_wait(0);
}

// Lane 0 votes while the other lanes shuffle.
__global__ void mixed_collectives(float* out) {
  if (threadIdx.x == 0) {
    out[0] = static_cast<float>(__ballot_sync(0xffffffffu, 1));
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
  }
}

// A scalar __shared__ variable is one per block.
__global__ void scalar_shared(float* out) {
  __shared__ int flag;
  if (threadIdx.x == 0) flag = 7;
  __syncthreads();
  out[threadIdx.x] = static_cast<float>(flag);
}

// A 16-byte vector load from an address aligned to 4 bytes only.
struct alignas(16) Float4 {
  float v[4];
};
__global__ void misaligned_vector(const float* in, float* out) {
  out[threadIdx.x] = reinterpret_cast<const Float4*>(in + 1)->v[0];
}

// ldmatrix over 8x8 matrices whose rows are 64 bytes apart: rows 0 and 2 share banks.
__global__ void ldmatrix_conflicts(float* out) {
  extern __shared__ __align__(16) unsigned char rows[];
  for (int i = threadIdx.x; i < 4096; i += 32) rows[i] = 0;
  __syncwarp();
  uint32_t r[4];
  ::emu::ldmatrix_x4(r, rows + (threadIdx.x % 8) * 64 + (threadIdx.x / 8) * 1024, false);
  out[threadIdx.x] = static_cast<float>(r[0]);
}

}  // namespace

extern "C" int emu_selftest(int which, const float* in, float* out, int n) {
  switch (which) {
    case 0: missing_barrier<<<1, 32>>>(out); break;
    case 1: divergent_barrier<<<1, 32>>>(out); break;
    case 2: exited_lane<<<1, 32>>>(out); break;
    case 3: big_dynamic_smem<<<1, 32, 64 * 1024>>>(out); break;
    case 4: cp_async_unwaited<<<1, 32>>>(in, out); break;
    case 5: past_the_end<<<1, 32>>>(in, out, n); break;
    case 6: past_the_shared_end<<<1, 32>>>(out); break;
    case 7: bounded<<<1, 128>>>(out); break;
    case 8: race_between_warps<<<1, 64>>>(out); break;
    case 9: {
      void* args[] = {&out};
      return static_cast<int>(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(grid_sync_after_exit),
                                                          dim3(2), dim3(32), args, 0, nullptr));
    }
    case 10: cp_async_overwrites<<<1, 32>>>(in, out); break;
    case 11: mixed_collectives<<<1, 32>>>(out); break;
    case 12: scalar_shared<<<1, 32>>>(out); break;
    case 13: misaligned_vector<<<1, 1>>>(in, out); break;
    case 14: ldmatrix_conflicts<<<1, 32, 4096>>>(out); break;
    default: return -1;
  }
  return static_cast<int>(cudaGetLastError());
}
