// bfloat16 <-> float conversions of convert.h, compiled once per instruction set.
#include "cpu/convert.h"

namespace fastloss::cpu {

FASTLOSS_CPU_CLONES void to_float(const c10::BFloat16* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = to_acc<float>(in[i]);
}

FASTLOSS_CPU_CLONES void from_float(const float* in, c10::BFloat16* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = to_output<c10::BFloat16>(in[i]);
}

}  // namespace fastloss::cpu
