//! Straight-line detection: controlnet_aux's `MLSDdetector`, M-LSD ("Towards Light-weight and
//! Real-time Line Segment Detection", Gu et al., AAAI 2022) in its `MobileV2_MLSD_Large` form,
//! as ControlNet's `mlsd` model was trained on.
//!
//! Weights: `lllyasviel/Annotators`, file `mlsd_large_512_fp32.pth` (also
//! `lllyasviel/ControlNet` `annotator/ckpts/mlsd_large_512_fp32.pth`), a pickled `state_dict`
//! read as published. The network: a MobileNetV2 backbone cut after its 96-channel stage (four
//! channels in: RGB and a constant plane), and a decoder that merges the backbone's features at
//! strides 16, 8, 4 and 2 back up to half the input size. Its output is the "tp map": a centre
//! heat map and, per pixel, the displacements to a segment's two end points. Batch norms are
//! folded into the convolutions at load; widths are read from the weights.
//!
//! Post-processing follows controlnet_aux's `pred_lines`: local maxima (3x3) of the sigmoid
//! heat map, the 200 strongest, kept when their score and segment length pass the thresholds
//! (0.1 and 0.1 by default); end points scaled to the input and truncated to integers; each
//! segment drawn one pixel wide in white on black as `cv2.line` draws it; the drawing resized to
//! the input's size (`INTER_LINEAR`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use image::{GrayImage, RgbImage};

use super::pth::{conv_shape, detect_resolution, read_pth};
use super::resize::{resize_gray, working_image, Interpolation};
use super::Detector;
use crate::models::layers::{conv2d, Conv2d};
use crate::{Error, Result};

/// The published file in `lllyasviel/Annotators`.
pub const FILE: &str = "mlsd_large_512_fp32.pth";
/// controlnet_aux's default working resolution (short side, before rounding to 64).
pub const DEFAULT_DETECT_RESOLUTION: u32 = 512;
/// controlnet_aux's default score threshold (`thr_v`).
pub const DEFAULT_SCORE_THRESHOLD: f32 = 0.1;
/// controlnet_aux's default segment length threshold (`thr_d`), in tp-map pixels.
pub const DEFAULT_DISTANCE_THRESHOLD: f32 = 0.1;
/// How many heat-map peaks `pred_lines` considers.
const TOP_K: usize = 200;
/// `nn.BatchNorm2d`'s default epsilon.
const BATCH_NORM_EPS: f64 = 1e-5;
/// Index of the backbone stages whose outputs the decoder reads (`fpn_selected`).
const FPN_SELECTED: [usize; 5] = [1, 3, 6, 10, 13];
/// The backbone's inverted-residual blocks with stride 2 (`features` indices): the MobileNetV2
/// settings `[1,16,1,1], [6,24,2,2], [6,32,3,2], [6,64,4,2], [6,96,3,1]`.
const STRIDE_2_BLOCKS: [usize; 3] = [2, 4, 7];

/// The M-LSD detector: network, working resolution and thresholds.
#[derive(Debug, Clone)]
pub struct MlsdDetector {
    net: Mlsd,
    detect_resolution: u32,
    score_threshold: f32,
    distance_threshold: f32,
    device: Device,
}

/// A detected segment in working-resolution pixels: `[x_start, y_start, x_end, y_end]`.
pub type Segment = [f64; 4];

