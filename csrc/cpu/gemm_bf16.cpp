#include "cpu/gemm_bf16.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/record_function.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>

namespace fastloss::cpu {
namespace {

#if defined(CPUBLAS_BRGEMM_BF16BF16F32) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTLOSS_BF16_GEMM 1
#endif

// Blocks of C per call of the micro-kernel (measured on Zen 4, D = 1024-4096: 64 x 64 was
// as fast as any larger block and keeps both operands' blocks in L2).
constexpr int64_t kBlockRows = 64;
constexpr int64_t kBlockCols = 64;

enum class Probe { kAvailable, kNoCpuSupport, kNoKernel };

#ifdef FASTLOSS_BF16_GEMM
Probe probe() {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512bf16")) return Probe::kNoCpuSupport;
  // A product whose float32 result is exact: the kernel must exist and give it.
  constexpr int64_t m = 3, n = 5, k = 4;
  c10::BFloat16 a[m * k], b[k * n], bv[k * n];
  for (int64_t i = 0; i < m * k; ++i) a[i] = c10::BFloat16(static_cast<float>(i % 7) - 3.0f);
  for (int64_t i = 0; i < k * n; ++i) b[i] = c10::BFloat16(static_cast<float>(i % 5) - 1.5f);
  pack_vnni(b, n, k, n, bv);
  float c[m * n];
  try {
    at::native::cpublas::brgemm(m, n, k, k, n, n, false, a, bv, c, true);
    at::native::cpublas::brgemm_release(true);
  } catch (const c10::Error&) {
    return Probe::kNoKernel;
  }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      float s = 0;
      for (int64_t l = 0; l < k; ++l) s += static_cast<float>(a[i * k + l]) * static_cast<float>(b[l * n + j]);
      if (c[i * n + j] != s) return Probe::kNoKernel;
    }
  return Probe::kAvailable;
}
#elif defined(__x86_64__)
Probe probe() { return Probe::kNoKernel; }  // an ATen without the bfloat16 micro-kernel entry
#else
Probe probe() { return Probe::kNoCpuSupport; }
#endif

Probe probed() {
  static const Probe p = probe();
  return p;
}

uint32_t load_pair(const c10::BFloat16* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

uint32_t pair(c10::BFloat16 lo, c10::BFloat16 hi) {
  return static_cast<uint32_t>(lo.x) | (static_cast<uint32_t>(hi.x) << 16);
}

}  // namespace

bool bf16_gemm_available() { return probed() == Probe::kAvailable && at::globalContext().userEnabledMkldnn(); }

const char* bf16_gemm_path() {
  switch (probed()) {
    case Probe::kAvailable:
      return "oneDNN brgemm (AVX512-BF16)";
    case Probe::kNoCpuSupport:
      return "none (no AVX512-BF16)";
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
                       uint32_t* out = reinterpret_cast<uint32_t*>(dst + 2 * p * n);
                       for (int64_t j = 0; j < n; ++j) {
                         const uint32_t w = pair(r0[j], r1 ? r1[j] : zero);
                         std::memcpy(out + j, &w, sizeof(w));
                       }
                     }
                   });
}

void pack_vnni_transposed(const c10::BFloat16* src, int64_t ld, int64_t k, int64_t n, c10::BFloat16* dst) {
  // Each (k, k + 1) pair of a source row is one 32-bit word: a transpose of words, in tiles.
  constexpr int64_t kTile = 32;
  const int64_t pairs = vnni_depth(k) / 2, full = k / 2;
  const c10::BFloat16 zero(0.0f);
  at::parallel_for(0, (pairs + kTile - 1) / kTile, 1, [&](int64_t b, int64_t e) {
    for (int64_t pt = b; pt < e; ++pt) {
      const int64_t p0 = pt * kTile, p1 = std::min(pairs, p0 + kTile);
      for (int64_t j0 = 0; j0 < n; j0 += kTile) {
        const int64_t j1 = std::min(n, j0 + kTile);
        for (int64_t p = p0; p < p1; ++p) {
          uint32_t* out = reinterpret_cast<uint32_t*>(dst + 2 * p * n);
          for (int64_t j = j0; j < j1; ++j) {
            const c10::BFloat16* s = src + j * ld + 2 * p;
            const uint32_t w = p < full ? load_pair(s) : pair(s[0], zero);
            std::memcpy(out + j, &w, sizeof(w));
          }
        }
      }
    }
  });
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
      at::native::cpublas::brgemm(std::min(kBlockRows, m - r0), std::min(kBlockCols, n - c0), k, lda, n, ldc,
                                  accumulate, a + r0 * lda, b_vnni + 2 * c0, c + r0 * ldc + c0, true);
    }
    at::native::cpublas::brgemm_release(true);
  });
#else
  TORCH_INTERNAL_ASSERT(false, "gemm_bf16: not available in this build");
#endif
}

}  // namespace fastloss::cpu
