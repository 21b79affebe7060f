#include "cpu/gemm_bf16.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/record_function.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

namespace fastloss::cpu {
namespace {

#if defined(CPUBLAS_BRGEMM_BF16BF16F32) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTLOSS_BF16_GEMM 1
#endif

// Blocks of C per call of the micro-kernel (measured on Zen 4, D = 1024-4096: 64 x 64 was
// as fast as any larger block and keeps both operands' blocks in L2).
constexpr int64_t kBlockRows = 64;
constexpr int64_t kBlockCols = 64;

enum class Probe { kAvailable, kNoCpuSupport, kNoKernel, kDisabled };

#ifdef FASTLOSS_BF16_GEMM
// C (m x n, row stride ldc) (+)= A B with small integers, whose float32 sums are exact:
// whether the micro-kernel gives them, with tails in every dimension and strided operands.
bool exact_product(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldc, bool accumulate) {
  std::vector<c10::BFloat16> a(m * lda), b(k * n), bv(vnni_depth(k) * n);
  std::vector<float> c(m * ldc), want(m * ldc);
  for (int64_t i = 0; i < m * lda; ++i) a[i] = c10::BFloat16(static_cast<float>(i % 7) - 3.0f);
  for (int64_t i = 0; i < k * n; ++i) b[i] = c10::BFloat16(static_cast<float>(i % 5) - 1.5f);
  for (int64_t i = 0; i < m * ldc; ++i) c[i] = want[i] = accumulate ? static_cast<float>(i % 3) : -7.0f;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      float s = accumulate ? want[i * ldc + j] : 0.0f;
      for (int64_t l = 0; l < k; ++l) s += static_cast<float>(a[i * lda + l]) * static_cast<float>(b[l * n + j]);
      want[i * ldc + j] = s;
    }
  pack_vnni(b.data(), n, k, n, bv.data());
  at::native::cpublas::brgemm(m, n, k, lda, n, ldc, accumulate, a.data(), bv.data(), c.data(), true);
  at::native::cpublas::brgemm_release(true);
  return c == want;
}

Probe probe() {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512bf16")) return Probe::kNoCpuSupport;
  try {
    // the block shapes gemm_bf16 uses, and tails of each dimension (a depth of 78: not a
    // multiple of the 32 or 64 the instructions take at a time)
    if (exact_product(kBlockRows, kBlockCols, 128, 130, 70, false) && exact_product(37, 50, 78, 80, 64, true) &&
        exact_product(3, 5, 4, 4, 5, false))
      return Probe::kAvailable;
  } catch (...) {  // ATen without the micro-kernels (c10::Error), or oneDNN refusing them
  }
  return Probe::kNoKernel;
}
#elif defined(__x86_64__)
Probe probe() { return Probe::kNoKernel; }  // an ATen without the bfloat16 micro-kernel entry
#else
Probe probe() { return Probe::kNoCpuSupport; }
#endif

Probe probed() {
  // ATen's brgemm refuses while oneDNN is disabled: probe (once) only while it is enabled.
  if (!at::globalContext().userEnabledMkldnn()) return Probe::kDisabled;
  static const Probe p = probe();
  return p;
}

// Two consecutive bfloat16 entries (one VNNI pair) as one object to move.
struct Bf16Pair {
  c10::BFloat16 lo, hi;
};
static_assert(sizeof(Bf16Pair) == 2 * sizeof(c10::BFloat16));

}  // namespace

bool bf16_gemm_available() { return probed() == Probe::kAvailable; }

const char* bf16_gemm_path() {
  switch (probed()) {
    case Probe::kAvailable:
      return "oneDNN brgemm (AVX512-BF16)";
    case Probe::kNoCpuSupport:
      return "none (no AVX512-BF16)";
    case Probe::kDisabled:
      return "none (oneDNN disabled: torch.backends.mkldnn.enabled)";
    default:
      return "none (no oneDNN micro-kernel in this ATen)";
  }
}

void pack_vnni(const c10::BFloat16* src, int64_t ld, int64_t k, int64_t n, c10::BFloat16* dst) {
  const c10::BFloat16 zero(0.0f);
  at::parallel_for(0, vnni_depth(k) / 2, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, n)),
                   [&](int64_t b, int64_t e) {
                     for (int64_t p = b; p < e; ++p) {
                       const c10::BFloat16* r0 = src + 2 * p * ld;
                       const c10::BFloat16* r1 = 2 * p + 1 < k ? r0 + ld : nullptr;
                       Bf16Pair* out = reinterpret_cast<Bf16Pair*>(dst + 2 * p * n);
                       for (int64_t j = 0; j < n; ++j) out[j] = Bf16Pair{r0[j], r1 ? r1[j] : zero};
                     }
                   });
}

void pack_vnni_transposed(const c10::BFloat16* src, int64_t ld, int64_t k, int64_t n, c10::BFloat16* dst) {
  // Source row j holds column j of B; its entries (k, k + 1) are one VNNI pair: a transpose of pairs.
  TORCH_INTERNAL_ASSERT(k % 2 == 0 && ld % 2 == 0, "pack_vnni_transposed: needs an even depth and stride");
  transpose_into(reinterpret_cast<const Bf16Pair*>(src), n, k / 2, ld / 2, reinterpret_cast<Bf16Pair*>(dst), n);
}

void gemm_bf16(int64_t m, int64_t n, int64_t k, const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b_vnni,
               float* c, int64_t ldc, bool accumulate) {
  TORCH_INTERNAL_ASSERT(k % 2 == 0, "gemm_bf16: the depth of a VNNI product must be even");
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
    return;
  }
#ifdef FASTLOSS_BF16_GEMM
  RECORD_FUNCTION("fastloss::gemm_bf16", c10::ArrayRef<const c10::IValue>{});
  const int64_t row_blocks = (m + kBlockRows - 1) / kBlockRows, col_blocks = (n + kBlockCols - 1) / kBlockCols;
  at::parallel_for(0, row_blocks * col_blocks, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t r0 = (t / col_blocks) * kBlockRows, c0 = (t % col_blocks) * kBlockCols;
      const int64_t cols = std::min(kBlockCols, n - c0);
      // A last block of fewer rows goes in power-of-two pieces: ATen compiles and keeps a
      // kernel per shape, and the row count changes with the count of ignored tokens.
      for (int64_t r = r0, rows = std::min(kBlockRows, m - r0); rows > 0;) {
        const int64_t piece = rows == kBlockRows ? rows : int64_t(1) << (63 - __builtin_clzll(rows));
        at::native::cpublas::brgemm(piece, cols, k, lda, n, ldc, accumulate, a + r * lda, b_vnni + 2 * c0,
                                    c + r * ldc + c0, true);
        r += piece;
        rows -= piece;
      }
    }
    at::native::cpublas::brgemm_release(true);
  });
#else
  TORCH_INTERNAL_ASSERT(false, "gemm_bf16: not available in this build");
#endif
}

}  // namespace fastloss::cpu
