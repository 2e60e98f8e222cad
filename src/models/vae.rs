//! AutoencoderKL: the variational autoencoder (Kingma & Welling 2014, "Auto-Encoding Variational
//! Bayes") that Latent Diffusion (Rombach et al. 2022) uses as its first stage, mapping images to
//! the latent space the UNet denoises in and back.
//!
//! Layout and key names follow diffusers' `AutoencoderKL` (`encoder.down_blocks.N.resnets.M...`,
//! mid-block attention as `encoder.mid_block.attentions.0.to_q.weight`); the config mirrors its
//! `config.json`. The decoder is the memory peak of a generation at large sizes, so decoding runs
//! one image at a time and the blocks drop each intermediate as soon as it is consumed.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use serde::Deserialize;

use super::layers::{conv2d, scaled_dot_product_attention, AttentionPrecision, Conv2d};
use crate::error::{Error, Result};

/// Epsilon of every GroupNorm in the diffusers VAE (its blocks are built with `resnet_eps=1e-6`).
const NORM_EPS: f64 = 1e-6;

/// The VAE's `config.json`, with diffusers' defaults for absent fields.
#[derive(Debug, Clone, Deserialize)]
pub struct AutoencoderKlConfig {
    #[serde(default = "defaults::in_channels")]
    pub in_channels: usize,
    #[serde(default = "defaults::out_channels")]
    pub out_channels: usize,
    #[serde(default = "defaults::down_block_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "defaults::up_block_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "defaults::block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "defaults::layers_per_block")]
    pub layers_per_block: usize,
    #[serde(default = "defaults::act_fn")]
    pub act_fn: String,
    #[serde(default = "defaults::latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "defaults::norm_num_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "defaults::sample_size")]
    pub sample_size: usize,
    /// Latents are multiplied by this after encoding and divided by it before decoding.
    #[serde(default = "defaults::scaling_factor")]
    pub scaling_factor: f64,
    /// Subtracted before scaling (SD3/Flux VAEs); absent for SD 1.x/2.x/SDXL.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Per-channel latent statistics some VAEs publish for the pipeline to normalise with.
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// The VAE overflows in f16 (SDXL's original VAE): run it in f32.
    #[serde(default = "defaults::yes")]
    pub force_upcast: bool,
    #[serde(default = "defaults::yes")]
    pub use_quant_conv: bool,
    #[serde(default = "defaults::yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "defaults::yes")]
    pub mid_block_add_attention: bool,
}

mod defaults {
    pub fn in_channels() -> usize {
        3
    }
    pub fn out_channels() -> usize {
        3
    }
    pub fn down_block_types() -> Vec<String> {
        vec!["DownEncoderBlock2D".to_string()]
    }
    pub fn up_block_types() -> Vec<String> {
        vec!["UpDecoderBlock2D".to_string()]
    }
    pub fn block_out_channels() -> Vec<usize> {
        vec![64]
    }
    pub fn layers_per_block() -> usize {
        1
    }
    pub fn act_fn() -> String {
        "silu".to_string()
    }
    pub fn latent_channels() -> usize {
        4
    }
    pub fn norm_num_groups() -> usize {
        32
    }
    pub fn sample_size() -> usize {
        32
    }
    pub fn scaling_factor() -> f64 {
        0.18215
    }
    pub fn yes() -> bool {
        true
    }
}

