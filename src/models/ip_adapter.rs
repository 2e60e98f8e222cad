//! IP-Adapter (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for
//! Text-to-Image Diffusion Models"): a CLIP vision encoder embeds a reference image, a small
//! projection turns the embedding into a few "image tokens" of the UNet's text width, and every
//! cross-attention layer of the UNet also attends to those tokens through its own key and value
//! projections (`to_k_ip`, `to_v_ip`), adding that attention, scaled, to the text attention.
//!
//! Two projections are supported, told apart by the weights as diffusers does:
//! - plain (`ip-adapter_sd15`, `ip-adapter_sdxl`): the encoder's projected `image_embeds` through
//!   a linear layer to 4 tokens and a LayerNorm (diffusers' `ImageProjection`);
//! - plus (`ip-adapter-plus_*`): the encoder's penultimate hidden states through a Perceiver-style
//!   resampler of learned queries (diffusers' `IPAdapterPlusImageProjection`).
//!
//! The adapter file is read in the layout h94/IP-Adapter publishes (`image_proj.*`,
//! `ip_adapter.<n>.to_k_ip.weight` with `n` = 1, 3, 5, ... in diffusers' attention-processor
//! order); the image encoder is a transformers `CLIPVisionModelWithProjection` folder.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2dConfig, Linear, VarBuilder};
use serde::Deserialize;

use super::clip::{Activation, ClipTextConfig, EncoderLayer, LayerNorm};
use super::layers::{scaled_dot_product_attention, AttentionPrecision};
use super::unet::{ImageAttention, UNet2DConditionModel};
use crate::weights::folder::load_component;
use crate::{Error, Result};

/// CLIPImageProcessor's normalisation (OpenAI CLIP's dataset statistics).
const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// The vision encoder's `config.json` (transformers' `CLIPVisionConfig`), with its defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::projection_dim")]
    pub projection_dim: usize,
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::num_channels")]
    pub num_channels: usize,
    #[serde(default = "defaults::image_size")]
    pub image_size: usize,
    #[serde(default = "defaults::patch_size")]
    pub patch_size: usize,
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: String,
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
}

