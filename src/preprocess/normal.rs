//! Normal maps for `lllyasviel/sd-controlnet-normal`, built from DPT depth as its model card
//! does ("normal from distance"): the card runs transformers' depth-estimation pipeline with
//! `Intel/dpt-hybrid-midas`; here the same recipe runs on the depth of [`DptDepth`] (pure-ViT
//! DPT, `Intel/dpt-large`, as the hybrid variant is not implemented).
//!
//! The recipe, on the network's predicted depth at its own resolution (the card's
//! `predicted_depth[0]`):
//! 1. the depth min-max normalised to 0..1 marks the background: below 0.4;
//! 2. OpenCV's 3x3 Sobel derivatives `dx`, `dy` of the raw depth (`cv2.Sobel(depth, CV_32F, 1,
//!    0, ksize=3)`, border reflected without repeating the edge), zeroed on the background;
//! 3. the vector `(dx, dy, 2 pi)` normalised to unit length, mapped to 8 bits as
//!    `v * 127.5 + 127.5` (clipped, truncated), stored as R, G, B in that order.
//!
//! The card leaves the map at the network's resolution; a detector returns the input's size,
//! so the map is then resized with the same 8-bit antialiased bilinear resampling as the depth
//! network's input ([`super::resample`]).
//!
//! controlnet_aux's `normalbae` (Runware's `normalbae`) is a different network (NormalBae,
//! Bae et al. 2021, surface normals predicted directly); this detector is the depth-derived one.

use std::path::Path;

use candle_core::Device;
use image::RgbImage;

use super::depth::DptDepth;
use super::resample::{self, Filter};
use super::Detector;
use crate::{Error, Result};

/// The card's background threshold on the min-max normalised depth.
pub const BACKGROUND_THRESHOLD: f32 = 0.4;

/// The normal-map detector: a DPT depth estimator and the model card's recipe.
pub struct DepthNormal {
    depth: DptDepth,
}

impl DepthNormal {
    /// Loads the DPT depth estimator folder (see [`DptDepth::load`]).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Ok(DepthNormal {
            depth: DptDepth::load(path, device)?,
        })
    }

    /// The depth estimator underneath.
    pub fn depth(&self) -> &DptDepth {
        &self.depth
    }
}

impl Detector for DepthNormal {
    fn detect(&self, image: &RgbImage) -> Result<RgbImage> {
        let (depth, (h, w)) = self.depth.network_depth(image)?;
        let normal = normal_from_depth(&depth, w, h)?;
        if normal.dimensions() == image.dimensions() {
            return Ok(normal);
        }
        resample::resize_rgb(&normal, image.width(), image.height(), Filter::Bilinear)
    }
}

/// OpenCV's `BORDER_REFLECT_101` index: `-1 -> 1`, `n -> n - 2`.
fn reflect101(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let n = n as isize;
    let mut i = i;
    while i < 0 || i >= n {
        i = if i < 0 { -i } else { 2 * (n - 1) - i };
    }
    i as usize
}

/// 3x3 Sobel derivatives `(dx, dy)` of a row-major f32 map, as `cv2.Sobel(.., CV_32F, ..,
/// ksize=3)` computes them (separable: a [-1, 0, 1] / [1, 2, 1] row pass, then the column pass).
pub fn sobel(values: &[f32], width: usize, height: usize) -> (Vec<f32>, Vec<f32>) {
    let at = |x: isize, y: isize| values[reflect101(y, height) * width + reflect101(x, width)];
    let mut dx = vec![0f32; width * height];
    let mut dy = vec![0f32; width * height];
    // Row passes: the derivative and the smoothing along x.
    let mut diff = vec![0f32; width * height];
    let mut smooth = vec![0f32; width * height];
    for y in 0..height as isize {
        for x in 0..width as isize {
            let i = y as usize * width + x as usize;
            diff[i] = at(x + 1, y) - at(x - 1, y);
            smooth[i] = at(x - 1, y) + at(x, y) * 2.0 + at(x + 1, y);
        }
    }
    let row = |buf: &[f32], x: usize, y: isize| buf[reflect101(y, height) * width + x];
    for y in 0..height as isize {
        for x in 0..width {
            let i = y as usize * width + x;
            dx[i] = row(&diff, x, y - 1) + row(&diff, x, y) * 2.0 + row(&diff, x, y + 1);
            dy[i] = row(&smooth, x, y + 1) - row(&smooth, x, y - 1);
        }
    }
    (dx, dy)
}

/// The model card's normal map (see the module docs) of a row-major depth map of `width` x
/// `height`, at that size.
pub fn normal_from_depth(depth: &[f32], width: usize, height: usize) -> Result<RgbImage> {
    if width == 0 || height == 0 || depth.len() != width * height {
        return Err(Error::Internal(format!(
            "{} depth values for a {width}x{height} map",
            depth.len()
        )));
    }
    let min = depth.iter().copied().fold(f32::INFINITY, f32::min);
    let shifted: Vec<f32> = depth.iter().map(|&v| v - min).collect();
    let max = shifted.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (mut dx, mut dy) = sobel(depth, width, height);
    for (i, &v) in shifted.iter().enumerate() {
        // `v / max < threshold`; with a constant map (0 / 0, NaN) nothing is background.
        if v / max < BACKGROUND_THRESHOLD {
            dx[i] = 0.0;
            dy[i] = 0.0;
        }
    }
    let z = (std::f64::consts::PI * 2.0) as f32;
    let mut out = Vec::with_capacity(width * height * 3);
    for i in 0..width * height {
        let norm = (dx[i] * dx[i] + dy[i] * dy[i] + z * z).sqrt();
        for v in [dx[i], dy[i], z] {
            out.push(((v / norm) * 127.5 + 127.5).clamp(0.0, 255.0) as u8);
        }
    }
    RgbImage::from_raw(width as u32, height as u32, out)
        .ok_or_else(|| Error::Internal("normal map has the wrong size".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflect_101_borders() {
        assert_eq!(reflect101(-1, 5), 1);
        assert_eq!(reflect101(5, 5), 3);
        assert_eq!(reflect101(2, 5), 2);
        assert_eq!(reflect101(-1, 1), 0);
    }

    #[test]
    fn a_ramp_tilts_the_normal_along_its_gradient() {
        // depth = 3 x: Sobel dx = 8 * 3 = 24 inside, dy = 0; the border reflects, so dx = 0 on
        // the first and last columns.
        let (w, h) = (6, 4);
        let depth: Vec<f32> = (0..w * h).map(|i| 3.0 * (i % w) as f32).collect();
        let (dx, dy) = sobel(&depth, w, h);
        assert_eq!(dx[w + 2], 24.0);
        assert_eq!(dx[w], 0.0);
        assert!(dy.iter().all(|&v| v == 0.0));
        let normal = normal_from_depth(&depth, w, h).unwrap();
        let z = std::f32::consts::TAU;
        let n = (24.0f32 * 24.0 + z * z).sqrt();
        let inside = normal.get_pixel(2, 1).0;
        assert_eq!(inside[0], (24.0 / n * 127.5 + 127.5) as u8);
        assert_eq!(inside[1], 127);
        // Columns 0 and 1 are background (normalised depth 0 and 0.2).
        assert_eq!(normal.get_pixel(1, 1).0, [127, 127, 255]);
    }
}
