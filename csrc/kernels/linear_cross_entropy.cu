// Cut cross-entropy on CUDA tensor cores (Wijmans et al., "Cut Your Losses in Large-Vocabulary
// Language Models", ICLR 2025), float16 / bfloat16 inputs, float32 accumulation.
//
// Forward, kernel 1 (statistics): a block owns a tile of kBM = 128 tokens and a contiguous range
// of kBN = 128-row vocabulary tiles (its vocabulary split). For each vocabulary tile the logits
// E_tile C_tile^T come from mma.sync m16n8k16; hidden and classifier slices of kBK = 32 columns
// stream global -> shared through a kStages = 3 cp.async pipeline (one flattened loop over
// (vocabulary tile, k slice), so the next tile's first slices load during the current tile's
// epilogue) and reach the tensor cores through ldmatrix. 8 warps in a 4 (tokens) x 2
// (vocabulary) grid, each computing 32 x 64 logits. The epilogue works on the accumulator
// registers: + bias, softcap, then each thread merges its values of each of its 4 token rows
// into a running (max, sum of exp) pair and adds up the target logit and the sum of logits
// (label smoothing). After the last tile the pairs merge across the 4 lanes that share a row
// (shuffles) and the 2 vocabulary warps (shared memory); one (max, sum, target, logit sum)
// float4 per (token, split) goes to the workspace.
// Forward, kernel 2 (finalize): one thread per token merges its splits in a fixed order and
// writes (loss, lse) or, for a vocabulary shard, (lse, linear); ignored tokens get 0, bad
// targets NaN. The grid is (token tiles) x (splits), splits chosen so that few tokens x a large
// vocabulary still fill the GPU; everything runs in a fixed order, so the forward is bitwise
// reproducible on a given device.
// Backward (one kernel, same grid and pipeline): per tile, phase 1 recomputes the logits and
// turns them in registers into dZ = d loss / d logit (softmax minus one-hot, smoothing, z-loss,
// grad-LSE, softcap chain rule), decides with one block vote whether the tile is filtered out
// (every |dZ| below filter_eps times its token's scale and no target), adds its column sums to
// d bias and stages dZ in shared memory as 16-bit values scaled by a power of two; phase 2
// streams the same hidden / classifier slices again and computes dE[tokens, slice] += dZ C and
// dC[tile rows, slice] += dZ^T E with mma.sync (ldmatrix.trans for the transposed operands),
// added with float32 atomics (one vector atomic per pair of columns from sm_90 on).
// Memory traffic: E is re-read once per vocabulary tile and C once per token tile (mostly from
// L2: consecutive blocks share a split, hence the same classifier tiles); the forward adds 16
// bytes per (token, split), the backward 2 x 4 bytes of atomics per element of the (BM + BN) x D
// tile outputs of every kept tile. The N x V logits never reach global memory. FLOPs: 2 N V D
// forward, 6 N V D backward (2 N V D for a filtered-out tile).
// Shared memory: 3 x (128 + 128) x 40 halves = 60 KB (rows padded to 80 bytes so that the 8 row
// addresses of an ldmatrix hit distinct banks), + the 128 x 136 dZ tile in the backward (97 KB):
// forward 2 blocks per SM (1 on sm_86/89/120, 100 KB), backward 2 on sm_90/sm_100 and 1
// elsewhere. 128 registers (backward with one block per SM: 168 on sm_80, 189 on sm_120), no
// spills but on sm_100's backward.
#include "kernels/linear_cross_entropy.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "common/linear_cross_entropy_math.h"
#include "kernels/device_utils.cuh"

