//! Semantic segmentation for the segmentation ControlNets (`lllyasviel/sd-controlnet-seg`,
//! `lllyasviel/control_v11p_sd15_seg`), as their model cards make the control image with
//! transformers: UperNet (Xiao et al. 2018, "Unified Perceptual Parsing for Scene
//! Understanding") on a ConvNeXt backbone (Liu et al. 2022, "A ConvNet for the 2020s"), trained
//! on the 150 ADE20K classes, each pixel painted in its class's ADE20K colour.
//!
//! [`UperNetSegmenter::load`] reads the transformers folder of the public checkpoint
//! `openmmlab/upernet-convnext-small` (`config.json`, `model.safetensors`,
//! `preprocessor_config.json`) with its key names; every size comes from the config and the
//! weight shapes, so other ConvNeXt UperNets of that repository family load too. The steps are
//! those of the cards:
//!
//! 1. the image processor (`SegformerImageProcessor`): an antialiased resize of the 8-bit image
//!    to its `size` (512 x 512 for the public checkpoint, aspect not kept), then
//!    `(x - 255 mean) / (255 std)`;
//! 2. the ConvNeXt backbone: a patchify stem, stages of depthwise 7x7 convolution, channels-last
//!    LayerNorm, a GELU MLP and layer scale (drop path is the identity at inference), a
//!    LayerNorm-and-stride-2 downsampling between stages, and a channels-first LayerNorm on each
//!    feature map the head takes;
//! 3. the UperNet decode head: pyramid pooling on the last feature map, a top-down FPN, the
//!    levels upsampled and fused, and a 1x1 classifier (the auxiliary FCN head is for training
//!    and is not loaded);
//! 4. the logits upsampled (bilinear, half-pixel centres) to the network's input size as the
//!    model does, then to the image's size as `post_process_semantic_segmentation` does (the two
//!    resizes composed into one per axis), and the argmax over the classes;
//! 5. each class painted with [`ADE20K_PALETTE`].

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};
use image::RgbImage;
use serde::Deserialize;

use super::Detector;
use crate::models::ip_adapter::{resize_antialias, AntialiasFilter};
use crate::models::layers::{conv2d, Conv2d};
use crate::weights::folder::load_component;
use crate::{Error, Result};

/// The ADE20K colour of each of its 150 classes (wall, building, sky, floor, tree, ...), in
/// class order: the palette of the `sd-controlnet-seg` model card (`ade_palette()`, also
/// `controlnet_aux.util.ade_palette`), the one of ControlNet's own segmentation annotator that
/// the segmentation ControlNets were trained on. (The `control_v11p_sd15_seg` card's table has
/// a black entry in front, which paints every class with its predecessor's colour; not followed.)
#[rustfmt::skip]
pub const ADE20K_PALETTE: [[u8; 3]; 150] = [
    [120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50], [4, 200, 3], [120, 120, 80],
    [140, 140, 140], [204, 5, 255], [230, 230, 230], [4, 250, 7], [224, 5, 255], [235, 255, 7],
    [150, 5, 61], [120, 120, 70], [8, 255, 51], [255, 6, 82], [143, 255, 140], [204, 255, 4],
    [255, 51, 7], [204, 70, 3], [0, 102, 200], [61, 230, 250], [255, 6, 51], [11, 102, 255],
    [255, 7, 71], [255, 9, 224], [9, 7, 230], [220, 220, 220], [255, 9, 92], [112, 9, 255],
    [8, 255, 214], [7, 255, 224], [255, 184, 6], [10, 255, 71], [255, 41, 10], [7, 255, 255],
    [224, 255, 8], [102, 8, 255], [255, 61, 6], [255, 194, 7], [255, 122, 8], [0, 255, 20],
    [255, 8, 41], [255, 5, 153], [6, 51, 255], [235, 12, 255], [160, 150, 20], [0, 163, 255],
    [140, 140, 140], [250, 10, 15], [20, 255, 0], [31, 255, 0], [255, 31, 0], [255, 224, 0],
    [153, 255, 0], [0, 0, 255], [255, 71, 0], [0, 235, 255], [0, 173, 255], [31, 0, 255],
    [11, 200, 200], [255, 82, 0], [0, 255, 245], [0, 61, 255], [0, 255, 112], [0, 255, 133],
    [255, 0, 0], [255, 163, 0], [255, 102, 0], [194, 255, 0], [0, 143, 255], [51, 255, 0],
    [0, 82, 255], [0, 255, 41], [0, 255, 173], [10, 0, 255], [173, 255, 0], [0, 255, 153],
    [255, 92, 0], [255, 0, 255], [255, 0, 245], [255, 0, 102], [255, 173, 0], [255, 0, 20],
    [255, 184, 184], [0, 31, 255], [0, 255, 61], [0, 71, 255], [255, 0, 204], [0, 255, 194],
    [0, 255, 82], [0, 10, 255], [0, 112, 255], [51, 0, 255], [0, 194, 255], [0, 122, 255],
    [0, 255, 163], [255, 153, 0], [0, 255, 10], [255, 112, 0], [143, 255, 0], [82, 0, 255],
    [163, 255, 0], [255, 235, 0], [8, 184, 170], [133, 0, 255], [0, 255, 92], [184, 0, 255],
    [255, 0, 31], [0, 184, 255], [0, 214, 255], [255, 0, 112], [92, 255, 0], [0, 224, 255],
    [112, 224, 255], [70, 184, 160], [163, 0, 255], [153, 0, 255], [71, 255, 0], [255, 0, 163],
    [255, 204, 0], [255, 0, 143], [0, 255, 235], [133, 255, 0], [255, 0, 235], [245, 0, 255],
    [255, 0, 122], [255, 245, 0], [10, 190, 212], [214, 255, 0], [0, 204, 255], [20, 0, 255],
    [255, 255, 0], [0, 153, 255], [0, 41, 255], [0, 255, 204], [41, 0, 255], [41, 255, 0],
    [173, 0, 255], [0, 245, 255], [71, 0, 255], [122, 0, 255], [0, 255, 184], [0, 92, 255],
    [184, 255, 0], [0, 133, 255], [255, 214, 0], [25, 194, 194], [102, 255, 0], [92, 0, 255],
];

