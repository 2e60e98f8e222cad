//! Line-art extraction: controlnet_aux's `LineartDetector`, the image-to-sketch generator of
//! "Learning to generate line drawings that convey geometry and semantics" (Chan, Durand, Isola,
//! CVPR 2022) that lllyasviel trained for ControlNet 1.1's lineart model.
//!
//! Weights: `lllyasviel/Annotators`, file `sk_model.pth` (realistic) or `sk_model2.pth`
//! ("coarse": the same architecture, other weights), a pickled `state_dict` read as published.
//! The network: 7x7 convolution, two stride-2 convolutions, residual blocks (three in the
//! published files), two transposed convolutions, 7x7 convolution and a sigmoid; reflection
//! padding and instance normalisation (no affine parameters) throughout. Widths and the number
//! of residual blocks are read from the weights.
//!
//! Pre- and post-processing follow the reference: the image is resized to the working
//! resolution (short side 512, sides multiples of 64; [`super::resize::resize_image`]), scaled to
//! 0..1, and the network's output is turned into bytes (`x * 255` clipped and truncated), resized
//! back to the input's size (`INTER_LINEAR`) and inverted (black lines on white).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;
use image::{GrayImage, RgbImage};

use super::pth::{conv_shape, detect_resolution, read_pth};
use super::resize::{resize_gray, working_image, Interpolation};
use super::Detector;
use crate::models::layers::{conv2d, Conv2d};
use crate::{Error, Result};

/// The published file of the realistic line-art model in `lllyasviel/Annotators`.
pub const FILE: &str = "sk_model.pth";
/// The published file of the coarse line-art model (same architecture, loaded the same way).
pub const COARSE_FILE: &str = "sk_model2.pth";
/// controlnet_aux's default working resolution (short side, before rounding to 64).
pub const DEFAULT_DETECT_RESOLUTION: u32 = 512;

/// `nn.InstanceNorm2d`'s default epsilon.
const INSTANCE_NORM_EPS: f64 = 1e-5;

/// The line-art detector: the generator network and its working resolution.
#[derive(Debug, Clone)]
pub struct LineartDetector {
    generator: Generator,
    detect_resolution: u32,
    device: Device,
}

impl LineartDetector {
    /// Loads `sk_model.pth` (or `sk_model2.pth` for the coarse variant) from `path`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let tensors = read_pth(path)?;
        let generator = Generator::new(&tensors, device)
            .map_err(|e| Error::model(format!("{}: {e}", path.display())))?;
        Ok(Self {
            generator,
            detect_resolution: DEFAULT_DETECT_RESOLUTION,
            device: device.clone(),
        })
    }

    /// The same detector working at another resolution (controlnet_aux's `detect_resolution`);
    /// at least 64.
    pub fn with_detect_resolution(mut self, resolution: u32) -> Result<Self> {
        self.detect_resolution = detect_resolution(resolution)?;
        Ok(self)
    }

    /// The number of residual blocks found in the weights (three in the published files).
    pub fn residual_blocks(&self) -> usize {
        self.generator.residual.len()
    }

    /// The network's output for `image` at the working resolution: `[1, 1, H, W]` f32 in 0..1
    /// (line intensity before inversion).
    pub fn line_map(&self, image: &RgbImage) -> Result<Tensor> {
        let working = working_image(image, self.detect_resolution)?;
        let (w, h) = working.dimensions();
        let x = Tensor::from_vec(
            working.into_raw(),
            (h as usize, w as usize, 3),
            &self.device,
        )?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .to_dtype(DType::F32)?;
        let x = (x / 255.0)?;
        Ok(self.generator.forward(&x)?)
    }
}

impl Detector for LineartDetector {
    fn detect(&self, image: &RgbImage) -> Result<RgbImage> {
        let line = self.line_map(image)?;
        let (_, _, h, w) = line.dims4()?;
        let values = line.flatten_all()?.to_vec1::<f32>()?;
        // numpy: (x * 255).clip(0, 255).astype(uint8) truncates.
        let bytes = values
            .iter()
            .map(|v| (v * 255.0).clamp(0.0, 255.0) as u8)
            .collect();
        let map =
            GrayImage::from_raw(w as u32, h as u32, bytes).expect("the line map has h x w values");
        let mut map = resize_gray(&map, image.width(), image.height(), Interpolation::Linear);
        map.iter_mut().for_each(|v| *v = 255 - *v);
        Ok(image::DynamicImage::ImageLuma8(map).to_rgb8())
    }
}

/// `nn.ReflectionPad2d(pad)` on `[N, C, H, W]`.
fn reflection_pad(x: &Tensor, pad: usize) -> candle_core::Result<Tensor> {
    let index = |n: usize| -> candle_core::Result<Tensor> {
        if n <= pad {
            candle_core::bail!("reflection padding {pad} needs more than {pad} pixels, got {n}")
        }
        let idx: Vec<u32> = (0..n + 2 * pad)
            .map(|i| {
                let j = i as isize - pad as isize;
                let j = if j < 0 { -j } else { j };
                let last = n as isize - 1;
                (if j > last { 2 * last - j } else { j }) as u32
            })
            .collect();
        Tensor::new(idx, x.device())
    };
    let (_, _, h, w) = x.dims4()?;
    x.index_select(&index(h)?, 2)?.index_select(&index(w)?, 3)
}