impl AutoencoderKlConfig {
    /// Parses the component's `config.json` value.
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        serde_json::from_value(value.clone())
            .map_err(|e| Error::model(format!("vae config.json: {e}")))
    }

    /// Checks the settings this implementation supports, naming the first one it does not.
    pub fn validate(&self) -> Result<()> {
        if self.block_out_channels.is_empty() {
            return Err(Error::model("vae block_out_channels is empty"));
        }
        if self.down_block_types.len() != self.block_out_channels.len()
            || self.up_block_types.len() != self.block_out_channels.len()
        {
            return Err(Error::model(format!(
                "vae has {} block_out_channels but {} down and {} up block types",
                self.block_out_channels.len(),
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| t.as_str() != "DownEncoderBlock2D")
        {
            return Err(Error::model(format!(
                "vae down block type `{t}` is not supported (only DownEncoderBlock2D)"
            )));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| t.as_str() != "UpDecoderBlock2D")
        {
            return Err(Error::model(format!(
                "vae up block type `{t}` is not supported (only UpDecoderBlock2D)"
            )));
        }
        if self.act_fn != "silu" {
            return Err(Error::model(format!(
                "vae act_fn `{}` is not supported (only silu)",
                self.act_fn
            )));
        }
        if self.norm_num_groups == 0 {
            return Err(Error::model("vae norm_num_groups is 0"));
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c == 0 || !c.is_multiple_of(self.norm_num_groups))
        {
            return Err(Error::model(format!(
                "vae block_out_channels entry {c} is not a positive multiple of norm_num_groups {}",
                self.norm_num_groups
            )));
        }
        if self.latent_channels == 0 || self.in_channels == 0 || self.out_channels == 0 {
            return Err(Error::model("vae channel counts must be positive"));
        }
        Ok(())
    }

    /// How much smaller the latents are than the image on each side.
    pub fn downscale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// GroupNorm computed like torch: statistics in f32 (two-pass), then one per-channel
/// `x * scale + shift` pass in f32, rounded once to the storage dtype.
#[derive(Debug, Clone)]
struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
}

impl GroupNorm {
    fn new(groups: usize, channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(channels, "weight")?.to_dtype(DType::F32)?,
            bias: vb.get(channels, "bias")?.to_dtype(DType::F32)?,
            groups,
        })
    }
}

impl GroupNorm {
    /// The CPU kernel (with the SiLU when `silu`), or `None` where it does not apply.
    fn fast(&self, xs: &Tensor, silu: bool) -> candle_core::Result<Option<Tensor>> {
        crate::models::cpu::group_norm(xs, self.groups, NORM_EPS, &self.weight, &self.bias, silu)
    }

    /// `silu(self(xs))`, one fused pass on the CPU.
    fn forward_silu(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self.fast(xs, true)? {
            Some(ys) => Ok(ys),
            None => candle_nn::ops::silu(&self.forward(xs)?),
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(ys) = self.fast(xs, false)? {
            return Ok(ys);
        }
        let (b, c, h, w) = xs.dims4()?;
        let dtype = xs.dtype();
        let per_group = c / self.groups;
        let x32 = xs.to_dtype(DType::F32)?.reshape((b, c, h * w))?;
        let grouped = x32.reshape((b, self.groups, per_group * h * w))?;
        let mean = grouped.mean_keepdim(2)?; // [b, g, 1]
        let var = {
            let centred = grouped.broadcast_sub(&mean)?;
            centred.sqr()?.mean_keepdim(2)?
        };
        drop(grouped);
        let rstd = (var + NORM_EPS)?.sqrt()?.recip()?;
        // Fold the statistics and the affine parameters into one scale and shift per channel.
        let per_channel = |t: &Tensor| -> candle_core::Result<Tensor> {
            t.broadcast_as((b, self.groups, per_group))?
                .contiguous()?
                .reshape((b, c, 1))
        };
        let scale = per_channel(&rstd)?.broadcast_mul(&self.weight.reshape((1, c, 1))?)?;
        let shift = self
            .bias
            .reshape((1, c, 1))?
            .broadcast_sub(&per_channel(&mean)?.mul(&scale)?)?;
        let mut ys = x32.broadcast_mul(&scale)?;
        drop(x32);
        ys = ys.broadcast_add(&shift)?;
        ys.to_dtype(dtype)?.reshape((b, c, h, w))
    }
}

/// A VAE convolution: striped, since the decoder's full-resolution convolutions are the memory
/// peak of a generation.
fn striped_conv2d(
    vb: VarBuilder,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    padding: usize,
    stride: usize,
) -> Result<Conv2d> {
    Ok(conv2d(vb, in_channels, out_channels, kernel, padding, stride)?.striped())
}

/// `norm -> silu -> conv -> norm -> silu -> conv`, plus the (projected) input.
#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(in_ch: usize, out_ch: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let conv_shortcut = if in_ch != out_ch {
            Some(striped_conv2d(
                vb.pp("conv_shortcut"),
                in_ch,
                out_ch,
                1,
                0,
                1,
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(groups, in_ch, vb.pp("norm1"))?,
            conv1: striped_conv2d(vb.pp("conv1"), in_ch, out_ch, 3, 1, 1)?,
            norm2: GroupNorm::new(groups, out_ch, vb.pp("norm2"))?,
            conv2: striped_conv2d(vb.pp("conv2"), out_ch, out_ch, 3, 1, 1)?,
            conv_shortcut,
        })
    }
}

