//! f32 CPU kernels for the layers that dominate a generation on the CPU: convolutions, linear
//! layers, softmax attention, and GroupNorm with its SiLU.
//!
//! candle's CPU backend lowers a convolution to a full im2col copy (`c_in * 9` values per output
//! pixel, 1.2 GB for one 128-channel layer of a 512x512 VAE decode) followed by a matmul that
//! repacks both operands on every call, runs every elementwise op on one thread, and composes
//! GroupNorm from about ten such ops. Here:
//!
//! - convolutions, linear layers and attention's two products run on one matrix-product core
//!   ([`packed`]). A convolution reads its weights where they lie and packs the activations a
//!   cache-sized block at a time (the im2col of that block only). A linear layer over many
//!   tokens reads the tokens where they lie and packs its weight once per call, writing the
//!   output in place; over few tokens it goes the convolution's way round;
//! - 3x3 stride-1 convolutions with enough channels and pixels use Winograd's F(2x2, 3x3)
//!   ([`winograd`]), 2.25x fewer multiplies on the same core;
//! - attention packs each head's keys (times the softmax scale) and values once, then runs per
//!   (batch, head, block of queries): scores, softmax and the weighted sum of the values, so the
//!   `tokens x context` score matrix never exists whole;
//! - GroupNorm computes its statistics and applies the affine map (and SiLU) in one parallel
//!   pass per group.
//!
//! Every kernel accumulates in f32 like the reference (torch's CPU kernels), so the results
//! match candle's own path to rounding. [`enabled`] turns the whole module off
//! (`SD_SERVE_CPU_KERNELS=0`), for comparisons.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

mod packed;
mod winograd;

/// Whether the kernels here run for `t`: f32 on the CPU, unless `SD_SERVE_CPU_KERNELS=0`.
pub fn applies(t: &Tensor) -> bool {
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
pub struct SharedMut(*mut f32);
// SAFETY: every task writes a region no other task touches (see each use).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    pub fn new(buf: &mut [f32]) -> Self {
        Self(buf.as_mut_ptr())
    }

    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }

    /// Writes `value` at `index`.
    ///
    /// # Safety
    /// `index` lies in the buffer this was made from, which outlives the call, and no other
    /// thread reads or writes that element meanwhile.
    pub unsafe fn write(self, index: usize, value: f32) {
        // SAFETY: the caller's contract.
        unsafe { *self.0.add(index) = value };
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

/// Convolution with zero padding `padding` and stride `stride`, square kernel, no groups or
/// dilation.
struct Conv2dOp {
    padding: usize,
    stride: usize,
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
        let (p, s) = (self.padding, self.stride.max(1));
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
        if k == 3 && s == 1 && p == 1 && winograd::pays(batch, c_in, c_out, height, width) {
            let out = winograd::conv3x3(x, w, bias, (batch, c_in, height, width), c_out);
            return Ok((
                CpuStorage::F32(out),
                Shape::from_dims(&[batch, c_out, height, width]),
            ));
        }
        let (ho, wo) = ((hp - k) / s + 1, (wp - k) / s + 1);
        let plane = hp * wp;
        let taps = k * k;

        // At stride 1, output pixels are computed over the padded width, so that the input a
        // tap sees for a run of pixels is one contiguous run of the padded input; the k - 1
        // extra columns per row are dropped on the way out. The last tap's view of the last
        // row runs k - 1 values past the last plane: the padded copy has that many trailing
        // zeros.
        let dense = s == 1;
        let row_width = if dense { wp } else { wo };
        let columns = ho * row_width;
        let padded_storage;
        let xp: &[f32] = if p == 0 && (k == 1 || !dense) {
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

        // B (c_in * taps rows, batch * columns columns): row (ci, dy, dx), column (b, y, x) is
        // padded input (b, ci, y * s + dy, x * s + dx). Its rows are in the weight's order, so
        // A is the weight as it lies, `[c_out, c_in * k * k]`.
        let pack_b = |k0: usize, kc: usize, n0: usize, n: usize, dst: &mut [f32]| {
            let panels = n.div_ceil(packed::NR);
            for kk in 0..kc {
                let (ci, tap) = ((k0 + kk) / taps, (k0 + kk) % taps);
                let (dy, dx) = (tap / k, tap % k);
                for panel in 0..panels {
                    let row = &mut dst[packed::panel_row(panel, kk, kc)..][..packed::NR];
                    let width = packed::NR.min(n - panel * packed::NR);
                    let mut c = 0;
                    while c < width {
                        let g = n0 + panel * packed::NR + c;
                        let (b, j) = (g / columns, g % columns);
                        let plane_at = (b * c_in + ci) * plane;
                        if dense {
                            let run = (width - c).min(columns - j);
                            let at = plane_at + dy * wp + dx + j;
                            row[c..c + run].copy_from_slice(&xp[at..at + run]);
                            c += run;
                        } else {
                            let (y, x) = (j / wo, j % wo);
                            let run = (width - c).min(wo - x);
                            let at = plane_at + (y * s + dy) * wp + x * s + dx;
                            for (i, v) in row[c..c + run].iter_mut().enumerate() {
                                *v = xp[at + i * s];
                            }
                            c += run;
                        }
                    }
                    row[width..].fill(0.0);
                }
            }
        };

        let mut out = vec![0f32; batch * c_out * ho * wo];
        let out_ptr = SharedMut(out.as_mut_ptr());
        let sink = |m0: usize, m: usize, n0: usize, n: usize, acc: &[f32], ldc: usize| {
            // Runs of consecutive pixels of one output row, within one batch item.
            let mut c = 0;
            while c < n {
                let (b, j) = ((n0 + c) / columns, (n0 + c) % columns);
                let (y, x) = (j / row_width, j % row_width);
                let run = (row_width - x).min(n - c);
                let valid = wo.saturating_sub(x).min(run);
                for o in 0..m {
                    let ch = m0 + o;
                    let src = &acc[o * ldc + c..o * ldc + c + valid];
                    let at = ((b * c_out + ch) * ho + y) * wo + x;
                    // SAFETY: (b, ch, y, x..x + valid) lies in `out`, and belongs to this
                    // task's rows and columns only.
                    let dst =
                        unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(at), valid) };
                    for (d, &v) in dst.iter_mut().zip(src) {
                        *d = v + bias[ch];
                    }
                }
                c += run;
            }
        };
        packed::gemm(
            c_out,
            batch * columns,
            c_in * taps,
            w,
            c_in * taps,
            pack_b,
            sink,
        );
        Ok((
            CpuStorage::F32(out),
            Shape::from_dims(&[batch, c_out, ho, wo]),
        ))
    }
}

