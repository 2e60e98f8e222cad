//! The spatial transformer of latent diffusion (Rombach et al. 2022, "High-Resolution Image
//! Synthesis with Latent Diffusion Models"): the feature map is normalised, projected to tokens,
//! run through transformer blocks (Vaswani et al. 2017) that attend to themselves and to the text
//! embeddings, and projected back onto the residual. diffusers calls it `Transformer2DModel`.

use candle_core::{DType, Tensor, D};
use candle_nn::{LayerNorm, Module, VarBuilder};

use crate::models::layers::{
    linear, linear_no_bias, scaled_dot_product_attention, AttentionPrecision, Linear,
};
use crate::{Error, Result};

/// Multi-head attention with separate q/k/v projections (no bias) and a biased output
/// projection; diffusers' `Attention` as the transformer blocks configure it.
#[derive(Debug, Clone)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
    scale: f64,
    precision: AttentionPrecision,
}

impl Attention {
    fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        upcast: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: linear_no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: linear_no_bias(context_dim, inner, vb.pp("to_k"))?,
            to_v: linear_no_bias(context_dim, inner, vb.pp("to_v"))?,
            to_out: linear(inner, query_dim, vb.pp("to_out.0"))?,
            heads,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
            precision: if upcast {
                AttentionPrecision::Scores
            } else {
                AttentionPrecision::Softmax
            },
        })
    }

    /// `x`: `[B, N, query_dim]`; `context`: `[B, M, context_dim]`, `x` itself when None.
    /// `images`: IP-Adapter keys and values, each attended to with the same queries and added,
    /// scaled, to the text attention before the output projection (decoupled cross-attention).
    fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        images: &[ImageAttention],
    ) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let (b, n, _) = x.dims3()?;
        let m = context.dim(1)?;
        let split = |t: Tensor, len: usize| t.reshape((b, len, self.heads, self.head_dim));
        let q = split(self.to_q.forward(x)?, n)?;
        let k = split(self.to_k.forward(context)?, m)?;
        let v = split(self.to_v.forward(context)?, m)?;
        let mut out = scaled_dot_product_attention(&q, &k, &v, self.scale, self.precision, None)?
            .reshape((b, n, self.heads * self.head_dim))?;
        for image in images {
            let (kb, t, inner) = image.key.dims3()?;
            if kb != b || inner != self.heads * self.head_dim {
                return Err(Error::model(format!(
                    "unet: image-prompt keys [{kb}, {t}, {inner}] for a batch of {b} with {} \
                     attention channels",
                    self.heads * self.head_dim
                )));
            }
            let k = split(image.key.to_dtype(q.dtype())?, t)?;
            let v = split(image.value.to_dtype(q.dtype())?, t)?;
            let attended =
                scaled_dot_product_attention(&q, &k, &v, self.scale, self.precision, None)?
                    .reshape((b, n, self.heads * self.head_dim))?;
            out = (out + (attended * image.scale)?)?;
        }
        Ok(self.to_out.forward(&out)?)
    }
}

/// IP-Adapter keys and values for one cross-attention layer (Ye et al. 2023, "IP-Adapter: Text
/// Compatible Image Prompt Adapter for Text-to-Image Diffusion Models"): the image tokens through
/// the adapter's `to_k_ip` / `to_v_ip` of that layer, `[B, tokens, heads * head_dim]`, computed
/// once per request since the image tokens do not change between steps.
#[derive(Debug, Clone)]
pub struct ImageAttention {
    pub key: Tensor,
    pub value: Tensor,
    /// How much of the attention over the image is added to the text attention.
    pub scale: f64,
}

/// Most values of the feed-forward's inner activations computed at once on the CPU (20 MiB).
const FF_RUN_VALUES: usize = 2048 * 2560;

/// GEGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer"): a projection to twice
/// the inner width, one half gating the other through an exact GELU, and a projection back.
#[derive(Debug, Clone)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
    inner: usize,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj_in: linear(dim, 2 * inner, vb.pp("net.0.proj"))?,
            proj_out: linear(inner, dim, vb.pp("net.2"))?,
            inner,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // On the CPU, runs of tokens at a time: the projection's output for every token of a
        // 64x64 level (2 x 4096 x 2560 values, 84 MB) would be allocated, faulted in and
        // streamed through memory on every call; 20 MiB at a time stays in cache and in the
        // allocator's reuse. Each token's result is the same either way.
        if x.device().is_cpu() {
            return self.forward_in_runs(x, (FF_RUN_VALUES / (2 * self.inner)).max(1));
        }
        self.forward_all(x)
    }

    /// The feed-forward over runs of up to `run` tokens, one after another.
    fn forward_in_runs(&self, x: &Tensor, run: usize) -> Result<Tensor> {
        let (dims, width) = (x.dims(), x.dim(D::Minus1)?);
        let tokens = x.elem_count() / width.max(1);
        if tokens <= run {
            return self.forward_all(x);
        }
        let flat = x.reshape((tokens, width))?;
        let parts = (0..tokens)
            .step_by(run)
            .map(|start| self.forward_all(&flat.narrow(0, start, run.min(tokens - start))?))
            .collect::<Result<Vec<_>>>()?;
        // The feed-forward keeps the width, so the output has the input's shape.
        Ok(Tensor::cat(&parts, 0)?.reshape(dims)?)
    }

    fn forward_all(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj_in.forward(x)?;
        if let Some(h) = crate::models::cpu::geglu(&h)? {
            return Ok(self.proj_out.forward(&h)?);
        }
        let gate = h.narrow(D::Minus1, self.inner, self.inner)?.gelu_erf()?;
        let h = h.narrow(D::Minus1, 0, self.inner)?.mul(&gate)?;
        Ok(self.proj_out.forward(&h)?)
    }
}

/// Pre-norm transformer block: self-attention, cross-attention to the text, feed-forward.
#[derive(Debug, Clone)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    /// The first attention also attends to the text instead of to the image tokens.
    only_cross_attention: bool,
}

impl BasicTransformerBlock {
    fn new(vb: VarBuilder, dim: usize, s: &TransformerSettings) -> Result<Self> {
        let ln = |name: &str| candle_nn::layer_norm(dim, 1e-5, vb.pp(name));
        let attn1_context = if s.only_cross_attention {
            s.cross_attention_dim
        } else {
            dim
        };
        Ok(Self {
            norm1: ln("norm1")?,
            attn1: Attention::new(
                vb.pp("attn1"),
                dim,
                attn1_context,
                s.heads,
                s.head_dim,
                s.upcast_attention,
            )?,
            norm2: ln("norm2")?,
            attn2: Attention::new(
                vb.pp("attn2"),
                dim,
                s.cross_attention_dim,
                s.heads,
                s.head_dim,
                s.upcast_attention,
            )?,
            norm3: ln("norm3")?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
            only_cross_attention: s.only_cross_attention,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor, images: &[ImageAttention]) -> Result<Tensor> {
        let attn1_context = self.only_cross_attention.then_some(context);
        let x = (self
            .attn1
            .forward(&self.norm1.forward(x)?, attn1_context, &[])?
            + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context), images)?
            + x)?;
        Ok((self.ff.forward(&self.norm3.forward(&x)?)? + x)?)
    }
}

/// What the transformers of one U-Net level share.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TransformerSettings {
    pub heads: usize,
    pub head_dim: usize,
    pub cross_attention_dim: usize,
    pub norm_groups: usize,
    /// Linear token projections (SD2, SDXL) rather than 1x1 convolutions (SD1); the same map.
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
    pub upcast_attention: bool,
}

/// GroupNorm of a `[B, C, H, W]` map that returns it as tokens `[B, HW, C]`: the transposition
/// rides on the affine step, which writes a new tensor anyway.
#[derive(Debug, Clone)]
struct TokenGroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl TokenGroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let fast = crate::models::cpu::group_norm_tokens(
            x,
            self.groups,
            self.eps,
            &self.weight,
            &self.bias,
        )?;
        if let Some(tokens) = fast {
            return Ok(tokens);
        }
        let dtype = x.dtype();
        // Statistics in f32 whatever the model dtype, as torch computes them.
        let grouped = x
            .reshape((b, self.groups, c / self.groups * h * w))?
            .to_dtype(DType::F32)?;
        let centered = grouped.broadcast_sub(&grouped.mean_keepdim(2)?)?;
        let std = (centered.sqr()?.mean_keepdim(2)? + self.eps)?.sqrt()?;
        Ok(centered
            .broadcast_div(&std)?
            .to_dtype(dtype)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?)
    }
}