mod defaults {
    pub fn hidden_size() -> usize {
        768
    }
    pub fn intermediate_size() -> usize {
        3072
    }
    pub fn projection_dim() -> usize {
        512
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn num_attention_heads() -> usize {
        12
    }
    pub fn num_channels() -> usize {
        3
    }
    pub fn image_size() -> usize {
        224
    }
    pub fn patch_size() -> usize {
        32
    }
    pub fn hidden_act() -> String {
        "quick_gelu".to_string()
    }
    pub fn layer_norm_eps() -> f64 {
        1e-5
    }
}

/// What the vision encoder returns for a batch of images.
#[derive(Debug, Clone)]
pub struct ClipVisionOutput {
    /// The projected, post-normalised class token `[B, projection_dim]`.
    pub image_embeds: Tensor,
    /// The input to the last encoder layer `[B, tokens, hidden]` (transformers'
    /// `hidden_states[-2]`), which IP-Adapter Plus reads.
    pub penultimate: Tensor,
}

/// transformers' `CLIPVisionModelWithProjection`: patch embedding (a strided convolution), a
/// learned class token and positions, a pre-encoder LayerNorm, the CLIP encoder layers, the
/// post-LayerNorm of the class token and the visual projection.
#[derive(Debug, Clone)]
pub struct ClipVisionModel {
    patch_embedding: candle_nn::Conv2d,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    visual_projection: Linear,
    config: ClipVisionConfig,
    dtype: DType,
}

impl ClipVisionModel {
    /// `vb` is rooted at the model (`vision_model.embeddings.patch_embedding.weight`, ...,
    /// `visual_projection.weight`); its dtype is the compute dtype.
    pub fn new(vb: VarBuilder, cfg: &ClipVisionConfig) -> Result<Self> {
        let heads = cfg.num_attention_heads;
        if heads == 0 || !cfg.hidden_size.is_multiple_of(heads) {
            return Err(Error::model(format!(
                "image encoder hidden_size {} is not divisible by num_attention_heads {heads}",
                cfg.hidden_size
            )));
        }
        if cfg.patch_size == 0 || !cfg.image_size.is_multiple_of(cfg.patch_size) {
            return Err(Error::model(format!(
                "image encoder image_size {} is not a multiple of patch_size {}",
                cfg.image_size, cfg.patch_size
            )));
        }
        let activation = Activation::parse(&cfg.hidden_act)?;
        // The encoder layers are the text encoder's; only these settings reach them.
        let layer_cfg = ClipTextConfig {
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_attention_heads: heads,
            hidden_act: cfg.hidden_act.clone(),
            layer_norm_eps: cfg.layer_norm_eps,
            ..ClipTextConfig::from_json(&serde_json::json!({}))?
        };
        let vm = vb.pp("vision_model");
        let emb = vm.pp("embeddings");
        let h = cfg.hidden_size;
        let patches = (cfg.image_size / cfg.patch_size).pow(2);
        let patch_embedding = candle_nn::conv2d_no_bias(
            cfg.num_channels,
            h,
            cfg.patch_size,
            Conv2dConfig {
                stride: cfg.patch_size,
                ..Default::default()
            },
            emb.pp("patch_embedding"),
        )?;
        let layers_vb = vm.pp("encoder").pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(&layer_cfg, activation, layers_vb.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_embedding,
            class_embedding: emb.get(h, "class_embedding")?,
            position_embedding: emb.get((patches + 1, h), "position_embedding.weight")?,
            pre_layrnorm: LayerNorm::new(h, cfg.layer_norm_eps, vm.pp("pre_layrnorm"))?,
            layers,
            post_layernorm: LayerNorm::new(h, cfg.layer_norm_eps, vm.pp("post_layernorm"))?,
            visual_projection: candle_nn::linear_no_bias(
                h,
                cfg.projection_dim,
                vb.pp("visual_projection"),
            )?,
            config: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    /// Loads a transformers `CLIPVisionModelWithProjection` folder (`config.json` + weights).
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let component = load_component(dir, None, device, dtype)?;
        let cfg: ClipVisionConfig = serde_json::from_value(component.config.clone())
            .map_err(|e| Error::model(format!("image encoder config.json: {e}")))?;
        Self::new(component.weights.var_builder(dtype, device), &cfg)
    }

    /// The encoder's configuration (its `image_size` sets the preprocessing size).
    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// Encodes normalised pixels `[B, 3, image_size, image_size]` (see [`preprocess`]).
    pub fn forward(&self, pixels: &Tensor) -> Result<ClipVisionOutput> {
        let (b, _, height, width) = pixels.dims4()?;
        let size = self.config.image_size;
        if height != size || width != size {
            return Err(Error::model(format!(
                "image encoder takes {size}x{size} pixels, given {width}x{height}"
            )));
        }
        let h = self.config.hidden_size;
        let patches = self
            .patch_embedding
            .forward(&pixels.to_dtype(self.dtype)?)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let class = self.class_embedding.reshape((1, 1, h))?.repeat((b, 1, 1))?;
        let mut xs = Tensor::cat(&[&class, &patches], 1)?
            .broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        xs = self.pre_layrnorm.forward(&xs)?;
        let mut penultimate = xs.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            if i + 1 == self.layers.len() {
                penultimate = xs.clone();
            }
            xs = layer.forward(&xs, None)?;
        }
        let pooled = self
            .post_layernorm
            .forward(&xs.narrow(1, 0, 1)?.squeeze(1)?)?;
        Ok(ClipVisionOutput {
            image_embeds: self.visual_projection.forward(&pooled)?,
            penultimate,
        })
    }
}

/// An image as transformers' `CLIPImageProcessor` prepares it for a `size` x `size` encoder:
/// the shortest side resized to `size` (bicubic), the centre `size` x `size` cut out, scaled to
/// 0..1 and normalised with CLIP's mean and deviation. Returns `[1, 3, size, size]` f32.
///
/// The resize reproduces transformers' to the bit: see [`resize_bicubic_antialias`].
pub fn preprocess(image: &image::RgbImage, size: usize, device: &Device) -> Result<Tensor> {
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 || size == 0 {
        return Err(Error::invalid("the IP-Adapter image is empty"));
    }
    let (w, h, size_u) = (w as usize, h as usize, size as u32);
    // transformers: the short side becomes `size`, the long side int(size * long / short).
    let (new_w, new_h) = if w <= h {
        (size, size * h / w)
    } else {
        (size * w / h, size)
    };
    let resized = resize_bicubic_antialias(image, new_w, new_h);
    let top = ((new_h - size) / 2) as u32;
    let left = ((new_w - size) / 2) as u32;
    let cropped = image::imageops::crop_imm(&resized, left, top, size_u, size_u).to_image();
    let mut data = vec![0f32; 3 * size * size];
    for (x, y, pixel) in cropped.enumerate_pixels() {
        for c in 0..3 {
            let v = pixel.0[c] as f32 / 255.0;
            data[c * size * size + y as usize * size + x as usize] =
                (v - CLIP_MEAN[c]) / CLIP_STD[c];
        }
    }
    Ok(Tensor::from_vec(data, (1, 3, size, size), device)?)
}

/// The interpolation kernel of an antialiased resize (torch's `_upsample_*_aa` kernels, which
/// are Pillow's): its weight at distance `x` (in input pixels, before widening) and its support.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AntialiasFilter {
    /// The triangle (tent) kernel, support 1.
    Bilinear,
    /// Keys' cubic with a = -0.5 as Pillow uses it, support 2.
    Bicubic,
}