impl Module for ResnetBlock {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        // One statement per step so each intermediate is freed before the next is allocated.
        let mut h = self.norm1.forward_silu(xs)?;
        h = self.conv1.forward(&h)?;
        h = self.norm2.forward_silu(&h)?;
        h = self.conv2.forward(&h)?;
        match &self.conv_shortcut {
            Some(shortcut) => shortcut.forward(xs)? + h,
            None => xs + h,
        }
    }
}

/// Single-head spatial self-attention of the mid block, with a residual connection.
#[derive(Debug, Clone)]
struct AttentionBlock {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    scale: f64,
}

impl AttentionBlock {
    fn new(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            group_norm: GroupNorm::new(groups, channels, vb.pp("group_norm"))?,
            to_q: candle_nn::linear(channels, channels, vb.pp("to_q"))?,
            to_k: candle_nn::linear(channels, channels, vb.pp("to_k"))?,
            to_v: candle_nn::linear(channels, channels, vb.pp("to_v"))?,
            to_out: candle_nn::linear(channels, channels, vb.pp("to_out").pp(0))?,
            scale: (channels as f64).powf(-0.5),
        })
    }
}

impl Module for AttentionBlock {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        // [b, c, h, w] -> [b, hw, c]: one token per latent pixel.
        let tokens = self
            .group_norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        // Scores, softmax and the weighted sum run in f32, as torch's fused attention kernels
        // accumulate; the projections stay in the compute dtype. The f32 q/k/v copies (hw x c)
        // are small next to the decoder's activations.
        let one_head = |t: Tensor| t.reshape((b, h * w, 1, c));
        let attended = scaled_dot_product_attention(
            &one_head(self.to_q.forward(&tokens)?)?,
            &one_head(self.to_k.forward(&tokens)?)?,
            &one_head(self.to_v.forward(&tokens)?)?,
            self.scale,
            AttentionPrecision::Full,
            None,
        )?
        .reshape((b, h * w, c))?;
        drop(tokens);
        let out = self
            .to_out
            .forward(&attended)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        xs + out
    }
}

/// `resnet -> attention -> resnet` at the lowest resolution.
#[derive(Debug, Clone)]
struct MidBlock {
    resnet_in: ResnetBlock,
    attention: Option<AttentionBlock>,
    resnet_out: ResnetBlock,
}

impl MidBlock {
    fn new(channels: usize, groups: usize, add_attention: bool, vb: VarBuilder) -> Result<Self> {
        let attention = if add_attention {
            Some(AttentionBlock::new(
                channels,
                groups,
                vb.pp("attentions").pp(0),
            )?)
        } else {
            None
        };
        Ok(Self {
            resnet_in: ResnetBlock::new(channels, channels, groups, vb.pp("resnets").pp(0))?,
            attention,
            resnet_out: ResnetBlock::new(channels, channels, groups, vb.pp("resnets").pp(1))?,
        })
    }
}

