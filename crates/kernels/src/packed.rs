//! The f32 matrix product under the CPU convolution, linear and attention kernels (the crate
//! root): `C[m x n] = A[m x k] · B[k x n]` with A read where it lies, rows contiguous along k,
//! and B packed into panels of 16 columns.
//!
//! A general-purpose GEMM packs both operands on every call. Here A is always a matrix whose
//! rows are already contiguous along k, so the kernel reads it in place: a block of 6 rows is 6
//! sequential streams. Two drivers:
//!
//! - [`gemm`]: A is a weight matrix (a convolution's `[c_out, c_in * kh * kw]`, a linear layer's
//!   `[out, in]` over few tokens) and B the activations, packed per task by a closure that knows
//!   where they lie; for a convolution that packing is the im2col of one block, done in cache
//!   and never for the whole image. Results go to a per-task accumulator that another closure
//!   moves to the output (adding the bias, dropping a convolution's padding columns, or
//!   transposing a linear layer's `[out, tokens]` block into `[tokens, out]`).
//! - [`gemm_packed`] / [`gemm_serial`]: B is packed whole beforehand (a linear layer's weight
//!   once per call, attention's keys and values once per head, Winograd's transformed input)
//!   and C is written in place, overwritten by the first block of k and added to after.
//!
//! Blocking (Zen 3 / Skylake sizes: 32 KiB L1d, 512 KiB-1 MiB L2): a `KC x NB` block of packed B
//! (256 KiB) and an `MC x KC` block of A (96 KiB) stay in L2; a `KC x 16` panel of B (16 KiB)
//! stays in L1 while the 6-row micro-kernel runs over every row block of A. The micro-kernel
//! keeps a 6 x 16 tile of C in twelve AVX2 registers (two FMA pipes of latency 4-5 need ten
//! independent accumulators).

use rayon::prelude::*;

/// Columns per packed panel of B (two AVX2 vectors).
pub(crate) const NR: usize = 16;
/// Rows of A per micro-kernel call.
const MR: usize = 6;
/// Depth of one packed block of B.
const KC: usize = 256;
/// Rows of A per L2 block (a multiple of MR).
const MC: usize = 96;
/// Columns of B per task (a multiple of NR).
const NB: usize = 256;
/// Most rows of C per task: a `MAX_ROWS x NB` accumulator is 384 KiB.
const MAX_ROWS: usize = 384;

/// Where panel `panel`, row `kk` of a packed `kc`-deep block starts.
#[inline(always)]
pub(crate) fn panel_row(panel: usize, kk: usize, kc: usize) -> usize {
    (panel * kc + kk) * NR
}

