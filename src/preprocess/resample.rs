//! 8-bit image resampling as transformers' image processors do it on the CPU: torchvision's
//! `resize(uint8 tensor, antialias=True)`, which runs torch's AVX2 uint8 kernel (a port of
//! Pillow-SIMD's): separable convolution, horizontal pass then vertical pass, each rounding back
//! to 8 bits, with the filter support widened by the scale when shrinking (antialiasing).
//!
//! The filter weights are normalised in f64 and then quantised to 16-bit fixed point with the
//! largest precision (at most 22 bits) that keeps the biggest weight below 2^15, as that kernel
//! does; Pillow itself always uses 22 bits, which rounds some pixels one level differently. (On
//! CPUs without AVX2, torch resizes in float instead and can differ from this by a level.)

use image::RgbImage;

use crate::{Error, Result};

/// The resampling filters of transformers' `PILImageResampling` that the preprocessors use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Triangle filter (`PILImageResampling.BILINEAR`, value 2).
    Bilinear,
    /// Keys cubic with a = -0.5 (`PILImageResampling.BICUBIC`, value 3).
    Bicubic,
}

impl Filter {
    /// The filter named by a processor config's `resample` value (PIL's numbering).
    pub fn from_pil(value: i64) -> Result<Self> {
        match value {
            2 => Ok(Filter::Bilinear),
            3 => Ok(Filter::Bicubic),
            other => Err(Error::model(format!(
                "resample {other} is not supported (2 = bilinear and 3 = bicubic are)"
            ))),
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => (1.0 - x).max(0.0),
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// Fixed-point taps of one output pixel: the first input index and the weights from there.
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

/// The taps of every output pixel along one axis, and their fixed-point precision in bits.
fn taps(input: usize, output: usize, filter: Filter) -> (Vec<Taps>, u32) {
    let scale = input as f64 / output as f64;
    let filter_scale = scale.max(1.0);
    let inverse = 1.0 / filter_scale;
    let support = filter.support() * filter_scale;
    let mut rows = Vec::with_capacity(output);
    let mut max_weight = 0.0f64;
    for out in 0..output {
        let center = (out as f64 + 0.5) * scale;
        let first = ((center - support + 0.5) as i64).max(0) as usize;
        let last = ((center + support + 0.5) as i64).min(input as i64) as usize;
        let mut weights: Vec<f64> = (first..last)
            .map(|i| filter.weight((i as f64 - center + 0.5) * inverse))
            .collect();
        let total: f64 = weights.iter().sum();
        if total != 0.0 {
            for w in &mut weights {
                *w /= total;
            }
        }
        max_weight = weights.iter().copied().fold(max_weight, f64::max);
        rows.push((first, weights));
    }
    // The largest precision (up to 22 bits) for which the biggest weight still fits an i16.
    let mut precision = 0u32;
    while precision < 22 {
        let next = (0.5 + max_weight * (1u32 << (precision + 1)) as f64) as i64;
        if next >= 1 << 15 {
            break;
        }
        precision += 1;
    }
    let unit = (1u32 << precision) as f64;
    let taps = rows
        .into_iter()
        .map(|(first, weights)| Taps {
            first,
            weights: weights
                .into_iter()
                .map(|w| {
                    if w < 0.0 {
                        (-0.5 + w * unit) as i32
                    } else {
                        (0.5 + w * unit) as i32
                    }
                })
                .collect(),
        })
        .collect();
    (taps, precision)
}

/// Resamples the rows of an interleaved 8-bit image (`width` x `height` x `channels`) to
/// `out_width` columns.
fn horizontal(
    pixels: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    out_width: usize,
    filter: Filter,
) -> Vec<u8> {
    let (taps, precision) = taps(width, out_width, filter);
    let half = 1i64 << precision.saturating_sub(1);
    let mut out = vec![0u8; out_width * height * channels];
    for y in 0..height {
        let row = &pixels[y * width * channels..(y + 1) * width * channels];
        for (x, tap) in taps.iter().enumerate() {
            for c in 0..channels {
                let mut acc = half;
                for (k, &w) in tap.weights.iter().enumerate() {
                    acc += row[(tap.first + k) * channels + c] as i64 * w as i64;
                }
                out[(y * out_width + x) * channels + c] = (acc >> precision).clamp(0, 255) as u8;
            }
        }
    }
    out
}

/// Resamples the columns of an interleaved 8-bit image to `out_height` rows.
fn vertical(
    pixels: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    out_height: usize,
    filter: Filter,
) -> Vec<u8> {
    let (taps, precision) = taps(height, out_height, filter);
    let half = 1i64 << precision.saturating_sub(1);
    let stride = width * channels;
    let mut out = vec![0u8; out_height * stride];
    for (y, tap) in taps.iter().enumerate() {
        for i in 0..stride {
            let mut acc = half;
            for (k, &w) in tap.weights.iter().enumerate() {
                acc += pixels[(tap.first + k) * stride + i] as i64 * w as i64;
            }
            out[y * stride + i] = (acc >> precision).clamp(0, 255) as u8;
        }
    }
    out
}

/// Resizes interleaved 8-bit pixels (`channels` per pixel); a pass whose size is unchanged is
/// skipped, as torch skips it.
pub fn resize_u8(
    pixels: &[u8],
    (width, height): (usize, usize),
    channels: usize,
    (out_width, out_height): (usize, usize),
    filter: Filter,
) -> Result<Vec<u8>> {
    if width == 0 || height == 0 || out_width == 0 || out_height == 0 {
        return Err(Error::invalid(format!(
            "cannot resize a {width}x{height} image to {out_width}x{out_height}"
        )));
    }
    if pixels.len() != width * height * channels {
        return Err(Error::Internal(format!(
            "{} bytes for a {width}x{height}x{channels} image",
            pixels.len()
        )));
    }
    let mut data = pixels.to_vec();
    let mut w = width;
    if out_width != width {
        data = horizontal(&data, w, height, channels, out_width, filter);
        w = out_width;
    }
    if out_height != height {
        data = vertical(&data, w, height, channels, out_height, filter);
    }
    Ok(data)
}

/// Resizes an RGB image to `width` x `height` (see the module docs).
pub fn resize_rgb(image: &RgbImage, width: u32, height: u32, filter: Filter) -> Result<RgbImage> {
    let data = resize_u8(
        image.as_raw(),
        (image.width() as usize, image.height() as usize),
        3,
        (width as usize, height as usize),
        filter,
    )?;
    RgbImage::from_raw(width, height, data)
        .ok_or_else(|| Error::Internal("resized image has the wrong size".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for filter in [Filter::Bilinear, Filter::Bicubic] {
            for (input, output) in [(64, 96), (88, 20), (7, 7), (1, 5)] {
                let (taps, precision) = taps(input, output, filter);
                for tap in taps {
                    let sum: i32 = tap.weights.iter().sum();
                    // Each weight is rounded on its own: the sum is within one unit per tap.
                    assert!(
                        (sum - (1 << precision)).abs() <= tap.weights.len() as i32,
                        "{filter:?} {input}->{output}: {sum}"
                    );
                }
            }
        }
    }

    #[test]
    fn flat_images_stay_flat_and_empty_sizes_are_refused() {
        let image = RgbImage::from_pixel(13, 9, image::Rgb([200, 7, 99]));
        for filter in [Filter::Bilinear, Filter::Bicubic] {
            let out = resize_rgb(&image, 31, 4, filter).unwrap();
            assert!(out.pixels().all(|p| p.0 == [200, 7, 99]), "{filter:?}");
        }
        assert!(resize_rgb(&image, 0, 4, Filter::Bilinear).is_err());
        assert!(Filter::from_pil(1).is_err());
    }
}