impl AntialiasFilter {
    fn support(self) -> f64 {
        match self {
            AntialiasFilter::Bilinear => 1.0,
            AntialiasFilter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        const A: f64 = -0.5;
        let x = x.abs();
        match self {
            AntialiasFilter::Bilinear => (1.0 - x).max(0.0),
            AntialiasFilter::Bicubic if x < 1.0 => ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0,
            AntialiasFilter::Bicubic if x < 2.0 => (((x - 5.0) * x + 8.0) * x - 4.0) * A,
            AntialiasFilter::Bicubic => 0.0,
        }
    }
}

/// For one axis of `in_size` -> `out_size`: the fixed-point precision and, per output index,
/// the first input index and the integer weights. The kernel is widened by the scale when
/// shrinking, the weights normalised, then rounded to the most fractional bits that keep them
/// (and the largest doubled) within an i16, as torch's uint8 kernel does.
fn aa_coefficients(
    in_size: usize,
    out_size: usize,
    filter: AntialiasFilter,
) -> (u32, Vec<(usize, Vec<i64>)>) {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    let raw: Vec<(usize, Vec<f64>)> = (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let weights: Vec<f64> = (xmin..xmax)
                .map(|x| filter.weight((x as f64 - center + 0.5) / filter_scale))
                .collect();
            let total: f64 = weights.iter().sum();
            let weights = if total != 0.0 {
                weights.iter().map(|w| w / total).collect()
            } else {
                weights
            };
            (xmin, weights)
        })
        .collect();
    let max_weight = raw
        .iter()
        .flat_map(|(_, w)| w.iter().copied())
        .fold(0.0f64, f64::max);
    let mut precision = 0u32;
    while precision < 22 {
        if (0.5 + max_weight * (1u64 << (precision + 1)) as f64) as i64 >= 1 << 15 {
            break;
        }
        precision += 1;
    }
    let one = (1u64 << precision) as f64;
    let fixed = raw
        .into_iter()
        .map(|(xmin, weights)| {
            let ints = weights
                .iter()
                .map(|&w| {
                    if w < 0.0 {
                        (-0.5 + w * one) as i64
                    } else {
                        (0.5 + w * one) as i64
                    }
                })
                .collect();
            (xmin, ints)
        })
        .collect();
    (precision, fixed)
}