impl MlsdDetector {
    /// Loads `mlsd_large_512_fp32.pth` from `path`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let tensors = read_pth(path)?;
        let net = Mlsd::new(&tensors, device)
            .map_err(|e| Error::model(format!("{}: {e}", path.display())))?;
        Ok(Self {
            net,
            detect_resolution: DEFAULT_DETECT_RESOLUTION,
            score_threshold: DEFAULT_SCORE_THRESHOLD,
            distance_threshold: DEFAULT_DISTANCE_THRESHOLD,
            device: device.clone(),
        })
    }

    /// The same detector working at another resolution (controlnet_aux's `detect_resolution`);
    /// at least 64.
    pub fn with_detect_resolution(mut self, resolution: u32) -> Result<Self> {
        self.detect_resolution = detect_resolution(resolution)?;
        Ok(self)
    }

    /// Other thresholds (controlnet_aux's `thr_v`, score 0..1, and `thr_d`, length >= 0).
    pub fn with_thresholds(mut self, score: f32, distance: f32) -> Result<Self> {
        if !(0.0..=1.0).contains(&score) {
            return Err(Error::invalid(format!(
                "the M-LSD score threshold must be in 0..1. Given: {score}"
            )));
        }
        if !(distance >= 0.0 && distance.is_finite()) {
            return Err(Error::invalid(format!(
                "the M-LSD distance threshold must be >= 0. Given: {distance}"
            )));
        }
        self.score_threshold = score;
        self.distance_threshold = distance;
        Ok(self)
    }

    /// `image` at the working resolution (what the network sees and the lines are drawn on).
    fn working_image(&self, image: &RgbImage) -> Result<RgbImage> {
        working_image(image, self.detect_resolution)
    }

    /// The network's tp map for `image`: `[1, 9, H/2, W/2]` at the working resolution (channel
    /// 0 the centre logits, 1..5 the end-point displacements).
    pub fn tp_map(&self, image: &RgbImage) -> Result<Tensor> {
        self.tp_map_of_working(&self.working_image(image)?)
    }

    fn tp_map_of_working(&self, working: &RgbImage) -> Result<Tensor> {
        let (w, h) = (working.width() as usize, working.height() as usize);
        let rgb = Tensor::from_vec(working.as_raw().clone(), (h, w, 3), &self.device)?
            .permute((2, 0, 1))?
            .to_dtype(DType::F32)?;
        let ones = Tensor::ones((1, h, w), DType::F32, &self.device)?;
        let x = ((Tensor::cat(&[rgb, ones], 0)?.unsqueeze(0)? / 127.5)? - 1.0)?;
        Ok(self.net.forward(&x)?)
    }

    /// The segments `pred_lines` finds in `image`, in working-resolution pixels, strongest
    /// first.
    pub fn segments(&self, image: &RgbImage) -> Result<Vec<Segment>> {
        let tp = self.tp_map(image)?;
        decode_segments(&tp, self.score_threshold, self.distance_threshold)
    }
}

impl Detector for MlsdDetector {
    fn detect(&self, image: &RgbImage) -> Result<RgbImage> {
        let working = self.working_image(image)?;
        let tp = self.tp_map_of_working(&working)?;
        let segments = decode_segments(&tp, self.score_threshold, self.distance_threshold)?;
        let mut canvas = GrayImage::new(working.width(), working.height());
        for s in &segments {
            // Python's int() truncates towards zero.
            let [x1, y1, x2, y2] = s.map(|v| v.trunc() as i64);
            draw_line(&mut canvas, (x1, y1), (x2, y2), 255);
        }
        let map = resize_gray(
            &canvas,
            image.width(),
            image.height(),
            Interpolation::Linear,
        );
        Ok(image::DynamicImage::ImageLuma8(map).to_rgb8())
    }
}

/// `pred_lines` after the network: 3x3 local maxima of the sigmoid heat map, the `TOP_K`
/// strongest, kept when score > `score_threshold` and the end points are more than
/// `distance_threshold` apart; end points `2 * (centre + displacement)` (the tp map has half the
/// working resolution).
pub fn decode_segments(
    tp: &Tensor,
    score_threshold: f32,
    distance_threshold: f32,
) -> Result<Vec<Segment>> {
    let (_, c, h, w) = tp.dims4()?;
    if c < 5 {
        return Err(Error::model(format!(
            "the M-LSD output has {c} channels, expected at least 5"
        )));
    }
    let tp = tp.get(0)?.to_device(&Device::Cpu)?;
    let heat: Vec<f32> = candle_nn::ops::sigmoid(&tp.get(0)?)?
        .flatten_all()?
        .to_vec1()?;
    let disp: Vec<Vec<f32>> = (1..5)
        .map(|i| tp.get(i)?.flatten_all()?.to_vec1())
        .collect::<candle_core::Result<_>>()?;
    // max_pool2d(3, stride 1, padding 1) == heat keeps the peaks.
    let mut peaks: Vec<(f32, usize)> = (0..h * w)
        .filter_map(|i| {
            let (y, x) = (i / w, i % w);
            let v = heat[i];
            let mut max = v;
            for yy in y.saturating_sub(1)..(y + 2).min(h) {
                for xx in x.saturating_sub(1)..(x + 2).min(w) {
                    max = max.max(heat[yy * w + xx]);
                }
            }
            (max == v).then_some((v, i))
        })
        .collect();
    peaks.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    peaks.truncate(TOP_K);
    let mut segments = Vec::new();
    for (score, i) in peaks {
        let (y, x) = ((i / w) as f64, (i % w) as f64);
        let [xs, ys, xe, ye] = [disp[0][i], disp[1][i], disp[2][i], disp[3][i]];
        let distance = ((xs - xe) * (xs - xe) + (ys - ye) * (ys - ye)).sqrt();
        if score > score_threshold && distance > distance_threshold {
            segments.push([
                2.0 * (x + xs as f64),
                2.0 * (y + ys as f64),
                2.0 * (x + xe as f64),
                2.0 * (y + ye as f64),
            ]);
        }
    }
    Ok(segments)
}

