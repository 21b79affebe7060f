// The softmax launchers whose input (forward) or gradient input (backward) is float32.
#include "kernels/softmax_impl.cuh"

namespace fastloss::kernels::softmax_detail {
FASTLOSS_SOFTMAX_FORWARD(, float, float)
FASTLOSS_SOFTMAX_BACKWARD(, float, float)
}  // namespace fastloss::kernels::softmax_detail