/// `C = A · B`: `a` holds `m` rows of `k` values, row `i` starting at `i * lda`.
///
/// `pack_b(k0, kc, n0, n, dst)` writes rows `k0..k0 + kc`, columns `n0..n0 + n` of B into `dst`
/// as `n.div_ceil(NR)` panels (element (kk, c) at `panel_row(c / NR, kk, kc) + c % NR`), zeros
/// past column `n`. `sink(m0, m, n0, n, c, ldc)` receives rows `m0..m0 + m`, columns
/// `n0..n0 + n` of C, element (i, j) at `c[i * ldc + j]`; tasks hand over disjoint blocks.
pub(crate) fn gemm<P, S>(m: usize, n: usize, k: usize, a: &[f32], lda: usize, pack_b: P, sink: S)
where
    P: Fn(usize, usize, usize, usize, &mut [f32]) + Sync,
    S: Fn(usize, usize, usize, usize, &[f32], usize) + Sync,
{
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        lda >= k && a.len() >= (m - 1) * lda + k,
        "gemm: {m} rows of {k} with stride {lda} in {} values",
        a.len()
    );
    let threads = rayon::current_num_threads().max(1);
    let n_blocks = n.div_ceil(NB);
    // Split the rows too when there are too few column blocks for every thread to have a few
    // (the lower levels of a UNet: 1280 channels over 8x8 pixels).
    let mut m_blocks = 1;
    while n_blocks * m_blocks < 3 * threads && m.div_ceil(m_blocks * 2) >= 4 * MR {
        m_blocks *= 2;
    }
    // And when a task's accumulator would outgrow L2: a linear layer with thousands of outputs
    // (a GEGLU projection) is faster re-packing B for each block of MAX_ROWS rows.
    m_blocks = m_blocks.max(m.div_ceil(MAX_ROWS));
    let m_chunk = m.div_ceil(m_blocks).div_ceil(MR) * MR;
    let m_blocks = m.div_ceil(m_chunk);
    let nb = NB.min(n.div_ceil(NR) * NR);
    let kernel = micro_kernel();
    (0..m_blocks * n_blocks).into_par_iter().for_each_init(
        || (vec![0f32; KC * nb], vec![0f32; m_chunk * nb]),
        |(packed, acc), task| {
            let (mi, ni) = (task / n_blocks, task % n_blocks);
            let (m0, n0) = (mi * m_chunk, ni * NB);
            let (rows, cols) = (m_chunk.min(m - m0), NB.min(n - n0));
            let panels = cols.div_ceil(NR);
            let ldc = panels * NR;
            // Every tile of `acc` is overwritten by the first block of k, added to after.
            let acc = &mut acc[..rows * ldc];
            for k0 in (0..k).step_by(KC) {
                let kc = KC.min(k - k0);
                let packed = &mut packed[..panels * kc * NR];
                pack_b(k0, kc, n0, cols, packed);
                for i0 in (0..rows).step_by(MC) {
                    let mc = MC.min(rows - i0);
                    for panel in 0..panels {
                        let b = &packed[panel_row(panel, 0, kc)..panel_row(panel + 1, 0, kc)];
                        for i in (i0..i0 + mc).step_by(MR) {
                            let r = MR.min(i0 + mc - i);
                            let a_row = (m0 + i) * lda + k0;
                            let c_at = i * ldc + panel * NR;
                            // SAFETY: rows m0 + i .. m0 + i + r of A hold k0 + kc <= k values
                            // each (checked above); `b` is kc x NR; C rows i..i + r, columns
                            // panel * NR.. + NR lie in `acc` (rows x ldc).
                            unsafe {
                                kernel(
                                    r,
                                    kc,
                                    a.as_ptr().add(a_row),
                                    lda,
                                    b.as_ptr(),
                                    acc.as_mut_ptr().add(c_at),
                                    ldc,
                                    k0 > 0,
                                );
                            }
                        }
                    }
                }
            }
            sink(m0, rows, n0, cols, acc, ldc);
        },
    );
}

/// `C[m x (panels * NR)] (+)= A[m x k] · B` on the calling thread, B packed whole: element
/// (kk, c) at `panel_row(c / NR, kk, k) + c % NR`; C rows at stride `ldc`, added to when
/// `accumulate`, else overwritten.
#[allow(clippy::too_many_arguments)] // a BLAS-shaped signature: sizes, operands, strides
pub(crate) fn gemm_serial(
    m: usize,
    panels: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || panels == 0 || k == 0 {
        return;
    }
    assert_extents(
        "gemm_serial",
        m,
        panels,
        k,
        a.len(),
        lda,
        b.len(),
        c.len(),
        ldc,
    );
    // SAFETY: the extents were checked above.
    unsafe {
        serial_block(
            m,
            panels,
            k,
            a.as_ptr(),
            lda,
            b.as_ptr(),
            c.as_mut_ptr(),
            ldc,
            accumulate,
        )
    };
}

/// Panics unless A (`m` rows of `k` at stride `lda`), B (`panels` panels `k` deep) and C (`m`
/// rows of `panels * NR` at stride `ldc`) fit in buffers of the given lengths; `m` and `k` > 0.
#[allow(clippy::too_many_arguments)]
fn assert_extents(
    what: &str,
    m: usize,
    panels: usize,
    k: usize,
    a_len: usize,
    lda: usize,
    b_len: usize,
    c_len: usize,
    ldc: usize,
) {
    assert!(
        lda >= k
            && a_len >= (m - 1) * lda + k
            && b_len >= panels * k * NR
            && ldc >= panels * NR
            && c_len >= (m - 1) * ldc + panels * NR,
        "{what}: {m} x {k} by {panels} panels"
    );
}