/// One axis of the resize: `horizontal` or vertical, from `image` to `out` pixels along it.
fn aa_pass(
    image: &image::RgbImage,
    out: usize,
    horizontal: bool,
    filter: AntialiasFilter,
) -> image::RgbImage {
    let (w, h) = image.dimensions();
    let in_size = if horizontal { w } else { h } as usize;
    let (precision, coefficients) = aa_coefficients(in_size, out, filter);
    let (out_w, out_h) = if horizontal {
        (out as u32, h)
    } else {
        (w, out as u32)
    };
    let half = if precision > 0 {
        1i64 << (precision - 1)
    } else {
        0
    };
    image::RgbImage::from_fn(out_w, out_h, |x, y| {
        let (start, weights) = &coefficients[if horizontal { x } else { y } as usize];
        let mut acc = [half; 3];
        for (i, weight) in weights.iter().enumerate() {
            let at = (start + i) as u32;
            let p = if horizontal {
                image.get_pixel(at, y)
            } else {
                image.get_pixel(x, at)
            };
            for (sum, value) in acc.iter_mut().zip(p.0) {
                *sum += value as i64 * weight;
            }
        }
        image::Rgb(acc.map(|a| (a >> precision).clamp(0, 255) as u8))
    })
}

/// Antialiased bicubic resize of 8-bit RGB, bit for bit as transformers' CLIP image processor
/// does it (torchvision's `resize(..., BICUBIC, antialias=True)` on a uint8 tensor, i.e. torch's
/// uint8 kernel, itself Pillow's algorithm with 16-bit weights): a horizontal pass into an 8-bit
/// image, then a vertical pass, each skipped when its size does not change.
pub fn resize_bicubic_antialias(
    image: &image::RgbImage,
    width: usize,
    height: usize,
) -> image::RgbImage {
    resize_antialias(image, width, height, AntialiasFilter::Bicubic)
}

/// [`resize_bicubic_antialias`] with the kernel chosen: torchvision's
/// `resize(..., interpolation, antialias=True)` on a uint8 tensor, as transformers' image
/// processors run it.
pub fn resize_antialias(
    image: &image::RgbImage,
    width: usize,
    height: usize,
    filter: AntialiasFilter,
) -> image::RgbImage {
    let horizontal = if width != image.width() as usize {
        aa_pass(image, width, true, filter)
    } else {
        image.clone()
    };
    if height == horizontal.height() as usize {
        return horizontal;
    }
    aa_pass(&horizontal, height, false, filter)
}

/// diffusers' `ImageProjection`: `image_embeds` to `tokens` x `cross_dim` and a LayerNorm.
#[derive(Debug, Clone)]
struct PlainProjection {
    proj: Linear,
    norm: candle_nn::LayerNorm,
    tokens: usize,
    cross_dim: usize,
}

impl PlainProjection {
    fn forward(&self, embeds: &Tensor) -> Result<Tensor> {
        let b = embeds.dim(0)?;
        let tokens = self
            .proj
            .forward(embeds)?
            .reshape((b, self.tokens, self.cross_dim))?;
        Ok(self.norm.forward(&tokens)?)
    }
}

/// One resampler layer: the queries attend to the image features and themselves, then a
/// LayerNorm-GELU feed-forward; both residual.
#[derive(Debug, Clone)]
struct ResamplerLayer {
    norm_x: candle_nn::LayerNorm,
    norm_latents: candle_nn::LayerNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    ff_norm: candle_nn::LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
    heads: usize,
}

/// The resampler's head width, fixed by IP-Adapter Plus (diffusers derives the head count from
/// it: `to_q` rows / 64).
const RESAMPLER_HEAD_DIM: usize = 64;

