//! Building blocks shared by the CLIP text encoder, the UNet and the VAE: a biased 2-D
//! convolution that also runs in bf16 on the CPU and can bound its im2col buffer, and softmax
//! attention (Vaswani et al. 2017, "Attention Is All You Need") with its score memory bounded.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::Result;

/// Largest im2col buffer a striped convolution may allocate, in elements (512 MiB in f32).
const MAX_IM2COL_ELEMENTS: usize = 1 << 27;

/// Largest block of attention scores computed at once, counted as f32. At 512x512, SD 1.x with
/// classifier-free guidance would otherwise hold 2 x 8 heads x 4096^2 scores (1 GiB) at once.
const SCORE_BLOCK_BYTES: usize = 512 << 20;

/// A 2-D convolution with bias.
///
/// candle's CPU backend has no bf16 convolution; there it runs on f32 copies and rounds once to
/// bf16, which is what a GPU bf16 convolution does (f32 accumulation).
#[derive(Debug, Clone)]
pub(crate) struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    padding: usize,
    stride: usize,
    /// Largest im2col buffer one convolution call may allocate, in elements; see [`Self::striped`].
    max_im2col: usize,
}

/// `vb` holds `weight` `[out, in, kernel, kernel]` and `bias` `[out]`.
pub(crate) fn conv2d(
    vb: VarBuilder,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    padding: usize,
    stride: usize,
) -> Result<Conv2d> {
    Ok(Conv2d {
        weight: vb.get((out_channels, in_channels, kernel, kernel), "weight")?,
        bias: vb.get(out_channels, "bias")?,
        padding,
        stride,
        max_im2col: usize::MAX,
    })
}

impl Conv2d {
    pub(crate) fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Computes the convolution in horizontal stripes when the input is large.
    ///
    /// candle lowers a convolution to im2col + matmul (on CUDA unless built with cudnn), which
    /// materialises `c_in * k * k` values per output pixel: 9.7 GB in f32 for the 256-channel
    /// 3x3 convolutions of a 1024x1024 VAE decode. Striping the output rows bounds that buffer to
    /// `MAX_IM2COL_ELEMENTS`; each output pixel is computed from the same inputs either way.
    pub(crate) fn striped(self) -> Self {
        Self {
            max_im2col: MAX_IM2COL_ELEMENTS,
            ..self
        }
    }

    /// One convolution call with the given padding, plus the bias.
    fn conv_once(&self, xs: &Tensor, padding: usize) -> candle_core::Result<Tensor> {
        let out_channels = self.bias.dim(0)?;
        let with_bias = |xs: &Tensor, weight: &Tensor, bias: &Tensor| {
            xs.conv2d(weight, padding, self.stride, 1, 1)?
                .broadcast_add(&bias.reshape((1, out_channels, 1, 1))?)
        };
        if xs.dtype() == DType::BF16 && xs.device().is_cpu() {
            let ys = with_bias(
                &xs.to_dtype(DType::F32)?,
                &self.weight.to_dtype(DType::F32)?,
                &self.bias.to_dtype(DType::F32)?,
            )?;
            return ys.to_dtype(DType::BF16);
        }
        with_bias(xs, &self.weight, &self.bias)
    }

