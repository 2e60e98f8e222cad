//! HED soft edges (Xie & Tu 2015, "Holistically-Nested Edge Detection") as ControlNet's
//! annotator computes them: `controlnet_aux` 0.0.10's `HEDdetector`, the Apache-2.0 network
//! `ControlNetHED_Apache2` with the public weights `lllyasviel/Annotators` `ControlNetHED.pth`.
//!
//! The network is five VGG-like blocks of 3x3 convolutions + ReLU (2, 2, 3, 3, 3 layers; 64,
//! 128, 256, 512, 512 channels in the published file; each block after the first starts with a
//! 2x2 max-pool), an RGB input in 0..255 minus a learned `norm`, and a 1x1 projection to one
//! edge logit per block. The reference then
//!
//! 1. resizes the image so its short side is the detect resolution and both sides are multiples
//!    of 64 (`resize_image`: OpenCV's INTER_AREA to shrink, INTER_LANCZOS4 to enlarge);
//! 2. resizes each block's logits to that size (bilinear, float) and takes the sigmoid of their
//!    mean; `safe` quantises it with `safe_step` (0, 1/2, 1, 3/2 times, clipped);
//! 3. scales to 8 bits (truncating) and resizes back (bilinear) — here to the input's size;
//! 4. for scribbles: non-maximum suppression along four directions of the edge map blurred with
//!    sigma 3, threshold 127, a second blur with sigma 3, and everything above 4 set to 255.
//!
//! The channel widths and layer counts are read from the weights, so checkpoints of other widths
//! (the test fixture's tiny one) load with the same code.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use image::{GrayImage, RgbImage};

use super::cv;
use super::pth::{detect_resolution as detect_resolution_checked, read_pth};
use super::resize::{self, Interpolation};
use super::Detector;
use crate::models::layers::{conv2d, Conv2d};
use crate::{Error, Result};

/// The detect resolution `controlnet_aux` uses by default.
pub const DEFAULT_DETECT_RESOLUTION: u32 = 512;

/// What the detector makes of the edge map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HedMode {
    /// Soft edges (`softedge`, `hed`); `safe` applies `safe_step`'s quantisation.
    Soft { safe: bool },
    /// Thin binary strokes (`scribble`): `controlnet_aux`'s `scribble=True` post-processing.
    Scribble,
}

/// One block: `convs` 3x3 convolutions with ReLU, then a 1x1 projection to one edge logit.
#[derive(Debug)]
struct Block {
    convs: Vec<Conv2d>,
    projection: Conv2d,
    down_sample: bool,
}

impl Block {
    fn forward(&self, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut h = if self.down_sample {
            xs.max_pool2d(2)?
        } else {
            xs.clone()
        };
        for conv in &self.convs {
            h = conv.forward(&h)?.relu()?;
        }
        let projection = self.projection.forward(&h)?;
        Ok((h, projection))
    }
}

/// The HED edge detector: the network and the post-processing `mode`.
#[derive(Debug)]
pub struct Hed {
    norm: Tensor,
    blocks: Vec<Block>,
    device: Device,
    mode: HedMode,
    detect_resolution: u32,
}

/// An edge map in 0..1, row-major.
#[derive(Debug, Clone)]
pub struct EdgeMap {
    pub width: usize,
    pub height: usize,
    pub values: Vec<f64>,
}

