//! Monocular depth with DPT (Ranftl et al. 2021, "Vision Transformers for Dense Prediction"), the
//! depth estimator of diffusers' ControlNet depth examples: transformers' `pipeline("depth-
//! estimation")`, whose default model is `Intel/dpt-large`.
//!
//! [`DptDepth::load`] reads a transformers folder as published in `Intel/dpt-large`:
//! `config.json` (`DPTConfig`), `model.safetensors` (`DPTForDepthEstimation` key names) and
//! `preprocessor_config.json` (`DPTImageProcessor`; transformers' defaults when absent). Every
//! size comes from the config, so a tiny random-weight DPT loads with the same code. The hybrid
//! ViT + BiT variant (`Intel/dpt-hybrid-midas`, `is_hybrid: true`) and DPTs on a separate
//! backbone (BEiT, Swin, DINOv2: `backbone_config`) are refused with an error naming them.
//!
//! The steps, as transformers 5.23 runs them:
//! 1. the image processor: resize (8-bit, antialiased; see [`super::resample`]) to `size`, or to
//!    the aspect-preserving size nearest to it when `keep_aspect_ratio`, sides rounded to a
//!    multiple of `ensure_multiple_of`; rescale and normalise;
//! 2. the ViT encoder: 16x16 patches, a class token, position embeddings interpolated
//!    (bilinear) from the training grid to the image's grid, pre-norm transformer layers; the
//!    outputs of the layers in `backbone_out_indices` are kept;
//! 3. the neck: each kept layer is reassembled into a feature map (readout token projected into
//!    every token, 1x1 projection, transposed convolution / identity / strided convolution to
//!    its scale), a 3x3 convolution to the fusion width, then fused from the coarsest up with
//!    residual convolution units and 2x bilinear upsampling;
//! 4. the head: convolutions, a 2x upsampling and ReLU to one channel, the predicted depth
//!    (relative inverse depth: larger is nearer);
//! 5. the depth-estimation pipeline's post-processing: bicubic interpolation (`align_corners =
//!    False`) to the image size, then min-max scaling to 0..255, truncated to 8 bits. The
//!    control image is that gray map replicated to RGB.
//!
//! transformers reshapes the tokens to a square grid, so it only runs square network inputs
//! (`keep_aspect_ratio: false`, as every published DPT-ViT config has); here the grid's height
//! and width are kept, so aspect-preserving configs run too.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{LayerNorm, Linear, VarBuilder};
use image::RgbImage;
use serde::Deserialize;

use super::resample::{self, Filter};
use super::Detector;
use crate::models::layers::{self, AttentionPrecision, Conv2d};
use crate::weights::folder::load_component;
use crate::{Error, Result};

/// An integer or a `[height, width]` pair, as `DPTConfig.image_size` / `patch_size` may be.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
enum Size2 {
    Square(usize),
    Pair([usize; 2]),
}

impl Size2 {
    fn pair(self) -> (usize, usize) {
        match self {
            Size2::Square(s) => (s, s),
            Size2::Pair([h, w]) => (h, w),
        }
    }
}

/// `config.json` of a DPT depth model (transformers' `DPTConfig`, defaults = `Intel/dpt-large`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DptConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    image_size: Size2,
    patch_size: Size2,
    pub num_channels: usize,
    pub is_hybrid: bool,
    pub qkv_bias: bool,
    pub backbone_out_indices: Vec<usize>,
    pub readout_type: String,
    pub reassemble_factors: Vec<f64>,
    pub neck_hidden_sizes: Vec<usize>,
    pub fusion_hidden_size: usize,
    pub head_in_index: i64,
    pub use_batch_norm_in_fusion_residual: bool,
    pub use_bias_in_fusion_residual: Option<bool>,
    pub add_projection: bool,
    pub backbone_config: Option<serde_json::Value>,
    pub backbone: Option<serde_json::Value>,
}

impl Default for DptConfig {
    fn default() -> Self {
        DptConfig {
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-12,
            image_size: Size2::Square(384),
            patch_size: Size2::Square(16),
            num_channels: 3,
            is_hybrid: false,
            qkv_bias: true,
            backbone_out_indices: vec![2, 5, 8, 11],
            readout_type: "project".into(),
            reassemble_factors: vec![4.0, 2.0, 1.0, 0.5],
            neck_hidden_sizes: vec![96, 192, 384, 768],
            fusion_hidden_size: 256,
            head_in_index: -1,
            use_batch_norm_in_fusion_residual: false,
            use_bias_in_fusion_residual: None,
            add_projection: false,
            backbone_config: None,
            backbone: None,
        }
    }
}