/// ConvNeXt's LayerNorms (blocks, stem, downsampling, output norms) use this epsilon.
const CONVNEXT_NORM_EPS: f64 = 1e-6;
/// PyTorch's `BatchNorm2d` default, which UperNet's convolution modules keep.
const BATCH_NORM_EPS: f64 = 1e-5;
/// The depthwise convolution of a ConvNeXt block.
const DW_KERNEL: usize = 7;
/// Largest block of upsampled class scores held at once, in f32 values (256 MiB).
const MAX_SCORE_VALUES: usize = 1 << 26;

/// `backbone_config` of the UperNet `config.json` (transformers' `ConvNextConfig`).
#[derive(Debug, Clone, Deserialize)]
struct ConvNextConfig {
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default = "default_num_channels")]
    num_channels: usize,
    #[serde(default = "default_patch_size")]
    patch_size: usize,
    hidden_sizes: Vec<usize>,
    depths: Vec<usize>,
    #[serde(default = "default_hidden_act")]
    hidden_act: String,
    #[serde(default)]
    out_features: Option<Vec<String>>,
    #[serde(default)]
    out_indices: Option<Vec<usize>>,
}

fn default_num_channels() -> usize {
    3
}
fn default_patch_size() -> usize {
    4
}
fn default_hidden_act() -> String {
    "gelu".to_string()
}

/// The UperNet `config.json` (transformers' `UperNetConfig`); the auxiliary head's settings are
/// for training and not read.
#[derive(Debug, Clone, Deserialize)]
struct UperNetConfig {
    #[serde(default)]
    model_type: Option<String>,
    backbone_config: ConvNextConfig,
    hidden_size: usize,
    pool_scales: Vec<usize>,
}

/// `preprocessor_config.json`, read with `SegformerImageProcessor`'s defaults (the processor
/// transformers picks for UperNet checkpoints).
#[derive(Debug, Clone, Deserialize)]
struct ProcessorConfig {
    #[serde(default)]
    image_processor_type: Option<String>,
    #[serde(default)]
    feature_extractor_type: Option<String>,
    #[serde(default = "yes")]
    do_resize: bool,
    #[serde(default)]
    size: Option<serde_json::Value>,
    #[serde(default = "default_resample")]
    resample: u32,
    #[serde(default = "yes")]
    do_rescale: bool,
    #[serde(default = "default_rescale_factor")]
    rescale_factor: f64,
    #[serde(default = "yes")]
    do_normalize: bool,
    #[serde(default = "default_mean")]
    image_mean: [f64; 3],
    #[serde(default = "default_std")]
    image_std: [f64; 3],
}

fn yes() -> bool {
    true
}
fn default_resample() -> u32 {
    2
}
fn default_rescale_factor() -> f64 {
    1.0 / 255.0
}
fn default_mean() -> [f64; 3] {
    [0.485, 0.456, 0.406]
}
fn default_std() -> [f64; 3] {
    [0.229, 0.224, 0.225]
}

/// The image processor's settings, checked.
#[derive(Debug, Clone)]
struct ImageProcessor {
    /// `(width, height)` the image is resized to, or `None` to keep its size.
    size: Option<(usize, usize)>,
    filter: AntialiasFilter,
    /// Per channel, `pixel = (value - offset) / divisor` on 0..255 values.
    offset: [f32; 3],
    divisor: [f32; 3],
}

