//! f32 CPU kernels for the layers that dominate a generation on the CPU: 3x3 and 1x1
//! convolutions, softmax attention, and GroupNorm with its SiLU.
//!
//! candle's CPU backend lowers a convolution to a full im2col copy (`c_in * 9` values per output
//! pixel, 1.2 GB for one 128-channel layer of a 512x512 VAE decode) followed by a matmul, runs
//! every elementwise op on one thread, and composes GroupNorm from about ten such ops. Here:
//!
//! - a stride-1 convolution is a sum of `k * k` matrix products, one per kernel tap, each reading
//!   the zero-padded input through a shifted view (no im2col). Output pixels are computed over the
//!   padded width, so that a tap's view is a plain strided matrix; the `k - 1` extra columns per
//!   row are dropped when the block is copied out. Work is split into column blocks whose
//!   accumulator stays in cache while all taps add into it;
//! - attention runs per (batch, head, block of queries): scores, softmax and the weighted sum of
//!   the values, so the `tokens x context` score matrix never exists whole;
//! - GroupNorm computes its statistics and applies the affine map (and SiLU) in one parallel
//!   pass per group.
//!
//! Every kernel accumulates in f32 like the reference (torch's CPU kernels), so the results
//! match candle's own path to rounding. [`enabled`] turns the whole module off
//! (`SD_SERVE_CPU_KERNELS=0`), for comparisons.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// Whether the kernels here run for `t`: f32 on the CPU, unless `SD_SERVE_CPU_KERNELS=0`.
pub(crate) fn applies(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && enabled()
}

/// `SD_SERVE_CPU_KERNELS=0` falls back to candle's kernels everywhere.
pub fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("SD_SERVE_CPU_KERNELS").map_or(true, |v| v != "0"))
}

fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// A pointer that rayon tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: every task writes a region no other task touches (see each use).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{what}: expected f32 storage");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

// ---------------------------------------------------------------------------------------------
// Convolution

/// Stride-1 convolution with zero padding `padding`, square kernel, no groups or dilation.
struct Conv2dOp {
    padding: usize,
}