/// diffusers' `Transformer2DModel` over a continuous feature map.
#[derive(Debug, Clone)]
pub(crate) struct Transformer2DModel {
    norm: TokenGroupNorm,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    /// `[channels, inner]`.
    proj_out_weight: Tensor,
    /// `[channels, 1]`, to broadcast over the tokens of a `[B, channels, tokens]` map.
    proj_out_bias: Tensor,
}

impl Transformer2DModel {
    pub(crate) fn new(
        vb: VarBuilder,
        channels: usize,
        layers: usize,
        s: &TransformerSettings,
    ) -> Result<Self> {
        let inner = s.heads * s.head_dim;
        // A 1x1 convolution and a linear layer are the same map; only the stored shape differs.
        let projection = |name: &str, out: usize, inp: usize| -> Result<(Tensor, Tensor)> {
            let vb = vb.pp(name);
            let weight = if s.use_linear_projection {
                vb.get((out, inp), "weight")?
            } else {
                vb.get((out, inp, 1, 1), "weight")?.reshape((out, inp))?
            };
            Ok((weight, vb.get(out, "bias")?))
        };
        let (proj_in_weight, proj_in_bias) = projection("proj_in", inner, channels)?;
        let (proj_out_weight, proj_out_bias) = projection("proj_out", channels, inner)?;
        let norm = vb.pp("norm");
        let blocks = (0..layers)
            .map(|i| BasicTransformerBlock::new(vb.pp(format!("transformer_blocks.{i}")), inner, s))
            .collect::<Result<Vec<_>>>()?;
        if !channels.is_multiple_of(s.norm_groups) {
            return Err(Error::model(format!(
                "unet: {channels} channels do not split into {} norm groups",
                s.norm_groups
            )));
        }
        Ok(Self {
            norm: TokenGroupNorm {
                weight: norm.get(channels, "weight")?,
                bias: norm.get(channels, "bias")?,
                groups: s.norm_groups,
                eps: 1e-6,
            },
            proj_in: Linear::new(proj_in_weight, Some(proj_in_bias)),
            blocks,
            proj_out_weight,
            proj_out_bias: proj_out_bias.unsqueeze(1)?,
        })
    }

    /// Transformer blocks, each with one cross-attention layer.
    pub(crate) fn depth(&self) -> usize {
        self.blocks.len()
    }

    /// `x`: `[B, C, H, W]`; `context`: the text embeddings `[B, M, cross_attention_dim]`;
    /// `images`: empty, or the IP-Adapter keys and values of each block's cross-attention.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        images: &[Vec<ImageAttention>],
    ) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if !images.is_empty() && images.len() != self.blocks.len() {
            return Err(Error::model(format!(
                "unet: image-prompt keys for {} cross-attention layers, the transformer has {}",
                images.len(),
                self.blocks.len()
            )));
        }
        let mut tokens = self.proj_in.forward(&self.norm.forward(x)?)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let own = images.get(i).map_or(&[][..], Vec::as_slice);
            tokens = block.forward(&tokens, context, own)?;
        }
        // W_out [C, inner] x tokens^T [B, inner, HW] lands in [B, C, HW], the feature-map layout,
        // without a transposing copy.
        let out = self
            .proj_out_weight
            .broadcast_left(b)?
            .matmul(&tokens.transpose(1, 2)?)?
            .broadcast_add(&self.proj_out_bias)?
            .reshape((b, c, h, w))?;
        Ok((out + x)?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use candle_nn::VarMap;

    use super::*;
    use crate::models::layers::max_abs_diff;

    #[test]
    fn the_feed_forward_in_runs_of_tokens_matches_all_at_once() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let ff = FeedForward::new(vb, 24).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 50, 24), &Device::Cpu).unwrap();
        let all = ff.forward_all(&x).unwrap();
        let largest = max_abs_diff(&all, &all.zeros_like().unwrap());
        assert!(largest > 0.1, "random weights give a signal");
        // 100 tokens in runs of 7 (the last one 2 long), and in one run.
        for run in [7, 100] {
            let runs = ff.forward_in_runs(&x, run).unwrap();
            assert_eq!(runs.dims(), all.dims());
            // The same dot products per token; only the way round the product is taken for a
            // run of few tokens may differ, which reorders nothing within a token's sums but
            // adds the bias before or after them (f32 rounding).
            let diff = max_abs_diff(&runs, &all);
            assert!(diff < 1e-5, "runs of {run}: {diff}");
        }
        assert!(ff.forward(&x).unwrap().dims() == all.dims());
    }
}
