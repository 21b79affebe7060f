"""CPU emulation of the tensor-core fragment addressing in csrc/kernels/linear_cross_entropy.cu.

ldmatrix (plain and .trans) and mma.m16n8k16 are emulated lane by lane from the PTX ISA's
fragment layouts; the shared-memory address expressions and accumulator-to-(row, column) maps
below are the kernels' own. Each test checks that one warp tile of the kernel computes the
matrix product it claims to, for every warp of the block, and that the padded shared-memory
pitches keep the 8 row addresses of an ldmatrix in distinct banks. Edit these together with
the kernel."""

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