/// Accumulator block: columns per task such that `out_channels` rows stay within ~512 KiB.
fn conv_block_columns(out_channels: usize, columns: usize, batch: usize) -> usize {
    let mut block = ((128 * 1024) / out_channels.max(1)).clamp(64, 2048);
    // Enough blocks for every thread to have a few.
    let wanted = 3 * threads();
    while block > 32 && batch * columns.div_ceil(block) < wanted {
        block /= 2;
    }
    block.div_ceil(8) * 8
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "sd-serve-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "conv2d input")?;
        let w = f32_slice(ws, wl, "conv2d weight")?;
        let bias = f32_slice(bs, bl, "conv2d bias")?;
        let (batch, c_in, height, width) = xl.shape().dims4()?;
        let (c_out, w_in, k, k2) = wl.shape().dims4()?;
        if w_in != c_in || k != k2 || bias.len() != c_out {
            candle_core::bail!(
                "conv2d: input {:?}, weight {:?}, bias {}",
                xl.shape(),
                wl.shape(),
                bias.len()
            );
        }
        let p = self.padding;
        let (hp, wp) = (height + 2 * p, width + 2 * p);
        if hp < k || wp < k {
            candle_core::bail!(
                "conv2d: input {:?} smaller than the {k}x{k} kernel",
                xl.shape()
            );
        }
        if batch * c_in * c_out * height * width == 0 {
            candle_core::bail!(
                "conv2d: empty input {:?} or weight {:?}",
                xl.shape(),
                wl.shape()
            );
        }
        let (ho, wo) = (hp - k + 1, wp - k + 1);
        let plane = hp * wp;

        // The padded input, plus k - 1 trailing zeros: the last tap's view of the last row runs
        // that far past the last plane (into columns that are dropped).
        let padded_storage;
        let xp: &[f32] = if p == 0 && k == 1 {
            x
        } else {
            let mut buf = vec![0f32; batch * c_in * plane + k - 1];
            buf[..batch * c_in * plane]
                .par_chunks_mut(plane)
                .zip(x.par_chunks(height * width))
                .for_each(|(dst, src)| {
                    for (row, src_row) in src.chunks_exact(width).enumerate() {
                        let at = (row + p) * wp + p;
                        dst[at..at + width].copy_from_slice(src_row);
                    }
                });
            padded_storage = buf;
            &padded_storage
        };

        // Output over the padded width: column j of a batch item is pixel (j / wp, j % wp).
        let columns = ho * wp;
        let block = conv_block_columns(c_out, columns, batch);
        let blocks = columns.div_ceil(block);
        let mut out = vec![0f32; batch * c_out * ho * wo];
        let out_ptr = SharedMut(out.as_mut_ptr());
        let taps = k * k;
        (0..batch * blocks).into_par_iter().for_each_init(
            || vec![0f32; c_out * block],
            |acc, task| {
                let (b, blk) = (task / blocks, task % blocks);
                let j0 = blk * block;
                let n = block.min(columns - j0);
                for (row, chunk) in acc.chunks_exact_mut(block).enumerate() {
                    chunk[..n].fill(bias[row]);
                }
                let x_b = &xp[b * c_in * plane..];
                for tap in 0..taps {
                    let (dy, dx) = (tap / k, tap % k);
                    let shift = dy * wp + dx + j0;
                    // SAFETY: `acc` holds c_out rows of `block` >= n columns; the weight view is
                    // c_out x c_in with strides (c_in * taps, taps) inside `w`; the input view is
                    // c_in x n with strides (plane, 1) starting at `shift`, whose last element,
                    // (c_in - 1) * plane + shift + n - 1 <= c_in * plane + k - 2, lies in the
                    // padded buffer (k - 1 trailing zeros).
                    unsafe {
                        gemm::gemm(
                            c_out,
                            n,
                            c_in,
                            acc.as_mut_ptr(),
                            1,
                            block as isize,
                            true,
                            w.as_ptr().add(tap),
                            taps as isize,
                            (c_in * taps) as isize,
                            x_b.as_ptr().add(shift),
                            1,
                            plane as isize,
                            1.0,
                            1.0,
                            false,
                            false,
                            false,
                            Parallelism::None,
                        );
                    }
                }
                // Copy the valid columns out: runs of consecutive pixels of one output row.
                let mut j = 0;
                while j < n {
                    let (y, x) = ((j0 + j) / wp, (j0 + j) % wp);
                    let run = (wp - x).min(n - j);
                    let valid = wo.saturating_sub(x).min(run);
                    if valid > 0 {
                        for c in 0..c_out {
                            let src = &acc[c * block + j..c * block + j + valid];
                            let at = ((b * c_out + c) * ho + y) * wo + x;
                            // SAFETY: (b, c, y, x..x + valid) belongs to this task's columns
                            // only; tasks cover disjoint column ranges of each batch item.
                            unsafe {
                                std::ptr::copy_nonoverlapping(
                                    src.as_ptr(),
                                    out_ptr.get().add(at),
                                    valid,
                                );
                            }
                        }
                    }
                    j += run;
                }
            },
        );
        Ok((
            CpuStorage::F32(out),
            Shape::from_dims(&[batch, c_out, ho, wo]),
        ))
    }
}

/// `conv2d(x, weight, padding, stride 1) + bias` for f32 CPU tensors, or `None` where this
/// module does not apply (another dtype or device, a stride other than 1).
pub(crate) fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Option<Tensor>> {
    if stride != 1 || !applies(x) || weight.dtype() != DType::F32 || bias.dtype() != DType::F32 {
        return Ok(None);
    }
    let op = Conv2dOp { padding };
    x.contiguous()?
        .apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &op)
        .map(Some)
}

// ---------------------------------------------------------------------------------------------
// Vector math: exp and the loops that use it, compiled for AVX2 + FMA where the CPU has them.

/// `exp(x)` to about 1 ulp for x in [-87, 88] (Cephes' single-precision polynomial after the
/// usual reduction x = n ln2 + r), without branches so loops of it vectorise. Below -87 it
/// returns about 1e-38 instead of a denormal or 0; nothing here needs those.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut poly = 1.987_569_1e-4f32;
    poly = poly.mul_add(r, 1.398_199_9e-3);
    poly = poly.mul_add(r, 8.333_452e-3);
    poly = poly.mul_add(r, 4.166_579_6e-2);
    poly = poly.mul_add(r, 1.666_666_5e-1);
    poly = poly.mul_add(r, 0.5);
    let e = poly.mul_add(r * r, r) + 1.0;
    // SAFETY: n is an integer in [-126, 127] after the clamp, so the conversion is exact.
    let biased = unsafe { n.to_int_unchecked::<i32>() } + 127;
    let scale = f32::from_bits((biased as u32) << 23);
    e * scale
}