impl Module for MidBlock {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.resnet_in.forward(xs)?;
        if let Some(attention) = &self.attention {
            h = attention.forward(&h)?;
        }
        self.resnet_out.forward(&h)
    }
}

/// The `count` resnets of a block (`resnets.{j}` under `vb`), the first taking `in_ch` channels
/// to `out_ch`.
fn resnet_stack(
    vb: &VarBuilder,
    count: usize,
    in_ch: usize,
    out_ch: usize,
    groups: usize,
) -> Result<Vec<ResnetBlock>> {
    (0..count)
        .map(|j| {
            let from = if j == 0 { in_ch } else { out_ch };
            ResnetBlock::new(from, out_ch, groups, vb.pp("resnets").pp(j))
        })
        .collect()
}

/// Encoder down block: resnets, then a stride-2 conv (except in the last block).
#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    downsample: Option<Conv2d>,
}

impl DownBlock {
    /// Takes the input by value so it is freed once the first resnet has consumed it.
    fn forward(&self, xs: Tensor) -> candle_core::Result<Tensor> {
        let mut h = xs;
        for resnet in &self.resnets {
            h = resnet.forward(&h)?;
        }
        if let Some(conv) = &self.downsample {
            // Padding only on the right and bottom, as the LDM autoencoder was trained with.
            h = h.pad_with_zeros(D::Minus1, 0, 1)?;
            h = h.pad_with_zeros(D::Minus2, 0, 1)?;
            h = conv.forward(&h)?;
        }
        Ok(h)
    }
}

/// Decoder up block: resnets, then nearest 2x upsampling and a conv (except in the last block).
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Conv2d>,
}

impl UpBlock {
    /// Takes the input by value so it is freed once the first resnet has consumed it.
    fn forward(&self, xs: Tensor) -> candle_core::Result<Tensor> {
        let mut h = xs;
        for resnet in &self.resnets {
            h = resnet.forward(&h)?;
        }
        if let Some(conv) = &self.upsample {
            let (_, _, height, width) = h.dims4()?;
            h = h.upsample_nearest2d(height * 2, width * 2)?;
            h = conv.forward(&h)?;
        }
        Ok(h)
    }
}

/// Image -> moments (mean and log-variance of the latent posterior).
#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(cfg: &AutoencoderKlConfig, vb: VarBuilder) -> Result<Self> {
        let channels = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let conv_in = striped_conv2d(vb.pp("conv_in"), cfg.in_channels, channels[0], 3, 1, 1)?;
        let mut down_blocks = Vec::with_capacity(channels.len());
        let mut in_ch = channels[0];
        for (i, &out_ch) in channels.iter().enumerate() {
            let block_vb = vb.pp("down_blocks").pp(i);
            let resnets = resnet_stack(&block_vb, cfg.layers_per_block, in_ch, out_ch, groups)?;
            let downsample = if i + 1 < channels.len() {
                let conv_vb = block_vb.pp("downsamplers").pp(0).pp("conv");
                Some(striped_conv2d(conv_vb, out_ch, out_ch, 3, 0, 2)?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                downsample,
            });
            in_ch = out_ch;
        }
        let last = *channels.last().expect("validated non-empty; this is a bug");
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: MidBlock::new(
                last,
                groups,
                cfg.mid_block_add_attention,
                vb.pp("mid_block"),
            )?,
            conv_norm_out: GroupNorm::new(groups, last, vb.pp("conv_norm_out"))?,
            // Twice the latent channels: mean and log-variance.
            conv_out: striped_conv2d(vb.pp("conv_out"), last, 2 * cfg.latent_channels, 3, 1, 1)?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.conv_in.forward(xs)?;
        for block in &self.down_blocks {
            h = block.forward(h)?;
        }
        h = self.mid_block.forward(&h)?;
        h = self.conv_norm_out.forward_silu(&h)?;
        self.conv_out.forward(&h)
    }
}

