// The emulator's scheduler, shared memory, tensor-core primitives and the CUDA runtime calls
// the launchers make (see emu.h). Single-threaded: every fiber runs on the calling thread.
#include "emu.h"

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <unordered_map>
#include <vector>

namespace emu {
namespace {

constexpr int kMaxDevices = 64;
// Shared memory per block with the opt-in, and per multiprocessor: sm_90 (H100) or sm_80 (A100).
constexpr size_t kSmemOptin = __CUDA_ARCH__ >= 900 ? 232448 : 166912;
constexpr size_t kSmemPerSm = __CUDA_ARCH__ >= 900 ? 233472 : 167936;
constexpr size_t kDefaultDynamicSmem = 49152;  // without cudaFuncSetAttribute
constexpr int kMaxThreadsPerSm = 2048;

size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}

// Memory whose end abuts an inaccessible page: a read or write past it faults at once.
struct Guarded {
  void* map = nullptr;
  size_t map_bytes = 0;
  unsigned char* data = nullptr;

  void allocate(size_t bytes) {
    const size_t page = page_size();
    const size_t body = (bytes + page - 1) / page * page;
    map_bytes = body + page;
    map = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (map == MAP_FAILED) {
      std::perror("emu: mmap");
      std::abort();
    }
    mprotect(static_cast<unsigned char*>(map) + body, page, PROT_NONE);
    data = static_cast<unsigned char*>(map) + body - ((bytes + 15) / 16 * 16);
    std::memset(map, 0xff, body);  // below the data too: a negative index reads the fill
  }
  void release() {
    if (map != nullptr) munmap(map, map_bytes);
    map = nullptr;
  }
};

struct Copy {
  void* dst;
  const void* src;
  int bytes;
  bool done;
};

struct Block;

enum class Wait { None, Block, Warp, Grid };

struct Fiber {
  Thread t;
  int linear = 0;
  Block* block = nullptr;
  ucontext_t ctx;
  void* stack_map = nullptr;
  bool done = false;
  bool waiting = false;
  Wait wait = Wait::None;
  unsigned mask = 0;
  int pred = 0;
  int kind = 0;   // the warp collective waited at (emu.h's Collective)
  int bytes = 0;  // and the bytes each lane gives it
  std::vector<std::vector<Copy>> cp_groups;  // committed, oldest first
  std::vector<Copy> cp_open;
};

struct Block {
  std::vector<Fiber*> fibers;
  Guarded dynamic;
  size_t dynamic_bytes = 0;
  size_t static_bytes = 0;
  std::unordered_map<const void*, Guarded> statics;
  int or_result = 0;
  std::vector<unsigned char> slots;  // [warp][parity][lane][16]
  std::vector<uint64_t> warp_releases;  // per warp: collectives completed (the slots' parity)
};

struct Launch {
  const char* name = "";
  size_t smem_limit = 0;  // static + dynamic shared memory per block
  std::function<void()>* body = nullptr;
  bool failed = false;
  std::string error;
};

ucontext_t g_scheduler;
Fiber* g_current = nullptr;
Launch* g_launch = nullptr;
cudaError_t g_last_error = cudaSuccess;
int g_device = 0;
int g_sms[kMaxDevices];
bool g_reverse = false;
size_t g_stack_bytes = size_t(128) << 10;
std::vector<void*> g_stacks;  // mapped stacks, reused across launches
std::unordered_map<const void*, int> g_max_dynamic_smem;
// ldmatrix instructions, and those with a shared-memory bank conflict (two distinct 32-bit words
// of one 8x8 matrix in one of the 32 banks): the layouts are meant to have none.
uint64_t g_ldmatrix_ops = 0, g_ldmatrix_conflicts = 0;

void fail(const std::string& what) {
  if (g_launch != nullptr && !g_launch->failed) {
    g_launch->failed = true;
    g_launch->error = what;
  }
}

std::string where(const Fiber* f) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", f->t.block_idx.x, f->t.block_idx.y,
                f->t.block_idx.z, f->t.thread_idx.x, f->t.thread_idx.y, f->t.thread_idx.z);
  return buf;
}