impl ImageProcessor {
    fn from_config(cfg: &ProcessorConfig) -> Result<Self> {
        let kind = cfg
            .image_processor_type
            .as_deref()
            .or(cfg.feature_extractor_type.as_deref());
        if let Some(kind) = kind {
            if !kind.starts_with("Segformer") {
                return Err(Error::model(format!(
                    "segmentation preprocessor_config.json: image processor {kind} is not \
                     supported (SegformerImageProcessor is)"
                )));
            }
        }
        let size = match &cfg.size {
            _ if !cfg.do_resize => None,
            None => Some((512, 512)),
            Some(serde_json::Value::Number(n)) => {
                let n = n.as_u64().unwrap_or(0) as usize;
                Some((n, n))
            }
            Some(serde_json::Value::Object(map)) => {
                let get = |k: &str| map.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
                match (get("width"), get("height")) {
                    (Some(w), Some(h)) => Some((w, h)),
                    _ => {
                        return Err(Error::model(format!(
                            "segmentation preprocessor_config.json: size {} has no height and \
                             width",
                            serde_json::Value::Object(map.clone())
                        )))
                    }
                }
            }
            Some(other) => {
                return Err(Error::model(format!(
                    "segmentation preprocessor_config.json: size {other} is not understood"
                )))
            }
        };
        if matches!(size, Some((w, h)) if w == 0 || h == 0) {
            return Err(Error::model(
                "segmentation preprocessor_config.json: size is zero",
            ));
        }
        // PIL's resampling codes, as transformers maps them to torchvision's.
        let filter = match cfg.resample {
            2 => AntialiasFilter::Bilinear,
            3 => AntialiasFilter::Bicubic,
            other => {
                return Err(Error::model(format!(
                    "segmentation preprocessor_config.json: resample {other} is not supported \
                     (2 bilinear, 3 bicubic are)"
                )))
            }
        };
        // transformers fuses rescale and normalise: mean and std scaled by 1 / rescale_factor
        // in f32, then `(x - mean) / std` on the 0..255 values.
        let unscale = if cfg.do_rescale {
            (1.0 / cfg.rescale_factor) as f32
        } else {
            1.0
        };
        let (offset, divisor) = if cfg.do_normalize {
            (
                cfg.image_mean.map(|m| m as f32 * unscale),
                cfg.image_std.map(|s| s as f32 * unscale),
            )
        } else {
            ([0.0; 3], [unscale; 3])
        };
        Ok(Self {
            size,
            filter,
            offset,
            divisor,
        })
    }

    /// `[1, 3, height, width]` f32 pixels for the network.
    fn apply(&self, image: &RgbImage, device: &Device) -> Result<Tensor> {
        let resized;
        let image = match self.size {
            Some((w, h)) if (w, h) != (image.width() as usize, image.height() as usize) => {
                resized = resize_antialias(image, w, h, self.filter);
                &resized
            }
            _ => image,
        };
        let (w, h) = (image.width() as usize, image.height() as usize);
        let mut data = vec![0f32; 3 * w * h];
        for (x, y, pixel) in image.enumerate_pixels() {
            for c in 0..3 {
                data[c * w * h + y as usize * w + x as usize] =
                    (pixel.0[c] as f32 - self.offset[c]) / self.divisor[c];
            }
        }
        Ok(Tensor::from_vec(data, (1, 3, h, w), device)?)
    }
}

/// A LayerNorm over the channels of an NCHW tensor (ConvNeXt's `channels_first` format).
#[derive(Debug, Clone)]
struct ChannelsFirstNorm(LayerNorm);

impl ChannelsFirstNorm {
    fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self(candle_nn::layer_norm(
            channels,
            CONVNEXT_NORM_EPS,
            vb,
        )?))
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let nhwc = xs.permute((0, 2, 3, 1))?.contiguous()?;
        Ok(self.0.forward(&nhwc)?.permute((0, 3, 1, 2))?.contiguous()?)
    }
}

/// One ConvNeXt block: depthwise 7x7, LayerNorm, Linear-GELU-Linear, layer scale, residual.
#[derive(Debug, Clone)]
struct ConvNextLayer {
    /// The depthwise kernel, one `[1, C, 1, 1]` tensor per tap (row-major over the 7x7 window).
    taps: Vec<Tensor>,
    dw_bias: Tensor,
    norm: LayerNorm,
    pwconv1: Linear,
    pwconv2: Linear,
    layer_scale: Option<Tensor>,
}