impl ResamplerLayer {
    /// `vb` at `image_proj.layers.<i>` in h94's layout: `0` the attention (`norm1`, `norm2`,
    /// `to_q`, `to_kv`, `to_out`), `1` the feed-forward (`0` LayerNorm, `1`, `3` linear).
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let attn = vb.pp("0");
        let inner = attn.get_unchecked("to_q.weight")?.dim(0)?;
        if inner == 0 || !inner.is_multiple_of(RESAMPLER_HEAD_DIM) {
            return Err(Error::model(format!(
                "IP-Adapter resampler: to_q has {inner} rows, not a multiple of \
                 {RESAMPLER_HEAD_DIM}"
            )));
        }
        let kv = attn.get((2 * inner, dim), "to_kv.weight")?;
        let ff = vb.pp("1");
        let hidden = ff.get_unchecked("1.weight")?.dim(0)?;
        Ok(Self {
            norm_x: candle_nn::layer_norm(dim, 1e-5, attn.pp("norm1"))?,
            norm_latents: candle_nn::layer_norm(dim, 1e-5, attn.pp("norm2"))?,
            to_q: candle_nn::linear_no_bias(dim, inner, attn.pp("to_q"))?,
            to_k: Linear::new(kv.narrow(0, 0, inner)?, None),
            to_v: Linear::new(kv.narrow(0, inner, inner)?, None),
            to_out: candle_nn::linear_no_bias(inner, dim, attn.pp("to_out"))?,
            ff_norm: candle_nn::layer_norm(dim, 1e-5, ff.pp("0"))?,
            ff_in: candle_nn::linear_no_bias(dim, hidden, ff.pp("1"))?,
            ff_out: candle_nn::linear_no_bias(hidden, dim, ff.pp("3"))?,
            heads: inner / RESAMPLER_HEAD_DIM,
        })
    }

    fn forward(&self, x: &Tensor, latents: &Tensor) -> Result<Tensor> {
        let (b, n, _) = latents.dims3()?;
        let x_norm = self.norm_x.forward(x)?;
        let l_norm = self.norm_latents.forward(latents)?;
        let context = Tensor::cat(&[&x_norm, &l_norm], 1)?;
        let m = context.dim(1)?;
        let split = |t: Tensor, len: usize| t.reshape((b, len, self.heads, RESAMPLER_HEAD_DIM));
        let q = split(self.to_q.forward(&l_norm)?, n)?;
        let k = split(self.to_k.forward(&context)?, m)?;
        let v = split(self.to_v.forward(&context)?, m)?;
        let scale = 1.0 / (RESAMPLER_HEAD_DIM as f64).sqrt();
        let attended =
            scaled_dot_product_attention(&q, &k, &v, scale, AttentionPrecision::Full, None)?
                .reshape((b, n, self.heads * RESAMPLER_HEAD_DIM))?;
        let latents = (self.to_out.forward(&attended)? + latents)?;
        let ff = self.ff_out.forward(
            &self
                .ff_in
                .forward(&self.ff_norm.forward(&latents)?)?
                .gelu_erf()?,
        )?;
        Ok((ff + latents)?)
    }
}

/// diffusers' `IPAdapterPlusImageProjection`: learned queries resampling the encoder's
/// penultimate hidden states into `queries` tokens of the UNet's text width.
#[derive(Debug, Clone)]
struct Resampler {
    latents: Tensor,
    proj_in: Linear,
    layers: Vec<ResamplerLayer>,
    proj_out: Linear,
    norm_out: candle_nn::LayerNorm,
}

impl Resampler {
    fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let b = hidden.dim(0)?;
        let x = self.proj_in.forward(hidden)?;
        let mut latents = self.latents.repeat((b, 1, 1))?;
        for layer in &self.layers {
            latents = layer.forward(&x, &latents)?;
        }
        Ok(self.norm_out.forward(&self.proj_out.forward(&latents)?)?)
    }
}

#[derive(Debug, Clone)]
enum Projection {
    Plain(PlainProjection),
    Plus(Resampler),
}

/// An IP-Adapter with its image encoder, ready to turn a reference image into the keys and
/// values of a UNet's cross-attention layers.
#[derive(Debug, Clone)]
pub struct IpAdapterModel {
    encoder: ClipVisionModel,
    projection: Projection,
    /// `(to_k_ip, to_v_ip)` per cross-attention layer, in diffusers' processor order.
    layers: Vec<(Linear, Linear)>,
    cross_dim: usize,
    dtype: DType,
}

