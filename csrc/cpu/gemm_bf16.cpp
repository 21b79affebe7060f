#include "cpu/gemm_bf16.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/record_function.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>
#include <vector>

#if defined(CPUBLAS_BRGEMM_BF16BF16F32) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTLOSS_BF16_GEMM 1
#include <ATen/cpu/Utils.h>
#include <immintrin.h>
#endif

namespace fastloss::cpu {
namespace {

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

// Whether oneDNN's micro-kernel takes AMX tiles here: it does where the CPU and Linux allow
// them and ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA) does not cap it below AMX (2-core Xeon
// with AMX, cut cross-entropy bfloat16 forward at 4096 x 32000 x 1024: 149 ms with AMX, 1172
// ms capped at AVX512_CORE_BF16).
bool amx_enabled() {
#ifdef FASTLOSS_BF16_GEMM
  static const bool amx = [] {
    for (const char* name : {"ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"}) {
      const char* cap = std::getenv(name);
      if (cap == nullptr || *cap == '\0') continue;
      std::string isa(cap);
      std::transform(isa.begin(), isa.end(), isa.begin(), [](unsigned char ch) { return std::toupper(ch); });
      if (isa != "ALL" && isa != "DEFAULT" && isa.find("AMX") == std::string::npos) return false;
      break;  // oneDNN reads the first one set
    }
    return at::cpu::init_amx();  // asks Linux for the tile state; false without AMX
  }();
  return amx;
#else
  return false;
#endif
}

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

// dst[c * ldd + r] = src[r * lds + c] (converted to T) for a rows x cols source, in tiles,
// in parallel over the destination's rows.
template <typename S, typename T>
void transpose_into(const S* src, int64_t rows, int64_t cols, int64_t lds, T* dst, int64_t ldd) {
  constexpr int64_t kTile = 32;
  at::parallel_for(0, (cols + kTile - 1) / kTile, 1, [&](int64_t b, int64_t e) {
    for (int64_t ct = b; ct < e; ++ct) {
      const int64_t c0 = ct * kTile, c1 = std::min(cols, c0 + kTile);
      for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
        const int64_t r1 = std::min(rows, r0 + kTile);
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t r = r0; r < r1; ++r) dst[c * ldd + r] = static_cast<T>(src[r * lds + c]);
      }
    }
  });
}

// How a transposed block of 32-bit entries is stored: as they are; (float) rounded to
// bfloat16; or (pairs of bfloat16) split, the first of each pair to row 2i, the second to
// row 2i + 1 of a bfloat16 destination.
enum class Store { kWords, kToBf16, kSplitPairs };

#ifdef FASTLOSS_BF16_GEMM
#define FASTLOSS_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

// A 16 x 16 block of 32-bit entries (rows src + i * lds) transposed in registers: two
// rounds of 128-bit-lane unpacks give, per lane L, column 4L + c of four rows; two rounds
// of lane shuffles gather each column's four lanes. Strides in destination entries.
template <Store kStore>
FASTLOSS_BF16_TARGET void transpose_block16(const void* src, int64_t lds, void* dst, int64_t ldd) {
  const auto* s = static_cast<const uint32_t*>(src);
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(s + i * lds);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + c], lane L: column 4L + c of rows i .. i + 3
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i v0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), v1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
    const __m512i w0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44);
    const __m512i w1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
    const __m512i out[4] = {_mm512_shuffle_i32x4(v0, w0, 0x88), _mm512_shuffle_i32x4(v0, w0, 0xDD),
                            _mm512_shuffle_i32x4(v1, w1, 0x88), _mm512_shuffle_i32x4(v1, w1, 0xDD)};
    for (int l = 0; l < 4; ++l) {
      const int64_t row = 4 * l + c;
      if constexpr (kStore == Store::kToBf16) {  // nearest even; subnormal floats become +-0
        const __m256bh h = _mm512_cvtneps_pbh(_mm512_castsi512_ps(out[l]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(dst) + row * ldd),
                            reinterpret_cast<const __m256i&>(h));
      } else if constexpr (kStore == Store::kSplitPairs) {
        uint16_t* d = static_cast<uint16_t*>(dst) + 2 * row * ldd;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), _mm512_cvtepi32_epi16(out[l]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + ldd), _mm512_cvtepi32_epi16(_mm512_srli_epi32(out[l], 16)));
      } else {
        _mm512_storeu_si512(static_cast<uint32_t*>(dst) + row * ldd, out[l]);
      }
    }
  }
}
#endif