/// The loops of [`gemm_serial`] over raw pointers, so parallel callers can hand each task its
/// own block of a shared C.
///
/// # Safety
/// `a` holds `m` rows of `k` at stride `lda`, `b` `panels` packed panels of depth `k`, and `c`
/// `m` rows of `panels * NR` at stride `ldc` that no other thread touches meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn serial_block(
    m: usize,
    panels: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let kernel = micro_kernel();
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        for i0 in (0..m).step_by(MC) {
            let mc = MC.min(m - i0);
            for panel in 0..panels {
                for i in (i0..i0 + mc).step_by(MR) {
                    let r = MR.min(i0 + mc - i);
                    // SAFETY: rows i..i + r of A hold k0 + kc <= k values at stride lda; the
                    // panel's rows k0..k0 + kc lie in `b`; C rows i..i + r, columns
                    // panel * NR.. + NR lie in `c` (the caller's contract).
                    unsafe {
                        kernel(
                            r,
                            kc,
                            a.add(i * lda + k0),
                            lda,
                            b.add(panel_row(panel, k0, k)),
                            c.add(i * ldc + panel * NR),
                            ldc,
                            accumulate || k0 > 0,
                        );
                    }
                }
            }
        }
    }
}

/// B = `w`ᵀ packed whole for [`gemm_packed`]: `w` holds `n` rows of `k` values (a linear
/// layer's `[out, in]` weight), which become the columns of B, NR to a panel, zeros past `n`.
pub(crate) fn pack_rows(w: &[f32], n: usize, k: usize) -> Vec<f32> {
    assert!(
        w.len() >= n * k,
        "pack_rows: {n} rows of {k} in {} values",
        w.len()
    );
    let panels = n.div_ceil(NR);
    let mut b = vec![0f32; panels * k * NR];
    b.par_chunks_mut(k * NR)
        .enumerate()
        .for_each(|(panel, dst)| {
            let rows = NR.min(n - panel * NR);
            transpose_into(&w[panel * NR * k..], k, rows, k, 1.0, dst, NR);
        });
    b
}

/// Like [`pack_rows`] on the calling thread into `dst`, rows at stride `ld`, every value times
/// `scale` (attention's keys, scaled once here instead of every score).
pub(crate) fn pack_rows_into(
    src: &[f32],
    ld: usize,
    n: usize,
    k: usize,
    scale: f32,
    dst: &mut [f32],
) {
    let panels = n.div_ceil(NR);
    assert!(
        n > 0 && src.len() >= (n - 1) * ld + k && dst.len() >= panels * k * NR,
        "pack_rows_into: {n} rows of {k}"
    );
    for (panel, block) in dst[..panels * k * NR].chunks_exact_mut(k * NR).enumerate() {
        let rows = NR.min(n - panel * NR);
        transpose_into(&src[panel * NR * ld..], ld, rows, k, scale, block, NR);
        if rows < NR {
            for row in block.chunks_exact_mut(NR) {
                row[rows..].fill(0.0);
            }
        }
    }
}

/// B = the first `n` columns of `src` (`k` rows at stride `ld`) packed into `dst`: panels of NR
/// columns, `k` deep, zeros past `n` (attention's values: each panel row is a slice of a row).
pub(crate) fn pack_columns_into(src: &[f32], ld: usize, k: usize, n: usize, dst: &mut [f32]) {
    let panels = n.div_ceil(NR);
    assert!(
        k > 0 && src.len() >= (k - 1) * ld + n && dst.len() >= panels * k * NR,
        "pack_columns_into: {k} rows of {n}"
    );
    for (panel, block) in dst[..panels * k * NR].chunks_exact_mut(k * NR).enumerate() {
        let first = panel * NR;
        let width = NR.min(n - first);
        for (kk, row) in block.chunks_exact_mut(NR).enumerate() {
            row[..width].copy_from_slice(&src[kk * ld + first..][..width]);
            row[width..].fill(0.0);
        }
    }
}

/// `dst[kk * ldd + j] = scale * src[j * lds + kk]` for `j < rows`, `kk < cols`.
fn transpose_into(
    src: &[f32],
    lds: usize,
    rows: usize,
    cols: usize,
    scale: f32,
    dst: &mut [f32],
    ldd: usize,
) {
    // Blocks of 8 rows by 64 columns keep the 8 source lines and the written panel rows in L1.
    for j0 in (0..rows).step_by(8) {
        let jn = 8.min(rows - j0);
        for k0 in (0..cols).step_by(64) {
            let kn = 64.min(cols - k0);
            for j in j0..j0 + jn {
                let row = &src[j * lds + k0..][..kn];
                for (kk, &v) in row.iter().enumerate() {
                    dst[(k0 + kk) * ldd + j] = scale * v;
                }
            }
        }
    }
}