/// `cv2.line(img, p1, p2, value, thickness=1)` with its default 8-connected line type: the
/// segment clipped to the image (`cv::clipLine`), then OpenCV's Bresenham walk from the left
/// end point.
pub fn draw_line(img: &mut GrayImage, p1: (i64, i64), p2: (i64, i64), value: u8) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let inside = |(x, y): (i64, i64)| (0..w).contains(&x) && (0..h).contains(&y);
    let (mut p1, mut p2) = (p1, p2);
    if !(inside(p1) && inside(p2)) {
        match clip_line(w, h, p1, p2) {
            Some((a, b)) => (p1, p2) = (a, b),
            None => return,
        }
    }
    let (mut dx, mut dy) = (p2.0 - p1.0, p2.1 - p1.1);
    if dx < 0 {
        (dx, dy) = (-dx, -dy);
        std::mem::swap(&mut p1, &mut p2);
    }
    let step_y = if dy < 0 { -1 } else { 1 };
    dy = dy.abs();
    let vertical = dy > dx;
    if vertical {
        std::mem::swap(&mut dx, &mut dy);
    }
    let mut err = dx - 2 * dy;
    let (mut x, mut y) = p1;
    for _ in 0..=dx {
        img.put_pixel(x as u32, y as u32, image::Luma([value]));
        let minor = err < 0;
        err += -2 * dy + if minor { 2 * dx } else { 0 };
        if vertical {
            y += step_y;
            if minor {
                x += 1;
            }
        } else {
            x += 1;
            if minor {
                y += step_y;
            }
        }
    }
}

/// `cv::clipLine` for a `w` x `h` image: the part of the segment inside it, end points on the
/// border moved along the line with OpenCV's truncating arithmetic; `None` when it misses.
fn clip_line(
    w: i64,
    h: i64,
    (mut x1, mut y1): (i64, i64),
    (mut x2, mut y2): (i64, i64),
) -> Option<((i64, i64), (i64, i64))> {
    let (right, bottom) = (w - 1, h - 1);
    let code = |x: i64, y: i64| {
        (x < 0) as u8 | ((x > right) as u8) << 1 | ((y < 0) as u8) << 2 | ((y > bottom) as u8) << 3
    };
    let (mut c1, mut c2) = (code(x1, y1), code(x2, y2));
    if c1 & c2 == 0 && c1 | c2 != 0 {
        if c1 & 12 != 0 {
            let a = if c1 < 8 { 0 } else { bottom };
            x1 += ((a - y1) as f64 * (x2 - x1) as f64 / (y2 - y1) as f64) as i64;
            y1 = a;
            c1 = code(x1, 0) & 3;
        }
        if c2 & 12 != 0 {
            let a = if c2 < 8 { 0 } else { bottom };
            x2 += ((a - y2) as f64 * (x2 - x1) as f64 / (y2 - y1) as f64) as i64;
            y2 = a;
            c2 = code(x2, 0) & 3;
        }
        if c1 & c2 == 0 && c1 | c2 != 0 {
            if c1 != 0 {
                let a = if c1 == 1 { 0 } else { right };
                y1 += ((a - x1) as f64 * (y2 - y1) as f64 / (x2 - x1) as f64) as i64;
                x1 = a;
                c1 = 0;
            }
            if c2 != 0 {
                let a = if c2 == 1 { 0 } else { right };
                y2 += ((a - x2) as f64 * (y2 - y1) as f64 / (x2 - x1) as f64) as i64;
                x2 = a;
                c2 = 0;
            }
        }
    }
    (c1 | c2 == 0).then_some(((x1, y1), (x2, y2)))
}