/// `nn.InstanceNorm2d` without affine parameters: each channel of each image normalised over
/// its pixels (biased variance).
fn instance_norm(x: &Tensor) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let flat = x.reshape((n, c, h * w))?;
    let mean = flat.mean_keepdim(D::Minus1)?;
    let centred = flat.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred
        .broadcast_div(&(var + INSTANCE_NORM_EPS)?.sqrt()?)?
        .reshape((n, c, h, w))
}

/// `nn.ConvTranspose2d(k=3, stride=2, padding=1, output_padding=1)`: doubles the size.
#[derive(Debug, Clone)]
struct Upsample {
    weight: Tensor,
    bias: Tensor,
}

impl Module for Upsample {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = x.conv_transpose2d(&self.weight, 1, 1, 2, 1)?;
        y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
    }
}

#[derive(Debug, Clone)]
struct ResidualBlock {
    conv1: Conv2d,
    conv2: Conv2d,
}

impl Module for ResidualBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = instance_norm(&self.conv1.forward(&reflection_pad(x, 1)?)?)?.relu()?;
        let y = instance_norm(&self.conv2.forward(&reflection_pad(&y, 1)?)?)?;
        x + y
    }
}

/// The `Generator` of controlnet_aux's lineart module, keys as in its `state_dict`.
#[derive(Debug, Clone)]
struct Generator {
    input: Conv2d,
    down: [Conv2d; 2],
    residual: Vec<ResidualBlock>,
    up: [Upsample; 2],
    output: Conv2d,
}

impl Generator {
    fn new(tensors: &HashMap<String, Tensor>, device: &Device) -> Result<Self> {
        let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, device);
        let conv = |name: &str, padding: usize, stride: usize| -> Result<Conv2d> {
            let [o, i, k, _] = conv_shape(tensors, &format!("{name}.weight"))?;
            conv2d(vb.pp(name), i, o, k, padding, stride)
        };
        let input = conv("model0.1", 0, 1)?;
        let down = [conv("model1.0", 1, 2)?, conv("model1.3", 1, 2)?];
        let residual = (0..)
            .take_while(|i| tensors.contains_key(&format!("model2.{i}.conv_block.1.weight")))
            .map(|i| {
                Ok(ResidualBlock {
                    conv1: conv(&format!("model2.{i}.conv_block.1"), 0, 1)?,
                    conv2: conv(&format!("model2.{i}.conv_block.5"), 0, 1)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let upsample = |name: &str| -> Result<Upsample> {
            let [i, o, _, _] = conv_shape(tensors, &format!("{name}.weight"))?;
            let vb = vb.pp(name);
            Ok(Upsample {
                weight: vb.get((i, o, 3, 3), "weight")?,
                bias: vb.get(o, "bias")?,
            })
        };
        let up = [upsample("model3.0")?, upsample("model3.3")?];
        let output = conv("model4.1", 0, 1)?;
        Ok(Self {
            input,
            down,
            residual,
            up,
            output,
        })
    }
}

impl Module for Generator {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = instance_norm(&self.input.forward(&reflection_pad(x, 3)?)?)?.relu()?;
        for down in &self.down {
            x = instance_norm(&down.forward(&x)?)?.relu()?;
        }
        for block in &self.residual {
            x = block.forward(&x)?;
        }
        for up in &self.up {
            x = instance_norm(&up.forward(&x)?)?.relu()?;
        }
        candle_nn::ops::sigmoid(&self.output.forward(&reflection_pad(&x, 3)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflection_pad_mirrors_without_repeating_the_edge() {
        let x = Tensor::new(&[[[[1f32, 2., 3.]]]], &Device::Cpu).unwrap();
        let x = x.repeat((1, 1, 3, 1)).unwrap();
        let y = reflection_pad(&x, 2).unwrap();
        assert_eq!(y.dims(), &[1, 1, 7, 7]);
        let row: Vec<f32> = y
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(row, vec![3., 2., 1., 2., 3., 2., 1.]);
        assert!(reflection_pad(&x, 3).is_err());
    }

    #[test]
    fn instance_norm_gives_zero_mean_unit_variance() {
        let x = Tensor::arange(0f32, 32., &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 4, 4))
            .unwrap();
        let y = instance_norm(&x).unwrap();
        let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        for c in v.chunks(16) {
            let mean: f32 = c.iter().sum::<f32>() / 16.0;
            let var: f32 = c.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 16.0;
            assert!(
                mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-4,
                "{mean} {var}"
            );
        }
    }
}