/// `conv2d(x, weight, padding, stride) + bias` for f32 CPU tensors, or `None` where this module
/// does not apply (another dtype or device).
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Option<Tensor>> {
    if stride == 0 || !applies(x) || weight.dtype() != DType::F32 || bias.dtype() != DType::F32 {
        return Ok(None);
    }
    let op = Conv2dOp { padding, stride };
    x.contiguous()?
        .apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &op)
        .map(Some)
}

// ---------------------------------------------------------------------------------------------
// Linear layers

/// `x · wᵀ (+ bias)` over the last dimension of `x`.
struct LinearOp;

/// `y[t, o] = sum_i x[t, i] w[o, i] (+ bias[o])` for `tokens` rows of `x`.
fn linear_into(x: &[f32], w: &[f32], bias: Option<&[f32]>, tokens: usize, out: usize) -> Vec<f32> {
    let inputs = w.len() / out.max(1);
    // Two ways round. Many tokens: C = y = x · wᵀ with x read in place and w packed once for
    // all tasks, written straight into y. Few tokens (cross-attention keys, an 8x8 UNet level)
    // or an output width that is not a whole number of panels: C = yᵀ = w · xᵀ with w read in
    // place and x packed per task, transposed into y at the end. Packing costs about one move
    // per packed value: w's out * in once, against x's tokens * in plus the transposition's
    // tokens * out.
    let packed_w = out.is_multiple_of(packed::NR) && tokens * (inputs + out) > out * inputs;
    if packed_w {
        let b = packed::pack_rows(w, out, inputs);
        // C starts as the bias (or zeros), written here rather than left to fresh zero pages:
        // the kernel's first store to a page it has only read would be a copy-on-write fault.
        let mut y = match bias {
            Some(bias) => bias.repeat(tokens),
            None => {
                let mut y = Vec::with_capacity(tokens * out);
                y.resize(tokens * out, 0f32);
                y
            }
        };
        packed::gemm_packed(tokens, out, inputs, x, inputs, &b, &mut y, out);
        return y;
    }
    let mut y = vec![0f32; tokens * out];
    let y_ptr = SharedMut(y.as_mut_ptr());
    // C = yᵀ (out x tokens) = w (as it lies) · xᵀ: B's column t is row t of x.
    let pack_b = |k0: usize, kc: usize, n0: usize, n: usize, dst: &mut [f32]| {
        for panel in 0..n.div_ceil(packed::NR) {
            let first = panel * packed::NR;
            let width = packed::NR.min(n - first);
            let block =
                &mut dst[packed::panel_row(panel, 0, kc)..packed::panel_row(panel + 1, 0, kc)];
            for c in 0..width {
                let src = &x[(n0 + first + c) * inputs + k0..][..kc];
                for (kk, &v) in src.iter().enumerate() {
                    block[kk * packed::NR + c] = v;
                }
            }
            if width < packed::NR {
                for row in block.chunks_exact_mut(packed::NR) {
                    row[width..].fill(0.0);
                }
            }
        }
    };
    let sink = |m0: usize, m: usize, n0: usize, n: usize, acc: &[f32], ldc: usize| {
        for t in 0..n {
            // SAFETY: row n0 + t, columns m0..m0 + m of y belong to this task only.
            let dst =
                unsafe { std::slice::from_raw_parts_mut(y_ptr.get().add((n0 + t) * out + m0), m) };
            for (o, d) in dst.iter_mut().enumerate() {
                *d = acc[o * ldc + t] + bias.map_or(0.0, |b| b[m0 + o]);
            }
        }
    };
    packed::gemm(out, tokens, inputs, w, inputs, pack_b, sink);
    y
}