impl ConvNextLayer {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let kernel = vb
            .get((dim, 1, DW_KERNEL, DW_KERNEL), "dwconv.weight")?
            .reshape((dim, DW_KERNEL * DW_KERNEL))?;
        let taps = (0..DW_KERNEL * DW_KERNEL)
            .map(|k| kernel.narrow(1, k, 1)?.reshape((1, dim, 1, 1)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let hidden = vb.get_unchecked("pwconv1.weight")?.dim(0)?;
        let layer_scale = if vb.contains_tensor("layer_scale_parameter") {
            Some(vb.get(dim, "layer_scale_parameter")?)
        } else {
            None
        };
        Ok(Self {
            taps,
            dw_bias: vb.get(dim, "dwconv.bias")?.reshape((1, dim, 1, 1))?,
            norm: candle_nn::layer_norm(dim, CONVNEXT_NORM_EPS, vb.pp("layernorm"))?,
            pwconv1: candle_nn::linear(dim, hidden, vb.pp("pwconv1"))?,
            pwconv2: candle_nn::linear(hidden, dim, vb.pp("pwconv2"))?,
            layer_scale,
        })
    }

    /// The depthwise convolution (zero padding 3) as a sum of 49 shifted, per-channel scaled
    /// copies: one broadcast multiply-add per tap instead of a convolution per channel.
    fn depthwise(&self, xs: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let pad = DW_KERNEL / 2;
        let padded = xs
            .pad_with_zeros(2, pad, pad)?
            .pad_with_zeros(3, pad, pad)?;
        let mut acc = self.dw_bias.broadcast_as(xs.shape())?.contiguous()?;
        for (k, tap) in self.taps.iter().enumerate() {
            let (ky, kx) = (k / DW_KERNEL, k % DW_KERNEL);
            let window = padded.narrow(2, ky, h)?.narrow(3, kx, w)?;
            acc = (acc + window.broadcast_mul(tap)?)?;
        }
        Ok(acc)
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let hs = self.depthwise(xs)?.permute((0, 2, 3, 1))?.contiguous()?;
        let hs = self.norm.forward(&hs)?;
        let hs = self
            .pwconv2
            .forward(&self.pwconv1.forward(&hs)?.gelu_erf()?)?;
        let hs = match &self.layer_scale {
            Some(scale) => hs.broadcast_mul(scale)?,
            None => hs,
        };
        Ok((xs + hs.permute((0, 3, 1, 2))?)?)
    }
}

/// A ConvNeXt stage: an optional LayerNorm + stride-2 convolution, then its blocks.
#[derive(Debug, Clone)]
struct ConvNextStage {
    downsample: Option<(ChannelsFirstNorm, Conv2d)>,
    layers: Vec<ConvNextLayer>,
}

impl ConvNextStage {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = match &self.downsample {
            Some((norm, conv)) => conv.forward(&norm.forward(xs)?)?,
            None => xs.clone(),
        };
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        Ok(xs)
    }
}

/// transformers' `ConvNextBackbone`: the stem, the stages, and a LayerNorm on each stage output
/// the head takes.
#[derive(Debug, Clone)]
struct ConvNextBackbone {
    stem: Conv2d,
    stem_norm: ChannelsFirstNorm,
    stages: Vec<ConvNextStage>,
    /// `(stage index, its output norm)` for each feature map given to the head, in order.
    outputs: Vec<(usize, ChannelsFirstNorm)>,
}