/// A convolution with its batch norm folded in (`w * g / sqrt(v + eps)`,
/// `(b - m) * g / sqrt(v + eps) + beta`); dense ones through the shared `Conv2d`, dilated ones
/// through candle_nn, depthwise ones as a sum of shifted products.
#[derive(Debug, Clone)]
enum Conv {
    Dense(Conv2d),
    Dilated(candle_nn::Conv2d),
    Depthwise(Depthwise),
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Conv::Dense(c) => c.forward(x),
            Conv::Dilated(c) => c.forward(x),
            Conv::Depthwise(c) => c.forward(x),
        }
    }
}

/// A depthwise convolution (one filter per channel). candle's grouped convolution runs one
/// convolution per group, hundreds of tiny calls; `k * k` whole-tensor multiply-adds of shifted
/// views compute the same sums.
#[derive(Debug, Clone)]
struct Depthwise {
    /// `[k * k]` per-tap weights, each `[1, C, 1, 1]`, row-major over the kernel.
    taps: Vec<Tensor>,
    bias: Tensor,
    kernel: usize,
    padding: usize,
    stride: usize,
}

impl Depthwise {
    fn new(weight: &Tensor, bias: &Tensor, padding: usize, stride: usize) -> Result<Self> {
        let (channels, _, kernel, _) = weight.dims4()?;
        let taps = (0..kernel * kernel)
            .map(|t| {
                weight
                    .narrow(2, t / kernel, 1)?
                    .narrow(3, t % kernel, 1)?
                    .reshape((1, channels, 1, 1))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            taps,
            bias: bias.reshape((1, channels, 1, 1))?,
            kernel,
            padding,
            stride,
        })
    }
}

impl Module for Depthwise {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let p = self.padding;
        let x = x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?;
        let (_, _, h, w) = x.dims4()?;
        if h < self.kernel || w < self.kernel {
            candle_core::bail!("depthwise convolution: input {h}x{w} smaller than its kernel")
        }
        let (oh, ow) = (h - self.kernel + 1, w - self.kernel + 1);
        let mut acc = self.bias.clone();
        for (t, tap) in self.taps.iter().enumerate() {
            let (i, j) = (t / self.kernel, t % self.kernel);
            let view = x.narrow(2, i, oh)?.narrow(3, j, ow)?;
            acc = view.broadcast_mul(tap)?.broadcast_add(&acc)?;
        }
        if self.stride == 1 {
            return Ok(acc);
        }
        let every = |n: usize| {
            let idx: Vec<u32> = (0..n).step_by(self.stride).map(|i| i as u32).collect();
            Tensor::new(idx, x.device())
        };
        acc.index_select(&every(oh)?, 2)?
            .index_select(&every(ow)?, 3)
    }
}

/// Builds convolutions from a `state_dict`, folding batch norms.
struct Builder<'a> {
    tensors: &'a HashMap<String, Tensor>,
    device: &'a Device,
}