impl DptConfig {
    /// Refuses the variants this module does not implement, by name.
    fn check(&self) -> Result<()> {
        if self.is_hybrid {
            return Err(Error::model(
                "DPT-Hybrid (ViT on a BiT backbone, e.g. Intel/dpt-hybrid-midas) is not \
                 supported; use the pure-ViT DPT (Intel/dpt-large)",
            ));
        }
        if self.backbone_config.as_ref().is_some_and(|v| !v.is_null())
            || self.backbone.as_ref().is_some_and(|v| !v.is_null())
        {
            return Err(Error::model(
                "DPT on a separate backbone (BEiT, Swin, DINOv2 ...) is not supported; use the \
                 pure-ViT DPT (Intel/dpt-large)",
            ));
        }
        if self.hidden_act != "gelu" {
            return Err(Error::model(format!(
                "DPT hidden_act {:?} is not supported (\"gelu\" is)",
                self.hidden_act
            )));
        }
        if !matches!(self.readout_type.as_str(), "ignore" | "add" | "project") {
            return Err(Error::model(format!(
                "DPT readout_type {:?} is not one of ignore, add, project",
                self.readout_type
            )));
        }
        if self.use_batch_norm_in_fusion_residual {
            return Err(Error::model(
                "DPT use_batch_norm_in_fusion_residual is not supported",
            ));
        }
        let n = self.neck_hidden_sizes.len();
        if n == 0 || self.reassemble_factors.len() != n || self.backbone_out_indices.len() != n {
            return Err(Error::model(format!(
                "DPT config: {} neck_hidden_sizes, {} reassemble_factors and {} \
                 backbone_out_indices must be as many, and not none",
                n,
                self.reassemble_factors.len(),
                self.backbone_out_indices.len()
            )));
        }
        let mut distinct = self.backbone_out_indices.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() != n {
            return Err(Error::model("DPT backbone_out_indices repeat a layer"));
        }
        if let Some(&i) = self
            .backbone_out_indices
            .iter()
            .find(|&&i| i >= self.num_hidden_layers)
        {
            return Err(Error::model(format!(
                "DPT backbone_out_indices names layer {i} of {}",
                self.num_hidden_layers
            )));
        }
        for &f in &self.reassemble_factors {
            let upsampling = f > 1.0 && f.fract() == 0.0;
            let downsampling = f > 0.0 && f < 1.0 && (1.0 / f).fract() == 0.0;
            if !(upsampling || downsampling || f == 1.0) {
                return Err(Error::model(format!(
                    "DPT reassemble factor {f} is neither an integer nor its inverse"
                )));
            }
        }
        let heads = self.num_attention_heads;
        if heads == 0 || !self.hidden_size.is_multiple_of(heads) {
            return Err(Error::model(format!(
                "DPT hidden_size {} is not a multiple of num_attention_heads {heads}",
                self.hidden_size
            )));
        }
        let (ph, pw) = self.patch_size.pair();
        if ph != pw || ph == 0 {
            return Err(Error::model(format!(
                "DPT patch_size {ph}x{pw}: only square patches are supported"
            )));
        }
        Ok(())
    }
}

/// `preprocessor_config.json` of a DPT model (transformers' `DPTImageProcessor`); fields the
/// processor does not use (`image_processor_type`, `size_divisor` without `do_pad` ...) are
/// ignored, those that would change the result and are not implemented are refused.
#[derive(Debug, Clone, PartialEq)]
pub struct DptImageProcessor {
    pub do_resize: bool,
    /// Target `(height, width)`.
    pub size: (usize, usize),
    pub resample: Filter,
    pub keep_aspect_ratio: bool,
    pub ensure_multiple_of: usize,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
}

impl Default for DptImageProcessor {
    /// The class defaults of transformers' `DPTImageProcessor`.
    fn default() -> Self {
        DptImageProcessor {
            do_resize: true,
            size: (384, 384),
            resample: Filter::Bicubic,
            keep_aspect_ratio: false,
            ensure_multiple_of: 1,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
        }
    }
}