impl Hed {
    /// Loads `ControlNetHED.pth` (or the same tensors as `.safetensors`) onto `device`, as a
    /// soft-edge detector at the default detect resolution.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let tensors = read_pth(path)?;
        let bad = |what: String| Error::model(format!("{}: {what}", path.display()));
        let mut blocks = Vec::new();
        let mut in_channels = 3;
        for b in 1.. {
            let prefix = format!("block{b}");
            let Some(first) = tensors.get(&format!("{prefix}.convs.0.weight")) else {
                break;
            };
            let width = first.dim(0)?;
            let layers = (0..)
                .take_while(|i| tensors.contains_key(&format!("{prefix}.convs.{i}.weight")))
                .count();
            blocks.push((prefix, in_channels, width, layers));
            in_channels = width;
        }
        if blocks.len() != 5 {
            return Err(bad(format!(
                "expected the five blocks `block1` .. `block5` of ControlNetHED, found {}",
                blocks.len()
            )));
        }
        if !tensors.contains_key("norm") {
            return Err(bad(
                "no `norm` tensor: not a ControlNetHED checkpoint".into()
            ));
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let norm = vb.get((1, 3, 1, 1), "norm")?;
        let blocks = blocks
            .into_iter()
            .enumerate()
            .map(|(i, (prefix, in_channels, width, layers))| {
                let vb = vb.pp(prefix);
                let convs = (0..layers)
                    .map(|l| {
                        let c_in = if l == 0 { in_channels } else { width };
                        conv2d(vb.pp(format!("convs.{l}")), c_in, width, 3, 1, 1)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let projection = conv2d(vb.pp("projection"), width, 1, 1, 0, 1)?;
                Ok(Block {
                    convs,
                    projection,
                    down_sample: i > 0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm,
            blocks,
            device: device.clone(),
            mode: HedMode::Soft { safe: false },
            detect_resolution: DEFAULT_DETECT_RESOLUTION,
        })
    }

    /// The same network with another post-processing.
    pub fn with_mode(self, mode: HedMode) -> Self {
        Self { mode, ..self }
    }

    /// The same network run at another detect resolution (the short side, at least 64).
    pub fn with_detect_resolution(self, detect_resolution: u32) -> Result<Self> {
        Ok(Self {
            detect_resolution: detect_resolution_checked(detect_resolution)?,
            ..self
        })
    }

    /// The five side outputs (edge logits) for `pixels` `[1, 3, H, W]` in 0..255.
    pub fn side_outputs(&self, pixels: &Tensor) -> Result<Vec<Tensor>> {
        let mut h = pixels.broadcast_sub(&self.norm)?;
        let mut outputs = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let (next, projection) = block.forward(&h)?;
            outputs.push(projection);
            h = next;
        }
        Ok(outputs)
    }

    /// The image at the detect resolution (the reference's `resize_image`).
    pub fn detect_input(&self, image: &RgbImage) -> Result<RgbImage> {
        resize::working_image(image, self.detect_resolution)
    }

    /// The sigmoid of the mean side output at the detect resolution, before any quantisation.
    pub fn soft_edges(&self, image: &RgbImage) -> Result<EdgeMap> {
        let input = self.detect_input(image)?;
        let (w, h) = (input.width() as usize, input.height() as usize);
        let pixels = Tensor::from_vec(
            input.as_raw().iter().map(|&v| v as f32).collect::<Vec<_>>(),
            (1, h, w, 3),
            &self.device,
        )?
        .permute((0, 3, 1, 2))?
        .contiguous()?;
        let mut sum: Option<Vec<f32>> = None;
        let outputs = self.side_outputs(&pixels)?;
        let count = outputs.len() as f32;
        for output in outputs {
            let (_, _, oh, ow) = output.dims4()?;
            let values = output.flatten_all()?.to_vec1::<f32>()?;
            let resized = resize::resize_linear_f32(&values, (ow, oh), (w, h));
            // numpy's float32 mean over the five maps: a running sum in order, then the division.
            sum = Some(match sum {
                None => resized,
                Some(mut acc) => {
                    acc.iter_mut().zip(&resized).for_each(|(a, r)| *a += r);
                    acc
                }
            });
        }
        let mean = sum.ok_or_else(|| Error::Internal("HED: no side outputs".into()))?;
        let values = mean
            .into_iter()
            .map(|s| 1.0 / (1.0 + (-f64::from(s / count)).exp()))
            .collect();
        Ok(EdgeMap {
            width: w,
            height: h,
            values,
        })
    }

    /// The 8-bit edge map at the detect resolution (`safe` quantisation applied).
    fn edge_u8(&self, edges: &EdgeMap, safe: bool) -> GrayImage {
        let bytes = edges
            .values
            .iter()
            .map(|&e| {
                let v = if safe {
                    // safe_step: float32, x * 3 truncated to an integer, halved.
                    let stepped = ((e as f32) * 3.0).trunc() / 2.0;
                    f64::from(stepped * 255.0)
                } else {
                    e * 255.0
                };
                v.clamp(0.0, 255.0) as u8
            })
            .collect();
        GrayImage::from_raw(edges.width as u32, edges.height as u32, bytes)
            .expect("edge map size matches its buffer; this is a bug")
    }
}

impl Detector for Hed {
    fn detect(&self, image: &RgbImage) -> Result<RgbImage> {
        let edges = self.soft_edges(image)?;
        let safe = matches!(self.mode, HedMode::Soft { safe: true });
        let map = self.edge_u8(&edges, safe);
        let mut map =
            resize::resize_gray(&map, image.width(), image.height(), Interpolation::Linear);
        if self.mode == HedMode::Scribble {
            map = scribble(&map);
        }
        Ok(image::DynamicImage::ImageLuma8(map).to_rgb8())
    }
}

/// `controlnet_aux`'s scribble post-processing: `nms(map, 127, 3.0)`, a Gaussian blur with
/// sigma 3, and every value above 4 set to 255, the rest to 0.
pub fn scribble(map: &GrayImage) -> GrayImage {
    let thin = cv::nms(map, 127.0, 3.0);
    let blurred = cv::gaussian_blur_u8_sigma3(&thin);
    GrayImage::from_fn(map.width(), map.height(), |x, y| {
        image::Luma([if blurred.get_pixel(x, y)[0] > 4 {
            255
        } else {
            0
        }])
    })
}