/// `erf(x)` to a few ulp: the odd rational approximation on [-4, 4] that Eigen and XNNPACK use
/// for f32 (beyond 4, erf is 1 in f32).
#[inline(always)]
fn erf_f32(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10f32;
    p = p.mul_add(x2, 2.770_681_4e-8);
    p = p.mul_add(x2, -2.101_024e-6);
    p = p.mul_add(x2, -5.692_506_5e-5);
    p = p.mul_add(x2, -7.349_906e-4);
    p = p.mul_add(x2, -2.954_600_2e-3);
    p = p.mul_add(x2, -1.609_603_3e-2);
    let mut q = -1.456_607_2e-5f32;
    q = q.mul_add(x2, -2.133_740_6e-4);
    q = q.mul_add(x2, -1.682_827e-3);
    q = q.mul_add(x2, -7.373_329_2e-3);
    q = q.mul_add(x2, -1.426_474e-2);
    x * p / q
}

/// Exact GELU, `x/2 (1 + erf(x / sqrt 2))`, as torch's default.
#[inline(always)]
fn gelu_f32(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
fn silu_f32(x: f32) -> f32 {
    x / (1.0 + exp_f32(-x))
}

/// Runs `$body` (an expression over the generic helpers above) compiled for AVX2 + FMA when the
/// CPU has them, else for the baseline target.
macro_rules! dispatch {
    ($(#[$meta:meta])* $name:ident ( $($arg:ident : $ty:ty),* ) -> $ret:ty $body:block) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($arg: $ty),*) -> $ret $body
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features `fast` was compiled for.
                    return unsafe { fast($($arg),*) };
                }
            }
            $body
        }
    };
}

dispatch!(row_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for chunk in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l = l.max(v);
        }
    }
    let mut m = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &v in chunks.remainder() {
        m = m.max(v);
    }
    m
});

dispatch!(/// `row[i] = exp(row[i] - max)`; returns the sum.
    exp_shifted_sum(row: &mut [f32], max: f32) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for chunk in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(chunk.iter_mut()) {
            *v = exp_f32(*v - max);
            *l += *v;
        }
    }
    let mut sum: f32 = lanes.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp_f32(*v - max);
        sum += *v;
    }
    sum
});

dispatch!(/// Sum of `xs` (f32 lanes within, returned as f64).
    sum_f32(xs: &[f32]) -> f64 {
    let mut lanes = [0f32; 8];
    let mut chunks = xs.chunks_exact(8);
    for chunk in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l += v;
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    lanes.iter().map(|&l| l as f64).sum::<f64>() + tail as f64
});

dispatch!(/// Sum of `(x - mean)^2` over `xs`.
    centered_squares_f32(xs: &[f32], mean: f32) -> f64 {
    let mut lanes = [0f32; 8];
    let mut chunks = xs.chunks_exact(8);
    for chunk in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            let d = v - mean;
            *l = d.mul_add(d, *l);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| (v - mean) * (v - mean)).sum();
    lanes.iter().map(|&l| l as f64).sum::<f64>() + tail as f64
});

dispatch!(/// `dst[i] = src[i] * scale + shift`, then SiLU when `silu`.
    affine(src: &[f32], dst: &mut [f32], scale: f32, shift: f32, silu: bool) -> () {
    if silu {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = silu_f32(s.mul_add(scale, shift));
        }
    } else {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s.mul_add(scale, shift);
        }
    }
});

dispatch!(silu_slice(src: &[f32], dst: &mut [f32]) -> () {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = silu_f32(s);
    }
});

dispatch!(
    /// `dst[i] = hidden[i] * gelu(gate[i])`.
    geglu_row(hidden: &[f32], gate: &[f32], dst: &mut [f32]) -> () {
    for ((d, &h), &g) in dst.iter_mut().zip(hidden).zip(gate) {
        *d = h * gelu_f32(g);
    }
});