impl DptImageProcessor {
    /// Parses a `preprocessor_config.json` value.
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        let mut p = DptImageProcessor::default();
        let bad = |key: &str| Error::model(format!("DPT preprocessor_config.json: bad {key}"));
        let flag = |key: &str, default: bool| -> Result<bool> {
            match value.get(key) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(v) => v.as_bool().ok_or_else(|| bad(key)),
            }
        };
        p.do_resize = flag("do_resize", p.do_resize)?;
        p.keep_aspect_ratio = flag("keep_aspect_ratio", p.keep_aspect_ratio)?;
        p.do_rescale = flag("do_rescale", p.do_rescale)?;
        p.do_normalize = flag("do_normalize", p.do_normalize)?;
        for key in ["do_pad", "do_center_crop", "do_reduce_labels"] {
            if flag(key, false)? {
                return Err(Error::model(format!(
                    "DPT preprocessor_config.json: {key} is not supported"
                )));
            }
        }
        match value.get("size") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Number(n)) => {
                let s = n.as_u64().ok_or_else(|| bad("size"))? as usize;
                p.size = (s, s);
            }
            Some(obj) => {
                let side = |k: &str| obj.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
                p.size = match (side("height"), side("width")) {
                    (Some(h), Some(w)) => (h, w),
                    _ => return Err(bad("size (height and width expected)")),
                };
            }
        }
        if p.size.0 == 0 || p.size.1 == 0 {
            return Err(bad("size"));
        }
        if let Some(v) = value.get("resample").filter(|v| !v.is_null()) {
            p.resample = Filter::from_pil(v.as_i64().ok_or_else(|| bad("resample"))?)?;
        }
        if let Some(v) = value.get("ensure_multiple_of").filter(|v| !v.is_null()) {
            p.ensure_multiple_of =
                v.as_u64()
                    .filter(|&m| m > 0)
                    .ok_or_else(|| bad("ensure_multiple_of"))? as usize;
        }
        if let Some(v) = value.get("rescale_factor").filter(|v| !v.is_null()) {
            p.rescale_factor = v.as_f64().ok_or_else(|| bad("rescale_factor"))?;
        }
        let triple = |key: &str, default: [f64; 3]| -> Result<[f64; 3]> {
            match value.get(key) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(serde_json::Value::Number(n)) => {
                    let v = n.as_f64().ok_or_else(|| bad(key))?;
                    Ok([v; 3])
                }
                Some(v) => {
                    let list: Vec<f64> = v
                        .as_array()
                        .ok_or_else(|| bad(key))?
                        .iter()
                        .map(|x| x.as_f64().ok_or_else(|| bad(key)))
                        .collect::<Result<_>>()?;
                    <[f64; 3]>::try_from(list).map_err(|_| bad(key))
                }
            }
        };
        p.image_mean = triple("image_mean", p.image_mean)?;
        p.image_std = triple("image_std", p.image_std)?;
        if p.image_std.contains(&0.0) {
            return Err(bad("image_std"));
        }
        Ok(p)
    }

    /// The network input size `(height, width)` for an image of `height` x `width`
    /// (transformers' `get_resize_output_image_size`; Python's `round` rounds half to even).
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        if !self.do_resize {
            return (height, width);
        }
        let (th, tw) = self.size;
        let mut scale_h = th as f64 / height as f64;
        let mut scale_w = tw as f64 / width as f64;
        if self.keep_aspect_ratio {
            // Scale as little as possible.
            if (1.0 - scale_w).abs() < (1.0 - scale_h).abs() {
                scale_h = scale_w;
            } else {
                scale_w = scale_h;
            }
        }
        let m = self.ensure_multiple_of as f64;
        let constrain = |v: f64| -> usize {
            let x = (v / m).round_ties_even() * m;
            let x = if x < 0.0 { (v / m).ceil() * m } else { x };
            x as usize
        };
        (
            constrain(scale_h * height as f64),
            constrain(scale_w * width as f64),
        )
    }

    /// The image resized to the network input size (8 bits, before normalisation).
    pub fn resize(&self, image: &RgbImage) -> Result<RgbImage> {
        let (h, w) = self.output_size(image.height() as usize, image.width() as usize);
        if h == 0 || w == 0 {
            return Err(Error::invalid(format!(
                "image of {}x{} is too small for the depth estimator",
                image.width(),
                image.height()
            )));
        }
        if (h, w) == (image.height() as usize, image.width() as usize) {
            return Ok(image.clone());
        }
        resample::resize_rgb(image, w as u32, h as u32, self.resample)
    }

    /// Network input `[1, 3, H, W]` (f32) for an image: resized, rescaled and normalised with
    /// transformers' fused arithmetic (`(x - mean / factor) / (std / factor)` in f32).
    pub fn pixel_values(&self, image: &RgbImage, device: &Device) -> Result<Tensor> {
        let resized = self.resize(image)?;
        let (w, h) = (resized.width() as usize, resized.height() as usize);
        let mut planes = vec![0f32; 3 * h * w];
        let factor = self.rescale_factor as f32;
        let (mean, std): ([f32; 3], [f32; 3]) = if self.do_normalize && self.do_rescale {
            let inv = (1.0 / self.rescale_factor) as f32;
            (
                self.image_mean.map(|m| m as f32 * inv),
                self.image_std.map(|s| s as f32 * inv),
            )
        } else {
            (
                self.image_mean.map(|m| m as f32),
                self.image_std.map(|s| s as f32),
            )
        };
        for (i, p) in resized.pixels().enumerate() {
            for c in 0..3 {
                let mut v = p.0[c] as f32;
                if self.do_normalize {
                    v = (v - mean[c]) / std[c];
                } else if self.do_rescale {
                    v *= factor;
                }
                planes[c * h * w + i] = v;
            }
        }
        Ok(Tensor::from_vec(planes, (1, 3, h, w), device)?)
    }
}