void wait(Wait kind, unsigned mask) {
  Fiber* f = g_current;
  f->waiting = true;
  f->wait = kind;
  f->mask = mask;
  swapcontext(&f->ctx, &g_scheduler);
}

void fiber_entry(unsigned hi, unsigned lo) {
  Fiber* f = reinterpret_cast<Fiber*>((static_cast<uintptr_t>(hi) << 32) | lo);
  (*g_launch->body)();
  if (!f->cp_open.empty() || !f->cp_groups.empty()) {
    fail(std::string("thread ended with cp.async copies never waited for at ") + where(f));
  }
  f->done = true;
  swapcontext(&f->ctx, &g_scheduler);
}

void* take_stack(size_t index) {
  while (g_stacks.size() <= index) {
    const size_t page = page_size();
    void* m = mmap(nullptr, g_stack_bytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (m == MAP_FAILED) {
      std::perror("emu: stack mmap");
      std::abort();
    }
    mprotect(m, page, PROT_NONE);  // a stack overflow faults instead of corrupting memory
    g_stacks.push_back(m);
  }
  return g_stacks[index];
}

// The crash report for a fault inside a kernel (out-of-bounds access, stack overflow): the
// kernel and the thread, then the previous handler (Python's faulthandler) runs.
struct sigaction g_previous_segv;
std::vector<char> g_alt_stack;

void on_segv(int sig, siginfo_t* info, void*) {
  char msg[512];
  int n = 0;
  if (g_launch != nullptr && g_current != nullptr) {
    n = std::snprintf(msg, sizeof msg, "\nemu: memory fault in kernel %s at %p, %s\n", g_launch->name, info->si_addr,
                      where(g_current).c_str());
  } else {
    n = std::snprintf(msg, sizeof msg, "\nemu: memory fault at %p outside a kernel\n", info->si_addr);
  }
  if (n > 0) (void)!write(2, msg, static_cast<size_t>(std::min<int>(n, sizeof msg)));
  sigaction(sig, &g_previous_segv, nullptr);
}

void install_fault_report() {
  static bool installed = false;
  if (installed) return;
  installed = true;
  g_alt_stack.resize(size_t(64) << 10);
  stack_t ss{};
  ss.ss_sp = g_alt_stack.data();
  ss.ss_size = g_alt_stack.size();
  sigaltstack(&ss, nullptr);
  struct sigaction sa {};
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_previous_segv);
}

// Warp w's collective, if every lane of its mask has arrived: 1 released, 0 not (yet), -1 a
// failure (recorded).
int release_warp(Block* b, size_t w0) {
  const size_t threads = b->fibers.size();
  Fiber* first = nullptr;
  for (size_t l = w0; l < std::min(threads, w0 + 32); ++l) {
    Fiber* f = b->fibers[l];
    if (!f->done && f->waiting && f->wait == Wait::Warp) {
      first = f;
      break;
    }
  }
  if (first == nullptr) return 0;
  for (int l = 0; l < 32; ++l) {
    if (!(first->mask >> l & 1u)) continue;
    if (w0 + l >= threads) {
      fail("warp collective whose mask names lanes past the block's threads at " + where(first));
      return -1;
    }
    Fiber* f = b->fibers[w0 + l];
    if (f->done) {
      fail("warp collective whose mask names an exited lane at " + where(first));
      return -1;
    }
    if (!f->waiting || f->wait != Wait::Warp) return 0;
    if (f->mask != first->mask || f->kind != first->kind || f->bytes != first->bytes) {
      fail("lanes of one mask at different warp collectives (masks, intrinsics or sizes differ) at " + where(first));
      return -1;
    }
  }
  for (int l = 0; l < 32; ++l) {
    if (first->mask >> l & 1u) b->fibers[w0 + l]->waiting = false;
  }
  ++b->warp_releases[w0 / 32];
  return 1;
}

template <typename T>
std::vector<T> in_order(std::vector<T> v) {
  if (g_reverse) std::reverse(v.begin(), v.end());
  return v;
}