/// Latents -> image.
#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(cfg: &AutoencoderKlConfig, vb: VarBuilder) -> Result<Self> {
        let groups = cfg.norm_num_groups;
        let reversed: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let top = reversed[0];
        let conv_in = striped_conv2d(vb.pp("conv_in"), cfg.latent_channels, top, 3, 1, 1)?;
        let mid_block =
            MidBlock::new(top, groups, cfg.mid_block_add_attention, vb.pp("mid_block"))?;
        let mut up_blocks = Vec::with_capacity(reversed.len());
        let mut in_ch = top;
        for (i, &out_ch) in reversed.iter().enumerate() {
            let block_vb = vb.pp("up_blocks").pp(i);
            // The decoder has one more resnet per block than the encoder.
            let count = cfg.layers_per_block + 1;
            let resnets = resnet_stack(&block_vb, count, in_ch, out_ch, groups)?;
            let upsample = if i + 1 < reversed.len() {
                let conv_vb = block_vb.pp("upsamplers").pp(0).pp("conv");
                Some(striped_conv2d(conv_vb, out_ch, out_ch, 3, 1, 1)?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsample });
            in_ch = out_ch;
        }
        let bottom = cfg.block_out_channels[0];
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(groups, bottom, vb.pp("conv_norm_out"))?,
            conv_out: striped_conv2d(vb.pp("conv_out"), bottom, cfg.out_channels, 3, 1, 1)?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.conv_in.forward(xs)?;
        h = self.mid_block.forward(&h)?;
        for block in &self.up_blocks {
            h = block.forward(h)?;
        }
        h = self.conv_norm_out.forward_silu(&h)?;
        self.conv_out.forward(&h)
    }
}

/// The latent posterior q(z|x): a diagonal Gaussian per latent element.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    pub std: Tensor,
}

impl DiagonalGaussian {
    /// Splits encoder moments [B, 2C, h, w] into mean and std, clamping the log-variance to
    /// [-30, 20] as the LDM autoencoder does.
    fn from_moments(moments: &Tensor) -> Result<Self> {
        let channels = moments.dim(1)? / 2;
        let mean = moments.narrow(1, 0, channels)?.contiguous()?;
        let logvar = moments
            .narrow(1, channels, channels)?
            .clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(Self { mean, std })
    }

    /// `mean + std * noise`, with `noise` ~ N(0, 1) shaped like the mean.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        Ok((&self.mean + (&self.std * noise.to_dtype(self.std.dtype())?)?)?)
    }

    /// The posterior's mode (diffusers' `latent_dist.mode()`).
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }
}

/// diffusers' `AutoencoderKL`.
#[derive(Debug, Clone)]
pub struct AutoencoderKl {
    encoder: Encoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    decoder: Decoder,
    config: AutoencoderKlConfig,
}

impl AutoencoderKl {
    /// `vb` is rooted at the component (keys `encoder.conv_in.weight`, ...); its dtype is the
    /// compute dtype.
    pub fn new(vb: VarBuilder, cfg: &AutoencoderKlConfig) -> Result<Self> {
        cfg.validate()?;
        let moments = 2 * cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(striped_conv2d(
                vb.pp("quant_conv"),
                moments,
                moments,
                1,
                0,
                1,
            )?)
        } else {
            None
        };
        let latent = cfg.latent_channels;
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(striped_conv2d(
                vb.pp("post_quant_conv"),
                latent,
                latent,
                1,
                0,
                1,
            )?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            quant_conv,
            post_quant_conv,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &AutoencoderKlConfig {
        &self.config
    }

    /// Encodes images [B, in_channels, H, W] with values in -1..1 (H and W multiples of the
    /// downscale factor) to the latent posterior, before scaling by `scaling_factor`.
    pub fn encode(&self, images: &Tensor) -> Result<DiagonalGaussian> {
        let (_, channels, height, width) = images.dims4()?;
        self.check_spatial(
            "image",
            channels,
            self.config.in_channels,
            height,
            width,
            true,
        )?;
        let mut moments = self.encoder.forward(images)?;
        if let Some(conv) = &self.quant_conv {
            moments = conv.forward(&moments)?;
        }
        DiagonalGaussian::from_moments(&moments)
    }

    /// Decodes latents [B, latent_channels, h, w] (already divided by `scaling_factor`) to
    /// images [B, out_channels, h*f, w*f] with values about -1..1. Images are decoded one at a
    /// time so the peak memory is that of a single image.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = latents.dims4()?;
        self.check_spatial(
            "latent",
            channels,
            self.config.latent_channels,
            height,
            width,
            false,
        )?;
        let mut images = Vec::with_capacity(batch);
        for i in 0..batch {
            let mut z = latents.narrow(0, i, 1)?;
            if let Some(conv) = &self.post_quant_conv {
                z = conv.forward(&z)?;
            }
            images.push(self.decoder.forward(&z)?);
        }
        Ok(Tensor::cat(&images, 0)?)
    }