namespace fastloss::kernels {
namespace {

constexpr int kBM = 128;  // tokens per block
constexpr int kBN = 128;  // vocabulary rows per tile
constexpr int kBK = 32;   // hidden columns per pipeline stage
constexpr int kStages = 3;
constexpr int kWarpsM = 4;
constexpr int kWarpsN = 2;
constexpr int kThreads = 32 * kWarpsM * kWarpsN;
constexpr int kWarpRows = kBM / kWarpsM;  // 32 tokens per warp
constexpr int kWarpCols = kBN / kWarpsN;  // 64 vocabulary rows per warp
constexpr int kMTiles = kWarpRows / 16;   // m16 tiles per warp
constexpr int kNTiles = kWarpCols / 8;    // n8 tiles per warp
constexpr int kRows = 2 * kMTiles;        // token rows per thread (g and g + 8 of each m16 tile)
constexpr int kPitch = kBK + 8;           // shared row pitch in elements: 80 bytes
constexpr int kChunksPerRow = kBK / 8;    // 16-byte chunks per shared row
constexpr int kStageElems = (kBM + kBN) * kPitch;
constexpr size_t kSmemBytes = size_t(kStages) * kStageElems * 2;
constexpr int kFinalizeThreads = 256;
constexpr int kMaxSplits = 65535;  // grid y limit

static_assert(kBM * kChunksPerRow % kThreads == 0 && kBN * kChunksPerRow % kThreads == 0,
              "every thread copies the same number of chunks");
static_assert(kNTiles % 2 == 0, "B fragments are loaded two n8 tiles per ldmatrix.x4");
static_assert((kPitch * 2) % 16 == 0, "cp.async and ldmatrix need 16-byte aligned shared rows");

// Per-token partial statistics of one vocabulary split.
struct alignas(16) Partial {
  float max;         // of the logits
  float sum;         // of exp(logit - max)
  float target;      // the target logit, 0 when the target is not in the split
  float logit_sum;   // for label smoothing (and NaN detection)
};

__device__ __forceinline__ float neg_inf() { return -dev_inf<float>(); }

// (m, s) += (m2, s2) as sums of exponentials; two empty pairs (-inf, 0) stay empty.
__device__ __forceinline__ void merge_lse(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  if (mx == neg_inf()) return;
  s = s * dev_exp(m - mx) + s2 * dev_exp(m2 - mx);
  m = mx;
}

__device__ __forceinline__ int64_t load_target(const void* t, bool is64, int64_t stride, int64_t i) {
  return is64 ? static_cast<const int64_t*>(t)[i * stride] : static_cast<int64_t>(static_cast<const int32_t*>(t)[i * stride]);
}

template <typename T>
struct StatsParams {
  const T* hidden;
  int64_t hidden_stride;
  const T* classifier;
  int64_t classifier_stride;
  const T* bias;
  int64_t bias_stride;
  const void* targets;
  bool targets_int64;
  int64_t targets_stride;
  int tokens, vocab, dim;
  int64_t vocab_start;
  int64_t ignore_index;
  float softcap;
  int tiles_per_split;
  Partial* partial;  // (splits, tokens)
};

constexpr int kARowsPerThread = kBM * kChunksPerRow / kThreads;  // hidden rows one thread copies

// One pipeline stage: rows [m0, m0 + kBM) of hidden and [n0, n0 + kBN) of the classifier,
// columns [k0, k0 + kBK). Chunks past the end of a matrix (D is a multiple of 8, so a
// chunk is either all inside or all outside) are zero-filled, and so are the hidden rows
// whose a_row_ok[i] is false (row (threadIdx.x + i kThreads) / kChunksPerRow of the tile).
template <typename T>
__device__ __forceinline__ void load_stage(T* stage, const StatsParams<T>& p, int m0, int n0, int k0,
                                           const bool (&a_row_ok)[kARowsPerThread]) {
  T* sa = stage;
  T* sb = stage + kBM * kPitch;
#pragma unroll
  for (int i = 0; i < kARowsPerThread; ++i) {
    const int c = static_cast<int>(threadIdx.x) + i * kThreads;
    const int row = c / kChunksPerRow, k = k0 + (c % kChunksPerRow) * 8;
    const bool ok = a_row_ok[i] && m0 + row < p.tokens && k < p.dim;
    const T* src = ok ? p.hidden + static_cast<int64_t>(m0 + row) * p.hidden_stride + k : p.hidden;
    cp_async16(sa + row * kPitch + (c % kChunksPerRow) * 8, src, ok ? 16 : 0);
  }
#pragma unroll
  for (int i = 0; i < kBN * kChunksPerRow / kThreads; ++i) {
    const int c = static_cast<int>(threadIdx.x) + i * kThreads;
    const int row = c / kChunksPerRow, k = k0 + (c % kChunksPerRow) * 8;
    const bool ok = n0 + row < p.vocab && k < p.dim;
    const T* src = ok ? p.classifier + static_cast<int64_t>(n0 + row) * p.classifier_stride + k : p.classifier;
    cp_async16(sb + row * kPitch + (c % kChunksPerRow) * 8, src, ok ? 16 : 0);
  }
}

// acc += the stage's hidden slice (sa, kBM x kBK) times the classifier slice (sb, kBN x kBK)
// transposed, for this warp's kWarpRows x kWarpCols part of the tile: the logits' main loop,
// shared by the forward and the backward's recomputation. (Each lane's two base addresses are
// formed once: indexing from sa and sb in the loop made ptxas spill in the backward, sm_90.)
template <typename T>
__device__ __forceinline__ void accumulate_logits(float (&acc)[kMTiles][kNTiles][4], const T* sa, const T* sb,
                                                  int warp_m, int warp_n, int lane) {
  // A: matrices 0..3 are rows +0..7 / +8..15 (lane % 16) x columns kk / kk + 8 (lane / 16).
  const T* a_lane = sa + (warp_m * kWarpRows + lane % 16) * kPitch + (lane / 16) * 8;
  // B: matrices 0..3 are (n tile 2nj, k kk), (2nj, kk + 8), (2nj + 1, kk), (2nj + 1, kk + 8);
  // classifier rows are B's columns, so the untransposed load gives b0 / b1 directly.
  const T* b_lane = sb + (warp_n * kWarpCols + lane % 8 + (lane / 16) * 8) * kPitch + ((lane / 8) % 2) * 8;
#pragma unroll
  for (int kk = 0; kk < kBK; kk += 16) {
    uint32_t af[kMTiles][4];
    uint32_t bfrag[kNTiles][2];
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi) ldmatrix_x4(af[mi], a_lane + mi * 16 * kPitch + kk);
#pragma unroll
    for (int nj = 0; nj < kNTiles / 2; ++nj) {
      uint32_t r[4];
      ldmatrix_x4(r, b_lane + nj * 16 * kPitch + kk);
      bfrag[2 * nj][0] = r[0];
      bfrag[2 * nj][1] = r[1];
      bfrag[2 * nj + 1][0] = r[2];
      bfrag[2 * nj + 1][1] = r[3];
    }
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
      for (int ni = 0; ni < kNTiles; ++ni) mma_16816<T>(acc[mi][ni], af[mi], bfrag[ni]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) lce_stats_kernel(const StatsParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  __shared__ float4 exchange[kWarpsN - 1][kBM];

  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  const int warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;
  const int g = lane / 4, q = lane % 4;
  const int m0 = static_cast<int>(blockIdx.x) * kBM;
  const int tiles = (p.vocab + kBN - 1) / kBN;
  const int tile_begin = static_cast<int>(blockIdx.y) * p.tiles_per_split;
  const int tile_end = min(tiles, tile_begin + p.tiles_per_split);
  const int k_tiles = (p.dim + kBK - 1) / kBK;
  const int64_t iters = static_cast<int64_t>(tile_end - tile_begin) * k_tiles;

  // Row r = 2 mi + h of this thread is token m0 + warp_m kWarpRows + 16 mi + 8 h + g; its
  // target as a column of this classifier, -1 when ignored or in another shard.
  int target_col[kRows];
  float run_max[kRows], run_sum[kRows], target[kRows], logit_sum[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int tok = m0 + warp_m * kWarpRows + 16 * (r / 2) + 8 * (r % 2) + g;
    target_col[r] = -1;
    if (tok < p.tokens) {
      const int64_t t = load_target(p.targets, p.targets_int64, p.targets_stride, tok);
      if (t != p.ignore_index && t >= p.vocab_start && t < p.vocab_start + p.vocab) {
        target_col[r] = static_cast<int>(t - p.vocab_start);
      }
    }
    run_max[r] = neg_inf();
    run_sum[r] = 0.f;
    target[r] = 0.f;
    logit_sum[r] = 0.f;
  }

  float acc[kMTiles][kNTiles][4];
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
    for (int ni = 0; ni < kNTiles; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;

  // Pipeline prologue: stages 0 .. kStages - 2. Iteration `it` is k slice it % k_tiles of
  // vocabulary tile tile_begin + it / k_tiles. Every thread commits one group per
  // iteration, empty or not, so that the wait counts below line up.
  int load_tile = tile_begin, load_k = 0;
  bool all_rows[kARowsPerThread];
#pragma unroll
  for (int i = 0; i < kARowsPerThread; ++i) all_rows[i] = true;
  auto issue = [&](int stage, int64_t it) {
    if (it < iters) {
      load_stage(smem + stage * kStageElems, p, m0, load_tile * kBN, load_k * kBK, all_rows);
      if (++load_k == k_tiles) load_k = 0, ++load_tile;
    }
    cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(s, s);

  int tile = tile_begin, k_tile = 0, stage = 0;
  for (int64_t it = 0; it < iters; ++it) {
    // Slice `it` has landed for this thread; the barrier makes every thread's copies visible
    // and guarantees that stage (it - 1) % kStages, refilled next, is no longer being read.
    cp_async_wait<kStages - 2>();
    __syncthreads();
    issue((stage + kStages - 1) % kStages, it + kStages - 1);

    const T* sa = smem + stage * kStageElems;
    const T* sb = sa + kBM * kPitch;
    accumulate_logits(acc, sa, sb, warp_m, warp_n, lane);
    stage = stage + 1 == kStages ? 0 : stage + 1;
    if (++k_tile < k_tiles) continue;

    // ---- Epilogue of vocabulary tile `tile`: acc[mi][ni][2 h + e] is the raw logit of row
    // 2 mi + h and column n_base + 8 ni + 2 q + e.
    const int n_base = tile * kBN + warp_n * kWarpCols + 2 * q;
    const float cap = p.softcap, inv_cap = cap > 0.f ? 1.f / cap : 0.f;
#pragma unroll
    for (int ni = 0; ni < kNTiles; ++ni) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = n_base + 8 * ni + e;
        const bool valid = col < p.vocab;
        const float b = valid && p.bias != nullptr ? to_acc(p.bias[static_cast<int64_t>(col) * p.bias_stride]) : 0.f;
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float z = acc[mi][ni][2 * h + e] + b;
            // Rounded, never contracted into a later subtraction: the backward recomputes
            // exactly this z (a perfectly predicted token gets loss 0 and gradient 0).
            if (cap > 0.f) z = __fmul_rn(cap, tanh_softcap(z * inv_cap));
            const int r = 2 * mi + h;
            logit_sum[r] += valid ? z : 0.f;
            if (col == target_col[r]) target[r] = z;
            acc[mi][ni][2 * h + e] = valid ? z : neg_inf();
          }
      }
    }
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = 2 * mi + h;
        float tmax = neg_inf();
#pragma unroll
        for (int ni = 0; ni < kNTiles; ++ni) tmax = fmaxf(tmax, fmaxf(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]));
        // All of this thread's columns past the vocabulary: nothing to add. (A NaN logit is
        // not seen by fmaxf but makes logit_sum NaN, which the finalize turns into NaN.)
        if (tmax != neg_inf()) {
          if (tmax > run_max[r]) {
            run_sum[r] *= dev_exp(run_max[r] - tmax);  // 0 for the initial -inf
            run_max[r] = tmax;
          }
          float s = 0.f;
#pragma unroll
          for (int ni = 0; ni < kNTiles; ++ni)
            s += dev_exp(acc[mi][ni][2 * h] - run_max[r]) + dev_exp(acc[mi][ni][2 * h + 1] - run_max[r]);
          run_sum[r] += s;
        }
#pragma unroll
        for (int ni = 0; ni < kNTiles; ++ni) acc[mi][ni][2 * h] = acc[mi][ni][2 * h + 1] = 0.f;
      }
    k_tile = 0;
    ++tile;
  }
  cp_async_wait<0>();  // only empty groups can be left; keeps the exit clean