dispatch!(scale_slice(xs: &mut [f32], factor: f32) -> () {
    for v in xs.iter_mut() {
        *v *= factor;
    }
});

// ---------------------------------------------------------------------------------------------
// Attention

/// Softmax attention over contiguous `[batch, tokens, heads, head_dim]` q and
/// `[batch, context, heads, head_dim]` k, v.
struct AttentionOp {
    scale: f32,
}

/// Query rows per task: up to 256, the score block (rows x context) within ~4 MiB; larger
/// blocks repack the keys less often.
fn attention_block_rows(context: usize, tokens: usize, tasks_outside: usize) -> usize {
    let mut rows = ((1024 * 1024) / context.max(1)).clamp(16, 256);
    let wanted = 3 * threads();
    while rows > 16 && tasks_outside * tokens.div_ceil(rows) < wanted {
        rows /= 2;
    }
    rows.min(tokens.max(1))
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "sd-serve-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let q = f32_slice(qs, ql, "attention q")?;
        let k = f32_slice(ks, kl, "attention k")?;
        let v = f32_slice(vs, vl, "attention v")?;
        let (batch, tokens, heads, dim) = ql.shape().dims4()?;
        let (kb, context, kh, kd) = kl.shape().dims4()?;
        if (kb, kh, kd) != (batch, heads, dim) || vl.shape() != kl.shape() {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?}",
                ql.shape(),
                kl.shape(),
                vl.shape()
            );
        }
        let rows = attention_block_rows(context, tokens, batch * heads);
        let blocks = tokens.div_ceil(rows);
        let mut out = vec![0f32; batch * tokens * heads * dim];
        let out_ptr = SharedMut(out.as_mut_ptr());
        let stride = (heads * dim) as isize;
        (0..batch * heads * blocks).into_par_iter().for_each_init(
            || vec![0f32; rows * context],
            |scores, task| {
                let (bh, blk) = (task / blocks, task % blocks);
                let (b, h) = (bh / heads, bh % heads);
                let r0 = blk * rows;
                let n = rows.min(tokens - r0);
                let q0 = ((b * tokens + r0) * heads + h) * dim;
                let kv0 = (b * context * heads + h) * dim;
                // SAFETY: views of q (n x dim, strides (heads*dim, 1)), k transposed
                // (dim x context, strides (1, heads*dim)) and v (context x dim) lie in their
                // contiguous buffers; `scores` has n x context elements.
                unsafe {
                    gemm::gemm(
                        n,
                        context,
                        dim,
                        scores.as_mut_ptr(),
                        1,
                        context as isize,
                        false,
                        q.as_ptr().add(q0),
                        1,
                        stride,
                        k.as_ptr().add(kv0),
                        stride,
                        1,
                        0.0,
                        self.scale,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
                let mut inv_sums = [0f32; 256];
                for (r, row) in scores.chunks_exact_mut(context).take(n).enumerate() {
                    let max = row_max(row);
                    inv_sums[r] = 1.0 / exp_shifted_sum(row, max);
                }
                // SAFETY: rows r0..r0+n of head h in batch b are written by this task only;
                // the destination view (n x dim, strides (heads*dim, 1)) lies in `out`.
                unsafe {
                    let dst = out_ptr.get().add(q0);
                    gemm::gemm(
                        n,
                        dim,
                        context,
                        dst,
                        1,
                        stride,
                        false,
                        scores.as_ptr(),
                        1,
                        context as isize,
                        v.as_ptr().add(kv0),
                        1,
                        stride,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                    for (r, &inv) in inv_sums.iter().enumerate().take(n) {
                        let row = std::slice::from_raw_parts_mut(dst.add(r * heads * dim), dim);
                        scale_slice(row, inv);
                    }
                }
            },
        );
        Ok((
            CpuStorage::F32(out),
            Shape::from_dims(&[batch, tokens, heads, dim]),
        ))
    }
}

/// Unmasked softmax attention for f32 CPU tensors (layout as
/// [`super::layers::scaled_dot_product_attention`]), or `None` where this module does not apply.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> candle_core::Result<Option<Tensor>> {
    if !applies(q) || k.dtype() != DType::F32 || v.dtype() != DType::F32 {
        return Ok(None);
    }
    let op = AttentionOp {
        scale: scale as f32,
    };
    q.contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
        .map(Some)
}

