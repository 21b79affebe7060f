// Storage-type conversions for the CPU kernels, written so the compiler vectorizes them.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu/isa.h"

#if defined(FASTLOSS_X86_CLONES)
#include <immintrin.h>
#endif

namespace fastloss::cpu {

// Conversion to the output type. bfloat16 rounds to nearest even by integer arithmetic the
// compiler can vectorize (c10's conversion branches on NaN per element).
template <typename out_t, typename acc_t>
FASTLOSS_CPU_INLINE out_t to_output(acc_t v) {
  if constexpr (std::is_same_v<out_t, c10::BFloat16>) {
    static_assert(std::is_same_v<acc_t, float>, "bfloat16 is written from float");
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const uint16_t out = v != v ? uint16_t(0x7fc0) : static_cast<uint16_t>(rounded);
    return c10::BFloat16(out, c10::BFloat16::from_bits());
  } else {
    return static_cast<out_t>(v);
  }
}

// Conversion from the storage type. bfloat16 is the high half of a float: a shift the
// compiler vectorizes.
template <typename acc_t, typename in_t>
FASTLOSS_CPU_INLINE acc_t to_acc(in_t v) {
  if constexpr (std::is_same_v<in_t, c10::BFloat16>) {
    const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return static_cast<acc_t>(f);
  } else {
    return static_cast<acc_t>(v);
  }
}

#if defined(FASTLOSS_X86_CLONES)
// Up to 16 entries in AVX-512 registers (mask: the first ones), to float and back: float16 by
// the conversion instructions (round to nearest even), bfloat16 as the high half of a float,
// rounded as to_output rounds it.
namespace avx512 {
FASTLOSS_AVX512_INLINE __m256i load16_bits(const void* p, __mmask16 mask) {
  return mask == 0xffff ? _mm256_loadu_si256(static_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi16(mask, p);
}
FASTLOSS_AVX512_INLINE void store16_bits(void* p, __m256i bits, __mmask16 mask) {
  if (mask == 0xffff) _mm256_storeu_si256(static_cast<__m256i*>(p), bits);
  else _mm256_mask_storeu_epi16(p, mask, bits);
}
FASTLOSS_AVX512_INLINE __m512 load16(const c10::Half* p, __mmask16 mask = 0xffff) {
  return _mm512_cvtph_ps(load16_bits(p, mask));
}
FASTLOSS_AVX512_INLINE __m512 load16(const c10::BFloat16* p, __mmask16 mask = 0xffff) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(load16_bits(p, mask)), 16));
}
FASTLOSS_AVX512_INLINE void store16(c10::Half* p, __m512 v, __mmask16 mask = 0xffff) {
  store16_bits(p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), mask);
}
FASTLOSS_AVX512_INLINE void store16(c10::BFloat16* p, __m512 v, __mmask16 mask = 0xffff) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  store16_bits(p, _mm512_cvtepi32_epi16(rounded), mask);
}
// float itself, so that kernels templated on these types also take float rows.
FASTLOSS_AVX512_INLINE __m512 load16(const float* p, __mmask16 mask = 0xffff) {
  return mask == 0xffff ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(mask, p);
}
FASTLOSS_AVX512_INLINE void store16(float* p, __m512 v, __mmask16 mask = 0xffff) {
  if (mask == 0xffff) _mm512_storeu_ps(p, v);
  else _mm512_mask_storeu_ps(p, mask, v);
}
FASTLOSS_AVX512_INLINE __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << count) - 1);
}
}  // namespace avx512