  // ---- Merge the row statistics: the 4 lanes of a quad, then the vocabulary warps.
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int o = 1; o < 4; o *= 2) {
      const float m2 = __shfl_xor_sync(kFullMask, run_max[r], o);
      const float s2 = __shfl_xor_sync(kFullMask, run_sum[r], o);
      target[r] += __shfl_xor_sync(kFullMask, target[r], o);
      logit_sum[r] += __shfl_xor_sync(kFullMask, logit_sum[r], o);
      merge_lse(run_max[r], run_sum[r], m2, s2);
    }
  }
  if (warp_n > 0 && q == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = warp_m * kWarpRows + 16 * (r / 2) + 8 * (r % 2) + g;
      exchange[warp_n - 1][row] = make_float4(run_max[r], run_sum[r], target[r], logit_sum[r]);
    }
  }
  __syncthreads();
  if (warp_n == 0 && q == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = warp_m * kWarpRows + 16 * (r / 2) + 8 * (r % 2) + g;
      if (m0 + row >= p.tokens) continue;
      Partial out{run_max[r], run_sum[r], target[r], logit_sum[r]};
#pragma unroll
      for (int w = 0; w < kWarpsN - 1; ++w) {
        const float4 o = exchange[w][row];
        merge_lse(out.max, out.sum, o.x, o.y);
        out.target += o.z;
        out.logit_sum += o.w;
      }
      p.partial[static_cast<int64_t>(blockIdx.y) * p.tokens + m0 + row] = out;
    }
  }
}

