// The softmax launchers whose input (forward) or gradient input (backward) is bfloat16.
#include "kernels/softmax_impl.cuh"

namespace fastloss::kernels::softmax_detail {
FASTLOSS_SOFTMAX_FORWARD(, __nv_bfloat16, __nv_bfloat16)
FASTLOSS_SOFTMAX_FORWARD(, __nv_bfloat16, float)
FASTLOSS_SOFTMAX_BACKWARD(, __nv_bfloat16, __nv_bfloat16)
FASTLOSS_SOFTMAX_BACKWARD(, float, __nv_bfloat16)
}  // namespace fastloss::kernels::softmax_detail