/// `C[m x n] += A[m x k] · B` with B packed whole by [`pack_rows`] and `n` a multiple of NR:
/// A rows at stride `lda`, read in place; C rows at stride `ldc`, written in place. Tasks take
/// blocks of A's rows by groups of B's panels.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_packed(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    c: &mut [f32],
    ldc: usize,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(
        n.is_multiple_of(NR),
        "gemm_packed: {n} columns, not whole panels"
    );
    let panels = n / NR;
    assert_extents(
        "gemm_packed",
        m,
        panels,
        k,
        a.len(),
        lda,
        b.len(),
        c.len(),
        ldc,
    );
    let threads = rayon::current_num_threads().max(1);
    // Up to 2 MC rows per task: the A block (MC x KC) and its C block stay in L2 while each
    // panel of B passes through L1. Column groups of up to NB when rows alone give too few tasks.
    let row_block = (2 * MC).min(m.div_ceil(MR) * MR);
    let row_blocks = m.div_ceil(row_block);
    let mut groups = panels.div_ceil(NB / NR);
    while row_blocks * groups < 4 * threads && groups < panels {
        groups += 1;
    }
    let group = panels.div_ceil(groups);
    let groups = panels.div_ceil(group);
    let c_ptr = crate::SharedMut::new(c);
    (0..row_blocks * groups).into_par_iter().for_each(|task| {
        let (ri, gi) = (task / groups, task % groups);
        let (r0, p0) = (ri * row_block, gi * group);
        let (rows, np) = (row_block.min(m - r0), group.min(panels - p0));
        // SAFETY: rows r0..r0 + rows of A and C and panels p0..p0 + np of B lie in the
        // buffers (checked above); this task alone writes its block of C.
        unsafe {
            serial_block(
                rows,
                np,
                k,
                a.as_ptr().add(r0 * lda),
                lda,
                b.as_ptr().add(p0 * k * NR),
                c_ptr.get().add(r0 * ldc + p0 * NR),
                ldc,
                true,
            );
        }
    });
}

/// `C[r x NR] (+)= A[r x kc] · B[kc x NR]` for r <= MR: A rows at stride `lda`, B one packed
/// panel, C rows at stride `ldc`; the last argument says whether C's values are kept and added
/// to (else overwritten, so C needs no zeroing first).
type MicroKernel = unsafe fn(usize, usize, *const f32, usize, *const f32, *mut f32, usize, bool);

fn micro_kernel() -> MicroKernel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return avx2::kernel;
        }
    }
    portable_kernel
}

