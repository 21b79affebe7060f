// The softmax launchers whose input (forward) or gradient input (backward) is float16.
#include "kernels/softmax_impl.cuh"

namespace fastloss::kernels::softmax_detail {
FASTLOSS_SOFTMAX_FORWARD(, __half, __half)
FASTLOSS_SOFTMAX_FORWARD(, __half, float)
FASTLOSS_SOFTMAX_BACKWARD(, __half, __half)
FASTLOSS_SOFTMAX_BACKWARD(, float, __half)
}  // namespace fastloss::kernels::softmax_detail
