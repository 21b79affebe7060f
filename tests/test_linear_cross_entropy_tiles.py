"""CPU emulation of the tensor-core fragment addressing in csrc/kernels/linear_cross_entropy.cu.

ldmatrix (plain and .trans) and mma.m16n8k16 are emulated lane by lane from the PTX ISA's
fragment layouts; the shared-memory address expressions and accumulator-to-(row, column) maps
below are the kernels' own. Each test checks that one warp tile of the kernel computes the
matrix product it claims to, for every warp of the block, and that the padded shared-memory
pitches keep the 8 row addresses of an ldmatrix in distinct banks. Further: the emulators
checked against the PTX ISA's fragment formulas, the cp.async pipeline bookkeeping (which
slice each iteration computes from, with the backward's skipped phase-2 loads), the float16
dZ scaling, and the forward's statistics merge. Edit these together with the kernel."""

import numpy as np

BM, BN, BK = 128, 128, 32  # kBM, kBN, kBK
PITCH, DZ_PITCH = BK + 8, BN + 8  # kPitch, kDzPitch (elements of 2 bytes)
WARPS_N, WARP_ROWS, WARP_COLS = 2, 32, 64


def ldmatrix_x4(mem, addr, trans=False):
    """regs[lane, j] = the two 16-bit values lane `lane` receives in register j; addr(lane) gives the
    (row, column) of the 8-element row that lane points to (matrix lane // 8, row lane % 8)."""
    rows = [addr(lane) for lane in range(32)]
    regs = np.zeros((32, 4, 2))
    for j in range(4):
        m = np.array([mem[r, c:c + 8] for r, c in rows[8 * j:8 * j + 8]])
        if trans:
            m = m.T
        for lane in range(32):
            regs[lane, j] = m[lane // 4, 2 * (lane % 4):2 * (lane % 4) + 2]
    return regs


def mma_16816(acc, a, b):
    """acc[lane] += the lane's C fragment of A @ B, A from a[lane, 0..3], B from b[lane] = (b0, b1)."""
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, q = lane // 4, lane % 4
        A[g, 2 * q:2 * q + 2], A[g + 8, 2 * q:2 * q + 2] = a[lane, 0], a[lane, 1]
        A[g, 2 * q + 8:2 * q + 10], A[g + 8, 2 * q + 8:2 * q + 10] = a[lane, 2], a[lane, 3]
        B[2 * q:2 * q + 2, g], B[2 * q + 8:2 * q + 10, g] = b[lane][0], b[lane][1]
    c = A @ B
    for lane in range(32):
        g, q = lane // 4, lane % 4
        acc[lane] += [c[g, 2 * q], c[g, 2 * q + 1], c[g + 8, 2 * q], c[g + 8, 2 * q + 1]]


def pairs(regs, j0):
    return [(regs[lane, j0], regs[lane, j0 + 1]) for lane in range(32)]


def test_logit_tile_fragments():
    rng = np.random.default_rng(0)
    sa, sb = rng.standard_normal((BM, PITCH)), rng.standard_normal((BN, PITCH))
    ref = sa[:, :BK] @ sb[:, :BK].T
    for warp in range(8):
        wm, wn = warp // WARPS_N, warp % WARPS_N
        acc = np.zeros((2, 8, 32, 4))
        for kk in (0, 16):
            af = [ldmatrix_x4(sa, lambda l, mi=mi: (wm * WARP_ROWS + mi * 16 + l % 16, kk + (l // 16) * 8))
                  for mi in range(2)]
            bf = []
            for nj in range(4):
                r = ldmatrix_x4(sb, lambda l, nj=nj: (wn * WARP_COLS + nj * 16 + l % 8 + (l // 16) * 8,
                                                      kk + ((l // 8) % 2) * 8))
                bf += [pairs(r, 0), pairs(r, 2)]
            for mi in range(2):
                for ni in range(8):
                    mma_16816(acc[mi, ni], af[mi], bf[ni])
        for lane in range(32):
            g, q = lane // 4, lane % 4
            for mi in range(2):
                for ni in range(8):
                    for h in range(2):
                        for e in range(2):
                            row, col = wm * WARP_ROWS + 16 * mi + 8 * h + g, wn * WARP_COLS + 8 * ni + 2 * q + e
                            assert abs(acc[mi, ni, lane, 2 * h + e] - ref[row, col]) < 1e-9


def test_gradient_tile_fragments():
    rng = np.random.default_rng(1)
    sa, sb = rng.standard_normal((BM, PITCH)), rng.standard_normal((BN, PITCH))
    dz = rng.standard_normal((BM, DZ_PITCH))
    ref_de, ref_dc = dz[:, :BN] @ sb[:, :BK], dz[:, :BN].T @ sa[:, :BK]
    for warp in range(8):
        wm, wn = warp // WARPS_N, warp % WARPS_N
        de, dc = np.zeros((2, 2, 32, 4)), np.zeros((2, 2, 32, 4))
        for kk in range(0, BN, 16):  # dE = dZ C: A = dZ (row-major), B = C slice (transposed loads)
            af = [ldmatrix_x4(dz, lambda l, mi=mi: (wm * WARP_ROWS + mi * 16 + l % 16, kk + (l // 16) * 8))
                  for mi in range(2)]
            bq = ldmatrix_x4(sb, lambda l: (kk + l % 8 + ((l // 8) % 2) * 8, wn * 16 + (l // 16) * 8), trans=True)
            for mi in range(2):
                mma_16816(de[mi, 0], af[mi], pairs(bq, 0))
                mma_16816(de[mi, 1], af[mi], pairs(bq, 2))
        for kk in range(0, BM, 16):  # dC = dZ^T E: A = dZ^T (transposed loads), B = E slice
            af = [ldmatrix_x4(dz, lambda l, mi=mi: (kk + l % 8 + (l // 16) * 8,
                                                    wm * WARP_ROWS + mi * 16 + ((l // 8) % 2) * 8), trans=True)
                  for mi in range(2)]
            bq = ldmatrix_x4(sa, lambda l: (kk + l % 8 + ((l // 8) % 2) * 8, wn * 16 + (l // 16) * 8), trans=True)
            for mi in range(2):
                mma_16816(dc[mi, 0], af[mi], pairs(bq, 0))
                mma_16816(dc[mi, 1], af[mi], pairs(bq, 2))
        for lane in range(32):
            g, q = lane // 4, lane % 4
            for mi in range(2):
                for h in range(2):
                    row = wm * WARP_ROWS + 16 * mi + 8 * h + g
                    for ni in range(2):
                        for e in range(2):
                            col = wn * 16 + 8 * ni + 2 * q + e
                            assert abs(de[mi, ni, lane, 2 * h + e] - ref_de[row, col]) < 1e-9
                            assert abs(dc[mi, ni, lane, 2 * h + e] - ref_dc[row, col]) < 1e-9


def test_padded_pitches_are_bank_conflict_free():
    # 8 consecutive rows of 16 bytes land in the 8 distinct 16-byte slots of the 128-byte bank line.
    for pitch in (PITCH, DZ_PITCH):
        assert sorted({(r * pitch * 2 // 16) % 8 for r in range(8)}) == list(range(8))
        assert pitch * 2 % 16 == 0  # cp.async / ldmatrix rows stay 16-byte aligned


# ---- The emulators above against the PTX ISA's own formulas ("Matrix Fragments for
# mma.m16n8k16 with floating point type": groupID = laneid >> 2, threadID_in_group = laneid % 4;
# each 32-bit register holds two consecutive elements, a0..a7, b0..b3, c0..c3 low to high).

def ptx_a(lane, i):
    g, t = lane >> 2, lane % 4
    row = g if (0 <= i < 2 or 4 <= i < 6) else g + 8
    col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def ptx_b(lane, i):
    g, t = lane >> 2, lane % 4
    return t * 2 + (i & 1) + (8 if i >= 2 else 0), g


def ptx_c(lane, i):
    g, t = lane >> 2, lane % 4
    return (g if i < 2 else g + 8), t * 2 + (i & 1)


def test_mma_emulation_matches_the_ptx_fragment_formulas():
    rng = np.random.default_rng(2)
    A, B = rng.standard_normal((16, 16)), rng.standard_normal((16, 8))
    a = np.array([[[A[ptx_a(l, 2 * j + h)] for h in range(2)] for j in range(4)] for l in range(32)])
    b = [tuple(np.array([B[ptx_b(l, 2 * j + h)] for h in range(2)]) for j in range(2)) for l in range(32)]
    acc = np.zeros((32, 4))
    mma_16816(acc, a, b)
    C = A @ B
    for lane in range(32):
        for i in range(4):
            assert abs(acc[lane, i] - C[ptx_c(lane, i)]) < 1e-12


def test_ldmatrix_emulation_matches_the_ptx_description():
    # Threads 8j..8j+7 give the row addresses of matrix j; a group of four consecutive threads
    # receives one row (thread 4r + w: row r, elements 2w, 2w + 1); .trans loads column-major.
    mem = np.arange(64 * 64, dtype=float).reshape(64, 64)
    origins = [(8 * j + 3, 16 * j + 8) for j in range(4)]
    regs = ldmatrix_x4(mem, lambda l: (origins[l // 8][0] + l % 8, origins[l // 8][1]))
    regs_t = ldmatrix_x4(mem, lambda l: (origins[l // 8][0] + l % 8, origins[l // 8][1]), trans=True)
    for lane in range(32):
        r, w = lane // 4, lane % 4
        for j, (r0, c0) in enumerate(origins):
            assert list(regs[lane, j]) == [mem[r0 + r, c0 + 2 * w], mem[r0 + r, c0 + 2 * w + 1]]
            assert list(regs_t[lane, j]) == [mem[r0 + 2 * w, c0 + r], mem[r0 + 2 * w + 1, c0 + r]]


# ---- Pipeline bookkeeping of the kernels' flattened (vocabulary tile, step) loops.

STAGES = 3  # kStages


def run_pipeline(tiles, k_tiles, phase2, keep):
    """Replays lce_grad_kernel's issue / consume order (phase2=False with keep all True is the
    forward's loop). Returns (consumed, loaded) where consumed lists the (tile, step) each
    iteration computes from and the (tile, step) its stage holds (None: skipped load)."""
    steps_per_tile = 2 * k_tiles if phase2 else k_tiles
    steps = tiles * steps_per_tile
    stage_holds = [None] * STAGES
    pending = {}  # group index -> (stage, content)
    groups = 0
    state = dict(load_tile=0, load_step=0, keep_tile=False)

    def issue(stage, it):
        nonlocal groups
        content = "empty"
        if it < steps:
            skip = state["load_step"] >= k_tiles + STAGES - 1 and not state["keep_tile"]
            content = None if skip else (state["load_tile"], state["load_step"])
            state["load_step"] += 1
            if state["load_step"] == steps_per_tile:
                state["load_step"], state["load_tile"] = 0, state["load_tile"] + 1
        pending[groups] = (stage, content)
        groups += 1

    for s in range(STAGES - 1):
        issue(s, s)
    out = []
    tile, step, stage = 0, 0, 0
    for it in range(steps):
        # cp.async.wait_group kStages - 2: all but the newest kStages - 2 groups have landed.
        for gidx in [g for g in pending if g < groups - (STAGES - 2)]:
            st, content = pending.pop(gidx)
            if content not in ("empty", None):
                stage_holds[st] = content
            elif content is None:
                stage_holds[st] = None
        # __syncthreads, then the refill targets the stage read in the previous iteration.
        refill = (stage + STAGES - 1) % STAGES
        assert refill != stage
        issue(refill, it + STAGES - 1)
        computes = step < k_tiles or state["keep_tile"]
        if computes:
            out.append(((tile, step), stage_holds[stage]))
        if step == k_tiles - 1:
            state["keep_tile"] = keep[tile]
        stage = (stage + 1) % STAGES
        step += 1
        if step == steps_per_tile:
            step, tile = 0, tile + 1
    return out


def expected_k0(step, k_tiles):
    return step if step < k_tiles else step - k_tiles


def test_pipeline_consumes_the_slice_it_expects():
    rng = np.random.default_rng(3)
    for tiles in (1, 2, 3, 5):
        for k_tiles in (1, 2, 3, 4, 7):
            for phase2 in (False, True):
                for _ in range(4):
                    keep = list(rng.random(tiles) < 0.5)
                    for want, held in run_pipeline(tiles, k_tiles, phase2, keep):
                        assert held is not None, (tiles, k_tiles, phase2, keep, want)
                        # same vocabulary tile and the same k slice (phase 2 re-reads phase 1's)
                        assert held[0] == want[0]
                        assert expected_k0(held[1], k_tiles) == expected_k0(want[1], k_tiles)
                        assert held == want


# ---- The float16 dZ scaling of lce_grad_kernel: a power of two with the largest |dZ| of the
# tile just below 2^14; exact both ways.

def dz_shift(big):
    if not (big > 0 and big <= np.float32(3.0e38)):  # compared in float32 under NumPy 1 and 2 alike
        return 0
    _, e2 = np.frexp(np.float32(big))
    return max(-126, min(126, 14 - int(e2)))


def test_dz_scale_keeps_float16_in_range_and_is_exact():
    for big in [1e-38, 3e-30, 1e-9, 6.1e-5, 1 / 16384, 0.3, 1.0, 2.0, 1000.0, 65504.0, 1e20, 3e38]:
        big = np.float32(big)
        shift = dz_shift(big)
        scale, unscale = np.float32(2.0 ** shift), np.float32(2.0 ** -shift)
        scaled = np.float32(big * scale)
        assert scaled < 2 ** 14 and np.isfinite(np.float16(scaled))
        assert np.float32(scale * unscale) == 1 and np.float32(scaled * unscale) == big
        if 2.0 ** -100 < big < 2.0 ** 100:  # the clamp is not active: the largest entry is in [2^13, 2^14)
            assert scaled >= 2 ** 13
    assert dz_shift(np.float32(np.nan)) == 0 and dz_shift(np.float32(np.inf)) == 0 and dz_shift(0.0) == 0


def test_stage_copy_covers_every_chunk_once():
    threads, chunks_per_row = 256, BK // 8
    a_rows_per_thread = BM * chunks_per_row // threads
    seen = np.zeros((BM, chunks_per_row), int)
    for tid in range(threads):
        for i in range(a_rows_per_thread):
            c = tid + i * threads
            seen[c // chunks_per_row, c % chunks_per_row] += 1
    assert (seen == 1).all()


# ---- lce_stats_kernel + lce_finalize_kernel statistics, emulated per thread (the 16 columns of
# a tile each (warp_n, q) thread holds for a token), merged as the kernels merge them: the
# quad (shuffles), the two vocabulary warps (shared memory), then the splits in order.

def merge_lse(m, s, m2, s2):
    mx = np.fmax(m, m2)
    with np.errstate(invalid="ignore", over="ignore"):
        new = s * np.exp(m - mx) + s2 * np.exp(m2 - mx)
    empty = mx == -np.inf
    return np.where(empty, m, mx), np.where(empty, s, new)


def stats_emulation(z, targets, ignore_index, vocab_start, tiles_per_split, ls, vocab_total, shard, z_loss):
    """z: (tokens, V) float32 logits after bias and softcap. Returns (out0, out1) as the kernels."""
    tokens, vocab = z.shape
    tiles = -(-vocab // BN)
    splits = -(-tiles // tiles_per_split)
    tcol = np.where((targets != ignore_index) & (targets >= vocab_start) & (targets < vocab_start + vocab),
                    targets - vocab_start, -1)
    parts = []
    for sp in range(splits):
        run_max = np.full((tokens, 2, 4), -np.inf, np.float32)
        run_sum = np.zeros((tokens, 2, 4), np.float32)
        tgt = np.zeros((tokens, 2, 4), np.float32)
        lsum = np.zeros((tokens, 2, 4), np.float32)
        for tile in range(sp * tiles_per_split, min(tiles, (sp + 1) * tiles_per_split)):
            for wn in range(2):
                for q in range(4):
                    cols = np.array([tile * BN + wn * 64 + 8 * ni + 2 * q + e for ni in range(8) for e in range(2)])
                    valid = cols < vocab
                    vals = np.full((tokens, cols.size), -np.inf, np.float32)
                    vals[:, valid] = z[:, cols[valid]]
                    lsum[:, wn, q] += np.where(valid, np.nan_to_num(vals, neginf=0.0), 0).sum(1) + \
                        np.where(np.isnan(vals), np.nan, 0).sum(1)
                    hit = cols[None, :] == tcol[:, None]
                    tgt[:, wn, q] = np.where(hit.any(1), (np.where(hit, vals, 0)).sum(1), tgt[:, wn, q])
                    tmax = np.fmax.reduce(vals, axis=1)
                    live = tmax != -np.inf
                    grow = live & (tmax > run_max[:, wn, q])
                    with np.errstate(invalid="ignore", over="ignore"):
                        run_sum[:, wn, q] = np.where(grow, run_sum[:, wn, q] * np.exp(run_max[:, wn, q] - tmax),
                                                     run_sum[:, wn, q])
                    run_max[:, wn, q] = np.where(grow, tmax, run_max[:, wn, q])
                    with np.errstate(invalid="ignore"):
                        add = np.exp(vals - run_max[:, wn, q][:, None]).sum(1)
                    run_sum[:, wn, q] += np.where(live, add, 0)
        for o in (1, 2):  # shfl_xor over the quad: lanes q and q ^ o
            perm = [q ^ o for q in range(4)]
            m2, s2 = run_max[:, :, perm], run_sum[:, :, perm]
            tgt, lsum = tgt + tgt[:, :, perm], lsum + lsum[:, :, perm]
            run_max, run_sum = merge_lse(run_max, run_sum, m2, s2)
        m, s = merge_lse(run_max[:, 0, 0], run_sum[:, 0, 0], run_max[:, 1, 0], run_sum[:, 1, 0])
        parts.append((m, s, tgt[:, 0, 0] + tgt[:, 1, 0], lsum[:, 0, 0] + lsum[:, 1, 0]))
    m = np.full(tokens, -np.inf, np.float32)
    s, t, l = (np.zeros(tokens, np.float32) for _ in range(3))
    for pm, ps, pt, pl in parts:
        m, s = merge_lse(m, s, pm, ps)
        t, l = t + pt, l + pl
    with np.errstate(divide="ignore"):
        lse = np.where(np.isnan(l), l, m + np.log(s))
    linear = -(1 - ls) * t - ls / vocab_total * l
    o0, o1 = (lse, linear) if shard else (lse + z_loss * lse * lse + linear, lse)
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_total))
    ign = targets == ignore_index
    o0, o1 = np.where(bad, np.nan, np.where(ign, 0, o0)), np.where(bad, np.nan, np.where(ign, 0, o1))
    return o0, o1


def test_forward_statistics_merge():
    rng = np.random.default_rng(4)
    tokens, vocab, vocab_total, start = 24, 700, 1000, 200
    z = (rng.standard_normal((tokens, vocab)) * 4).astype(np.float32)
    z[3, 650] = 40.0  # a large logit in the last, partial tile
    targets = rng.integers(0, vocab_total, tokens)
    targets[:4] = [-100, 250, 1000, -7]  # ignored, in the shard, bad, bad
    targets[4] = start + vocab - 1
    for tiles_per_split in (1, 2, 6):
        for shard in (False, True):
            ls, zl = 0.1, 1e-3
            o0, o1 = stats_emulation(z, targets, -100, start, tiles_per_split, ls, vocab_total, shard, zl)
            zd = z.astype(np.float64)
            lse = np.log(np.exp(zd - zd.max(1, keepdims=True)).sum(1)) + zd.max(1)
            in_shard = (targets >= start) & (targets < start + vocab)
            zt = np.where(in_shard, zd[np.arange(tokens), np.clip(targets - start, 0, vocab - 1)], 0)
            linear = -(1 - ls) * zt - ls / vocab_total * zd.sum(1)
            ref0, ref1 = (lse, linear) if shard else (lse + zl * lse * lse + linear, lse)
            ok = slice(4, None)
            np.testing.assert_allclose(o0[ok], ref0[ok], rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(o1[ok], ref1[ok], rtol=1e-5, atol=1e-4)
            assert o0[0] == 0 and o1[0] == 0
            assert np.isnan(o0[2]) and np.isnan(o1[3])
            np.testing.assert_allclose(o0[1], ref0[1], rtol=1e-5)
    z[5, 17] = np.nan  # a NaN logit makes the token's statistics NaN
    o0, o1 = stats_emulation(z, targets, -100, start, 2, 0.0, vocab_total, False, 0.0)
    assert np.isnan(o0[5]) and np.isnan(o1[5]) and np.isfinite(o0[6])