/// The micro-kernel in plain Rust, for CPUs without AVX2 + FMA.
#[allow(clippy::too_many_arguments)] // the `MicroKernel` signature
unsafe fn portable_kernel(
    r: usize,
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    keep: bool,
) {
    for i in 0..r {
        let mut row = [0f32; NR];
        for kk in 0..kc {
            // SAFETY: the caller's contract (see `MicroKernel`).
            let av = unsafe { *a.add(i * lda + kk) };
            let bv = unsafe { std::slice::from_raw_parts(b.add(kk * NR), NR) };
            for (acc, &bv) in row.iter_mut().zip(bv) {
                *acc += av * bv;
            }
        }
        // SAFETY: as above.
        let c_row = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), NR) };
        for (c, v) in c_row.iter_mut().zip(row) {
            *c = if keep { *c + v } else { v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{MR, NR};

    /// Dispatches on the row count, so each tile shape has its loops fully unrolled.
    #[allow(clippy::too_many_arguments)] // the `MicroKernel` signature
    pub(super) unsafe fn kernel(
        r: usize,
        kc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        keep: bool,
    ) {
        // SAFETY: `micro_kernel` hands this out only where AVX2 and FMA exist; the pointers
        // follow the `MicroKernel` contract.
        unsafe {
            match r {
                6 => tile::<6>(kc, a, lda, b, c, ldc, keep),
                5 => tile::<5>(kc, a, lda, b, c, ldc, keep),
                4 => tile::<4>(kc, a, lda, b, c, ldc, keep),
                3 => tile::<3>(kc, a, lda, b, c, ldc, keep),
                2 => tile::<2>(kc, a, lda, b, c, ldc, keep),
                1 => tile::<1>(kc, a, lda, b, c, ldc, keep),
                _ => unreachable!("micro-kernel of {r} rows"),
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize>(
        kc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        keep: bool,
    ) {
        const { assert!(R >= 1 && R <= MR) };
        let mut lo = [_mm256_setzero_ps(); R];
        let mut hi = [_mm256_setzero_ps(); R];
        let mut rows = [a; R];
        for (i, row) in rows.iter_mut().enumerate() {
            *row = a.wrapping_add(i * lda);
        }
        let mut bp = b;
        for kk in 0..kc {
            // SAFETY: B holds kc rows of NR; each A row holds kc values from `a`.
            unsafe {
                let b0 = _mm256_loadu_ps(bp);
                let b1 = _mm256_loadu_ps(bp.add(8));
                bp = bp.add(NR);
                for i in 0..R {
                    let av = _mm256_broadcast_ss(&*rows[i].add(kk));
                    lo[i] = _mm256_fmadd_ps(av, b0, lo[i]);
                    hi[i] = _mm256_fmadd_ps(av, b1, hi[i]);
                }
            }
        }
        for i in 0..R {
            // SAFETY: C rows i < R <= r hold NR values at stride ldc.
            unsafe {
                let at = c.add(i * ldc);
                if keep {
                    lo[i] = _mm256_add_ps(_mm256_loadu_ps(at), lo[i]);
                    hi[i] = _mm256_add_ps(_mm256_loadu_ps(at.add(8)), hi[i]);
                }
                _mm256_storeu_ps(at, lo[i]);
                _mm256_storeu_ps(at.add(8), hi[i]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed pseudo-random fill in [-1, 1).
    fn fill(n: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    #[test]
    fn every_kernel_and_the_driver_match_a_naive_product() {
        let (m, n, k) = (13, 37, 300);
        let a = fill(m * k, 1);
        let b = fill(k * n, 2);
        let expected: Vec<f32> = (0..m * n)
            .map(|ij| {
                (0..k)
                    .map(|kk| a[ij / n * k + kk] * b[kk * n + ij % n])
                    .sum()
            })
            .collect();
        // Rows of 6 and fewer, with the portable kernel and the one this CPU picks.
        let panels = n.div_ceil(NR);
        let mut packed = vec![0f32; panels * k * NR];
        for kk in 0..k {
            for j in 0..n {
                packed[panel_row(j / NR, kk, k) + j % NR] = b[kk * n + j];
            }
        }
        for kernel in [portable_kernel as MicroKernel, micro_kernel()] {
            for r in 1..=MR {
                // C overwritten, then C kept and added to.
                for (keep, before) in [(false, 0.0), (true, 0.5)] {
                    let mut c = vec![if keep { before } else { 7.0 }; r * NR];
                    // SAFETY: A has r <= m rows of k, B one packed panel of k rows, C r x NR.
                    unsafe {
                        kernel(
                            r,
                            k,
                            a.as_ptr(),
                            k,
                            packed.as_ptr(),
                            c.as_mut_ptr(),
                            NR,
                            keep,
                        )
                    };
                    for i in 0..r {
                        for j in 0..NR {
                            let diff = (c[i * NR + j] - before - expected[i * n + j]).abs();
                            // Dot products of 300 terms of size ~1/3 in another order.
                            assert!(diff < 1e-4, "{r} rows, {keep}: ({i}, {j}) off by {diff}");
                        }
                    }
                }
            }
        }
        let mut c = vec![0f32; m * n];
        let c_ptr = crate::SharedMut::new(&mut c);
        gemm(
            m,
            n,
            k,
            &a,
            k,
            |k0, kc, n0, cols, dst| {
                for kk in 0..kc {
                    for j in 0..cols.div_ceil(NR) * NR {
                        let v = if j < cols {
                            b[(k0 + kk) * n + n0 + j]
                        } else {
                            0.0
                        };
                        dst[panel_row(j / NR, kk, kc) + j % NR] = v;
                    }
                }
            },
            |m0, rows, n0, cols, acc, ldc| {
                for i in 0..rows {
                    for j in 0..cols {
                        // SAFETY: tasks hand over disjoint blocks of C.
                        unsafe { c_ptr.write((m0 + i) * n + n0 + j, acc[i * ldc + j]) };
                    }
                }
            },
        );
        for (got, want) in c.iter().zip(&expected) {
            assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        }
    }
}