    fn check_spatial(
        &self,
        what: &str,
        channels: usize,
        expected_channels: usize,
        height: usize,
        width: usize,
        needs_multiple: bool,
    ) -> Result<()> {
        if channels != expected_channels {
            return Err(Error::invalid(format!(
                "vae {what} has {channels} channels; expected {expected_channels}"
            )));
        }
        let factor = if needs_multiple {
            self.config.downscale_factor()
        } else {
            1
        };
        if height == 0
            || width == 0
            || !height.is_multiple_of(factor)
            || !width.is_multiple_of(factor)
        {
            return Err(Error::invalid(format!(
                "vae {what} size {width}x{height} must be a positive multiple of {factor}"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: serde_json::Value) -> AutoencoderKlConfig {
        AutoencoderKlConfig::from_json(&json).unwrap()
    }

    #[test]
    fn defaults_follow_diffusers() {
        let cfg = config(serde_json::json!({}));
        assert_eq!(cfg.latent_channels, 4);
        assert!(cfg.use_quant_conv && cfg.use_post_quant_conv && cfg.mid_block_add_attention);
        assert_eq!(cfg.scaling_factor, 0.18215);
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn rejects_unsupported_settings() {
        let bad = [
            serde_json::json!({"act_fn": "relu"}),
            serde_json::json!({"down_block_types": ["DownBlock2D"]}),
            serde_json::json!({"block_out_channels": [64, 128], "down_block_types": ["DownEncoderBlock2D"]}),
            serde_json::json!({"block_out_channels": [48], "norm_num_groups": 32}),
        ];
        for json in bad {
            assert!(
                matches!(config(json.clone()).validate(), Err(Error::Model(_))),
                "{json}"
            );
        }
    }

    #[test]
    fn group_norm_matches_definition() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let xs = Tensor::arange(0f32, 32.0, &dev)?
            .reshape((1, 4, 2, 4))?
            .sqr()?;
        let norm = GroupNorm {
            weight: Tensor::new(&[1f32, 2.0, 0.5, 1.0], &dev)?,
            bias: Tensor::new(&[0f32, 1.0, 0.0, -1.0], &dev)?,
            groups: 2,
        };
        let ys = norm.forward(&xs)?.flatten_all()?.to_vec1::<f32>()?;
        let xs = xs.flatten_all()?.to_vec1::<f32>()?;
        for (g, group) in xs.chunks(16).enumerate() {
            let mean = group.iter().sum::<f32>() / 16.0;
            let var = group.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 16.0;
            for (i, v) in group.iter().enumerate() {
                let c = 2 * g + i / 8;
                let (w, b) = ([1f32, 2.0, 0.5, 1.0][c], [0f32, 1.0, 0.0, -1.0][c]);
                let expected = (v - mean) / (var + 1e-6).sqrt() * w + b;
                assert!((ys[16 * g + i] - expected).abs() < 1e-4);
            }
        }
        Ok(())
    }
}