    fn forward_striped(&self, xs: &Tensor, max_im2col: usize) -> candle_core::Result<Tensor> {
        let (batch, in_channels, height, width) = xs.dims4()?;
        let kernel = self.weight.dim(3)?;
        let (p, s) = (self.padding, self.stride);
        if height + 2 * p < kernel || width + 2 * p < kernel {
            // Let the kernel report the shape error.
            return self.conv_once(xs, p);
        }
        let out_h = (height + 2 * p - kernel) / s + 1;
        let out_w = (width + 2 * p - kernel) / s + 1;
        let per_row = batch * in_channels * kernel * kernel * out_w;
        let rows = (max_im2col / per_row.max(1)).max(1);
        if rows >= out_h {
            return self.conv_once(xs, p);
        }
        let mut stripes = Vec::with_capacity(out_h.div_ceil(rows));
        for first in (0..out_h).step_by(rows) {
            let last = (first + rows).min(out_h);
            // Input rows [first*s - p, (last-1)*s - p + k) in padded coordinates.
            let top = first * s;
            let bottom = (last - 1) * s + kernel;
            let lo = top.saturating_sub(p).min(height);
            let hi = bottom.saturating_sub(p).min(height);
            let pad_top = p.saturating_sub(top);
            let pad_bottom = bottom.saturating_sub(p + height);
            let stripe = xs
                .narrow(2, lo, hi - lo)?
                .pad_with_zeros(2, pad_top, pad_bottom)?
                .pad_with_zeros(3, p, p)?;
            stripes.push(self.conv_once(&stripe, 0)?);
        }
        Tensor::cat(&stripes, 2)
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        // The CPU kernel needs no im2col buffer, so no stripes either.
        if let Some(ys) =
            super::cpu::conv2d(xs, &self.weight, &self.bias, self.padding, self.stride)?
        {
            return Ok(ys);
        }
        self.forward_striped(xs, self.max_im2col)
    }
}

/// A linear layer, `x · weightᵀ + bias`: on the CPU in f32 the kernel of [`super::cpu`] (which
/// reads the weight where it lies), elsewhere candle's.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    inner: candle_nn::Linear,
}

impl Linear {
    pub(crate) fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            inner: candle_nn::Linear::new(weight, bias),
        }
    }
}

/// `vb` holds `weight` `[out, in]` and `bias` `[out]`.
pub(crate) fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear {
        inner: candle_nn::linear(in_dim, out_dim, vb)?,
    })
}

/// `vb` holds `weight` `[out, in]`.
pub(crate) fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear {
        inner: candle_nn::linear_no_bias(in_dim, out_dim, vb)?,
    })
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match super::cpu::linear(xs, self.inner.weight(), self.inner.bias())? {
            Some(ys) => Ok(ys),
            None => self.inner.forward(xs),
        }
    }
}

/// GroupNorm over `[batch, channels, ...]` as torch computes it, with the SiLU that usually
/// follows fused in on the CPU ([`super::cpu`]); elsewhere candle's.
#[derive(Debug, Clone)]
pub(crate) struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

/// `vb` holds `weight` and `bias`, `[channels]` each.
pub(crate) fn group_norm(
    groups: usize,
    channels: usize,
    eps: f64,
    vb: VarBuilder,
) -> Result<GroupNorm> {
    let weight = vb.get(channels, "weight")?;
    let bias = vb.get(channels, "bias")?;
    Ok(GroupNorm {
        inner: candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?,
        weight,
        bias,
        groups,
        eps,
    })
}

impl GroupNorm {
    /// `silu(group_norm(x))`.
    pub(crate) fn forward_silu(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let fast =
            super::cpu::group_norm(xs, self.groups, self.eps, &self.weight, &self.bias, true)?;
        match fast {
            Some(ys) => Ok(ys),
            None => self.inner.forward(xs)?.silu(),
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let fast =
            super::cpu::group_norm(xs, self.groups, self.eps, &self.weight, &self.bias, false)?;
        match fast {
            Some(ys) => Ok(ys),
            None => self.inner.forward(xs),
        }
    }
}

/// Which parts of an attention run in f32 when the inputs are f16/bf16 (with f32 inputs all
/// three are the same computation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionPrecision {
    /// Scores and weighted sum in the input dtype; the softmax accumulates in f32.
    Softmax,
    /// Scores and softmax in f32, the weighted sum in the input dtype: diffusers'
    /// `upcast_attention`, for checkpoints whose f16 scores can overflow.
    Scores,
    /// Everything in f32 and the output rounded once, as torch's fused kernels accumulate; for
    /// the short sequences of CLIP and the VAE's single mid-block attention, where it is cheap.
    Full,
}