impl IpAdapterModel {
    /// Reads an adapter file in h94's layout and the image encoder folder it was trained with.
    pub fn load(file: &Path, image_encoder: &Path, device: &Device, dtype: DType) -> Result<Self> {
        crate::weights::refuse_pickle(file)?;
        let bytes = std::fs::read(file)
            .map_err(|e| Error::model(format!("cannot read IP-Adapter {}: {e}", file.display())))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| {
            Error::model(format!(
                "IP-Adapter {} is not a safetensors file: {e}",
                file.display()
            ))
        })?;
        let encoder = ClipVisionModel::load(image_encoder, device, dtype)?;
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        Self::new(vb, encoder).map_err(|e| match e {
            Error::Model(m) => Error::model(format!("IP-Adapter {}: {m}", file.display())),
            other => other,
        })
    }

    /// `vb` over the adapter's tensors (`image_proj.*`, `ip_adapter.*`).
    pub fn new(vb: VarBuilder, encoder: ClipVisionModel) -> Result<Self> {
        let proj = vb.pp("image_proj");
        let enc_cfg = encoder.config().clone();
        let (projection, cross_dim) = if proj.contains_tensor("proj.weight") {
            let (rows, input) = proj.get_unchecked("proj.weight")?.dims2()?;
            let cross_dim = proj.get_unchecked("norm.weight")?.dim(0)?;
            if input != enc_cfg.projection_dim || cross_dim == 0 || !rows.is_multiple_of(cross_dim)
            {
                return Err(Error::model(format!(
                    "image_proj.proj.weight is [{rows}, {input}]: expected [tokens x {cross_dim}, \
                     {}] (the image encoder's projection_dim)",
                    enc_cfg.projection_dim
                )));
            }
            let plain = PlainProjection {
                proj: candle_nn::linear(input, rows, proj.pp("proj"))?,
                norm: candle_nn::layer_norm(cross_dim, 1e-5, proj.pp("norm"))?,
                tokens: rows / cross_dim,
                cross_dim,
            };
            (Projection::Plain(plain), cross_dim)
        } else if proj.contains_tensor("latents") {
            let (_, _, dim) = proj.get_unchecked("latents")?.dims3()?;
            let cross_dim = proj.get_unchecked("proj_out.weight")?.dim(0)?;
            let depth = (0..)
                .take_while(|i| proj.contains_tensor(&format!("layers.{i}.0.to_q.weight")))
                .count();
            let layers = (0..depth)
                .map(|i| ResamplerLayer::new(proj.pp(format!("layers.{i}")), dim))
                .collect::<Result<Vec<_>>>()?;
            let resampler = Resampler {
                latents: proj.get_unchecked("latents")?,
                proj_in: candle_nn::linear(enc_cfg.hidden_size, dim, proj.pp("proj_in"))?,
                layers,
                proj_out: candle_nn::linear(dim, cross_dim, proj.pp("proj_out"))?,
                norm_out: candle_nn::layer_norm(cross_dim, 1e-5, proj.pp("norm_out"))?,
            };
            (Projection::Plus(resampler), cross_dim)
        } else {
            return Err(Error::model(
                "no image projection found (image_proj.proj.weight for IP-Adapter, \
                 image_proj.latents for IP-Adapter Plus); other variants (Full, FaceID) are \
                 not supported",
            ));
        };
        let ip = vb.pp("ip_adapter");
        let mut layers = Vec::new();
        loop {
            let n = 2 * layers.len() + 1;
            let name = format!("{n}.to_k_ip.weight");
            if !ip.contains_tensor(&name) {
                break;
            }
            let (inner, width) = ip.get_unchecked(&name)?.dims2()?;
            if width != cross_dim {
                return Err(Error::model(format!(
                    "ip_adapter.{n}.to_k_ip.weight takes width {width}, the image tokens are \
                     {cross_dim} wide"
                )));
            }
            layers.push((
                candle_nn::linear_no_bias(cross_dim, inner, ip.pp(format!("{n}.to_k_ip")))?,
                candle_nn::linear_no_bias(cross_dim, inner, ip.pp(format!("{n}.to_v_ip")))?,
            ));
        }
        if layers.is_empty() {
            return Err(Error::model("no ip_adapter.1.to_k_ip.weight found"));
        }
        Ok(Self {
            encoder,
            projection,
            layers,
            cross_dim,
            dtype: vb.dtype(),
        })
    }

    /// Whether this is an IP-Adapter Plus (resampler over the penultimate hidden states).
    pub fn is_plus(&self) -> bool {
        matches!(self.projection, Projection::Plus(_))
    }

    /// Cross-attention layers the adapter has keys for.
    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    /// The width of the image tokens (the UNet's text width it was trained with).
    pub fn cross_attention_dim(&self) -> usize {
        self.cross_dim
    }

    /// The CLIP vision encoder the adapter reads images with.
    pub fn image_encoder(&self) -> &ClipVisionModel {
        &self.encoder
    }

    /// The image tokens `[2, tokens, cross_dim]` for the unconditional input (first) and the
    /// image: as diffusers, a zero embedding through the plain projection, a zero image through
    /// the encoder for the resampler.
    pub fn image_tokens(&self, image: &image::RgbImage) -> Result<Tensor> {
        let size = self.encoder.config().image_size;
        let device = self.encoder.patch_embedding.weight().device();
        let pixels = preprocess(image, size, device)?;
        let encoded = self.encoder.forward(&pixels)?;
        self.tokens_from(&encoded, &pixels)
    }

    /// [`Self::image_tokens`] from the encoder's output for `pixels`.
    fn tokens_from(&self, encoded: &ClipVisionOutput, pixels: &Tensor) -> Result<Tensor> {
        match &self.projection {
            Projection::Plain(plain) => {
                let embeds = &encoded.image_embeds;
                let both = Tensor::cat(&[&embeds.zeros_like()?, embeds], 0)?;
                plain.forward(&both)
            }
            Projection::Plus(resampler) => {
                let zero = self.encoder.forward(&pixels.zeros_like()?)?;
                let both = Tensor::cat(&[&zero.penultimate, &encoded.penultimate], 0)?;
                resampler.forward(&both)
            }
        }
    }

    /// The tokens the projection makes of already encoded inputs (for tests against the
    /// reference): `embeds` `[B, projection_dim]` for a plain adapter, penultimate hidden
    /// states `[B, tokens, hidden]` for a plus one.
    pub fn project(&self, encoded: &Tensor) -> Result<Tensor> {
        match &self.projection {
            Projection::Plain(plain) => plain.forward(&encoded.to_dtype(self.dtype)?),
            Projection::Plus(resampler) => resampler.forward(&encoded.to_dtype(self.dtype)?),
        }
    }

    /// The keys and values of every cross-attention layer of `unet` for `image` at `scale`,
    /// for a batch of `num_images` (with `guided`, the unconditional rows first, as the
    /// pipeline batches them).
    pub fn attention(
        &self,
        unet: &UNet2DConditionModel,
        image: &image::RgbImage,
        scale: f64,
        guided: bool,
        num_images: usize,
    ) -> Result<Vec<ImageAttention>> {
        if unet.cross_attention_layers() != self.layers.len() {
            return Err(Error::invalid(format!(
                "the IP-Adapter has {} cross-attention layers, the model has {}: it was made for \
                 another model architecture",
                self.layers.len(),
                unet.cross_attention_layers()
            )));
        }
        if unet.cross_attention_dim() != self.cross_dim {
            return Err(Error::invalid(format!(
                "the IP-Adapter makes image tokens of width {}, the model attends to width {}",
                self.cross_dim,
                unet.cross_attention_dim()
            )));
        }
        let tokens = self.image_tokens(image)?;
        let rows = |t: Tensor| -> Result<Tensor> {
            let t = t.unsqueeze(0)?;
            Ok(Tensor::cat(&vec![&t; num_images], 0)?)
        };
        let uncond = rows(tokens.get(0)?)?;
        let cond = rows(tokens.get(1)?)?;
        let batch = if guided {
            Tensor::cat(&[&uncond, &cond], 0)?
        } else {
            cond
        }
        .to_dtype(unet.dtype())?;
        self.layers
            .iter()
            .map(|(to_k, to_v)| {
                Ok(ImageAttention {
                    key: to_k.forward(&batch)?,
                    value: to_v.forward(&batch)?,
                    scale,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocess_crops_the_centre_of_the_short_side() {
        // 8x4: the short side (4) becomes 2, the long side 4; the centre 2x2 is kept.
        let mut image = image::RgbImage::new(8, 4);
        for (x, _, p) in image.enumerate_pixels_mut() {
            *p = image::Rgb([if x < 4 { 0 } else { 255 }, 128, 0]);
        }
        let t = preprocess(&image, 2, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 2, 2]);
        let red = t.get(0).unwrap().get(0).unwrap().to_vec2::<f32>().unwrap();
        // Left column from the dark half, right column from the bright half.
        assert!(red[0][0] < red[0][1], "{red:?}");
    }
}