// ---------------------------------------------------------------------------------------------
// GroupNorm and SiLU

struct GroupNormOp {
    groups: usize,
    eps: f64,
    weight: Vec<f32>,
    bias: Vec<f32>,
    silu: bool,
    /// Write `[batch, spatial, channels]` (tokens) instead of the input's layout.
    tokens: bool,
}

impl CustomOp1 for GroupNormOp {
    fn name(&self) -> &'static str {
        "sd-serve-group-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "group norm input")?;
        let dims = l.shape().dims();
        if dims.len() < 2 {
            candle_core::bail!("group norm: input {:?} has no channel dimension", l.shape());
        }
        let channels = dims[1];
        let spatial: usize = dims[2..].iter().product();
        let g = self.groups;
        if g == 0 || !channels.is_multiple_of(g) || self.weight.len() != channels {
            candle_core::bail!("group norm: {channels} channels in {g} groups");
        }
        let per_group = channels / g;
        let group_len = per_group * spatial;
        if x.is_empty() {
            candle_core::bail!("group norm: empty input {:?}", l.shape());
        }
        // Per (item, group): the mean and 1/std, two passes as torch.
        let stats: Vec<(f32, f32)> = x
            .par_chunks(group_len)
            .map(|src| {
                let n = src.len().max(1) as f64;
                let mean = (src.chunks(4096).map(sum_f32).sum::<f64>() / n) as f32;
                let var = src
                    .chunks(4096)
                    .map(|c| centered_squares_f32(c, mean))
                    .sum::<f64>()
                    / n;
                (mean, (1.0 / (var + self.eps).sqrt()) as f32)
            })
            .collect();
        // Per (item, channel): y = x * scale + shift.
        let affine_of = |b: usize, ch: usize| {
            let (mean, rstd) = stats[b * g + ch / per_group];
            let scale = rstd * self.weight[ch];
            (scale, self.bias[ch] - mean * scale)
        };
        let mut out = vec![0f32; x.len()];
        if !self.tokens {
            out.par_chunks_mut(spatial.max(1))
                .zip(x.par_chunks(spatial.max(1)))
                .enumerate()
                .for_each(|(i, (dst, src))| {
                    let (scale, shift) = affine_of(i / channels, i % channels);
                    affine(src, dst, scale, shift, self.silu);
                });
            return Ok((CpuStorage::F32(out), l.shape().clone()));
        }
        // Tokens: each task writes whole rows (all channels of up to ROWS positions).
        const ROWS: usize = 64;
        for (b, item) in out.chunks_mut(spatial * channels).enumerate() {
            item.par_chunks_mut(ROWS * channels)
                .enumerate()
                .for_each(|(blk, dst)| {
                    let p0 = blk * ROWS;
                    let rows = dst.len() / channels;
                    let mut column = [0f32; ROWS];
                    for ch in 0..channels {
                        let (scale, shift) = affine_of(b, ch);
                        let src = &x[(b * channels + ch) * spatial + p0..][..rows];
                        affine(src, &mut column[..rows], scale, shift, self.silu);
                        for (r, &v) in column[..rows].iter().enumerate() {
                            dst[r * channels + ch] = v;
                        }
                    }
                });
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from_dims(&[dims[0], spatial, channels]),
        ))
    }
}

/// GroupNorm over `[batch, channels, ...]` with per-channel `weight` and `bias`, followed by SiLU
/// when `silu`, for f32 CPU tensors; `None` where this module does not apply.
pub(crate) fn group_norm(
    x: &Tensor,
    groups: usize,
    eps: f64,
    weight: &Tensor,
    bias: &Tensor,
    silu: bool,
) -> candle_core::Result<Option<Tensor>> {
    run_group_norm(x, groups, eps, (weight, bias), silu, false)
}

/// GroupNorm of `[batch, channels, height, width]` returned as tokens
/// `[batch, height * width, channels]` (the transposition done by the affine pass), for f32
/// CPU tensors; `None` where this module does not apply.
pub(crate) fn group_norm_tokens(
    x: &Tensor,
    groups: usize,
    eps: f64,
    weight: &Tensor,
    bias: &Tensor,
) -> candle_core::Result<Option<Tensor>> {
    run_group_norm(x, groups, eps, (weight, bias), false, true)
}