struct FinalizeParams {
  const Partial* partial;
  int splits;
  int tokens;
  const void* targets;
  bool targets_int64;
  int64_t targets_stride;
  int64_t ignore_index;
  int64_t vocab_total;
  float label_smoothing;
  float z_loss;
  bool shard;
  float* out0;
  float* out1;
};

__global__ void __launch_bounds__(kFinalizeThreads) lce_finalize_kernel(const FinalizeParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kFinalizeThreads + threadIdx.x;
  if (i >= p.tokens) return;
  const int64_t t = load_target(p.targets, p.targets_int64, p.targets_stride, i);
  if (t == p.ignore_index) {
    p.out0[i] = 0.f;
    p.out1[i] = 0.f;
    return;
  }
  float m = neg_inf(), s = 0.f, tgt = 0.f, lsum = 0.f;
  for (int k = 0; k < p.splits; ++k) {
    const Partial v = p.partial[static_cast<int64_t>(k) * p.tokens + i];
    merge_lse(m, s, v.max, v.sum);
    tgt += v.target;
    lsum += v.logit_sum;
  }
  const float log_sum = dev_log(s);
  float lse = m + log_sum;
  if (lsum != lsum) lse = lsum;  // a NaN logit makes the token's LSE NaN, like torch
  const float linear = token_linear(tgt, lsum, p.label_smoothing, 1.f / static_cast<float>(p.vocab_total));
  float o0 = p.shard ? lse : token_loss(m, log_sum, lse, linear, p.z_loss, p.label_smoothing);
  float o1 = p.shard ? linear : lse;
  if (t < 0 || t >= p.vocab_total) o0 = o1 = dev_nan<float>();
  p.out0[i] = o0;
  p.out1[i] = o1;
}

// ---------------------------------------------------------------------------------------------
// Backward

constexpr int kDzPitch = kBN + 8;  // 272-byte rows of the logit-gradient tile: ldmatrix conflict-free
constexpr size_t kGradSmemBytes = kSmemBytes + size_t(kBM) * kDzPitch * 2;
constexpr int kInactive = -2;  // row_target of ignored rows and rows past the tokens
// ~97 KB of shared memory per block: two blocks fit an SM of sm_90 and sm_100 (228 KB), one
// elsewhere (sm_80: 164 KB; sm_86/89/120: 100 KB), where the register budget of a single block
// then avoids spills (ptxas spills ~80 bytes under the two-block cap on sm_100 and sm_120).
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ < 900 || __CUDA_ARCH__ >= 1100)
constexpr int kGradMinBlocks = 1;
#else
constexpr int kGradMinBlocks = 2;
#endif

template <typename T>
struct GradParams {
  StatsParams<T> s;  // inputs, sizes and the vocabulary split (partial unused)
  const float* grad_loss;  // (tokens), contiguous
  const float* grad_lse;   // (tokens), contiguous, or nullptr
  const float* lse;        // (tokens), contiguous: the whole vocabulary's
  float label_smoothing, z_loss, inv_vocab_total, filter_eps;
  float* d_hidden;      // (tokens, dim) float32, zeroed; nullptr: not wanted
  float* d_classifier;  // (vocab, dim) float32, zeroed; nullptr: not wanted
  float* d_bias;        // (vocab) float32, zeroed; nullptr: not wanted
};

