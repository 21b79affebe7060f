// Element types understood by the torch-free CUDA launchers (the glue maps torch dtypes here).
#pragma once

namespace fastloss::kernels {

enum class DType : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

}  // namespace fastloss::kernels