fn run_group_norm(
    x: &Tensor,
    groups: usize,
    eps: f64,
    (weight, bias): (&Tensor, &Tensor),
    silu: bool,
    tokens: bool,
) -> candle_core::Result<Option<Tensor>> {
    if !applies(x) {
        return Ok(None);
    }
    let op = GroupNormOp {
        groups,
        eps,
        weight: weight.to_dtype(DType::F32)?.to_vec1()?,
        bias: bias.to_dtype(DType::F32)?.to_vec1()?,
        silu,
        tokens,
    };
    x.contiguous()?.apply_op1_no_bwd(&op).map(Some)
}

struct SiluOp;

impl CustomOp1 for SiluOp {
    fn name(&self) -> &'static str {
        "sd-serve-silu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "silu input")?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(1 << 14)
            .zip(x.par_chunks(1 << 14))
            .for_each(|(d, s)| silu_slice(s, d));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// `x * sigmoid(x)` on all threads for f32 CPU tensors, else candle's.
pub(crate) fn silu(x: &Tensor) -> candle_core::Result<Tensor> {
    if applies(x) {
        x.contiguous()?.apply_op1_no_bwd(&SiluOp)
    } else {
        x.silu()
    }
}

// ---------------------------------------------------------------------------------------------
// GEGLU

struct GegluOp;

impl CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "sd-serve-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "geglu input")?;
        let dims = l.shape().dims();
        let width = dims.last().copied().unwrap_or(0);
        if width == 0 || width % 2 != 0 {
            candle_core::bail!("geglu: last dimension of {:?} is not even", l.shape());
        }
        let inner = width / 2;
        let mut out = vec![0f32; x.len() / 2];
        out.par_chunks_mut(inner)
            .zip(x.par_chunks(width))
            .for_each(|(d, row)| geglu_row(&row[..inner], &row[inner..], d));
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = inner;
        }
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// diffusers' GEGLU over the last dimension: its first half times the exact GELU of its second
/// half, on all threads for f32 CPU tensors; `None` where this module does not apply.
pub(crate) fn geglu(x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !applies(x) {
        return Ok(None);
    }
    x.contiguous()?.apply_op1_no_bwd(&GegluOp).map(Some)
}