impl Builder<'_> {
    fn get(&self, name: &str) -> Result<Tensor> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| Error::model(format!("missing tensor {name}")))
    }

    /// Convolution `conv` (with or without bias) followed by batch norm `bn` (if given).
    fn conv(
        &self,
        conv: &str,
        bn: Option<&str>,
        padding: usize,
        stride: usize,
        dilation: usize,
        depthwise: bool,
    ) -> Result<Conv> {
        let [out, per_group, k, _] = conv_shape(self.tensors, &format!("{conv}.weight"))?;
        let weight = self.get(&format!("{conv}.weight"))?.to_dtype(DType::F64)?;
        let bias = match self.tensors.get(&format!("{conv}.bias")) {
            Some(b) => b.to_dtype(DType::F64)?,
            None => Tensor::zeros(out, DType::F64, &Device::Cpu)?,
        };
        let (weight, bias) = match bn {
            Some(bn) => {
                let g = self.get(&format!("{bn}.weight"))?.to_dtype(DType::F64)?;
                let beta = self.get(&format!("{bn}.bias"))?.to_dtype(DType::F64)?;
                let mean = self
                    .get(&format!("{bn}.running_mean"))?
                    .to_dtype(DType::F64)?;
                let var = self
                    .get(&format!("{bn}.running_var"))?
                    .to_dtype(DType::F64)?;
                let k = (g / (var + BATCH_NORM_EPS)?.sqrt()?)?;
                let weight = weight.broadcast_mul(&k.reshape((out, 1, 1, 1))?)?;
                let bias = ((bias - mean)? * &k)?.add(&beta)?;
                (weight, bias)
            }
            None => (weight, bias),
        };
        let weight = weight.to_dtype(DType::F32)?.to_device(self.device)?;
        let bias = bias.to_dtype(DType::F32)?.to_device(self.device)?;
        if depthwise && per_group != 1 {
            return Err(Error::model(format!(
                "{conv}.weight: a depthwise kernel has one input channel per group, found {per_group}"
            )));
        }
        if depthwise {
            if dilation != 1 {
                return Err(Error::model(format!("{conv}: dilated depthwise kernel")));
            }
            return Ok(Conv::Depthwise(Depthwise::new(
                &weight, &bias, padding, stride,
            )?));
        }
        if dilation == 1 {
            let vb = VarBuilder::from_tensors(
                HashMap::from([("weight".to_string(), weight), ("bias".to_string(), bias)]),
                DType::F32,
                self.device,
            );
            return Ok(Conv::Dense(conv2d(vb, per_group, out, k, padding, stride)?));
        }
        let config = candle_nn::Conv2dConfig {
            padding,
            stride,
            dilation,
            groups: 1,
            cudnn_fwd_algo: None,
        };
        Ok(Conv::Dilated(candle_nn::Conv2d::new(
            weight,
            Some(bias),
            config,
        )))
    }
}

/// MobileNetV2's `ConvBNReLU`: ReLU6; stride 2 pads right and bottom by one (TFLite style).
#[derive(Debug, Clone)]
struct ConvBnRelu6 {
    conv: Conv,
    stride: usize,
}

impl ConvBnRelu6 {
    fn new(b: &Builder, prefix: &str, stride: usize, depthwise: bool) -> Result<Self> {
        let [_, _, k, _] = conv_shape(b.tensors, &format!("{prefix}.0.weight"))?;
        let padding = if stride == 2 { 0 } else { (k - 1) / 2 };
        let conv = b.conv(
            &format!("{prefix}.0"),
            Some(&format!("{prefix}.1")),
            padding,
            stride,
            1,
            depthwise,
        )?;
        Ok(Self { conv, stride })
    }
}

impl Module for ConvBnRelu6 {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = if self.stride == 2 {
            x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?
        } else {
            x.clone()
        };
        self.conv.forward(&x)?.clamp(0f32, 6f32)
    }
}

/// MobileNetV2's inverted residual: optional 1x1 expansion, 3x3 depthwise, 1x1 projection.
#[derive(Debug, Clone)]
struct InvertedResidual {
    expand: Option<ConvBnRelu6>,
    depthwise: ConvBnRelu6,
    project: Conv,
    residual: bool,
}