fn linear(vb: VarBuilder, inp: usize, out: usize, bias: bool) -> Result<Linear> {
    let weight = vb.get((out, inp), "weight")?;
    let bias = if bias {
        Some(vb.get(out, "bias")?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

fn layer_norm(vb: VarBuilder, size: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm::new(
        vb.get(size, "weight")?,
        vb.get(size, "bias")?,
        eps,
    ))
}

/// A convolution without bias (candle's), or with bias when `bias` (the crate's).
enum Conv {
    Biased(Conv2d),
    Plain(candle_nn::Conv2d),
}

impl Conv {
    fn new(
        vb: VarBuilder,
        inp: usize,
        out: usize,
        kernel: usize,
        padding: usize,
        stride: usize,
        bias: bool,
    ) -> Result<Self> {
        if bias {
            Ok(Conv::Biased(layers::conv2d(
                vb, inp, out, kernel, padding, stride,
            )?))
        } else {
            let cfg = candle_nn::Conv2dConfig {
                padding,
                stride,
                ..Default::default()
            };
            Ok(Conv::Plain(candle_nn::conv2d_no_bias(
                inp, out, kernel, cfg, vb,
            )?))
        }
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Conv::Biased(c) => c.forward(xs)?,
            Conv::Plain(c) => c.forward(xs)?,
        })
    }
}

/// One pre-norm ViT layer (`dpt.encoder.layer.N`).
struct VitLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_out: Linear,
    intermediate: Linear,
    output: Linear,
    norm_before: LayerNorm,
    norm_after: LayerNorm,
    heads: usize,
}

impl VitLayer {
    fn new(vb: VarBuilder, cfg: &DptConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let attn = vb.pp("attention");
        Ok(VitLayer {
            query: linear(attn.pp("attention.query"), h, h, cfg.qkv_bias)?,
            key: linear(attn.pp("attention.key"), h, h, cfg.qkv_bias)?,
            value: linear(attn.pp("attention.value"), h, h, cfg.qkv_bias)?,
            attention_out: linear(attn.pp("output.dense"), h, h, true)?,
            intermediate: linear(vb.pp("intermediate.dense"), h, cfg.intermediate_size, true)?,
            output: linear(vb.pp("output.dense"), cfg.intermediate_size, h, true)?,
            norm_before: layer_norm(vb.pp("layernorm_before"), h, cfg.layer_norm_eps)?,
            norm_after: layer_norm(vb.pp("layernorm_after"), h, cfg.layer_norm_eps)?,
            heads: cfg.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, n, h) = xs.dims3()?;
        let head_dim = h / self.heads;
        let normed = self.norm_before.forward(xs)?;
        let split = |t: Tensor| t.reshape((b, n, self.heads, head_dim));
        let q = split(self.query.forward(&normed)?)?;
        let k = split(self.key.forward(&normed)?)?;
        let v = split(self.value.forward(&normed)?)?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let attn = layers::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            scale,
            AttentionPrecision::Full,
            None,
        )?
        .reshape((b, n, h))?;
        let xs = (self.attention_out.forward(&attn)? + xs)?;
        let mlp = self
            .intermediate
            .forward(&self.norm_after.forward(&xs)?)?
            .gelu_erf()?;
        Ok((self.output.forward(&mlp)? + xs)?)
    }
}

/// How a reassembled feature map reaches its scale.
enum Rescale {
    Up(candle_nn::ConvTranspose2d),
    Same,
    Down(Conv),
}