// One block: token tile m0 against its split's vocabulary tiles. Per tile, phase 1 recomputes
// the logits (k slices over D, as in the forward) and turns them into dZ in registers; phase 2
// streams the same (hidden, classifier) slices again and multiplies them with dZ from shared
// memory: dE[m0 rows, slice] += dZ C[tile rows, slice], dC[tile rows, slice] += dZ^T E[m0 rows,
// slice], added with float atomics to float32 buffers.
template <typename T>
__global__ void __launch_bounds__(kThreads, kGradMinBlocks) lce_grad_kernel(const GradParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  T* dz = smem + kStages * kStageElems;  // (kBM, kDzPitch): this tile's logit gradient
  __shared__ float4 row_coef[kBM];       // (lse, a, c, filter threshold) per token
  __shared__ float row_b[kBM];
  __shared__ int row_target[kBM];        // target column, -1 elsewhere, kInactive
  __shared__ float red_scratch[32];

  const StatsParams<T>& sp = p.s;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32, warp = tid / 32;
  const int warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;
  const int g = lane / 4, q = lane % 4;
  const int m0 = static_cast<int>(blockIdx.x) * kBM;
  const int tiles = (sp.vocab + kBN - 1) / kBN;
  const int tile_begin = static_cast<int>(blockIdx.y) * sp.tiles_per_split;
  const int tile_end = min(tiles, tile_begin + sp.tiles_per_split);
  const int k_tiles = (sp.dim + kBK - 1) / kBK;
  const bool need_de = p.d_hidden != nullptr, need_dc = p.d_classifier != nullptr;
  const bool phase2 = need_de || need_dc;
  const int steps_per_tile = phase2 ? 2 * k_tiles : k_tiles;
  const int64_t steps = static_cast<int64_t>(tile_end - tile_begin) * steps_per_tile;

  bool any_active = false;
  for (int r = tid; r < kBM; r += kThreads) {
    const int tok = m0 + r;
    int tc = kInactive;
    float4 coef = make_float4(0.f, 0.f, 0.f, 0.f);
    float b = 0.f;
    if (tok < sp.tokens) {
      const int64_t t = load_target(sp.targets, sp.targets_int64, sp.targets_stride, tok);
      if (t != sp.ignore_index) {
        tc = t >= sp.vocab_start && t < sp.vocab_start + sp.vocab ? static_cast<int>(t - sp.vocab_start) : -1;
        const float lse = p.lse[tok];
        const TokenGrad<float> tg = token_grad<float>(p.grad_loss[tok], p.grad_lse ? p.grad_lse[tok] : 0.f, lse,
                                                      p.label_smoothing, p.z_loss, p.inv_vocab_total, p.filter_eps);
        coef = make_float4(lse, tg.a, tg.c, tg.threshold);
        b = tg.b;
        any_active = true;
      }
    }
    row_coef[r] = coef;
    row_b[r] = b;
    row_target[r] = tc;
  }
  // Every token of the tile ignored: no gradient to add (the outputs start at zero).
  if (!__syncthreads_or(any_active)) return;
  // Hidden rows of ignored tokens (and past the tokens) load as zeros: their dZ rows are 0,
  // and 0 times a non-finite hidden value would otherwise put NaN into dC (the CPU path
  // never reads those rows).
  bool a_row_ok[kARowsPerThread];
#pragma unroll
  for (int i = 0; i < kARowsPerThread; ++i)
    a_row_ok[i] = row_target[(tid + i * kThreads) / kChunksPerRow] != kInactive;

  float acc[kMTiles][kNTiles][4];
  bool keep_tile = false;  // block-uniform: the current tile's dZ is not filtered out
  float unscale = 1.f;     // block-uniform: 1 / the power of two dZ was scaled by in shared memory

  int load_tile = tile_begin, load_step = 0;
  auto issue = [&](int stage, int64_t it) {
    if (it < steps) {
      const int k0 = (load_step < k_tiles ? load_step : load_step - k_tiles) * kBK;
      // Phase-2 slices issued after the tile's epilogue (all but the first kStages - 1) are
      // skipped with the tile; keep_tile already belongs to load_tile then.
      const bool skip = load_step >= k_tiles + kStages - 1 && !keep_tile;
      if (!skip) load_stage(smem + stage * kStageElems, sp, m0, load_tile * kBN, k0, a_row_ok);
      if (++load_step == steps_per_tile) load_step = 0, ++load_tile;
    }
    cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(s, s);

  int tile = tile_begin, step = 0, stage = 0;
  for (int64_t it = 0; it < steps; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    issue((stage + kStages - 1) % kStages, it + kStages - 1);
    const T* sa = smem + stage * kStageElems;  // hidden rows m0.., this k slice
    const T* sb = sa + kBM * kPitch;           // classifier rows of the tile, this k slice

    if (step < k_tiles) {
      // ---- Phase 1: logits of the tile, as in the forward.
      if (step == 0) {
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
          for (int ni = 0; ni < kNTiles; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
      }
      accumulate_logits(acc, sa, sb, warp_m, warp_n, lane);
      if (step == k_tiles - 1) {
        // ---- Epilogue: dZ = ((a p - c - b [col = target]) chain) for active tokens, 0
        // elsewhere, in place in acc; acc[mi][ni][2 h + e] is row 2 mi + h, column
        // n_base + 8 ni + e (n_local the same within the tile).
        const int n_local = warp_n * kWarpCols + 2 * q;
        const int n_base = tile * kBN + n_local;
        const float cap = sp.softcap, inv_cap = cap > 0.f ? 1.f / cap : 0.f;
        bool keep = false;
        float big = 0.f;  // max |dZ| of this thread's entries
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int row = warp_m * kWarpRows + 16 * mi + 8 * h + g;
            const float4 coef = row_coef[row];
            const float b = row_b[row];
            const int tc = row_target[row];
#pragma unroll
            for (int ni = 0; ni < kNTiles; ++ni)
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const int col = n_base + 8 * ni + e;
                float z = acc[mi][ni][2 * h + e];
                if (sp.bias != nullptr && col < sp.vocab) z += to_acc(sp.bias[static_cast<int64_t>(col) * sp.bias_stride]);
                float chain = 1.f;
                if (cap > 0.f) {
                  const float t = tanh_softcap(z * inv_cap);
                  z = __fmul_rn(cap, t);  // as the forward rounded it (not fused into exp's argument)
                  chain = 1.f - t * t;
                }
                float d = coef.y * dev_exp(z - coef.x) - coef.z;
                if (col == tc) {
                  d -= b;
                  keep = true;  // a tile holding a target is never skipped
                }
                d *= chain;
                if (tc == kInactive || col >= sp.vocab) d = 0.f;
                else if (!(fabsf(d) < coef.w)) keep = true;  // NaN keeps the tile
                big = fmaxf(big, fabsf(d));
                acc[mi][ni][2 * h + e] = d;
              }
          }
        keep_tile = __syncthreads_or(keep) != 0;
        if (keep_tile && phase2) {
          // dZ goes to shared memory in 16 bits, scaled by a power of two that brings the
          // tile's largest entry just below 2^14: small probabilities (~1/V, times 1/N for a
          // mean) stay normal numbers in float16 instead of flushing to zero. Exact in both
          // directions; the products are unscaled before they are added.
          big = block_allreduce<kThreads>(big, MaxOp{}, red_scratch);
          int e2 = 0;
          (void)frexpf(big, &e2);  // big < 2^e2
          const int shift = big > 0.f && isfinite(big) ? max(-126, min(126, 14 - e2)) : 0;
          const float scale = ldexpf(1.f, shift);
          unscale = ldexpf(1.f, -shift);
#pragma unroll
          for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int row = warp_m * kWarpRows + 16 * mi + 8 * h + g;
#pragma unroll
              for (int ni = 0; ni < kNTiles; ++ni)
                *reinterpret_cast<uint32_t*>(dz + row * kDzPitch + n_local + 8 * ni) =
                    pack2<T>(acc[mi][ni][2 * h] * scale, acc[mi][ni][2 * h + 1] * scale);
            }
        }
        if (keep_tile && p.d_bias != nullptr) {
          // Column sums: this thread's 4 rows, then the 8 lanes that share q, then atomics
          // from the kWarpsM warps of this column range.
#pragma unroll
          for (int ni = 0; ni < kNTiles; ++ni)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float cs = 0.f;
#pragma unroll
              for (int mi = 0; mi < kMTiles; ++mi) cs += acc[mi][ni][e] + acc[mi][ni][2 + e];
              cs += __shfl_xor_sync(kFullMask, cs, 4);
              cs += __shfl_xor_sync(kFullMask, cs, 8);
              cs += __shfl_xor_sync(kFullMask, cs, 16);
              const int col = n_base + 8 * ni + e;
              if (g == 0 && col < sp.vocab) atomicAdd(p.d_bias + col, cs);
            }
        }
        // The dZ stores reach the other warps at the barrier at the top of the next step.
      }
    } else if (keep_tile) {
      // ---- Phase 2, slice k0: warp (warp_m, warp_n) owns rows warp_m * 32 .. + 32 (tokens for
      // dE, vocabulary rows for dC) and columns warp_n * 16 .. + 16 of the slice.
      const int k0 = (step - k_tiles) * kBK;
      const int col = k0 + warp_n * 16 + 2 * q;  // + 8 ni: the D column of acc[..][ni][2h..2h+1]
      if (need_de) {
        float de[kMTiles][2][4] = {};
#pragma unroll
        for (int kk = 0; kk < kBN; kk += 16) {
          uint32_t af[kMTiles][4], bq[4];
#pragma unroll
          for (int mi = 0; mi < kMTiles; ++mi)
            ldmatrix_x4(af[mi], dz + (warp_m * kWarpRows + mi * 16 + lane % 16) * kDzPitch + kk + (lane / 16) * 8);
          // B = C[tile rows kk.., slice columns]: (k = vocabulary row, n = D column); stored with
          // n contiguous, so transposed loads: matrices (kk, n), (kk + 8, n), (kk, n + 8), (kk + 8, n + 8).
          ldmatrix_x4_trans(bq, sb + (kk + lane % 8 + ((lane / 8) % 2) * 8) * kPitch + warp_n * 16 + (lane / 16) * 8);
          const uint32_t b0[2] = {bq[0], bq[1]}, b1[2] = {bq[2], bq[3]};
#pragma unroll
          for (int mi = 0; mi < kMTiles; ++mi) {
            mma_16816<T>(de[mi][0], af[mi], b0);
            mma_16816<T>(de[mi][1], af[mi], b1);
          }
        }
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int row = warp_m * kWarpRows + 16 * mi + 8 * h + g;
            if (row_target[row] == kInactive) continue;  // ignored or past the tokens: zero
#pragma unroll
            for (int ni = 0; ni < 2; ++ni) {
              const int c = col + 8 * ni;
              if (c < sp.dim)
                atomic_add2(p.d_hidden + static_cast<int64_t>(m0 + row) * sp.dim + c, de[mi][ni][2 * h] * unscale,
                            de[mi][ni][2 * h + 1] * unscale);
            }
          }
      }
      if (need_dc) {
        float dc[kMTiles][2][4] = {};
#pragma unroll
        for (int kk = 0; kk < kBM; kk += 16) {
          uint32_t af[kMTiles][4], bq[4];
          // A = dZ^T (m = vocabulary row, k = token), stored token-major: transposed loads of
          // matrices (tokens kk, vocab vm), (kk, vm + 8), (kk + 8, vm), (kk + 8, vm + 8) give a0..a3.
#pragma unroll
          for (int mi = 0; mi < kMTiles; ++mi)
            ldmatrix_x4_trans(af[mi], dz + (kk + lane % 8 + (lane / 16) * 8) * kDzPitch + warp_m * kWarpRows +
                                          mi * 16 + ((lane / 8) % 2) * 8);
          // B = E[m0 rows kk.., slice columns] (k = token, n = D column), as for dE.
          ldmatrix_x4_trans(bq, sa + (kk + lane % 8 + ((lane / 8) % 2) * 8) * kPitch + warp_n * 16 + (lane / 16) * 8);
          const uint32_t b0[2] = {bq[0], bq[1]}, b1[2] = {bq[2], bq[3]};
#pragma unroll
          for (int mi = 0; mi < kMTiles; ++mi) {
            mma_16816<T>(dc[mi][0], af[mi], b0);
            mma_16816<T>(dc[mi][1], af[mi], b1);
          }
        }
        const int n0 = tile * kBN;
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int vrow = n0 + warp_m * kWarpRows + 16 * mi + 8 * h + g;
            if (vrow >= sp.vocab) continue;
#pragma unroll
            for (int ni = 0; ni < 2; ++ni) {
              const int c = col + 8 * ni;
              if (c < sp.dim)
                atomic_add2(p.d_classifier + static_cast<int64_t>(vrow) * sp.dim + c, dc[mi][ni][2 * h] * unscale,
                            dc[mi][ni][2 * h + 1] * unscale);
            }
          }
      }
    }
    stage = stage + 1 == kStages ? 0 : stage + 1;
    if (++step == steps_per_tile) step = 0, ++tile;
  }
  cp_async_wait<0>();
}