// transpose32 entry by entry (kSplitPairs: the pairs' bfloat16 entries, each a row of dst).
template <Store kStore, typename S, typename T>
void transpose_entries(const S* src, int64_t rows, int64_t cols, int64_t lds, T* dst, int64_t ldd) {
  if constexpr (kStore == Store::kSplitPairs) {
    transpose_into(reinterpret_cast<const c10::BFloat16*>(src), rows, 2 * cols, 2 * lds, dst, ldd);
  } else {
    transpose_into(src, rows, cols, lds, dst, ldd);
  }
}

// dst[c * ldd + r] = src[r * lds + c] for 32-bit source entries (kSplitPairs: pairs of
// bfloat16, with c counting pairs and the destination's rows 2c and 2c + 1): 16 x 16 blocks
// in registers where the products run (so AVX512-BF16 is there), the edges one by one.
template <Store kStore, typename S, typename T>
void transpose32(const S* src, int64_t rows, int64_t cols, int64_t lds, T* dst, int64_t ldd) {
  static_assert(sizeof(S) == 4 && sizeof(T) == (kStore == Store::kWords ? 4 : 2));
#ifdef FASTLOSS_BF16_GEMM
  if (bf16_gemm_available()) {
    const int64_t full_rows = rows / 16 * 16, full_cols = cols / 16 * 16;
    const int64_t rows_per_col = kStore == Store::kSplitPairs ? 2 : 1;
    at::parallel_for(0, full_cols / 16, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b * 16; c < e * 16; c += 16)
        for (int64_t r = 0; r < full_rows; r += 16)
          transpose_block16<kStore>(src + r * lds + c, lds, dst + rows_per_col * c * ldd + r, ldd);
    });
    if (full_rows < rows)
      transpose_entries<kStore>(src + full_rows * lds, rows - full_rows, full_cols, lds, dst + full_rows, ldd);
    if (full_cols < cols)
      transpose_entries<kStore>(src + full_cols, rows, cols - full_cols, lds, dst + rows_per_col * full_cols * ldd,
                                ldd);
    return;
  }
#endif
  transpose_entries<kStore>(src, rows, cols, lds, dst, ldd);
}

}  // namespace

bool bf16_gemm_available() { return probed() == Probe::kAvailable; }

const char* bf16_gemm_path() {
  switch (probed()) {
    case Probe::kAvailable:
      return amx_enabled() ? "oneDNN brgemm (AMX-BF16)" : "oneDNN brgemm (AVX512-BF16)";
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
  transpose32<Store::kWords>(reinterpret_cast<const Bf16Pair*>(src), n, k / 2, ld / 2,
                             reinterpret_cast<Bf16Pair*>(dst), n);
}

void transpose_to_bf16(const float* src, int64_t rows, int64_t cols, int64_t lds, c10::BFloat16* dst, int64_t ldd) {
  transpose32<Store::kToBf16>(src, rows, cols, lds, dst, ldd);
}

void transpose_f32(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst, int64_t ldd) {
  transpose32<Store::kWords>(src, rows, cols, lds, dst, ldd);
}

void transpose_bf16(const c10::BFloat16* src, int64_t rows, int64_t cols, int64_t lds, c10::BFloat16* dst,
                    int64_t ldd) {
  TORCH_INTERNAL_ASSERT(cols % 2 == 0 && lds % 2 == 0, "transpose_bf16: needs an even width and stride");
  transpose32<Store::kSplitPairs>(reinterpret_cast<const Bf16Pair*>(src), rows, cols / 2, lds / 2, dst, ldd);
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