/// Softmax attention over `[batch, tokens, heads, head_dim]` queries and
/// `[batch, context_tokens, heads, head_dim]` keys and values; returns
/// `[batch, tokens, heads, head_dim]` (possibly a strided view) in the dtype of `v`.
///
/// `mask`, when given, is added to the scores: `[tokens, context_tokens]`, f32 with
/// [`AttentionPrecision::Full`], else in the input dtype. The layout is that of fused attention
/// kernels, so one can replace this function as is.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    precision: AttentionPrecision,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    if mask.is_none() {
        // In f32 every precision is the same computation.
        if let Some(out) = super::cpu::attention(q, k, v, scale)? {
            return Ok(out);
        }
    }
    attention_in_blocks(q, k, v, scale, precision, mask, SCORE_BLOCK_BYTES)
}

fn attention_in_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    precision: AttentionPrecision,
    mask: Option<&Tensor>,
    block_bytes: usize,
) -> candle_core::Result<Tensor> {
    let (b, n, heads, head_dim) = q.dims4()?;
    let m = k.dim(1)?;
    let dtype = v.dtype();
    let (q, k, v) = if precision == AttentionPrecision::Full {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        (f32(q)?, f32(k)?, f32(v)?)
    } else {
        (q.clone(), k.clone(), v.clone())
    };
    // Heads become a batch dimension; scaling q is folded into the copy that transposition
    // needs anyway, and keeps the scores small.
    let q = (q.transpose(1, 2)? * scale)?.reshape((b * heads, n, head_dim))?;
    let k = k
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * heads, m, head_dim))?;
    let v = v
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * heads, m, head_dim))?;
    let (q, k) = if precision == AttentionPrecision::Scores {
        (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
    } else {
        (q, k)
    };

    // Queries attend independently: take them in blocks of rows to bound the scores' memory.
    let rows = (block_bytes / (b * heads * m * 4)).max(1);
    let out = if rows >= n {
        attend(&q, &k, &v, mask)?
    } else {
        let blocks = (0..n)
            .step_by(rows)
            .map(|start| {
                let len = rows.min(n - start);
                let mask = mask.map(|mask| mask.narrow(0, start, len)).transpose()?;
                attend(&q.narrow(1, start, len)?, &k, &v, mask.as_ref())
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&blocks, 1)?
    };
    out.reshape((b, heads, n, head_dim))?
        .transpose(1, 2)?
        .to_dtype(dtype)
}

/// softmax(q k^T + mask) v over `[batch * heads, tokens, head_dim]`, q already scaled; the
/// scores are in the dtype of q and k, the output in that of v.
fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let mut scores = q.matmul(&k.t()?)?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(mask)?;
    }
    let probs = softmax_last_dim_f32(&scores)?.to_dtype(v.dtype())?;
    probs.matmul(v)
}

/// Softmax over the last dimension, accumulated in f32.
fn softmax_last_dim_f32(x: &Tensor) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    // candle's CUDA kernel already accumulates f16/bf16 in f32; elsewhere the reduction would run
    // in the half type, so widen first.
    if matches!(dtype, DType::F32 | DType::F64) || x.device().is_cuda() {
        candle_nn::ops::softmax_last_dim(x)
    } else {
        candle_nn::ops::softmax_last_dim(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)
    }
}