struct Grid {
  int m_blocks, splits, tiles_per_split;
};

// Blocks of the forward (kGrad false) or backward kernel resident on one SM of this device,
// at least 1: shared memory allows two of either from sm_90 on, one backward block on sm_80
// and one of each on sm_86/89/120 (~100 KB per SM); cached per device. Also raises the
// kernel's dynamic shared memory limit on this device, as its launches need.
template <typename T, bool kGrad>
cudaError_t blocks_per_sm(const DeviceInfo& dev, int* blocks) {
  static std::atomic<int> cache[kMaxDevices];
  const void* kernel = kGrad ? reinterpret_cast<const void*>(lce_grad_kernel<T>)
                             : reinterpret_cast<const void*>(lce_stats_kernel<T>);
  const size_t smem = kGrad ? kGradSmemBytes : kSmemBytes;
  // Every call (not cached): a reset device or another context starts from the default limit.
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const bool cacheable = dev.device >= 0 && dev.device < kMaxDevices;
  if (cacheable && (*blocks = cache[dev.device].load(std::memory_order_relaxed)) > 0) return cudaSuccess;
  int n = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, smem);
  if (err != cudaSuccess) return err;
  *blocks = n < 1 ? 1 : n;
  if (cacheable) cache[dev.device].store(*blocks, std::memory_order_relaxed);
  return cudaSuccess;
}