// Runs one warp until each of its live lanes waits at a block or grid barrier (or at a warp
// collective that cannot complete): a warp collective releases as soon as its lanes arrive, so
// the other warps do not move in between (a missing barrier between warps shows up as a
// difference between the thread orders).
bool run_warp(Block* b, size_t w0) {
  std::vector<Fiber*> lanes(b->fibers.begin() + w0, b->fibers.begin() + std::min(b->fibers.size(), w0 + 32));
  lanes = in_order(lanes);
  while (true) {
    for (Fiber* f : lanes) {
      if (f->done || f->waiting) continue;
      g_current = f;
      swapcontext(&g_scheduler, &f->ctx);
      g_current = nullptr;
      if (g_launch->failed) return false;
    }
    const int r = release_warp(b, w0);
    if (r < 0) return false;
    if (r == 0) return true;
  }
}

std::string deadlock_report(const Block* b) {
  size_t counts[4] = {0, 0, 0, 0};
  const Fiber* example[4] = {nullptr, nullptr, nullptr, nullptr};
  for (const Fiber* f : b->fibers) {
    if (f->done || !f->waiting) continue;
    const int k = static_cast<int>(f->wait);
    ++counts[k];
    if (example[k] == nullptr) example[k] = f;
  }
  std::string s = "deadlock: threads wait at different barriers (";
  s += std::to_string(counts[1]) + " at __syncthreads, " + std::to_string(counts[2]) + " at warp collectives, " +
       std::to_string(counts[3]) + " at grid sync)";
  for (int k = 1; k < 4; ++k) {
    if (example[k] != nullptr) s += "; e.g. " + where(example[k]);
  }
  return s;
}

// Runs one block, warp after warp, releasing its __syncthreads, until every live thread waits
// at a grid sync or has returned.
bool run_block(Block* b) {
  std::vector<size_t> warps;
  for (size_t w0 = 0; w0 < b->fibers.size(); w0 += 32) warps.push_back(w0);
  warps = in_order(warps);
  while (true) {
    for (size_t w0 : warps) {
      if (!run_warp(b, w0)) return false;
    }
    size_t live = 0, at_block = 0, at_grid = 0;
    int any = 0;
    for (const Fiber* f : b->fibers) {
      if (f->done) continue;
      ++live;
      if (f->waiting && f->wait == Wait::Block) {
        ++at_block;
        any |= f->pred;
      }
      at_grid += f->waiting && f->wait == Wait::Grid;
    }
    if (live == 0 || at_grid == live) return true;
    if (at_block == live) {
      b->or_result = any;
      for (Fiber* f : b->fibers) f->waiting = false;
      continue;
    }
    fail(deadlock_report(b));
    return false;
  }
}

// Runs the given blocks' threads to completion (or to a failure). A cooperative grid runs
// block after block up to each grid sync.
void run(std::vector<Block*>& blocks, bool cooperative) {
  size_t index = 0;
  for (Block* b : blocks) {
    for (Fiber* f : b->fibers) {
      void* stack = take_stack(index++);
      getcontext(&f->ctx);
      f->ctx.uc_stack.ss_sp = static_cast<unsigned char*>(stack) + page_size();
      f->ctx.uc_stack.ss_size = g_stack_bytes;
      f->ctx.uc_link = nullptr;
      const auto p = reinterpret_cast<uintptr_t>(f);
      makecontext(&f->ctx, reinterpret_cast<void (*)()>(fiber_entry), 2, static_cast<unsigned>(p >> 32),
                  static_cast<unsigned>(p & 0xffffffffu));
    }
  }
  const std::vector<Block*> order = in_order(blocks);
  while (true) {
    for (Block* b : order) {
      if (!run_block(b)) return;
    }
    size_t live = 0;
    for (const Block* b : blocks) {
      for (const Fiber* f : b->fibers) live += !f->done;
    }
    if (live == 0) return;
    if (!cooperative) {
      fail("grid sync outside a cooperative launch");
      return;
    }
    // Cooperative groups' grid sync waits for thread 0 of every block of the grid.
    for (const Block* b : blocks) {
      if (b->fibers[0]->done) {
        fail("grid sync after thread 0 of a block returned (a GPU waits for it forever), " + where(b->fibers[0]));
        return;
      }
    }
    for (Block* b : blocks) {
      for (Fiber* f : b->fibers) f->waiting = false;
    }
  }
}