impl ConvNextBackbone {
    /// `vb` at `backbone`; returns the backbone and the channel count of each output.
    fn new(vb: VarBuilder, cfg: &ConvNextConfig) -> Result<(Self, Vec<usize>)> {
        if let Some(kind) = cfg.model_type.as_deref() {
            if kind != "convnext" {
                return Err(Error::model(format!(
                    "segmentation config.json: backbone {kind} is not supported (convnext is)"
                )));
            }
        }
        if cfg.hidden_act != "gelu" {
            return Err(Error::model(format!(
                "segmentation config.json: hidden_act {} is not supported (gelu is)",
                cfg.hidden_act
            )));
        }
        let n = cfg.hidden_sizes.len();
        if n == 0 || cfg.depths.len() != n || cfg.patch_size == 0 {
            return Err(Error::model(format!(
                "segmentation config.json: {} hidden_sizes for {} depths, patch_size {}",
                n,
                cfg.depths.len(),
                cfg.patch_size
            )));
        }
        // transformers names the outputs "stem", "stage1" ... and indexes them in that order.
        let stage_names: Vec<String> = std::iter::once("stem".to_string())
            .chain((1..=n).map(|i| format!("stage{i}")))
            .collect();
        let indices: Vec<usize> = match (&cfg.out_features, &cfg.out_indices) {
            (Some(names), _) => names
                .iter()
                .map(|name| {
                    stage_names.iter().position(|s| s == name).ok_or_else(|| {
                        Error::model(format!(
                            "segmentation config.json: out_features names unknown stage {name}"
                        ))
                    })
                })
                .collect::<Result<_>>()?,
            (None, Some(indices)) => indices.clone(),
            (None, None) => vec![n],
        };
        if indices.is_empty() || indices.iter().any(|&i| i == 0 || i > n) {
            return Err(Error::model(format!(
                "segmentation config.json: backbone outputs {indices:?} must be stages 1..={n} \
                 (the stem is not supported)"
            )));
        }
        let dims = &cfg.hidden_sizes;
        let stem = conv2d(
            vb.pp("embeddings.patch_embeddings"),
            cfg.num_channels,
            dims[0],
            cfg.patch_size,
            0,
            cfg.patch_size,
        )?;
        let stem_norm = ChannelsFirstNorm::new(vb.pp("embeddings.layernorm"), dims[0])?;
        let mut stages = Vec::with_capacity(n);
        for (i, (&dim, &depth)) in dims.iter().zip(&cfg.depths).enumerate() {
            let svb = vb.pp(format!("encoder.stages.{i}"));
            let prev = if i == 0 { dims[0] } else { dims[i - 1] };
            let downsample = if i > 0 || prev != dim {
                let stride = if i > 0 { 2 } else { 1 };
                let dvb = svb.pp("downsampling_layer");
                Some((
                    ChannelsFirstNorm::new(dvb.pp("0"), prev)?,
                    conv2d(dvb.pp("1"), prev, dim, 2, 0, stride)?,
                ))
            } else {
                None
            };
            let layers = (0..depth)
                .map(|j| ConvNextLayer::new(svb.pp(format!("layers.{j}")), dim))
                .collect::<Result<_>>()?;
            stages.push(ConvNextStage { downsample, layers });
        }
        let outputs = indices
            .iter()
            .map(|&i| {
                let norm = ChannelsFirstNorm::new(
                    vb.pp(format!("hidden_states_norms.{}", stage_names[i])),
                    dims[i - 1],
                )?;
                Ok((i - 1, norm))
            })
            .collect::<Result<Vec<_>>>()?;
        let channels = indices.iter().map(|&i| dims[i - 1]).collect();
        Ok((
            Self {
                stem,
                stem_norm,
                stages,
                outputs,
            },
            channels,
        ))
    }

    fn forward(&self, pixels: &Tensor) -> Result<Vec<Tensor>> {
        let mut xs = self.stem_norm.forward(&self.stem.forward(pixels)?)?;
        let mut stage_outputs = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            xs = stage.forward(&xs)?;
            stage_outputs.push(xs.clone());
        }
        self.outputs
            .iter()
            .map(|(i, norm)| norm.forward(&stage_outputs[*i]))
            .collect()
    }
}

/// UperNet's convolution module (convolution without bias, BatchNorm, ReLU) with the
/// BatchNorm's running statistics folded into the convolution's weight and bias.
fn conv_module(
    vb: VarBuilder,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
) -> Result<Conv2d> {
    let weight = vb.get((out_channels, in_channels, kernel, kernel), "conv.weight")?;
    let bn = vb.pp("batch_norm");
    let gamma = bn.get(out_channels, "weight")?;
    let beta = bn.get(out_channels, "bias")?;
    let mean = bn.get(out_channels, "running_mean")?;
    let var = bn.get(out_channels, "running_var")?;
    let scale = (gamma / (var + BATCH_NORM_EPS)?.sqrt()?)?;
    let folded = HashMap::from([
        (
            "weight".to_string(),
            weight.broadcast_mul(&scale.reshape((out_channels, 1, 1, 1))?)?,
        ),
        ("bias".to_string(), (beta - (mean * &scale)?)?),
    ]);
    let fvb = VarBuilder::from_tensors(folded, DType::F32, weight.device());
    conv2d(fvb, in_channels, out_channels, kernel, kernel / 2, 1)
}

/// The UperNet decode head: pyramid pooling on the last level, FPN, fusion, classifier.
#[derive(Debug, Clone)]
struct UperNetHead {
    /// `(pool scale, 1x1 convolution module)` of the pyramid pooling module.
    psp: Vec<(usize, Conv2d)>,
    bottleneck: Conv2d,
    lateral_convs: Vec<Conv2d>,
    fpn_convs: Vec<Conv2d>,
    fpn_bottleneck: Conv2d,
    classifier: Conv2d,
}