impl InvertedResidual {
    fn new(b: &Builder, prefix: &str, stride: usize) -> Result<Self> {
        // With expansion the layers are conv.0 (1x1), conv.1 (depthwise), conv.2 + conv.3;
        // without (expand ratio 1), conv.0 (depthwise), conv.1 + conv.2.
        let expanded = b.tensors.contains_key(&format!("{prefix}.conv.3.weight"));
        let first = usize::from(expanded);
        let expand = if expanded {
            Some(ConvBnRelu6::new(b, &format!("{prefix}.conv.0"), 1, false)?)
        } else {
            None
        };
        let depthwise = ConvBnRelu6::new(b, &format!("{prefix}.conv.{first}"), stride, true)?;
        let project = b.conv(
            &format!("{prefix}.conv.{}", first + 1),
            Some(&format!("{prefix}.conv.{}", first + 2)),
            0,
            1,
            1,
            false,
        )?;
        let [out, _, _, _] = conv_shape(b.tensors, &format!("{prefix}.conv.{}.weight", first + 1))?;
        let input = match &expand {
            Some(_) => conv_shape(b.tensors, &format!("{prefix}.conv.0.0.weight"))?[1],
            None => conv_shape(b.tensors, &format!("{prefix}.conv.0.0.weight"))?[0],
        };
        Ok(Self {
            expand,
            depthwise,
            project,
            residual: stride == 1 && input == out,
        })
    }
}

impl Module for InvertedResidual {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut y = x.clone();
        if let Some(e) = &self.expand {
            y = e.forward(&y)?;
        }
        let y = self.project.forward(&self.depthwise.forward(&y)?)?;
        if self.residual {
            x + y
        } else {
            Ok(y)
        }
    }
}

/// Conv + BN + ReLU of the decoder blocks.
#[derive(Debug, Clone)]
struct ConvBnRelu(Conv);

impl ConvBnRelu {
    fn new(b: &Builder, prefix: &str, padding: usize, dilation: usize) -> Result<Self> {
        Ok(Self(b.conv(
            &format!("{prefix}.0"),
            Some(&format!("{prefix}.1")),
            padding,
            1,
            dilation,
            false,
        )?))
    }
}

impl Module for ConvBnRelu {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.0.forward(x)?.relu()
    }
}

/// `BlockTypeA`: 1x1 projections of a skip feature `a` and the deeper `b` (upsampled 2x,
/// bilinear with aligned corners, except in the first block), concatenated.
#[derive(Debug, Clone)]
struct BlockA {
    deep: ConvBnRelu,
    skip: ConvBnRelu,
    upscale: bool,
}

impl BlockA {
    fn new(b: &Builder, prefix: &str, upscale: bool) -> Result<Self> {
        Ok(Self {
            deep: ConvBnRelu::new(b, &format!("{prefix}.conv1"), 0, 1)?,
            skip: ConvBnRelu::new(b, &format!("{prefix}.conv2"), 0, 1)?,
            upscale,
        })
    }

    fn forward(&self, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        let mut b = self.deep.forward(b)?;
        let a = self.skip.forward(a)?;
        if self.upscale {
            let (_, _, h, w) = b.dims4()?;
            b = b.upsample_bilinear2d(2 * h, 2 * w, true)?;
        }
        Tensor::cat(&[a, b], 1)
    }
}

/// `BlockTypeB`: a residual 3x3 conv, then a 3x3 conv.
#[derive(Debug, Clone)]
struct BlockB {
    conv1: ConvBnRelu,
    conv2: ConvBnRelu,
}

impl BlockB {
    fn new(b: &Builder, prefix: &str) -> Result<Self> {
        Ok(Self {
            conv1: ConvBnRelu::new(b, &format!("{prefix}.conv1"), 1, 1)?,
            conv2: ConvBnRelu::new(b, &format!("{prefix}.conv2"), 1, 1)?,
        })
    }
}

impl Module for BlockB {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = (self.conv1.forward(x)? + x)?;
        self.conv2.forward(&x)
    }
}

/// `MobileV2_MLSD_Large`, keys as in its `state_dict`.
#[derive(Debug, Clone)]
struct Mlsd {
    stem: ConvBnRelu6,
    blocks: Vec<InvertedResidual>,
    a15: BlockA,
    b16: BlockB,
    a17: BlockA,
    b18: BlockB,
    a19: BlockA,
    b20: BlockB,
    a21: BlockA,
    b22: BlockB,
    c23: [ConvBnRelu; 2],
    head: Conv,
}

