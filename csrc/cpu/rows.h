// Splitting (outer, size, inner) rows over CPU threads, shared by the CPU kernels.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "common/torch_checks.h"

namespace fastloss::cpu {

// inner == 1: lastdim(begin_row, end_row) over contiguous rows. inner > 1: strided(o, j,
// count) for `count` (<= lanes) neighbouring columns j.. of outer index o, so that every
// load is contiguous across lanes. Work per task is at least ~32K elements so small
// problems stay on one thread.
template <typename LastDimFn, typename StridedFn>
void for_each_row_block(const RowLayout& l, LastDimFn&& lastdim, StridedFn&& strided, int lanes) {
  constexpr int64_t kMinElementsPerTask = 32768;
  if (l.inner == 1) {
    const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(1, l.size));
    at::parallel_for(0, l.outer, grain, [&](int64_t b, int64_t e) { lastdim(b, e); });
    return;
  }
  const int64_t blocks_per_outer = (l.inner + lanes - 1) / lanes;
  const int64_t tasks = l.outer * blocks_per_outer;
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(1, l.size * lanes));
  at::parallel_for(0, tasks, grain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t o = t / blocks_per_outer;
      const int64_t j = (t % blocks_per_outer) * lanes;
      strided(o, j, static_cast<int>(std::min<int64_t>(lanes, l.inner - j)));
    }
  });
}

}  // namespace fastloss::cpu
