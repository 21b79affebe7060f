// The part of CUDA's cooperative groups the kernels use, for the CPU emulator (emu.h).
#pragma once

namespace cooperative_groups {

struct grid_group {
  void sync() const { ::emu::sync_grid(); }
};

inline grid_group this_grid() { return {}; }

}  // namespace cooperative_groups