impl UperNetHead {
    /// `vb` at `decode_head`; `in_channels` of each backbone output.
    fn new(vb: VarBuilder, cfg: &UperNetConfig, in_channels: &[usize]) -> Result<Self> {
        let ch = cfg.hidden_size;
        let last = *in_channels
            .last()
            .expect("at least one backbone output, this is a bug");
        if cfg.pool_scales.contains(&0) {
            return Err(Error::model(
                "segmentation config.json: a pool scale is zero",
            ));
        }
        let psp = cfg
            .pool_scales
            .iter()
            .enumerate()
            .map(|(i, &scale)| {
                Ok((
                    scale,
                    conv_module(vb.pp(format!("psp_modules.{i}.1")), last, ch, 1)?,
                ))
            })
            .collect::<Result<_>>()?;
        let levels = in_channels.len();
        let lateral_convs = in_channels[..levels - 1]
            .iter()
            .enumerate()
            .map(|(i, &c)| conv_module(vb.pp(format!("lateral_convs.{i}")), c, ch, 1))
            .collect::<Result<_>>()?;
        let fpn_convs = (0..levels - 1)
            .map(|i| conv_module(vb.pp(format!("fpn_convs.{i}")), ch, ch, 3))
            .collect::<Result<_>>()?;
        let classes = vb.get_unchecked("classifier.weight")?.dim(0)?;
        Ok(Self {
            psp,
            bottleneck: conv_module(
                vb.pp("bottleneck"),
                last + cfg.pool_scales.len() * ch,
                ch,
                3,
            )?,
            lateral_convs,
            fpn_convs,
            fpn_bottleneck: conv_module(vb.pp("fpn_bottleneck"), levels * ch, ch, 3)?,
            classifier: conv2d(vb.pp("classifier"), ch, classes, 1, 0, 1)?,
        })
    }

    fn forward(&self, features: &[Tensor]) -> Result<Tensor> {
        let relu = |conv: &Conv2d, xs: &Tensor| -> Result<Tensor> { Ok(conv.forward(xs)?.relu()?) };
        let last = features.last().expect("backbone outputs, this is a bug");
        let (_, _, h, w) = last.dims4()?;
        let mut psp = vec![last.clone()];
        for (scale, conv) in &self.psp {
            let pooled = relu(conv, &adaptive_avg_pool(last, *scale)?)?;
            psp.push(resize_bilinear(&pooled, h, w)?);
        }
        let mut laterals = self
            .lateral_convs
            .iter()
            .zip(features)
            .map(|(conv, xs)| relu(conv, xs))
            .collect::<Result<Vec<_>>>()?;
        laterals.push(relu(&self.bottleneck, &Tensor::cat(&psp, 1)?)?);
        let levels = laterals.len();
        for i in (1..levels).rev() {
            let (_, _, h, w) = laterals[i - 1].dims4()?;
            laterals[i - 1] = (&laterals[i - 1] + resize_bilinear(&laterals[i], h, w)?)?;
        }
        let mut fpn = self
            .fpn_convs
            .iter()
            .zip(&laterals)
            .map(|(conv, xs)| relu(conv, xs))
            .collect::<Result<Vec<_>>>()?;
        fpn.push(laterals[levels - 1].clone());
        let (_, _, h, w) = fpn[0].dims4()?;
        for level in fpn.iter_mut().skip(1) {
            *level = resize_bilinear(level, h, w)?;
        }
        let fused = relu(&self.fpn_bottleneck, &Tensor::cat(&fpn, 1)?)?;
        Ok(self.classifier.forward(&fused)?)
    }
}

/// `[out, in]` row-major weights of torch's `adaptive_avg_pool` along one axis: output `i`
/// averages inputs `floor(i * in / out) .. ceil((i + 1) * in / out)`.
fn adaptive_pool_matrix(in_size: usize, out_size: usize) -> Vec<f32> {
    let mut m = vec![0f32; out_size * in_size];
    for i in 0..out_size {
        let start = i * in_size / out_size;
        let end = ((i + 1) * in_size).div_ceil(out_size);
        for j in start..end {
            m[i * in_size + j] = 1.0 / (end - start) as f32;
        }
    }
    m
}

/// `[out, in]` row-major weights of torch's bilinear interpolation along one axis with
/// `align_corners=False` and no scale factor given: source `(i + 0.5) * in / out - 0.5`, clamped
/// at 0, between its floor and the next index (the last index repeated), in f32 as torch
/// computes it.
fn bilinear_matrix(in_size: usize, out_size: usize) -> Vec<f32> {
    let mut m = vec![0f32; out_size * in_size];
    let scale = in_size as f32 / out_size as f32;
    for i in 0..out_size {
        let src = (scale * (i as f32 + 0.5) - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(in_size - 1);
        let i1 = if i0 < in_size - 1 { i0 + 1 } else { i0 };
        let l1 = (src - i0 as f32).clamp(0.0, 1.0);
        m[i * in_size + i0] += 1.0 - l1;
        m[i * in_size + i1] += l1;
    }
    m
}

/// `a [n, k] @ b [k, m]` for small row-major matrices.
fn matmul_rows(a: &[f32], b: &[f32], n: usize, k: usize, m: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * m];
    for i in 0..n {
        for l in 0..k {
            let av = a[i * k + l];
            if av != 0.0 {
                for j in 0..m {
                    out[i * m + j] += av * b[l * m + j];
                }
            }
        }
    }
    out
}