Block* make_block(dim3 block_idx, dim3 grid, dim3 block, size_t smem) {
  Block* b = new Block;
  const unsigned threads = block.x * block.y * block.z;
  b->dynamic_bytes = smem;
  if (smem > 0) b->dynamic.allocate(smem);
  b->slots.assign(size_t((threads + 31) / 32) * 2 * 32 * 16, 0xff);
  b->warp_releases.assign((threads + 31) / 32, 0);
  for (unsigned i = 0; i < threads; ++i) {
    Fiber* f = new Fiber;
    f->linear = static_cast<int>(i);
    f->block = b;
    f->t.thread_idx = make_uint3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
    f->t.block_idx = make_uint3(block_idx.x, block_idx.y, block_idx.z);
    f->t.block_dim = block;
    f->t.grid_dim = grid;
    b->fibers.push_back(f);
  }
  return b;
}

void free_block(Block* b) {
  for (Fiber* f : b->fibers) delete f;
  for (auto& kv : b->statics) kv.second.release();
  b->dynamic.release();
  delete b;
}

void run_copy(Copy& c) {
  if (c.done) return;
  std::memset(c.dst, 0, 16);
  if (c.bytes > 0) std::memcpy(c.dst, c.src, static_cast<size_t>(c.bytes));
  c.done = true;
}

float half_bits_to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    const uint32_t w = static_cast<uint32_t>(bits) << 16;
    float r;
    std::memcpy(&r, &w, sizeof r);
    return r;
  }
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

}  // namespace

Thread* current() { return &g_current->t; }

int warp_lane() { return g_current->linear % 32; }

void sync_block() {
  g_current->pred = 0;
  wait(Wait::Block, 0);
}

int sync_block_or(int predicate) {
  g_current->pred = predicate != 0;
  wait(Wait::Block, 0);
  return g_current->block->or_result;
}

void sync_grid() { wait(Wait::Grid, 0); }

void sync_warp(unsigned mask) { warp_collect(mask, nullptr, 0, kSyncWarp); }

const unsigned char* warp_collect(unsigned mask, const void* mine, int bytes, int kind) {
  Fiber* f = g_current;
  Block* b = f->block;
  const int warp = f->linear / 32, lane = f->linear % 32;
  if (!(mask >> lane & 1u)) trap("warp collective whose mask leaves out the calling lane");
  // Every lane of one collective deposits before it completes, so all see the same count; the
  // other buffer serves the next collective while lanes may still read this one.
  const int parity = static_cast<int>(b->warp_releases[warp] & 1u);
  unsigned char* base = b->slots.data() + (size_t(warp) * 2 + parity) * 32 * 16;
  if (bytes > 0) std::memcpy(base + 16 * lane, mine, static_cast<size_t>(bytes));
  f->kind = kind;
  f->bytes = bytes;
  wait(Wait::Warp, mask);
  return base;
}

void* dynamic_smem() {
  Block* b = g_current->block;
  // A kernel that declares dynamic shared memory but was launched without any gets a
  // pointer to the guard page: any use faults.
  if (b->dynamic_bytes == 0) {
    static Guarded none;
    if (none.map == nullptr) none.allocate(0);
    return none.data;
  }
  return b->dynamic.data;
}

void* block_static(const void* key, size_t bytes, size_t align) {
  Block* b = g_current->block;
  auto it = b->statics.find(key);
  if (it != b->statics.end()) return it->second.data;
  // Its own guarded mapping, so an index past the end of a static array faults.
  Guarded& g = b->statics[key];
  g.allocate(bytes);
  if (reinterpret_cast<uintptr_t>(g.data) % align != 0) trap("static shared variable alignment above 16");
  b->static_bytes += (bytes + 15) / 16 * 16;
  if (b->static_bytes + b->dynamic_bytes > g_launch->smem_limit) {
    fail("static + dynamic shared memory over the kernel's limit (48 KB without the opt-in) in " +
         std::string(g_launch->name));
  }
  return g.data;
}

