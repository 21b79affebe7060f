// Storage-type conversions for the CPU kernels, written so the compiler vectorizes them.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/isa.h"

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

}  // namespace fastloss::cpu
