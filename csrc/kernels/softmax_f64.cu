// The softmax launchers whose input (forward) or gradient input (backward) is float64.
#include "kernels/softmax_impl.cuh"

namespace fastloss::kernels::softmax_detail {
FASTLOSS_SOFTMAX_FORWARD(, double, double)
FASTLOSS_SOFTMAX_BACKWARD(, double, double)
}  // namespace fastloss::kernels::softmax_detail