impl LinearOp {
    fn run(
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        bias: Option<&[f32]>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(x, xl, "linear input")?;
        let w = f32_slice(w, wl, "linear weight")?;
        let (out, inputs) = wl.shape().dims2()?;
        let dims = xl.shape().dims();
        if dims.last() != Some(&inputs) || bias.is_some_and(|b| b.len() != out) || out == 0 {
            candle_core::bail!("linear: input {:?}, weight {:?}", xl.shape(), wl.shape());
        }
        let tokens = x.len() / inputs.max(1);
        let y = linear_into(x, w, bias, tokens, out);
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("checked above") = out;
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }
}

impl candle_core::CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "sd-serve-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Self::run(xs, xl, ws, wl, None)
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "sd-serve-linear-bias"
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
        let bias = f32_slice(bs, bl, "linear bias")?;
        Self::run(xs, xl, ws, wl, Some(bias))
    }
}

/// `x · weightᵀ + bias` over the last dimension of `x` (a linear layer, `weight` `[out, in]`)
/// for f32 CPU tensors; `None` where this module does not apply.
pub fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    if !applies(x) || weight.dtype() != DType::F32 || bias.is_some_and(|b| b.dtype() != DType::F32)
    {
        return Ok(None);
    }
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    match bias {
        Some(bias) => x.apply_op3_no_bwd(&weight, &bias.contiguous()?, &LinearOp),
        None => x.apply_op2_no_bwd(&weight, &LinearOp),
    }
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

// ---------------------------------------------------------------------------------------------
// Attention

/// Softmax attention over contiguous `[batch, tokens, heads, head_dim]` q and
/// `[batch, context, heads, head_dim]` k, v.
struct AttentionOp {
    scale: f32,
}

