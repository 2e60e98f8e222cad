//! 3x3 convolutions (stride 1, padding 1) by Winograd's minimal filtering F(2x2, 3x3) (Lavin and
//! Gray 2016, "Fast Algorithms for Convolutional Neural Networks"), on the CPU in f32.
//!
//! Each 2x2 block of outputs comes from a 4x4 patch of input: with `V = Bᵀ d B` (the patch)
//! and `U = G g Gᵀ` (each 3x3 filter), the block is `Aᵀ [Σ_c U ⊙ V] A`. The sum over input
//! channels is, for each of the 16 positions of the 4x4 transform, a matrix product
//! `[c_out x c_in] · [c_in x tiles]`: 16 products of 16 multiply-adds per 4 outputs instead of
//! 36, 2.25 times fewer. The transforms are additions, subtractions and halvings, which f32
//! does exactly or to one rounding each, so the result stays within a few ulp of the direct
//! convolution's (checked against it in the tests).
//!
//! Work is split into blocks of tiles: each task transforms its patches for every input channel
//! into packed panels, runs the 16 products with the micro-kernel of [`crate::packed`], and
//! transforms its outputs back, so the transformed image never exists whole.

use rayon::prelude::*;

use crate::packed::{self, NR};

/// Transformed filters `U`, `[16][c_out][c_in]`.
fn transform_filters(w: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
    let plane = c_out * c_in;
    let mut u = vec![0f32; 16 * plane];
    let u_ptr = crate::SharedMut::new(&mut u);
    (0..c_out).into_par_iter().for_each(|o| {
        for c in 0..c_in {
            let g = &w[(o * c_in + c) * 9..][..9];
            // G g: 4 rows of 3.
            let mut t = [[0f32; 3]; 4];
            for j in 0..3 {
                let (g0, g1, g2) = (g[j], g[3 + j], g[6 + j]);
                t[0][j] = g0;
                t[1][j] = 0.5 * (g0 + g1 + g2);
                t[2][j] = 0.5 * (g0 - g1 + g2);
                t[3][j] = g2;
            }
            // (G g) Gᵀ: 4 x 4.
            for (i, row) in t.iter().enumerate() {
                let (g0, g1, g2) = (row[0], row[1], row[2]);
                let vals = [g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2];
                for (j, v) in vals.into_iter().enumerate() {
                    // SAFETY: position (i, j), row o, column c: this task owns row o.
                    unsafe { u_ptr.write((i * 4 + j) * plane + o * c_in + c, v) };
                }
            }
        }
    });
    u
}

/// The tiles `t0..t0 + n` as runs `(offset from t0, length)` that stay within one row of tiles
/// and one packed panel (at most NR long).
fn tile_runs(t0: usize, n: usize, tiles_per_item: usize, tw: usize) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut t = 0;
    while t < n {
        let in_row = tw - (t0 + t) % tiles_per_item % tw;
        let in_panel = NR - t % NR;
        let len = in_row.min(in_panel).min(n - t);
        runs.push((t, len));
        t += len;
    }
    runs
}

/// Whether F(2x2, 3x3) pays for this convolution: enough tiles for the transforms (and the
/// filter transform, done per call) to be amortised, enough channels for the products to be
/// matrix products. Measured on 2 cores: a UNet's 640-channel convolution at 2x32x32 takes
/// 94 ms against 120-130 ms direct, its 1280-channel one at 2x16x16 155 ms against 130 ms.
pub(crate) fn pays(batch: usize, c_in: usize, c_out: usize, height: usize, width: usize) -> bool {
    c_in >= 32 && c_out >= 32 && batch * height * width >= 2 * 32 * 32 && height >= 4 && width >= 4
}

