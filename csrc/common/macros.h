// Portability macros for math written once and compiled for both the host (C++) and the
// device (CUDA). Headers in csrc/common include nothing from torch, so csrc/kernels can
// use them on machines whose torch has no CUDA.
#pragma once

#if defined(__CUDACC__)
#define FASTLOSS_HD __host__ __device__ __forceinline__
#else
#define FASTLOSS_HD inline __attribute__((always_inline))
#endif