/// Query rows per task: up to 256, the score block (rows x context) within ~4 MiB (blocks of
/// 0.4 to 4 MiB time alike for SD1.5's 64x64 level on a 2-core Zen 3), fewer where the tasks
/// would not keep every thread busy.
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
        if context == 0 || dim == 0 {
            candle_core::bail!("attention: no keys in k {:?}", kl.shape());
        }
        let rows = attention_block_rows(context, tokens, batch * heads);
        let blocks = tokens.div_ceil(rows);
        let stride = heads * dim;
        // Keys (scaled) and values packed once per head for every block of queries: keys as
        // the columns of Kᵀ (context.div_ceil(NR) panels, dim deep), values as panels of NR of
        // their dim columns, context deep.
        let key_panels = context.div_ceil(packed::NR);
        let value_panels = dim.div_ceil(packed::NR);
        let (keys_len, values_len) = (
            key_panels * packed::NR * dim,
            value_panels * packed::NR * context,
        );
        let mut keys = vec![0f32; batch * heads * keys_len];
        let mut values = vec![0f32; batch * heads * values_len];
        keys.par_chunks_mut(keys_len)
            .zip(values.par_chunks_mut(values_len))
            .enumerate()
            .for_each(|(bh, (kd, vd))| {
                let kv0 = ((bh / heads) * context * heads + bh % heads) * dim;
                packed::pack_rows_into(&k[kv0..], stride, context, dim, self.scale, kd);
                packed::pack_columns_into(&v[kv0..], stride, context, dim, vd);
            });
        let scores_ld = key_panels * packed::NR;
        let out_ld = value_panels * packed::NR;
        let mut out = vec![0f32; batch * tokens * heads * dim];
        let out_ptr = SharedMut(out.as_mut_ptr());
        (0..batch * heads * blocks).into_par_iter().for_each_init(
            || (vec![0f32; rows * scores_ld], vec![0f32; rows * out_ld]),
            |(scores, o), task| {
                let (bh, blk) = (task / blocks, task % blocks);
                let (b, h) = (bh / heads, bh % heads);
                let r0 = blk * rows;
                let n = rows.min(tokens - r0);
                let q0 = ((b * tokens + r0) * heads + h) * dim;
                // Scores: n x context (the padding columns past it are never read).
                packed::gemm_serial(
                    n,
                    key_panels,
                    dim,
                    &q[q0..],
                    stride,
                    &keys[bh * keys_len..][..keys_len],
                    &mut scores[..n * scores_ld],
                    scores_ld,
                    false,
                );
                let mut inv_sums = [0f32; 256];
                for (r, row) in scores.chunks_exact_mut(scores_ld).take(n).enumerate() {
                    let row = &mut row[..context];
                    let max = row_max(row);
                    inv_sums[r] = 1.0 / exp_shifted_sum(row, max);
                }
                // Weighted values: n x dim (and the padding columns of the last panel).
                packed::gemm_serial(
                    n,
                    value_panels,
                    context,
                    scores,
                    scores_ld,
                    &values[bh * values_len..][..values_len],
                    &mut o[..n * out_ld],
                    out_ld,
                    false,
                );
                for (r, &inv) in inv_sums.iter().enumerate().take(n) {
                    // SAFETY: rows r0..r0+n of head h in batch b are written by this task only;
                    // each row's dim values lie in `out`.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(out_ptr.get().add(q0 + r * stride), dim)
                    };
                    for (d, &x) in dst.iter_mut().zip(&o[r * out_ld..][..dim]) {
                        *d = x * inv;
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
/// `sd_serve::models::layers::scaled_dot_product_attention`), or `None` where this module does not apply.
pub fn attention(
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
pub fn group_norm(
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
pub fn group_norm_tokens(
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
pub fn silu(x: &Tensor) -> candle_core::Result<Tensor> {
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
pub fn geglu(x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !applies(x) {
        return Ok(None);
    }
    x.contiguous()?.apply_op1_no_bwd(&GegluOp).map(Some)
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
    fn winograd_convolution_matches_candle() {
        // Through the op (shapes where F(2x2, 3x3) is chosen, odd sides included), then the
        // transform on its own at sizes the op would give to the direct kernel.
        let cases: &[(usize, usize, usize, usize, usize, bool)] = &[
            (1, 32, 33, 65, 67, true),
            (2, 40, 37, 48, 44, true),
            (1, 3, 5, 7, 9, false),
            (2, 6, 4, 4, 5, false),
            (1, 2, 3, 1, 2, false),
        ];
        for &(batch, c_in, c_out, h, w, via_op) in cases {
            assert_eq!(winograd::pays(batch, c_in, c_out, h, w), via_op);
            let x = random(&[batch, c_in, h, w], 41);
            let weight = random(&[c_out, c_in, 3, 3], 42);
            let bias = random(&[c_out], 43);
            let ours = if via_op {
                conv2d(&x, &weight, &bias, 1, 1).unwrap().unwrap()
            } else {
                let data = winograd::conv3x3(
                    &x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    &weight.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    &bias.to_vec1::<f32>().unwrap(),
                    (batch, c_in, h, w),
                    c_out,
                );
                Tensor::from_vec(data, (batch, c_out, h, w), &Device::Cpu).unwrap()
            };
            let theirs = x
                .conv2d(&weight, 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, c_out, 1, 1)).unwrap())
                .unwrap();
            // Sums of up to 360 products of size ~1 (|sum| ~ 6), in another order and through
            // transforms whose intermediate values reach 4x the inputs: ~1e-5 typical, 2e-4 at
            // worst; a wrong tap or transform coefficient is off by O(1).
            let diff = max_diff(&ours, &theirs);
            assert!(diff < 2e-4, "{batch}x{c_in}x{h}x{w} -> {c_out}: {diff}");
        }
    }

    #[test]
    fn strided_convolution_matches_candle() {
        // Stride 2 with and without padding (the UNet's and the VAE encoder's downsamplers),
        // and a depth past one packed block (c_in * 9 = 576 > 256).
        for &(batch, c_in, c_out, h, w, k, p, s) in &[
            (2, 5, 7, 9, 11, 3, 1, 2),
            (1, 64, 13, 16, 16, 3, 1, 2),
            (2, 3, 4, 9, 10, 3, 0, 2),
            (1, 4, 3, 11, 7, 1, 0, 2),
        ] {
            let x = random(&[batch, c_in, h, w], 21);
            let weight = random(&[c_out, c_in, k, k], 22);
            let bias = random(&[c_out], 23);
            let ours = conv2d(&x, &weight, &bias, p, s).unwrap().unwrap();
            let theirs = x
                .conv2d(&weight, p, s, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, c_out, 1, 1)).unwrap())
                .unwrap();
            // Sums of up to 576 products of size ~1 in another order.
            let diff = max_diff(&ours, &theirs);
            assert!(diff < 1e-4, "{batch}x{c_in}x{h}x{w} k{k} p{p} s{s}: {diff}");
        }
    }

    #[test]
    fn linear_matches_candle() {
        // Token counts and widths around the 16-column panels, 6-row tiles and 256-deep blocks.
        // The first three take the w · xᵀ way (widths that are not whole panels), the last two
        // x · wᵀ: 422 tokens in row blocks of 192, 192 and 38, and 20 panels cut into groups.
        for &(lead, tokens, inputs, out) in &[
            (1, 1, 3, 1),
            (2, 37, 300, 41),
            (1, 100, 17, 600),
            (2, 211, 300, 48),
            (1, 50, 40, 320),
        ] {
            let x = random(&[lead, tokens, inputs], 31);
            let weight = random(&[out, inputs], 32);
            let bias = random(&[out], 33);
            for bias in [None, Some(&bias)] {
                let ours = linear(&x, &weight, bias).unwrap().unwrap();
                let layer = candle_nn::Linear::new(weight.clone(), bias.cloned());
                let theirs = candle_core::Module::forward(&layer, &x).unwrap();
                // Dot products of up to 300 terms of size ~1, summed in blocks.
                let diff = max_diff(&ours, &theirs);
                assert!(diff < 5e-5, "{lead}x{tokens}x{inputs} -> {out}: {diff}");
            }
        }
        let odd = random(&[4, 6], 34).t().unwrap();
        let weight = random(&[3, 4], 35);
        let ours = linear(&odd, &weight, None).unwrap().unwrap();
        let theirs = odd
            .contiguous()
            .unwrap()
            .matmul(&weight.t().unwrap())
            .unwrap();
        assert!(max_diff(&ours, &theirs) < 1e-5);
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
        let ours = conv2d(&x, &weight, &bias, 1, 2).unwrap().unwrap();
        let theirs = x
            .contiguous()
            .unwrap()
            .conv2d(&weight, 1, 2, 1, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, 2, 1, 1)).unwrap())
            .unwrap();
        assert!(max_diff(&ours, &theirs) < 1e-5);
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
        // Head widths around the 16-column panels and past a 256-deep block (the VAE's 512),
        // contexts around the panels and past a block.
        for &(batch, tokens, context, heads, dim) in &[
            (2, 37, 37, 3, 8),
            (1, 600, 77, 2, 16),
            (2, 5, 1000, 1, 40),
            (1, 20, 30, 1, 300),
        ] {
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