/// `conv2d(x, w, padding 1, stride 1) + bias`, `x` `[batch, c_in, height, width]`, `w`
/// `[c_out, c_in, 3, 3]`, all contiguous; returns `[batch, c_out, height, width]`.
pub(crate) fn conv3x3(
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    (batch, c_in, height, width): (usize, usize, usize, usize),
    c_out: usize,
) -> Vec<f32> {
    let (th, tw) = (height.div_ceil(2), width.div_ceil(2));
    let tiles_per_item = th * tw;
    let tiles = batch * tiles_per_item;
    let u = transform_filters(w, c_out, c_in);
    let plane = c_out * c_in;

    // Tiles per task: the packed patches of one position (c_in x block) within 128 KiB, so
    // that a task's patches and products (16 positions each) stay within 2 MiB (measured
    // best on 128-512 channels among 64 KiB to 512 KiB per position).
    let threads = rayon::current_num_threads().max(1);
    let mut block = ((32 * 1024) / c_in).clamp(2 * NR, 32 * NR) / NR * NR;
    while block > 2 * NR && tiles.div_ceil(block) < 3 * threads {
        block /= 2;
    }
    let block = block.div_ceil(NR) * NR;

    let mut out = vec![0f32; batch * c_out * height * width];
    let out_ptr = crate::SharedMut::new(&mut out);
    let input = |b: usize, c: usize, y: isize, x_: isize| -> f32 {
        if y < 0 || x_ < 0 || y >= height as isize || x_ >= width as isize {
            0.0
        } else {
            x[((b * c_in + c) * height + y as usize) * width + x_ as usize]
        }
    };
    (0..tiles.div_ceil(block)).into_par_iter().for_each_init(
        || {
            (
                vec![0f32; 16 * c_in * block],
                vec![0f32; 16 * c_out * block],
            )
        },
        |(v, m), task| {
            let t0 = task * block;
            let n = block.min(tiles - t0);
            let panels = n.div_ceil(NR);
            let stride_v = c_in * panels * NR;
            // V for every position: panel p of position e holds rows c, columns t % NR. Tiles
            // go in runs that share a row of tiles and a panel, up to NR at once, so the
            // arithmetic runs across the run's lanes.
            let runs = tile_runs(t0, n, tiles_per_item, tw);
            for c in 0..c_in {
                for &(t, len) in &runs {
                    let (b, r) = ((t0 + t) / tiles_per_item, (t0 + t) % tiles_per_item);
                    let (y0, x0) = (2 * (r / tw) as isize - 1, 2 * (r % tw) as isize - 1);
                    // d[i][j][lane]: patch element (i, j) of tile t + lane.
                    let mut d = [[[0f32; NR]; 4]; 4];
                    for lane in 0..len {
                        let x0 = x0 + 2 * lane as isize;
                        let inside = y0 >= 0
                            && x0 >= 0
                            && y0 as usize + 4 <= height
                            && x0 as usize + 4 <= width;
                        let base = ((b * c_in + c) * height) as isize * width as isize;
                        for (i, plane) in d.iter_mut().enumerate() {
                            for (j, row) in plane.iter_mut().enumerate() {
                                row[lane] = if inside {
                                    x[(base + (y0 + i as isize) * width as isize + x0 + j as isize)
                                        as usize]
                                } else {
                                    input(b, c, y0 + i as isize, x0 + j as isize)
                                };
                            }
                        }
                    }
                    // Bᵀ d B, lane by lane.
                    let mut e = [[0f32; NR]; 16];
                    for lane in 0..NR {
                        let mut s = [[0f32; 4]; 4];
                        for j in 0..4 {
                            s[0][j] = d[0][j][lane] - d[2][j][lane];
                            s[1][j] = d[1][j][lane] + d[2][j][lane];
                            s[2][j] = d[2][j][lane] - d[1][j][lane];
                            s[3][j] = d[1][j][lane] - d[3][j][lane];
                        }
                        for (i, row) in s.iter().enumerate() {
                            e[i * 4][lane] = row[0] - row[2];
                            e[i * 4 + 1][lane] = row[1] + row[2];
                            e[i * 4 + 2][lane] = row[2] - row[1];
                            e[i * 4 + 3][lane] = row[1] - row[3];
                        }
                    }
                    let at = packed::panel_row(t / NR, c, c_in) + t % NR;
                    for (pos, vals) in e.iter().enumerate() {
                        v[pos * stride_v + at..][..len].copy_from_slice(&vals[..len]);
                    }
                }
                // Columns past the last tile are zeros.
                for t in n..panels * NR {
                    let at = packed::panel_row(t / NR, c, c_in) + t % NR;
                    for pos in 0..16 {
                        v[pos * stride_v + at] = 0.0;
                    }
                }
            }
            // M[e] = U[e] · V[e], c_out x (panels * NR) each.
            let ldc = panels * NR;
            let m = &mut m[..16 * c_out * ldc];
            for e in 0..16 {
                packed::gemm_serial(
                    c_out,
                    panels,
                    c_in,
                    &u[e * plane..(e + 1) * plane],
                    c_in,
                    &v[e * stride_v..(e + 1) * stride_v],
                    &mut m[e * c_out * ldc..(e + 1) * c_out * ldc],
                    ldc,
                    false,
                );
            }
            // Y = Aᵀ M A + bias, 2x2 per tile, clipped at the image's edge. Channels outer,
            // runs of tiles inner: M is read along its rows, a run's lanes at once.
            for o in 0..c_out {
                for &(t, len) in &runs {
                    let mut mm = [[0f32; NR]; 16];
                    for (pos, vals) in mm.iter_mut().enumerate() {
                        vals[..len].copy_from_slice(&m[(pos * c_out + o) * ldc + t..][..len]);
                    }
                    // Aᵀ M A, lane by lane: y[i * 2 + j][lane].
                    let mut y = [[0f32; NR]; 4];
                    for lane in 0..NR {
                        let mut s = [[0f32; 4]; 2];
                        for j in 0..4 {
                            s[0][j] = mm[j][lane] + mm[4 + j][lane] + mm[8 + j][lane];
                            s[1][j] = mm[4 + j][lane] - mm[8 + j][lane] - mm[12 + j][lane];
                        }
                        for (i, row) in s.iter().enumerate() {
                            y[i * 2][lane] = row[0] + row[1] + row[2] + bias[o];
                            y[i * 2 + 1][lane] = row[1] - row[2] - row[3] + bias[o];
                        }
                    }
                    let (b, r) = ((t0 + t) / tiles_per_item, (t0 + t) % tiles_per_item);
                    let (y0, x_start) = (2 * (r / tw), 2 * (r % tw));
                    let rows = (height - y0).min(2);
                    for (i, pair) in y.chunks_exact(2).enumerate().take(rows) {
                        let base = ((b * c_out + o) * height + y0 + i) * width;
                        for lane in 0..len {
                            let x0 = x_start + 2 * lane;
                            for (j, col) in pair.iter().enumerate().take((width - x0).min(2)) {
                                // SAFETY: pixel (b, o, y0 + i, x0 + j) belongs to this tile,
                                // which only this task computes.
                                unsafe { out_ptr.write(base + x0 + j, col[lane]) };
                            }
                        }
                    }
                }
            }
        },
    );
    out
}
