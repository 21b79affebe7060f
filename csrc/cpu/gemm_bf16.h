// bfloat16 x bfloat16 -> float32 matrix products on the CPU's bfloat16 dot-product
// instructions (AVX512-BF16, AMX), through the oneDNN micro-kernel that ATen exports
// (at::native::cpublas::brgemm). ATen's own bfloat16 matmul rounds its output to bfloat16;
// these keep the float32 sums, so cut cross-entropy's logits and gradient sums stay float32
// (on Zen 4: 2.3x a float32 matmul for one 1024 x 512 x 1024 product, 4x over the op).
//
// B operands are in the VNNI layout the instructions read: rows k and k+1 interleaved, i.e.
// element (k, n) of a K x N matrix at [(k / 2) * 2N + 2n + k % 2], K padded to even with zeros.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace fastloss::cpu {

// Whether the products below run here: an x86-64 CPU with AVX512-BF16, an ATen built with
// the oneDNN micro-kernels (checked once by a small product), and oneDNN not disabled by
// the user (torch.backends.mkldnn.enabled).
bool bf16_gemm_available();

// What bf16_gemm_available() found, for the build information.
const char* bf16_gemm_path();

// K rounded up to even: the rows of a VNNI operand.
inline int64_t vnni_depth(int64_t k) { return (k + 1) / 2 * 2; }

// dst (VNNI, vnni_depth(K) x N) from a row-major K x N matrix with row stride ld.
void pack_vnni(const c10::BFloat16* src, int64_t ld, int64_t k, int64_t n, c10::BFloat16* dst);

// dst (VNNI, K x N) from the transpose of a row-major N x K matrix with row stride ld (so
// element (k, n) is src[n * ld + k]); K and ld even.
void pack_vnni_transposed(const c10::BFloat16* src, int64_t ld, int64_t k, int64_t n, c10::BFloat16* dst);

// dst[c * ldd + r] = bfloat16(src[r * lds + c]) for a rows x cols float32 source (rounded to
// nearest even), in parallel.
void transpose_to_bf16(const float* src, int64_t rows, int64_t cols, int64_t lds, c10::BFloat16* dst, int64_t ldd);

// dst[c * ldd + r] = src[r * lds + c] for a rows x cols float32 source.
void transpose_f32(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst, int64_t ldd);

// dst[c * ldd + r] = src[r * lds + c] for a rows x cols bfloat16 source; cols and lds even.
void transpose_bf16(const c10::BFloat16* src, int64_t rows, int64_t cols, int64_t lds, c10::BFloat16* dst,
                    int64_t ldd);

// C (M x N, float32, row stride ldc) = A B, or += A B when accumulate, with A row-major
// bfloat16 (M x K, row stride lda) and B in the VNNI layout (K x N); K even. Parallel over
// blocks of C; each entry is one sum over K, so the result does not depend on the threads.
void gemm_bf16(int64_t m, int64_t n, int64_t k, const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b_vnni,
               float* c, int64_t ldc, bool accumulate);

}  // namespace fastloss::cpu