impl Mlsd {
    fn new(tensors: &HashMap<String, Tensor>, device: &Device) -> Result<Self> {
        let b = Builder { tensors, device };
        let stem = ConvBnRelu6::new(&b, "backbone.features.0", 2, false)?;
        let last = FPN_SELECTED[FPN_SELECTED.len() - 1];
        let blocks = (1..=last)
            .map(|i| {
                let stride = if STRIDE_2_BLOCKS.contains(&i) { 2 } else { 1 };
                InvertedResidual::new(&b, &format!("backbone.features.{i}"), stride)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            stem,
            blocks,
            a15: BlockA::new(&b, "block15", false)?,
            b16: BlockB::new(&b, "block16")?,
            a17: BlockA::new(&b, "block17", true)?,
            b18: BlockB::new(&b, "block18")?,
            a19: BlockA::new(&b, "block19", true)?,
            b20: BlockB::new(&b, "block20")?,
            a21: BlockA::new(&b, "block21", true)?,
            b22: BlockB::new(&b, "block22")?,
            c23: [
                ConvBnRelu::new(&b, "block23.conv1", 5, 5)?,
                ConvBnRelu::new(&b, "block23.conv2", 1, 1)?,
            ],
            head: b.conv("block23.conv3", None, 0, 1, 1, false)?,
        })
    }
}

impl Module for Mlsd {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.stem.forward(x)?;
        let mut features = Vec::with_capacity(FPN_SELECTED.len());
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x)?;
            if FPN_SELECTED.contains(&(i + 1)) {
                features.push(x.clone());
            }
        }
        let [c1, c2, c3, c4, c5] = <[Tensor; 5]>::try_from(features).expect("five stages");
        let x = self.b16.forward(&self.a15.forward(&c4, &c5)?)?;
        let x = self.b18.forward(&self.a17.forward(&c3, &x)?)?;
        let x = self.b20.forward(&self.a19.forward(&c2, &x)?)?;
        let x = self.b22.forward(&self.a21.forward(&c1, &x)?)?;
        let x = self.c23[1].forward(&self.c23[0].forward(&x)?)?;
        let x = self.head.forward(&x)?;
        // The model returns output channels 7.. (the tp map and unused extras).
        let channels = x.dim(1)?;
        x.narrow(1, 7, channels - 7)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drawn(w: u32, h: u32, p1: (i64, i64), p2: (i64, i64)) -> Vec<(u32, u32)> {
        let mut img = GrayImage::new(w, h);
        draw_line(&mut img, p1, p2, 255);
        img.enumerate_pixels()
            .filter(|(_, _, p)| p.0[0] == 255)
            .map(|(x, y, _)| (x, y))
            .collect()
    }

    #[test]
    fn lines_are_8_connected_and_symmetric_in_their_end_points() {
        assert_eq!(drawn(8, 8, (1, 2), (5, 2)).len(), 5);
        assert_eq!(drawn(8, 8, (3, 0), (3, 7)).len(), 8);
        assert_eq!(
            drawn(8, 8, (0, 0), (3, 3)),
            vec![(0, 0), (1, 1), (2, 2), (3, 3)]
        );
        // Drawn from the left end point either way.
        assert_eq!(
            drawn(16, 16, (1, 2), (12, 7)),
            drawn(16, 16, (12, 7), (1, 2))
        );
    }

    #[test]
    fn depthwise_equals_a_grouped_convolution() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (1, 6, 9, 8), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (6, 1, 3, 3), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., 6, &dev).unwrap();
        for (padding, stride) in [(1, 1), (0, 2), (1, 2)] {
            let ours = Depthwise::new(&w, &b, padding, stride)
                .unwrap()
                .forward(&x)
                .unwrap();
            let reference = x
                .conv2d(&w, padding, stride, 1, 6)
                .unwrap()
                .broadcast_add(&b.reshape((1, 6, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(ours.dims(), reference.dims(), "{padding} {stride}");
            let diff = crate::models::layers::max_abs_diff(&ours, &reference);
            assert!(diff < 1e-5, "{padding} {stride}: {diff}");
        }
    }

    #[test]
    fn lines_outside_are_clipped_or_skipped() {
        assert!(drawn(8, 8, (-5, -5), (-1, 20)).is_empty());
        let pixels = drawn(8, 8, (-4, 3), (20, 3));
        assert_eq!(pixels.len(), 8);
        assert!(pixels.iter().all(|&(_, y)| y == 3));
    }
}
