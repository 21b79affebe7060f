// Portability macros for math written once and compiled for both the host (C++) and the
// device (CUDA). The math headers in csrc/common (*_math.h, exp_pair.h, log_bessel*.h,
// normal_quantile.h) include nothing from torch, so csrc/kernels can use them on machines
// whose torch has no CUDA; the *_op.h, *_aten.h and torch_checks.h headers are torch glue.
#pragma once

// The instruction-set namespace of the inline functions of the shared headers that a CPU
// translation unit compiled for another instruction set (e.g. -march=x86-64-v4) also
// includes: that unit defines it first, so its copies are distinct symbols and the linker
// never hands the baseline code an AVX-512 copy (or the reverse).
#ifndef FASTLOSS_ISA_NAMESPACE
#define FASTLOSS_ISA_NAMESPACE baseline
#endif

#if defined(__CUDACC__)
#define FASTLOSS_HD __host__ __device__ __forceinline__
// Fully unrolled on the GPU (fixed-size arrays stay in registers); nothing on the host, whose
// compilers would warn about an unknown pragma.
#define FASTLOSS_UNROLL _Pragma("unroll")
#else
#define FASTLOSS_HD inline __attribute__((always_inline))
#define FASTLOSS_UNROLL
#endif