/// One reassemble layer (`neck.reassemble_stage.{readout_projects,layers}.I`).
struct Reassemble {
    readout: Option<Linear>,
    projection: Conv,
    rescale: Rescale,
}

/// A pre-activation residual convolution unit.
struct ResidualUnit {
    conv1: Conv,
    conv2: Conv,
}

impl ResidualUnit {
    fn new(vb: VarBuilder, channels: usize, bias: bool) -> Result<Self> {
        Ok(ResidualUnit {
            conv1: Conv::new(vb.pp("convolution1"), channels, channels, 3, 1, 1, bias)?,
            conv2: Conv::new(vb.pp("convolution2"), channels, channels, 3, 1, 1, bias)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&xs.relu()?)?;
        let h = self.conv2.forward(&h.relu()?)?;
        Ok((h + xs)?)
    }
}

/// One feature fusion layer (`neck.fusion_stage.layers.I`).
struct Fusion {
    residual1: ResidualUnit,
    residual2: ResidualUnit,
    projection: Conv,
}

impl Fusion {
    fn forward(&self, xs: &Tensor, skip: Option<&Tensor>) -> Result<Tensor> {
        let mut xs = xs.clone();
        if let Some(skip) = skip {
            let (_, _, h, w) = xs.dims4()?;
            let skip = if skip.dims() != xs.dims() {
                skip.upsample_bilinear2d(h, w, false)?
            } else {
                skip.clone()
            };
            xs = (xs + self.residual1.forward(&skip)?)?;
        }
        let xs = self.residual2.forward(&xs)?;
        let (_, _, h, w) = xs.dims4()?;
        let xs = xs.upsample_bilinear2d(2 * h, 2 * w, true)?;
        self.projection.forward(&xs)
    }
}

/// transformers' depth head has a fixed 32-channel layer.
const HEAD_CHANNELS: usize = 32;

/// The DPT network (`DPTForDepthEstimation`).
struct Dpt {
    patch_embedding: Conv2d,
    cls_token: Tensor,
    position_embeddings: Tensor,
    patch: usize,
    layers: Vec<VitLayer>,
    out_indices: Vec<usize>,
    readout_type: String,
    reassemble: Vec<Reassemble>,
    neck_convs: Vec<Conv>,
    fusion: Vec<Fusion>,
    head_in_index: usize,
    head_projection: Option<Conv>,
    head: [Conv; 3],
}

impl Dpt {
    fn new(vb: VarBuilder, cfg: &DptConfig) -> Result<Self> {
        cfg.check()?;
        let h = cfg.hidden_size;
        let (patch, _) = cfg.patch_size.pair();
        let (ih, iw) = cfg.image_size.pair();
        let positions = (ih / patch) * (iw / patch) + 1;
        let emb = vb.pp("dpt.embeddings");
        let patch_embedding = layers::conv2d(
            emb.pp("patch_embeddings.projection"),
            cfg.num_channels,
            h,
            patch,
            0,
            patch,
        )?;
        let cls_token = emb.get((1, 1, h), "cls_token")?;
        let position_embeddings = emb.get((1, positions, h), "position_embeddings")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| VitLayer::new(vb.pp(format!("dpt.encoder.layer.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;

        let neck = vb.pp("neck");
        let mut reassemble = Vec::new();
        for (i, (&channels, &factor)) in cfg
            .neck_hidden_sizes
            .iter()
            .zip(&cfg.reassemble_factors)
            .enumerate()
        {
            let stage = neck.pp("reassemble_stage");
            let readout = if cfg.readout_type == "project" {
                Some(linear(
                    stage.pp(format!("readout_projects.{i}.0")),
                    2 * h,
                    h,
                    true,
                )?)
            } else {
                None
            };
            let layer = stage.pp(format!("layers.{i}"));
            let projection = Conv::new(layer.pp("projection"), h, channels, 1, 0, 1, true)?;
            let rescale = if factor > 1.0 {
                let f = factor as usize;
                let cfg2 = candle_nn::ConvTranspose2dConfig {
                    stride: f,
                    ..Default::default()
                };
                Rescale::Up(candle_nn::conv_transpose2d(
                    channels,
                    channels,
                    f,
                    cfg2,
                    layer.pp("resize"),
                )?)
            } else if factor == 1.0 {
                Rescale::Same
            } else {
                let stride = (1.0 / factor).round() as usize;
                Rescale::Down(Conv::new(
                    layer.pp("resize"),
                    channels,
                    channels,
                    3,
                    1,
                    stride,
                    true,
                )?)
            };
            reassemble.push(Reassemble {
                readout,
                projection,
                rescale,
            });
        }
        let f = cfg.fusion_hidden_size;
        let neck_convs = cfg
            .neck_hidden_sizes
            .iter()
            .enumerate()
            .map(|(i, &c)| Conv::new(neck.pp(format!("convs.{i}")), c, f, 3, 1, 1, false))
            .collect::<Result<Vec<_>>>()?;
        let bias = cfg
            .use_bias_in_fusion_residual
            .unwrap_or(!cfg.use_batch_norm_in_fusion_residual);
        let fusion = (0..cfg.neck_hidden_sizes.len())
            .map(|i| {
                let vb = neck.pp(format!("fusion_stage.layers.{i}"));
                Ok(Fusion {
                    residual1: ResidualUnit::new(vb.pp("residual_layer1"), f, bias)?,
                    residual2: ResidualUnit::new(vb.pp("residual_layer2"), f, bias)?,
                    projection: Conv::new(vb.pp("projection"), f, f, 1, 0, 1, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let n = fusion.len() as i64;
        let head_in_index = if cfg.head_in_index < 0 {
            n + cfg.head_in_index
        } else {
            cfg.head_in_index
        };
        if !(0..n).contains(&head_in_index) {
            return Err(Error::model(format!(
                "DPT head_in_index {} out of range for {n} fusion layers",
                cfg.head_in_index
            )));
        }
        let head_vb = vb.pp("head");
        let head_projection = if cfg.add_projection {
            Some(Conv::new(head_vb.pp("projection"), f, f, 3, 1, 1, true)?)
        } else {
            None
        };
        let head = head_vb.pp("head");
        let head = [
            Conv::new(head.pp("0"), f, f / 2, 3, 1, 1, true)?,
            Conv::new(head.pp("2"), f / 2, HEAD_CHANNELS, 3, 1, 1, true)?,
            Conv::new(head.pp("4"), HEAD_CHANNELS, 1, 1, 0, 1, true)?,
        ];
        Ok(Dpt {
            patch_embedding,
            cls_token,
            position_embeddings,
            patch,
            layers,
            out_indices: cfg.backbone_out_indices.clone(),
            readout_type: cfg.readout_type.clone(),
            reassemble,
            neck_convs,
            fusion,
            head_in_index: head_in_index as usize,
            head_projection,
            head,
        })
    }

    /// The position embeddings for a `grid_h` x `grid_w` patch grid: the training grid's
    /// embeddings resized bilinearly (`align_corners = False`), the class token's kept.
    fn position_embeddings(&self, grid_h: usize, grid_w: usize) -> Result<Tensor> {
        let (_, n, h) = self.position_embeddings.dims3()?;
        let old = ((n - 1) as f64).sqrt() as usize;
        if old * old != n - 1 {
            return Err(Error::model(format!(
                "DPT position embeddings: {} patches are not a square grid",
                n - 1
            )));
        }
        let cls = self.position_embeddings.narrow(1, 0, 1)?;
        let grid = self
            .position_embeddings
            .narrow(1, 1, n - 1)?
            .reshape((1, old, old, h))?
            .permute((0, 3, 1, 2))?
            .contiguous()?
            .upsample_bilinear2d(grid_h, grid_w, false)?
            .permute((0, 2, 3, 1))?
            .reshape((1, grid_h * grid_w, h))?;
        Ok(Tensor::cat(&[&cls, &grid], 1)?)
    }

    /// Predicted depth `[B, H', W']` for normalised pixels `[B, 3, H, W]`.
    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, _, height, width) = pixels.dims4()?;
        let (gh, gw) = (height / self.patch, width / self.patch);
        if gh == 0 || gw == 0 {
            return Err(Error::invalid(format!(
                "depth input {width}x{height} is smaller than one {p}x{p} patch",
                p = self.patch
            )));
        }
        let hidden = self.cls_token.dim(2)?;
        let patches = self
            .patch_embedding
            .forward(pixels)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let cls = self.cls_token.repeat((b, 1, 1))?;
        let mut xs =
            Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embeddings(gh, gw)?)?;
        let mut kept = Vec::with_capacity(self.out_indices.len());
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs)?;
            if self.out_indices.contains(&i) {
                kept.push(xs.clone());
            }
        }
        // `kept` is in layer order, as transformers filters the hidden states by index.
        let mut features = Vec::with_capacity(kept.len());
        for (i, (state, r)) in kept.iter().zip(&self.reassemble).enumerate() {
            let cls = state.narrow(1, 0, 1)?;
            let tokens = state.narrow(1, 1, gh * gw)?;
            let tokens = match (self.readout_type.as_str(), &r.readout) {
                ("project", Some(project)) => {
                    let readout = cls.broadcast_as((b, gh * gw, hidden))?;
                    project
                        .forward(&Tensor::cat(&[&tokens, &readout], D::Minus1)?)?
                        .gelu_erf()?
                }
                ("add", _) => tokens.broadcast_add(&cls)?,
                _ => tokens,
            };
            let map = tokens
                .reshape((b, gh, gw, hidden))?
                .permute((0, 3, 1, 2))?
                .contiguous()?;
            let map = r.projection.forward(&map)?;
            let map = match &r.rescale {
                Rescale::Up(conv) => conv.forward(&map)?,
                Rescale::Same => map,
                Rescale::Down(conv) => conv.forward(&map)?,
            };
            features.push(self.neck_convs[i].forward(&map)?);
        }
        let mut fused: Vec<Tensor> = Vec::with_capacity(features.len());
        for (layer, feature) in self.fusion.iter().zip(features.iter().rev()) {
            let next = match fused.last() {
                None => layer.forward(feature, None)?,
                Some(previous) => layer.forward(previous, Some(feature))?,
            };
            fused.push(next);
        }
        let mut xs = fused[self.head_in_index].clone();
        if let Some(projection) = &self.head_projection {
            xs = projection.forward(&xs)?.relu()?;
        }
        let xs = self.head[0].forward(&xs)?;
        let (_, _, h, w) = xs.dims4()?;
        let xs = xs.upsample_bilinear2d(2 * h, 2 * w, true)?;
        let xs = self.head[1].forward(&xs)?.relu()?;
        let xs = self.head[2].forward(&xs)?.relu()?;
        Ok(xs.squeeze(1)?)
    }
}

/// The DPT depth detector: network, image processor and the pipeline's post-processing.
pub struct DptDepth {
    model: Dpt,
    processor: DptImageProcessor,
    device: Device,
}

impl DptDepth {
    /// Loads a transformers DPT folder (see the module docs) onto `device`, in f32.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let component = load_component(path, None, device, DType::F32)?;
        let cfg: DptConfig = serde_json::from_value(component.config.clone())
            .map_err(|e| Error::model(format!("DPT config.json: {e}")))?;
        let model = Dpt::new(component.weights.var_builder(DType::F32, device), &cfg)?;
        let processor_path = path.join("preprocessor_config.json");
        let processor = if processor_path.is_file() {
            DptImageProcessor::from_json(&crate::weights::read_json(&processor_path)?)?
        } else {
            DptImageProcessor::default()
        };
        Ok(DptDepth {
            model,
            processor,
            device: device.clone(),
        })
    }

    /// The image processor settings (from `preprocessor_config.json`).
    pub fn processor(&self) -> &DptImageProcessor {
        &self.processor
    }

    /// Normalised network input `[1, 3, H, W]` for an image.
    pub fn pixel_values(&self, image: &RgbImage) -> Result<Tensor> {
        self.processor.pixel_values(image, &self.device)
    }

    /// The network's predicted depth `[B, H', W']` (f32) for normalised pixels `[B, 3, H, W]`.
    pub fn predict(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.model
            .forward(&pixel_values.to_device(&self.device)?.to_dtype(DType::F32)?)
    }

    /// The predicted depth of an image at the network's resolution, row-major, with its
    /// `(height, width)`.
    pub fn network_depth(&self, image: &RgbImage) -> Result<(Vec<f32>, (usize, usize))> {
        let depth = self.predict(&self.pixel_values(image)?)?.squeeze(0)?;
        let (h, w) = depth.dims2()?;
        let values = depth
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok((values, (h, w)))
    }

    /// The 8-bit depth map of an image at its own size: the predicted depth interpolated
    /// bicubically to the image size and min-max scaled to 0..255.
    pub fn depth_gray(&self, image: &RgbImage) -> Result<image::GrayImage> {
        let (depth, (h, w)) = self.network_depth(image)?;
        let (out_w, out_h) = (image.width() as usize, image.height() as usize);
        let full = bicubic_resize(&depth, (h, w), (out_h, out_w));
        let gray = min_max_u8(&full);
        image::GrayImage::from_raw(out_w as u32, out_h as u32, gray)
            .ok_or_else(|| Error::Internal("depth map has the wrong size".into()))
    }
}

impl Detector for DptDepth {
    fn detect(&self, image: &RgbImage) -> Result<RgbImage> {
        let gray = self.depth_gray(image)?;
        Ok(image::DynamicImage::ImageLuma8(gray).to_rgb8())
    }
}

/// Min-max scaling to 8 bits as the depth-estimation pipeline does (f32, truncated); a constant
/// map (which the pipeline turns into NaN, then 0) is all zeros.
pub fn min_max_u8(values: &[f32]) -> Vec<u8> {
    let min = values.iter().copied().fold(f32::INFINITY, f32::min);
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let range = max - min;
    if range.is_nan() || range <= 0.0 || range.is_infinite() {
        return vec![0; values.len()];
    }
    values
        .iter()
        .map(|&v| (((v - min) / range) * 255.0) as u8)
        .collect()
}

/// Keys' cubic convolution with a = -0.75, as torch's bicubic interpolation.
fn cubic_weights(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// Source indices (clamped to the input) and weights of each output position along one axis,
/// as torch's `upsample_bicubic2d(align_corners=False)` computes them in f32.
fn bicubic_taps(input: usize, output: usize) -> Vec<([usize; 4], [f32; 4])> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| {
            let real = scale * (o as f32 + 0.5) - 0.5;
            let index = (real.floor() as i64).min(input as i64 - 1);
            let t = (real - index as f32).clamp(0.0, 1.0);
            let at = |k: i64| (index - 1 + k).clamp(0, input as i64 - 1) as usize;
            ([at(0), at(1), at(2), at(3)], cubic_weights(t))
        })
        .collect()
}

/// Bicubic interpolation (`align_corners = False`, borders clamped) of a row-major map of
/// `(height, width)` to `(out_height, out_width)`, in f32 as torch computes it on the CPU.
pub fn bicubic_resize(
    values: &[f32],
    (height, width): (usize, usize),
    (out_height, out_width): (usize, usize),
) -> Vec<f32> {
    let rows = bicubic_taps(height, out_height);
    let cols = bicubic_taps(width, out_width);
    let mut out = Vec::with_capacity(out_height * out_width);
    for (ys, wy) in &rows {
        for (xs, wx) in &cols {
            let row = |y: usize| {
                let r = &values[y * width..(y + 1) * width];
                r[xs[0]] * wx[0] + r[xs[1]] * wx[1] + r[xs[2]] * wx[2] + r[xs[3]] * wx[3]
            };
            out.push(
                row(ys[0]) * wy[0] + row(ys[1]) * wy[1] + row(ys[2]) * wy[2] + row(ys[3]) * wy[3],
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bicubic_keeps_constants_and_identity() {
        let values: Vec<f32> = (0..12).map(|i| i as f32 * 0.5).collect();
        assert_eq!(bicubic_resize(&values, (3, 4), (3, 4)), values);
        let flat = vec![3.25f32; 20];
        for v in bicubic_resize(&flat, (4, 5), (9, 7)) {
            assert!((v - 3.25).abs() < 1e-5);
        }
    }

    #[test]
    fn min_max_truncates_and_handles_constant_maps() {
        assert_eq!(min_max_u8(&[1.0, 2.0, 3.0]), vec![0, 127, 255]);
        assert_eq!(min_max_u8(&[4.0; 3]), vec![0, 0, 0]);
    }

    #[test]
    fn hybrid_and_backbone_configs_are_refused() {
        let hybrid: DptConfig = serde_json::from_str(r#"{"is_hybrid": true}"#).unwrap();
        let err = hybrid.check().unwrap_err().to_string();
        assert!(err.contains("dpt-hybrid-midas"), "{err}");
        let beit: DptConfig =
            serde_json::from_str(r#"{"backbone_config": {"model_type": "beit"}}"#).unwrap();
        assert!(beit.check().unwrap_err().to_string().contains("backbone"));
        assert!(DptConfig::default().check().is_ok());
    }

    #[test]
    fn processor_config_is_read_and_checked() {
        let p = DptImageProcessor::from_json(&serde_json::json!({
            "size": 384, "resample": 2, "keep_aspect_ratio": false, "ensure_multiple_of": 1,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]
        }))
        .unwrap();
        assert_eq!(p.size, (384, 384));
        assert_eq!(p.resample, Filter::Bilinear);
        assert!(DptImageProcessor::from_json(&serde_json::json!({"do_pad": true})).is_err());
        assert!(DptImageProcessor::from_json(&serde_json::json!({"resample": 1})).is_err());
    }
}