Grid plan_grid(int64_t tokens, int64_t vocab, const DeviceInfo& dev, int resident_per_sm, size_t workspace_bytes) {
  Grid gr;
  gr.m_blocks = static_cast<int>(ceil_div(tokens, kBM));
  const int64_t tiles = ceil_div(vocab, kBN);
  // Split the vocabulary until the grid covers every resident block slot once.
  const int64_t want = ceil_div(static_cast<int64_t>(resident_per_sm) * dev.sms, gr.m_blocks);
  int64_t splits = want < 1 ? 1 : want > tiles ? tiles : want;
  const int64_t fit = static_cast<int64_t>(workspace_bytes / (sizeof(Partial) * static_cast<size_t>(tokens)));
  if (splits > fit) splits = fit;
  if (splits > kMaxSplits) splits = kMaxSplits;
  if (splits < 1) splits = 1;  // the caller checks that one split fits
  gr.tiles_per_split = static_cast<int>(ceil_div(tiles, splits));
  gr.splits = static_cast<int>(ceil_div(tiles, gr.tiles_per_split));  // no empty split
  return gr;
}

template <typename T>
StatsParams<T> stats_params(const LinearCrossEntropyInputs& a, const Grid& gr) {
  StatsParams<T> sp;
  sp.hidden = static_cast<const T*>(a.hidden);
  sp.hidden_stride = a.hidden_stride;
  sp.classifier = static_cast<const T*>(a.classifier);
  sp.classifier_stride = a.classifier_stride;
  sp.bias = static_cast<const T*>(a.bias);
  sp.bias_stride = a.bias_stride;
  sp.targets = a.targets;
  sp.targets_int64 = a.targets_int64;
  sp.targets_stride = a.targets_stride;
  sp.tokens = static_cast<int>(a.tokens);
  sp.vocab = static_cast<int>(a.vocab);
  sp.dim = static_cast<int>(a.dim);
  sp.vocab_start = a.vocab_start;
  sp.ignore_index = a.ignore_index;
  sp.softcap = a.softcap;
  sp.tiles_per_split = gr.tiles_per_split;
  sp.partial = nullptr;
  return sp;
}

template <typename T>
cudaError_t launch_forward(const LinearCrossEntropyForwardArgs& fa, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream) {
  const LinearCrossEntropyInputs& a = fa.in;
  DeviceInfo dev;
  cudaError_t err = device_info(&dev);
  if (err != cudaSuccess) return err;
  int resident = 1;
  err = blocks_per_sm<T, false>(dev, &resident);
  if (err != cudaSuccess) return err;
  const Grid gr = plan_grid(a.tokens, a.vocab, dev, resident, workspace_bytes);
  StatsParams<T> sp = stats_params<T>(a, gr);
  sp.partial = static_cast<Partial*>(workspace);
  lce_stats_kernel<T><<<dim3(gr.m_blocks, gr.splits), kThreads, kSmemBytes, stream>>>(sp);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  FinalizeParams fp;
  fp.partial = sp.partial;
  fp.splits = gr.splits;
  fp.tokens = sp.tokens;
  fp.targets = a.targets;
  fp.targets_int64 = a.targets_int64;
  fp.targets_stride = a.targets_stride;
  fp.ignore_index = a.ignore_index;
  fp.vocab_total = a.vocab_total;
  fp.label_smoothing = a.label_smoothing;
  fp.z_loss = a.z_loss;
  fp.shard = fa.shard;
  fp.out0 = fa.out0;
  fp.out1 = fa.out1;
  lce_finalize_kernel<<<static_cast<unsigned>(ceil_div(a.tokens, kFinalizeThreads)), kFinalizeThreads, 0, stream>>>(fp);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const LinearCrossEntropyBackwardArgs& ba, cudaStream_t stream) {
  const LinearCrossEntropyInputs& a = ba.in;
  DeviceInfo dev;
  cudaError_t err = device_info(&dev);
  if (err != cudaSuccess) return err;
  // No workspace: the vocabulary splits only add atomics into the same outputs.
  int resident = 1;
  err = blocks_per_sm<T, true>(dev, &resident);
  if (err != cudaSuccess) return err;
  const Grid gr = plan_grid(a.tokens, a.vocab, dev, resident, ~size_t(0));
  GradParams<T> gp;
  gp.s = stats_params<T>(a, gr);
  gp.grad_loss = ba.grad_loss;
  gp.grad_lse = ba.grad_lse;
  gp.lse = ba.lse;
  gp.label_smoothing = a.label_smoothing;
  gp.z_loss = a.z_loss;
  gp.inv_vocab_total = 1.f / static_cast<float>(a.vocab_total);
  gp.filter_eps = ba.filter_eps;
  gp.d_hidden = ba.d_hidden;
  gp.d_classifier = ba.d_classifier;
  gp.d_bias = ba.d_bias;
  lce_grad_kernel<T><<<dim3(gr.m_blocks, gr.splits), kThreads, kGradSmemBytes, stream>>>(gp);
  return cudaGetLastError();
}