/// Applies `rows [oh, h]` and `cols [ow, w]` (row-major) to the last two axes of `xs`
/// `[b, c, h, w]`: `rows @ xs @ cols^T`, as two 2-D matrix products.
fn separable(xs: &Tensor, rows: &[f32], oh: usize, cols: &[f32], ow: usize) -> Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    let dev = xs.device();
    let cols_t = Tensor::from_slice(cols, (ow, w), dev)?.t()?;
    let rows_t = Tensor::from_slice(rows, (oh, h), dev)?.t()?;
    let along_w = xs
        .contiguous()?
        .reshape((b * c * h, w))?
        .matmul(&cols_t)?
        .reshape((b * c, h, ow))?;
    let along_h = along_w
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * c * ow, h))?
        .matmul(&rows_t)?
        .reshape((b, c, ow, oh))?;
    Ok(along_h.transpose(2, 3)?.contiguous()?)
}

/// torch's `adaptive_avg_pool2d(xs, scale)`.
fn adaptive_avg_pool(xs: &Tensor, scale: usize) -> Result<Tensor> {
    let (_, _, h, w) = xs.dims4()?;
    separable(
        xs,
        &adaptive_pool_matrix(h, scale),
        scale,
        &adaptive_pool_matrix(w, scale),
        scale,
    )
}

/// torch's `interpolate(xs, size=(h, w), mode="bilinear", align_corners=False)`.
fn resize_bilinear(xs: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, ih, iw) = xs.dims4()?;
    if (ih, iw) == (h, w) {
        return Ok(xs.clone());
    }
    separable(xs, &bilinear_matrix(ih, h), h, &bilinear_matrix(iw, w), w)
}

/// The segmentation network with its image processor: UperNet on ConvNeXt, loaded from a
/// transformers folder (see the module docs).
#[derive(Debug, Clone)]
pub struct UperNetSegmenter {
    processor: ImageProcessor,
    backbone: ConvNextBackbone,
    head: UperNetHead,
    classes: usize,
    device: Device,
}