// 8 float16 (F16C, round to nearest even), bfloat16 or float entries <-> floats in an AVX2
// register.
namespace avx2 {
FASTLOSS_AVX2_INLINE __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
FASTLOSS_AVX2_INLINE void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// The first `count` (< 8) 16-bit entries, the rest zeros. Loaded in registers: pairs by a
// masked 32-bit load, an odd last entry blended in. (Copied entry by entry into a vector on
// the stack, they were read back as one 128-bit load that the store buffer cannot forward:
// float16 backward rows of 100, AVX2 build, 463 -> 205 us.)
FASTLOSS_AVX2_INLINE __m128i load_first_bits8(const void* p, int64_t count) {
  const __m128i lane = _mm_setr_epi32(0, 1, 2, 3);
  __m128i bits = _mm_maskload_epi32(static_cast<const int*>(p), _mm_cmpgt_epi32(_mm_set1_epi32(int(count / 2)), lane));
  if (count & 1) {
    uint16_t last;
    std::memcpy(&last, static_cast<const uint16_t*>(p) + count - 1, sizeof(last));
    const __m128i at_last = _mm_cmpeq_epi16(_mm_set1_epi16(short(count - 1)), _mm_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7));
    bits = _mm_blendv_epi8(bits, _mm_set1_epi16(short(last)), at_last);
  }
  return bits;
}
FASTLOSS_AVX2_INLINE __m256 load8_first(const c10::Half* p, int64_t count) {
  return _mm256_cvtph_ps(load_first_bits8(p, count));
}
// Stores the first `count` (< 8) 16-bit entries of bits: through a vector on the stack, copied
// entry by entry (narrower loads of one wide store forward; a memcpy of a run-time size is a
// library call, which took as long as the rest of a float16 backward row of 300: AVX2 build,
// 2 threads, against torch, 0.88x -> 1.30x).
FASTLOSS_AVX2_INLINE void store_first_bits8(void* p, __m128i bits, int64_t count) {
  uint16_t part[8];
  _mm_storeu_si128(reinterpret_cast<__m128i*>(part), bits);
  _Pragma("GCC unroll 8") for (int k = 0; k < 8; ++k) {
    if (k < count) std::memcpy(static_cast<uint16_t*>(p) + k, &part[k], sizeof(uint16_t));
  }
}
FASTLOSS_AVX2_INLINE void store8_first(c10::Half* p, __m256 v, int64_t count) {
  store_first_bits8(p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), count);
}
// bfloat16 as the high half of a float, rounded as to_output rounds it.
FASTLOSS_AVX2_INLINE __m256 bf16_bits_to_float(__m128i bits) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
FASTLOSS_AVX2_INLINE __m128i float_to_bf16_bits(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  // Each 32-bit value is below 2^16: the unsigned saturating pack is exact.
  return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
}
FASTLOSS_AVX2_INLINE __m256 load8(const c10::BFloat16* p) {
  return bf16_bits_to_float(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
FASTLOSS_AVX2_INLINE void store8(c10::BFloat16* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), float_to_bf16_bits(v));
}
FASTLOSS_AVX2_INLINE __m256 load8_first(const c10::BFloat16* p, int64_t count) {
  return bf16_bits_to_float(load_first_bits8(p, count));
}
FASTLOSS_AVX2_INLINE void store8_first(c10::BFloat16* p, __m256 v, int64_t count) {
  store_first_bits8(p, float_to_bf16_bits(v), count);
}
// float itself, so that kernels templated on these types also take float rows.
FASTLOSS_AVX2_INLINE __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
FASTLOSS_AVX2_INLINE void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
FASTLOSS_AVX2_INLINE __m256i first_lanes_mask8(int64_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
FASTLOSS_AVX2_INLINE __m256 load8_first(const float* p, int64_t count) {
  return _mm256_maskload_ps(p, first_lanes_mask8(count));
}
FASTLOSS_AVX2_INLINE void store8_first(float* p, __m256 v, int64_t count) {
  _mm256_maskstore_ps(p, first_lanes_mask8(count), v);
}
}  // namespace avx2
#endif

// Bulk float16 <-> float conversion with the hardware instructions (AVX-512 or F16C), chosen
// at run time. GCC 12 does not vectorize element-wise float16 conversions (c10's software
// conversion vectorizes to ~30 instructions per 16 elements; _Float16 casts become one scalar
// vcvtph2ps each), so kernels over float16 rows convert a block of rows to float with these,
// run their float kernel, and convert the result back. Both round to nearest even, like
// c10::Half(float), so the result is the same to the bit (NaN payloads aside).
namespace half_detail {
#if defined(FASTLOSS_X86_CLONES)
// All n entries: the last n % 16 (n % 8) masked (through a stack vector), where c10's software
// conversion took ~20 (to float) and ~30 (to float16) instructions per entry (a row of 127
// float16 entries: 15 of them, a third of the row's conversion time).
__attribute__((target("arch=x86-64-v4"))) inline void to_float_avx512(const c10::Half* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, avx512::load16(in + i));
  if (i < n) {
    const __mmask16 m = avx512::first_lanes(n - i);
    _mm512_mask_storeu_ps(out + i, m, avx512::load16(in + i, m));
  }
}
__attribute__((target("arch=x86-64-v4"))) inline void from_float_avx512(const float* in, c10::Half* out, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) avx512::store16(out + i, _mm512_loadu_ps(in + i));
  if (i < n) {
    const __mmask16 m = avx512::first_lanes(n - i);
    avx512::store16(out + i, _mm512_maskz_loadu_ps(m, in + i), m);
  }
}
// 8 entries at a time, the last n % 8 through a stack vector.
__attribute__((target("arch=x86-64-v3"))) inline void to_float_f16c(const c10::Half* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, avx2::load8(in + i));
  if (i < n) {
    float values[8];
    _mm256_storeu_ps(values, avx2::load8_first(in + i, n - i));
    _Pragma("GCC unroll 8") for (int k = 0; k < 8; ++k) {
      if (k < n - i) out[i + k] = values[k];
    }
  }
}
__attribute__((target("arch=x86-64-v3"))) inline void from_float_f16c(const float* in, c10::Half* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) avx2::store8(out + i, _mm256_loadu_ps(in + i));
  if (i < n) {
    float values[8] = {};
    _Pragma("GCC unroll 8") for (int k = 0; k < 8; ++k) {
      if (k < n - i) values[k] = in[i + k];
    }
    avx2::store8_first(out + i, _mm256_loadu_ps(values), n - i);
  }
}
#endif