bool inputs_ok(const LinearCrossEntropyInputs& a) {
  return linear_cross_entropy_layout_ok(a.dtype, a.tokens, a.vocab, a.dim, a.hidden, a.hidden_stride, a.classifier,
                                        a.classifier_stride) &&
         a.targets != nullptr && a.vocab_start >= 0 && a.vocab_start + a.vocab <= a.vocab_total;
}

}  // namespace

bool linear_cross_entropy_kernels_runnable() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  // Per device: 0 not yet asked, 1 runnable, -1 not (the answer cannot change in a process).
  constexpr int kMaxDevices = 64;
  static std::atomic<signed char> known[kMaxDevices];
  if (device >= 0 && device < kMaxDevices) {
    const signed char k = known[device].load(std::memory_order_relaxed);
    if (k != 0) return k > 0;
  }
  // The code the device would run: its own SASS, or PTX JIT-compiled from the newest virtual
  // architecture at or below it. ptxVersion is that PTX's architecture, i.e. the __CUDA_ARCH__
  // the kernels were compiled with; below 80 their tensor-core helpers trap. No image at all
  // for this device (cudaErrorInvalidDeviceFunction) also means no.
  cudaFuncAttributes attr{};
  bool ok = false;
  if (cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(lce_grad_kernel<__nv_bfloat16>)) == cudaSuccess) {
    ok = attr.ptxVersion >= 80 && attr.binaryVersion >= 80;
  } else {
    (void)cudaGetLastError();
  }
  if (device >= 0 && device < kMaxDevices) known[device].store(ok ? 1 : -1, std::memory_order_relaxed);
  return ok;
}

bool linear_cross_entropy_layout_ok(DType dtype, int64_t tokens, int64_t vocab, int64_t dim, const void* hidden,
                                    int64_t hidden_stride, const void* classifier, int64_t classifier_stride) {
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  return linear_cross_entropy_shape_ok(dtype, tokens, vocab, dim) && hidden_stride % 8 == 0 &&
         classifier_stride % 8 == 0 && hidden_stride >= dim && classifier_stride >= dim && aligned(hidden) &&
         aligned(classifier);
}

size_t linear_cross_entropy_forward_workspace_bytes(int64_t tokens, int64_t vocab, int64_t dim) {
  if (tokens <= 0 || vocab <= 0) return 0;
  // Room for the splits of either input type's launch (launch_forward caps its splits at the
  // workspace it is given, so a smaller answer here would only cost parallelism).
  DeviceInfo dev;
  int half = 1, bf16 = 1;
  if (device_info(&dev) != cudaSuccess || blocks_per_sm<__half, false>(dev, &half) != cudaSuccess ||
      blocks_per_sm<__nv_bfloat16, false>(dev, &bf16) != cudaSuccess) {
    (void)cudaGetLastError();
    dev.sms = 1;
  }
  const Grid gr = plan_grid(tokens, vocab, dev, half > bf16 ? half : bf16, ~size_t(0));
  return sizeof(Partial) * static_cast<size_t>(tokens) * static_cast<size_t>(gr.splits);
}

cudaError_t launch_linear_cross_entropy_forward(const LinearCrossEntropyForwardArgs& a, void* workspace,
                                                size_t workspace_bytes, cudaStream_t stream) {
  if (!inputs_ok(a.in) || workspace == nullptr || workspace_bytes < sizeof(Partial) * static_cast<size_t>(a.in.tokens) ||
      a.out0 == nullptr || a.out1 == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (a.in.dtype == DType::F16) return launch_forward<__half>(a, workspace, workspace_bytes, stream);
  return launch_forward<__nv_bfloat16>(a, workspace, workspace_bytes, stream);
}

cudaError_t launch_linear_cross_entropy_backward(const LinearCrossEntropyBackwardArgs& a, cudaStream_t stream) {
  if (!inputs_ok(a.in) || a.grad_loss == nullptr || a.lse == nullptr || !(a.filter_eps >= 0.f && a.filter_eps <= 1.f)) {
    return cudaErrorInvalidValue;
  }
  if (a.d_hidden == nullptr && a.d_classifier == nullptr && (a.d_bias == nullptr || a.in.bias == nullptr)) {
    return cudaSuccess;  // nothing asked for
  }
  if (a.in.dtype == DType::F16) return launch_backward<__half>(a, stream);
  return launch_backward<__nv_bfloat16>(a, stream);
}

}  // namespace fastloss::kernels