impl UperNetSegmenter {
    /// Loads the transformers folder at `path` (`config.json`, `model.safetensors`,
    /// `preprocessor_config.json`), as published in `openmmlab/upernet-convnext-small`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let component = load_component(path, None, device, DType::F32)?;
        let cfg: UperNetConfig = serde_json::from_value(component.config.clone())
            .map_err(|e| Error::model(format!("segmentation config.json: {e}")))?;
        if let Some(kind) = cfg.model_type.as_deref() {
            if kind != "upernet" {
                return Err(Error::model(format!(
                    "segmentation config.json: model_type {kind} is not upernet"
                )));
            }
        }
        let processor_path = path.join("preprocessor_config.json");
        let text = std::fs::read_to_string(&processor_path)
            .map_err(|e| Error::model(format!("cannot read {}: {e}", processor_path.display())))?;
        let processor_cfg: ProcessorConfig = serde_json::from_str(&text)
            .map_err(|e| Error::model(format!("{}: {e}", processor_path.display())))?;
        let processor = ImageProcessor::from_config(&processor_cfg)?;
        let vb = component.weights.var_builder(DType::F32, device);
        let (backbone, channels) = ConvNextBackbone::new(vb.pp("backbone"), &cfg.backbone_config)?;
        let head = UperNetHead::new(vb.pp("decode_head"), &cfg, &channels)?;
        let classes = head.classifier.weight().dim(0)?;
        if classes != ADE20K_PALETTE.len() {
            return Err(Error::model(format!(
                "segmentation: the classifier has {classes} classes; the ADE20K palette colours \
                 {}",
                ADE20K_PALETTE.len()
            )));
        }
        Ok(Self {
            processor,
            backbone,
            head,
            classes,
            device: device.clone(),
        })
    }

    /// The image processor's output for `image`: `[1, 3, height, width]` f32.
    pub fn preprocess(&self, image: &RgbImage) -> Result<Tensor> {
        if image.width() == 0 || image.height() == 0 {
            return Err(Error::invalid("the segmentation input image is empty"));
        }
        self.processor.apply(image, &self.device)
    }

    /// The decode head's class logits for `pixels` `[1, 3, H, W]`, at the resolution of the
    /// backbone's first output (a quarter of the input for ConvNeXt): `[1, classes, h, w]`.
    pub fn logits(&self, pixels: &Tensor) -> Result<Tensor> {
        let features = self.backbone.forward(pixels)?;
        self.head.forward(&features)
    }

    /// Per-axis weights taking logits of `from` rows to `to` rows through `via` (the network's
    /// input size), as the model's and the post-processor's two bilinear resizes do.
    fn upsampling(from: usize, via: usize, to: usize) -> Vec<f32> {
        let first = bilinear_matrix(from, via);
        if via == to {
            return first;
        }
        matmul_rows(&bilinear_matrix(via, to), &first, to, via, from)
    }

    /// Class scores for every pixel of a `width` x `height` image: `logits` (from
    /// [`Self::logits`] on an input of `input` = `(width, height)` pixels) upsampled to the
    /// input and then to the image size. `[classes, height, width]`.
    pub fn class_scores(
        &self,
        logits: &Tensor,
        input: (usize, usize),
        width: usize,
        height: usize,
    ) -> Result<Tensor> {
        let (_, _, lh, lw) = logits.dims4()?;
        let rows = Self::upsampling(lh, input.1, height);
        let cols = Self::upsampling(lw, input.0, width);
        Ok(separable(logits, &rows, height, &cols, width)?.squeeze(0)?)
    }

    /// The ADE20K class of every pixel of `image`, row-major, as the model card's
    /// `post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])` gives it.
    pub fn segment(&self, image: &RgbImage) -> Result<Vec<u8>> {
        let pixels = self.preprocess(image)?;
        let (_, _, ih, iw) = pixels.dims4()?;
        let logits = self.logits(&pixels)?;
        let (_, _, lh, lw) = logits.dims4()?;
        let (width, height) = (image.width() as usize, image.height() as usize);
        let rows = Self::upsampling(lh, ih, height);
        let cols = Self::upsampling(lw, iw, width);
        // Bounded memory: the scores of a block of rows at a time.
        let block = (MAX_SCORE_VALUES / (self.classes * width).max(1)).max(1);
        let mut classes = Vec::with_capacity(width * height);
        for first in (0..height).step_by(block) {
            let n = block.min(height - first);
            let scores = separable(
                &logits,
                &rows[first * lh..(first + n) * lh],
                n,
                &cols,
                width,
            )?;
            let best = scores
                .squeeze(0)?
                .argmax(0)?
                .flatten_all()?
                .to_vec1::<u32>()?;
            classes.extend(best.into_iter().map(|c| c as u8));
        }
        Ok(classes)
    }
}

/// Paints each class of a `width` x `height` class map with its [`ADE20K_PALETTE`] colour.
pub fn colorize(classes: &[u8], width: u32, height: u32) -> Result<RgbImage> {
    if classes.len() != width as usize * height as usize {
        return Err(Error::invalid(format!(
            "segmentation: {} classes for a {width}x{height} image",
            classes.len()
        )));
    }
    let mut out = RgbImage::new(width, height);
    for (pixel, &class) in out.pixels_mut().zip(classes) {
        let colour = ADE20K_PALETTE.get(class as usize).ok_or_else(|| {
            Error::invalid(format!("segmentation: class {class} has no ADE20K colour"))
        })?;
        pixel.0 = *colour;
    }
    Ok(out)
}

impl Detector for UperNetSegmenter {
    fn detect(&self, image: &RgbImage) -> Result<RgbImage> {
        let classes = self.segment(image)?;
        colorize(&classes, image.width(), image.height())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_pool_bins_overlap_as_torch_does() {
        // 2 -> 3: bins [0, 1), [0, 2), [1, 2).
        assert_eq!(
            adaptive_pool_matrix(2, 3),
            vec![1.0, 0.0, 0.5, 0.5, 0.0, 1.0]
        );
        // 5 -> 2: bins [0, 3), [2, 5).
        let third = 1.0 / 3.0;
        assert_eq!(
            adaptive_pool_matrix(5, 2),
            vec![third, third, third, 0.0, 0.0, 0.0, 0.0, third, third, third]
        );
    }

    #[test]
    fn bilinear_weights_use_half_pixel_centres() {
        // 2 -> 4: sources -0.25 (clamped to 0), 0.25, 0.75, 1.25 (index 1 repeated).
        let m = bilinear_matrix(2, 4);
        assert_eq!(m, vec![1.0, 0.0, 0.75, 0.25, 0.25, 0.75, 0.0, 1.0]);
        // Every row sums to one, so a constant image stays constant.
        for row in bilinear_matrix(7, 19).chunks(7) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn colorize_refuses_a_class_without_colour() {
        assert!(colorize(&[0, 149], 2, 1).is_ok());
        assert!(colorize(&[150], 1, 1).is_err());
        assert!(colorize(&[0], 2, 1).is_err());
    }
}