[[noreturn]] void trap(const char* what) {
  Fiber* f = g_current;
  fail(std::string(what) + " at " + where(f));
  f->done = true;
  swapcontext(&f->ctx, &g_scheduler);
  std::abort();  // never resumed
}

cudaError_t launch(const void* fn, const char* name, dim3 grid, dim3 block, size_t smem, bool cooperative,
                   std::function<void()> body) {
  install_fault_report();
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  auto bad = [&](cudaError_t e, const char* why) {
    std::fprintf(stderr, "emu: launch of %s refused: %s\n", name, why);
    g_last_error = e;
    return e;
  };
  if (threads == 0 || threads > 1024 || block.z > 64 || blocks == 0 || grid.x > 2147483647u || grid.y > 65535 ||
      grid.z > 65535) {
    return bad(cudaErrorInvalidConfiguration, "grid or block dimensions out of range");
  }
  auto limit = g_max_dynamic_smem.find(fn);
  const size_t max_dynamic = limit == g_max_dynamic_smem.end() ? kDefaultDynamicSmem : size_t(limit->second);
  if (smem > max_dynamic) return bad(cudaErrorInvalidValue, "dynamic shared memory above the kernel's limit");
  constexpr uint64_t kMaxFibers = 16384;  // each has its own mapped stack (and guard page)
  if (cooperative && blocks * threads > kMaxFibers) {
    return bad(cudaErrorNotSupported, "cooperative grid too large to emulate (more than 16384 threads)");
  }
  if (cooperative) {
    int per_sm = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, static_cast<int>(threads), smem);
    if (blocks > uint64_t(per_sm) * g_sms[g_device]) {
      return bad(cudaErrorCooperativeLaunchTooLarge, "cooperative grid larger than the resident blocks");
    }
  }
  const char* order = std::getenv("FASTLOSS_EMU_ORDER");
  g_reverse = order != nullptr && std::strcmp(order, "reverse") == 0;
  const char* trace = std::getenv("FASTLOSS_EMU_TRACE");
  if (trace != nullptr && std::strcmp(trace, "1") == 0) {
    std::fprintf(stderr, "emu: %s<<<(%u,%u,%u), (%u,%u,%u), %zu>>>%s\n", name, grid.x, grid.y, grid.z, block.x, block.y,
                 block.z, smem, cooperative ? " cooperative" : "");
  }
  Launch l;
  l.name = name;
  l.smem_limit = max_dynamic > kDefaultDynamicSmem ? kSmemOptin : kDefaultDynamicSmem;
  l.body = &body;
  g_launch = &l;
  std::vector<dim3> ids;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) ids.push_back(dim3(x, y, z));
    }
  }
  if (cooperative) {
    std::vector<Block*> all;
    for (const dim3& id : ids) all.push_back(make_block(id, grid, block, smem));
    run(all, true);
    for (Block* b : all) free_block(b);
  } else {
    for (const dim3& id : in_order(ids)) {
      std::vector<Block*> one{make_block(id, grid, block, smem)};
      run(one, false);
      free_block(one[0]);
      if (l.failed) break;
    }
  }
  g_launch = nullptr;
  if (l.failed) {
    std::fprintf(stderr, "emu: kernel %s failed: %s\n", name, l.error.c_str());
    g_last_error = cudaErrorLaunchFailure;
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

void cp_async16(void* smem, const void* gmem, int src_bytes) {
  if (reinterpret_cast<uintptr_t>(smem) % 16 != 0 || reinterpret_cast<uintptr_t>(gmem) % 16 != 0) {
    trap("cp.async with an address not 16-byte aligned");
  }
  if (src_bytes < 0 || src_bytes > 16) trap("cp.async with src_bytes outside [0, 16]");
  // Forward order: the copy lands at the wait that retires it (a read before the wait sees
  // the fill); reverse order: at once (a write to its destination before the wait, or a read
  // of the source after the issue that should not see it, differs between the orders).
  g_current->cp_open.push_back(Copy{smem, gmem, src_bytes, false});
  if (g_reverse) run_copy(g_current->cp_open.back());
}

void cp_async_commit() {
  Fiber* f = g_current;
  f->cp_groups.push_back(std::move(f->cp_open));
  f->cp_open.clear();
}

void cp_async_wait(int pending) {
  Fiber* f = g_current;
  while (static_cast<int>(f->cp_groups.size()) > pending) {
    for (Copy& c : f->cp_groups.front()) run_copy(c);
    f->cp_groups.erase(f->cp_groups.begin());
  }
}

void ldmatrix_x4(uint32_t (&r)[4], const void* smem, bool trans) {
  if (reinterpret_cast<uintptr_t>(smem) % 16 != 0) trap("ldmatrix row address not 16-byte aligned");
  const unsigned char* all = warp_collect(0xffffffffu, &smem, sizeof smem, kLdmatrix);
  const int lane = warp_lane();
  if (lane == 0) {
    // Banks relative to the block's dynamic shared memory (on a GPU its base is 128-byte aligned).
    const auto base = reinterpret_cast<uintptr_t>(g_current->block->dynamic.data);
    bool conflict = false;
    for (int j = 0; j < 4; ++j) {
      uintptr_t words[32];
      for (int r = 0; r < 8; ++r) {
        uintptr_t row;
        std::memcpy(&row, all + 16 * (8 * j + r), sizeof row);
        for (int w = 0; w < 4; ++w) words[4 * r + w] = (row - base) / 4 + w;
      }
      for (int a = 0; a < 32 && !conflict; ++a) {
        for (int b = a + 1; b < 32; ++b) {
          if (words[a] != words[b] && words[a] % 32 == words[b] % 32) conflict = true;
        }
      }
    }
    ++g_ldmatrix_ops;
    g_ldmatrix_conflicts += conflict;
  }
  for (int j = 0; j < 4; ++j) {
    uint16_t v[2];
    for (int h = 0; h < 2; ++h) {
      // Without .trans: row lane/4, column 2 (lane%4) + h of matrix j; with: the transpose.
      const int row = trans ? 2 * (lane % 4) + h : lane / 4;
      const int col = trans ? lane / 4 : 2 * (lane % 4) + h;
      const unsigned char* row_ptr;
      std::memcpy(&row_ptr, all + 16 * (8 * j + row), sizeof row_ptr);
      std::memcpy(&v[h], row_ptr + 2 * col, 2);
    }
    r[j] = uint32_t(v[0]) | (uint32_t(v[1]) << 16);
  }
}

void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16) {
  const unsigned char* all_a = warp_collect(0xffffffffu, a, 16, kMmaA);
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    uint32_t r[4];
    std::memcpy(r, all_a + 16 * l, 16);
    const int g = l / 4, q = l % 4;
    for (int h = 0; h < 2; ++h) {
      A[g][2 * q + h] = half_bits_to_float(uint16_t(r[0] >> (16 * h)), bf16);
      A[g + 8][2 * q + h] = half_bits_to_float(uint16_t(r[1] >> (16 * h)), bf16);
      A[g][2 * q + 8 + h] = half_bits_to_float(uint16_t(r[2] >> (16 * h)), bf16);
      A[g + 8][2 * q + 8 + h] = half_bits_to_float(uint16_t(r[3] >> (16 * h)), bf16);
    }
  }
  const unsigned char* all_b = warp_collect(0xffffffffu, b, 8, kMmaB);
  for (int l = 0; l < 32; ++l) {
    uint32_t r[2];
    std::memcpy(r, all_b + 16 * l, 8);
    const int g = l / 4, q = l % 4;
    for (int h = 0; h < 2; ++h) {
      B[2 * q + h][g] = half_bits_to_float(uint16_t(r[0] >> (16 * h)), bf16);
      B[2 * q + 8 + h][g] = half_bits_to_float(uint16_t(r[1] >> (16 * h)), bf16);
    }
  }
  const int lane = warp_lane(), g = lane / 4, q = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * q + (i % 2);
    // Products of 16-bit values are exact in float; the sum is rounded at every step, as the
    // hardware's float accumulation is (it truncates; this rounds to nearest).
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    d[i] = acc;
  }
}

}  // namespace emu