/// The stride-1 convolution kernel on its own (`examples/kernels_bench.rs` times it against
/// candle's); an error where it does not apply (not f32 on the CPU, or turned off).
pub fn conv2d_stride1(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    padding: usize,
) -> candle_core::Result<Tensor> {
    conv2d(x, weight, bias, padding, 1)?
        .ok_or_else(|| candle_core::Error::Msg("the CPU convolution kernel does not apply".into()))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn random(shape: &[usize], seed: u64) -> Tensor {
        // A fixed pseudo-random fill, so failures reproduce.
        let n: usize = shape.iter().product();
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let data: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn exp_matches_std() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let rel = ((exp_f32(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        // Cephes' expf is within about 1 ulp (1.2e-7 relative) of the exact value; std's exp
        // is within 1 ulp too, so the two may differ by 2 ulp.
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert!(exp_f32(-1000.0) < 1e-37);
        assert!(exp_f32(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn erf_and_geglu_match_candle() {
        let mut worst = 0f32;
        let mut x = -6.0f32;
        while x < 6.0 {
            let exact = candle_core::cpu::erf::erf_f64(x as f64) as f32;
            worst = worst.max((erf_f32(x) - exact).abs());
            x += 0.001;
        }
        // The approximation's published bound is a few ulp of 1.
        assert!(worst < 5e-7, "worst erf error {worst}");
        let h = random(&[2, 3, 10], 13).affine(3.0, 0.0).unwrap();
        let ours = geglu(&h).unwrap().unwrap();
        let theirs =
            (h.narrow(2, 0, 5).unwrap() * h.narrow(2, 5, 5).unwrap().gelu_erf().unwrap()).unwrap();
        assert!(max_diff(&ours, &theirs) < 2e-6);
    }

    #[test]
    fn convolution_matches_candle() {
        // Shapes that exercise padding, 1x1, odd sizes, one block and many blocks per item.
        for &(batch, c_in, c_out, h, w, k, p) in &[
            (2, 5, 7, 9, 11, 3, 1),
            (1, 16, 24, 33, 20, 3, 1),
            (2, 8, 4, 6, 5, 1, 0),
            (1, 3, 6, 7, 7, 3, 0),
            (1, 4, 4, 5, 6, 5, 2),
            (3, 2, 3, 70, 90, 3, 1),
        ] {
            let x = random(&[batch, c_in, h, w], 1);
            let weight = random(&[c_out, c_in, k, k], 2);
            let bias = random(&[c_out], 3);
            let ours = conv2d(&x, &weight, &bias, p, 1).unwrap().unwrap();
            let theirs = x
                .conv2d(&weight, p, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, c_out, 1, 1)).unwrap())
                .unwrap();
            // Same products, summed in another order (per tap instead of im2col's one long
            // dot product): f32 rounding of sums of up to c_in * k * k = 400 terms of size ~1.
            let diff = max_diff(&ours, &theirs);
            assert!(diff < 1e-4, "{batch}x{c_in}x{h}x{w} k{k} p{p}: {diff}");
        }
    }

    #[test]
    fn convolution_of_a_strided_input() {
        let x = random(&[1, 6, 8, 3], 4).permute((0, 1, 3, 2)).unwrap();
        let weight = random(&[2, 6, 3, 3], 5);
        let bias = random(&[2], 6);
        let ours = conv2d(&x, &weight, &bias, 1, 1).unwrap().unwrap();
        let theirs = x
            .contiguous()
            .unwrap()
            .conv2d(&weight, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, 2, 1, 1)).unwrap())
            .unwrap();
        assert!(max_diff(&ours, &theirs) < 1e-5);
        assert!(conv2d(&x, &weight, &bias, 1, 2).unwrap().is_none());
    }

    fn reference_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
        let t = |x: &Tensor| x.transpose(1, 2).unwrap().contiguous().unwrap();
        let (q, k, v) = (t(q), t(k), t(v));
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        probs.matmul(&v).unwrap().transpose(1, 2).unwrap()
    }

    #[test]
    fn attention_matches_the_composed_ops() {
        for &(batch, tokens, context, heads, dim) in
            &[(2, 37, 37, 3, 8), (1, 600, 77, 2, 16), (2, 5, 1000, 1, 40)]
        {
            let q = (random(&[batch, tokens, heads, dim], 7) * 3.0).unwrap();
            let k = random(&[batch, context, heads, dim], 8);
            let v = random(&[batch, context, heads, dim], 9);
            let scale = 1.0 / (dim as f64).sqrt();
            let ours = attention(&q, &k, &v, scale).unwrap().unwrap();
            let theirs = reference_attention(&q, &k, &v, scale);
            // Same math; softmax with a 1-2 ulp exp and sums in another order.
            let diff = max_diff(&ours, &theirs);
            assert!(
                diff < 2e-6,
                "{batch} {tokens} {context} {heads} {dim}: {diff}"
            );
        }
    }

    #[test]
    fn group_norm_and_silu_match_the_composed_ops() {
        let x = random(&[2, 12, 7, 9], 10).affine(4.0, 1.5).unwrap();
        let weight = random(&[12], 11);
        let bias = random(&[12], 12);
        let gn = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), 12, 4, 1e-6).unwrap();
        let theirs = candle_core::Module::forward(&gn, &x).unwrap();
        let ours = group_norm(&x, 4, 1e-6, &weight, &bias, false)
            .unwrap()
            .unwrap();
        // Statistics accumulated in f64 here, in f32 by candle: a few ulp of the output.
        assert!(max_diff(&ours, &theirs) < 2e-6);
        let ours = group_norm(&x, 4, 1e-6, &weight, &bias, true)
            .unwrap()
            .unwrap();
        assert!(max_diff(&ours, &theirs.silu().unwrap()) < 2e-6);
        let tokens = group_norm_tokens(&x, 4, 1e-6, &weight, &bias)
            .unwrap()
            .unwrap();
        let expected = theirs
            .reshape((2, 12, 63))
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        assert_eq!(tokens.dims(), &[2, 63, 12]);
        assert!(max_diff(&tokens, &expected.contiguous().unwrap()) < 2e-6);
        let plain = silu(&x).unwrap();
        assert!(max_diff(&plain, &x.silu().unwrap()) < 2e-6);
    }
}