// 2: AVX-512, 1: F16C, 0: scalar.
inline int isa_level() {
  static const int level = has_avx512() ? 2 : has_avx2() ? 1 : 0;
  return level;
}
}  // namespace half_detail

inline void to_float(const c10::Half* in, float* out, int64_t n) {
#if defined(FASTLOSS_X86_CLONES)
  const int level = half_detail::isa_level();
  if (level == 2) return half_detail::to_float_avx512(in, out, n);
  if (level == 1) return half_detail::to_float_f16c(in, out, n);
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(in[i]);
}

inline void from_float(const float* in, c10::Half* out, int64_t n) {
#if defined(FASTLOSS_X86_CLONES)
  const int level = half_detail::isa_level();
  if (level == 2) return half_detail::from_float_avx512(in, out, n);
  if (level == 1) return half_detail::from_float_f16c(in, out, n);
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = c10::Half(in[i]);
}

// A per-thread float buffer of at least `count` elements (which: one of 5 per thread), kept
// between calls (at most 5 x 128 KiB per thread): a fresh allocation of this size would be
// fresh pages (faults) each call.
inline float* stage_buffer(int which, int64_t count) {
  thread_local std::vector<float> buffers[5];
  std::vector<float>& b = buffers[which];
  if (static_cast<int64_t>(b.size()) < count) b.resize(static_cast<size_t>(count));
  return b.data();
}

// bfloat16 <-> float (convert.cpp, compiled per instruction set): a shift, and rounding to
// nearest even as in to_output.
void to_float(const c10::BFloat16* in, float* out, int64_t n);
void from_float(const float* in, c10::BFloat16* out, int64_t n);

// float16 or bfloat16 rows staged through float: blocks of rows of about kStageBytes float
// bytes per buffer (in L1), one row per block beyond kStageBytes. The thread's buffers are
// kept for rows of up to kMaxStagedRow elements (up to 128 KiB per buffer, in L2); a longer
// row gets buffers for the call alone, so that no thread keeps megabytes.
constexpr int64_t kStageBytes = int64_t(8) << 10;
constexpr int64_t kMaxStagedRow = 32768;
inline int64_t staged_rows(int64_t n) { return std::max<int64_t>(1, kStageBytes / (n * int64_t(sizeof(float)))); }

// Runs a float kernel over rows [begin, end) of n entries of type T (float16 or bfloat16),
// block by block: the rows of each `in` converted to float, kernel(first_row, rows, float_in,
// float_out), the rows of each `out` converted back from float_out.
template <typename T, size_t I, size_t O, typename Kernel>
void staged_float_rows(int64_t begin, int64_t end, int64_t n, const std::array<const T*, I>& in,
                       const std::array<T*, O>& out, Kernel&& kernel) {
  static_assert(I + O <= 5, "stage_buffer holds 5 buffers per thread");
  const int64_t step = staged_rows(n), most = std::min(step, end - begin) * n;
  std::unique_ptr<float[]> call_buffers;
  if (n > kMaxStagedRow) call_buffers.reset(new float[(I + O) * static_cast<size_t>(n)]);
  const auto buffer = [&](size_t which) {
    return call_buffers ? call_buffers.get() + which * n : stage_buffer(static_cast<int>(which), most);
  };
  std::array<float*, I> fin{};
  std::array<float*, O> fout{};
  for (size_t i = 0; i < I; ++i) fin[i] = buffer(i);
  for (size_t o = 0; o < O; ++o) fout[o] = buffer(I + o);
  for (int64_t r = begin; r < end; r += step) {
    const int64_t rows = std::min(step, end - r), count = rows * n;
    for (size_t i = 0; i < I; ++i) to_float(in[i] + r * n, fin[i], count);
    kernel(r, rows, fin, fout);
    for (size_t o = 0; o < O; ++o) from_float(fout[o], out[o] + r * n, count);
  }
}

}  // namespace fastloss::cpu