// The emulated device: sm_90's (or sm_80's) limits, FASTLOSS_EMU_SMS multiprocessors (default
// 4: small grids, several blocks per row where the kernels split rows).
extern "C" {

// "Device" memory for the tests: its end abuts an inaccessible page, and it starts as 0xff
// bytes. Freed by fastloss_emu_free.
static std::unordered_map<void*, emu::Guarded>& test_buffers() {
  static auto* buffers = new std::unordered_map<void*, emu::Guarded>;
  return *buffers;
}

void* fastloss_emu_alloc(size_t bytes) {
  emu::Guarded g;
  g.allocate(bytes);
  test_buffers()[g.data] = g;
  return g.data;
}

void fastloss_emu_free(void* p) {
  auto it = test_buffers().find(p);
  if (it == test_buffers().end()) return;
  it->second.release();
  test_buffers().erase(it);
}

void fastloss_emu_ldmatrix_stats(uint64_t* ops, uint64_t* conflicts, int reset) {
  *ops = emu::g_ldmatrix_ops;
  *conflicts = emu::g_ldmatrix_conflicts;
  if (reset) emu::g_ldmatrix_ops = emu::g_ldmatrix_conflicts = 0;
}

void fastloss_emu_set_device(int device, int sms) {
  emu::g_device = device;
  emu::g_sms[device] = sms;
}

cudaError_t cudaGetDevice(int* device) {
  *device = emu::g_device;
  if (emu::g_sms[emu::g_device] == 0) {
    const char* s = std::getenv("FASTLOSS_EMU_SMS");
    emu::g_sms[emu::g_device] = s != nullptr ? std::atoi(s) : 4;
  }
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  const int sms = emu::g_sms[device];
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = sms; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(emu::kSmemOptin); break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = static_cast<int>(emu::kSmemPerSm); break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = static_cast<int>(emu::kDefaultDynamicSmem); break;
    case cudaDevAttrCooperativeLaunch: *value = 1; break;
    case cudaDevAttrComputeCapabilityMajor: *value = __CUDA_ARCH__ / 100; break;
    case cudaDevAttrComputeCapabilityMinor: *value = (__CUDA_ARCH__ % 100) / 10; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = emu::kMaxThreadsPerSm; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrL2CacheSize: *value = 50 << 20; break;
    default:
      std::fprintf(stderr, "emu: cudaDeviceGetAttribute(%d) is not emulated\n", static_cast<int>(attr));
      return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return emu::g_last_error; }

const char* cudaGetErrorString(cudaError_t e) {
  static char buf[48];
  std::snprintf(buf, sizeof buf, "emulated CUDA error %d", static_cast<int>(e));
  return buf;
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > emu::kSmemOptin) {
      emu::g_last_error = cudaErrorInvalidValue;
      return cudaErrorInvalidValue;
    }
    emu::g_max_dynamic_smem[func] = value;
  }
  return cudaSuccess;
}

cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void* func) {
  std::memset(attr, 0, sizeof *attr);
  auto it = emu::g_max_dynamic_smem.find(func);
  attr->maxDynamicSharedSizeBytes = it == emu::g_max_dynamic_smem.end() ? int(emu::kDefaultDynamicSmem) : it->second;
  attr->maxThreadsPerBlock = 1024;
  attr->ptxVersion = __CUDA_ARCH__ / 10;
  attr->binaryVersion = __CUDA_ARCH__ / 10;
  attr->numRegs = 64;
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int threads, size_t smem) {
  if (threads <= 0 || threads > 1024 || smem > emu::kSmemOptin) {
    *blocks = 0;
    return cudaSuccess;
  }
  int by_threads = emu::kMaxThreadsPerSm / threads;
  int by_smem = static_cast<int>(emu::kSmemPerSm / (smem + 1024));
  *blocks = std::max(0, std::min(std::min(by_threads, by_smem), 32));
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* blocks, const void* fn, int threads,
                                                                   size_t smem, unsigned) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, fn, threads, smem);
}

cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}

}  // extern "C"