/// The largest `|a - b|` over all elements, in f32 (tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn values(shape: (usize, usize, usize, usize), phase: f64) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        Tensor::arange(0f32, n as f32, &Device::Cpu)
            .unwrap()
            .affine(12.9898, phase)
            .unwrap()
            .sin()
            .unwrap()
            .reshape(shape)
            .unwrap()
    }

    #[test]
    fn blocks_of_query_rows_give_the_same_attention() {
        // Three heads over 11 keys (the UNet's cross-attention), and one head over every token
        // (the VAE's mid-block self-attention).
        for (heads, keys) in [(3, 11), (1, 37)] {
            let q = values((2, 37, heads, 8), 0.1);
            let k = values((2, keys, heads, 8), 0.2);
            let v = values((2, keys, heads, 8), 0.3);
            // The last key is masked out for the first 20 queries only: a per-row mask.
            let mask = Tensor::from_vec(
                (0..37 * keys)
                    .map(|i| {
                        if i % keys == keys - 1 && i < keys * 20 {
                            -1e4f32
                        } else {
                            0.0
                        }
                    })
                    .collect(),
                (37, keys),
                &Device::Cpu,
            )
            .unwrap();
            for precision in [
                AttentionPrecision::Softmax,
                AttentionPrecision::Scores,
                AttentionPrecision::Full,
            ] {
                for mask in [None, Some(&mask)] {
                    let attention = |block_bytes| {
                        attention_in_blocks(&q, &k, &v, 0.3, precision, mask, block_bytes).unwrap()
                    };
                    let whole = attention(usize::MAX);
                    // Blocks of 5 query rows (2 x heads x keys f32 scores each), then one of 2.
                    let blocked = attention(5 * 2 * heads * keys * 4);
                    assert_eq!(blocked.dims(), &[2, 37, heads, 8]);
                    // Same arithmetic; the matmul may block a shorter row count differently
                    // (f32 ulps).
                    let diff = max_abs_diff(&whole, &blocked);
                    assert!(
                        diff < 1e-6,
                        "{heads} heads {precision:?} mask {}: {diff}",
                        mask.is_some()
                    );
                }
            }
        }
    }

    #[test]
    fn mask_removes_keys() -> Result<()> {
        let q = values((1, 4, 2, 8), 0.1);
        let k = values((1, 4, 2, 8), 0.2);
        let v = values((1, 4, 2, 8), 0.3);
        let mask: Vec<f32> = (0..16)
            .map(|i| {
                if i % 4 > i / 4 {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (4, 4), &Device::Cpu)?;
        let full = AttentionPrecision::Full;
        let causal = scaled_dot_product_attention(&q, &k, &v, 0.5, full, Some(&mask))?;
        // Query i sees keys 0..=i only: the same as attending to that prefix.
        for i in 0..4 {
            let prefix = |t: &Tensor| t.narrow(1, 0, i + 1);
            let alone = scaled_dot_product_attention(
                &q.narrow(1, i, 1)?,
                &prefix(&k)?,
                &prefix(&v)?,
                0.5,
                full,
                None,
            )?;
            assert!(max_abs_diff(&causal.narrow(1, i, 1)?, &alone) < 1e-6);
        }
        Ok(())
    }

    #[test]
    fn striped_convolution_equals_whole() -> Result<()> {
        let dev = Device::Cpu;
        // (kernel, padding, stride, height, width): the VAE's 3x3 and 1x1 convolutions and its
        // stride-2 downsampler (no padding, odd and even sizes).
        for (kernel, padding, stride, height, width) in [
            (3, 1, 1, 13, 7),
            (1, 0, 1, 9, 5),
            (3, 0, 2, 12, 9),
            (3, 0, 2, 11, 8),
        ] {
            let conv = Conv2d {
                weight: Tensor::randn(0f32, 1.0, (4, 3, kernel, kernel), &dev)?,
                bias: Tensor::randn(0f32, 1.0, 4, &dev)?,
                padding,
                stride,
                max_im2col: usize::MAX,
            };
            let xs = Tensor::randn(0f32, 1.0, (2, 3, height, width), &dev)?;
            let whole = conv.conv_once(&xs, padding)?;
            // Budgets of one, two and three output rows per stripe.
            let per_row = 2 * 3 * kernel * kernel * whole.dim(3)?;
            for rows in 1..=3 {
                let striped = conv.forward_striped(&xs, rows * per_row)?;
                assert_eq!(striped.dims(), whole.dims());
                let diff = (&striped - &whole)?.abs()?.flatten_all()?.max(0)?;
                assert!(
                    diff.to_scalar::<f32>()? < 1e-5,
                    "k{kernel} s{stride} rows {rows}"
                );
            }
        }
        Ok(())
    }
}
