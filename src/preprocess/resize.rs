//! OpenCV's `cv2.resize` for 8-bit images (bit-exact for `INTER_LINEAR`, `INTER_AREA` and
//! `INTER_LANCZOS4`) and its `INTER_LINEAR` for float32 maps, and controlnet_aux's
//! `resize_image` built on them. The ControlNet preprocessors were trained on images resized this
//! way; the model-based detectors resize their input to a working resolution and their output
//! back with these functions. Resizes follow OpenCV's pixel-centre convention
//! (`src = (dst + 0.5) * scale - 0.5`) with the border replicated.
//!
//! OpenCV resizes 8-bit images in 11-bit fixed point (coefficients scaled by 2048) for the
//! interpolating modes: a horizontal pass into `i32` rows, then a vertical pass. Its SIMD
//! vertical pass for `INTER_LINEAR` drops 4 bits of each row before the multiply; that is
//! reproduced here, so results equal OpenCV's byte for byte (checked against opencv-python).
//! (OpenCV resizes an exact 8-bit halving with `INTER_LINEAR` by area; the bilinear weights are
//! then all 1/2 and the fixed-point passes give the same rounded 2x2 means, so no special case.)

use image::{GrayImage, RgbImage};

use crate::{Error, Result};

/// Coefficient scale of OpenCV's fixed-point resize (`INTER_RESIZE_COEF_SCALE`).
const COEF_SCALE: f32 = 2048.0;

/// OpenCV's interpolation modes used by the preprocessors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interpolation {
    /// `cv2.INTER_LINEAR`
    Linear,
    /// `cv2.INTER_AREA`
    Area,
    /// `cv2.INTER_LANCZOS4`
    Lanczos4,
}

/// controlnet_aux's `resize_image`: scales so that the short side is `resolution`, rounds each
/// side to a multiple of 64, and resizes with Lanczos when enlarging, else by area.
pub fn resize_image(image: &RgbImage, resolution: u32) -> RgbImage {
    let (w, h) = working_size(image.width(), image.height(), resolution);
    let k = resolution as f64 / image.width().min(image.height()) as f64;
    let mode = if k > 1.0 {
        Interpolation::Lanczos4
    } else {
        Interpolation::Area
    };
    resize_rgb(image, w, h, mode)
}

/// The most pixels a detector's input may have after [`resize_image`] (a 512 short side with a
/// 16:1 aspect ratio): the short side is scaled up, so a thin strip of an image would otherwise
/// ask for gigabytes of activations.
pub const MAX_DETECT_PIXELS: u64 = 2048 * 2048;

/// [`resize_image`] for a detector working at `resolution`, refusing images it cannot work on
/// (see [`checked_working_size`]).
pub fn working_image(image: &RgbImage, resolution: u32) -> Result<RgbImage> {
    checked_working_size(image.width(), image.height(), resolution)?;
    Ok(resize_image(image, resolution))
}

/// [`working_size`], refusing empty images, working sizes with a side of 0 and working images
/// of more than [`MAX_DETECT_PIXELS`].
pub fn checked_working_size(width: u32, height: u32, resolution: u32) -> Result<(u32, u32)> {
    if width == 0 || height == 0 {
        return Err(Error::invalid(format!(
            "the control image must be non-empty. Given: {width}x{height}"
        )));
    }
    let (w, h) = working_size(width, height, resolution);
    if w == 0 || h == 0 || u64::from(w) * u64::from(h) > MAX_DETECT_PIXELS {
        return Err(Error::invalid(format!(
            "a {width}x{height} image becomes {w}x{h} at detect resolution {resolution}; the \
             detector takes 64x64 up to {MAX_DETECT_PIXELS} pixels (an aspect ratio up to 16:1 \
             at resolution 512)"
        )));
    }
    Ok((w, h))
}

/// The size `resize_image` gives an image of `width` x `height` at `resolution`:
/// `round(side * k / 64) * 64` with `k = resolution / short side` (numpy's round: half to even).
/// Saturates for sizes no detector takes ([`checked_working_size`] refuses them).
pub fn working_size(width: u32, height: u32, resolution: u32) -> (u32, u32) {
    let k = resolution as f64 / width.min(height).max(1) as f64;
    let side = |s: u32| ((s as f64 * k / 64.0).round_ties_even() as u32).saturating_mul(64);
    (side(width), side(height))
}

/// `cv2.resize(image, (width, height), interpolation=mode)` for an RGB image.
pub fn resize_rgb(image: &RgbImage, width: u32, height: u32, mode: Interpolation) -> RgbImage {
    let data = resize_u8(
        image.as_raw(),
        (image.width() as usize, image.height() as usize),
        3,
        (width as usize, height as usize),
        mode,
    );
    RgbImage::from_raw(width, height, data).expect("resize output has width x height x 3 bytes")
}

/// `cv2.resize` for a one-channel image.
pub fn resize_gray(image: &GrayImage, width: u32, height: u32, mode: Interpolation) -> GrayImage {
    let data = resize_u8(
        image.as_raw(),
        (image.width() as usize, image.height() as usize),
        1,
        (width as usize, height as usize),
        mode,
    );
    GrayImage::from_raw(width, height, data).expect("resize output has width x height bytes")
}

/// `cv2.resize` on interleaved 8-bit pixels (`channels` per pixel), `src` of size `(w, h)`.
pub(crate) fn resize_u8(
    src: &[u8],
    (sw, sh): (usize, usize),
    channels: usize,
    (dw, dh): (usize, usize),
    mode: Interpolation,
) -> Vec<u8> {
    if (sw, sh) == (dw, dh) || sw == 0 || sh == 0 || dw == 0 || dh == 0 {
        // OpenCV copies when the size does not change.
        return if (sw, sh) == (dw, dh) {
            src.to_vec()
        } else {
            vec![0; dw * dh * channels]
        };
    }
    match mode {
        Interpolation::Area if sw >= dw && sh >= dh => area(src, (sw, sh), channels, (dw, dh)),
        // Enlarging (on either axis) by area is a linear interpolation with coefficients from
        // the covered fractions.
        Interpolation::Area | Interpolation::Linear => {
            let x = taps(sw, dw, mode, true);
            let y = taps(sh, dh, mode, false);
            separable(src, (sw, sh), channels, (dw, dh), &x, &y, true)
        }
        Interpolation::Lanczos4 => {
            let x = taps(sw, dw, Interpolation::Lanczos4, true);
            let y = taps(sh, dh, Interpolation::Lanczos4, false);
            separable(src, (sw, sh), channels, (dw, dh), &x, &y, false)
        }
    }
}

/// `cv2.resize(map, (dw, dh), interpolation=mode)` of a row-major one-channel float32 map of
/// `sw` x `sh`. Float maps have no fixed point: OpenCV's f32 weights, the horizontal taps summed
/// in order, then the vertical ones; `Area` shrinking sums the covered fractions in f32.
pub fn resize_f32(
    src: &[f32],
    (sw, sh): (usize, usize),
    (dw, dh): (usize, usize),
    mode: Interpolation,
) -> Vec<f32> {
    if (sw, sh) == (dw, dh) || sw == 0 || sh == 0 || dw == 0 || dh == 0 {
        return if (sw, sh) == (dw, dh) {
            src.to_vec()
        } else {
            vec![0.0; dw * dh]
        };
    }
    if mode == Interpolation::Area && sw >= dw && sh >= dh {
        return area_f32(src, (sw, sh), (dw, dh));
    }
    let (x_first, x_weights) = float_taps(sw, dw, mode, true);
    let (y_first, y_weights) = float_taps(sh, dh, mode, false);
    let clamp = |i: isize, n: usize| i.clamp(0, n as isize - 1) as usize;
    let rows: Vec<Vec<f32>> = src
        .chunks_exact(sw)
        .map(|row| {
            x_first
                .iter()
                .zip(&x_weights)
                .map(|(&s, w)| {
                    let mut v = 0f32;
                    for (k, &a) in w.iter().enumerate() {
                        v += row[clamp(s + k as isize, sw)] * a;
                    }
                    v
                })
                .collect()
        })
        .collect();
    let mut out = Vec::with_capacity(dw * dh);
    for (&s, w) in y_first.iter().zip(&y_weights) {
        let taps: Vec<(&Vec<f32>, f32)> = w
            .iter()
            .enumerate()
            .map(|(k, &b)| (&rows[clamp(s + k as isize, sh)], b))
            .collect();
        out.extend((0..dw).map(|x| {
            let mut v = 0f32;
            for (row, b) in &taps {
                v += row[x] * b;
            }
            v
        }));
    }
    out
}

/// [`resize_f32`] with `INTER_LINEAR`.
pub fn resize_linear_f32(src: &[f32], from: (usize, usize), to: (usize, usize)) -> Vec<f32> {
    resize_f32(src, from, to, Interpolation::Linear)
}

/// `INTER_AREA` reduction of a float map: whole-pixel factors average blocks (sum, then times
/// the reciprocal of the block size), other factors weight the covered fractions.
fn area_f32(src: &[f32], (sw, sh): (usize, usize), (dw, dh): (usize, usize)) -> Vec<f32> {
    if sw % dw == 0 && sh % dh == 0 {
        let (fx, fy) = (sw / dw, sh / dh);
        let inv = 1.0f32 / (fx * fy) as f32;
        let mut out = Vec::with_capacity(dw * dh);
        for dy in 0..dh {
            for dx in 0..dw {
                let mut sum = 0f32;
                for yy in 0..fy {
                    for xx in 0..fx {
                        sum += src[(dy * fy + yy) * sw + dx * fx + xx];
                    }
                }
                out.push(sum * inv);
            }
        }
        return out;
    }
    let xt = area_taps(sw, dw);
    let yt = area_taps(sh, dh);
    let mut out = Vec::with_capacity(dw * dh);
    let mut row = vec![0f32; dw];
    let mut acc = vec![0f32; dw];
    for taps in &yt {
        acc.iter_mut().for_each(|v| *v = 0.0);
        for &(sy, by) in taps {
            let line = &src[sy * sw..(sy + 1) * sw];
            for (r, xs) in row.iter_mut().zip(&xt) {
                let mut v = 0f32;
                for &(sx, bx) in xs {
                    v += line[sx] * bx;
                }
                *r = v;
            }
            for (a, r) in acc.iter_mut().zip(&row) {
                *a += r * by;
            }
        }
        out.extend_from_slice(&acc);
    }
    out
}

/// Per destination index: the first source index (may be outside, clamped when read) and the
/// fixed-point coefficients of the consecutive source samples from there.
struct Taps {
    first: Vec<isize>,
    coefs: Vec<Vec<i32>>,
}

/// OpenCV's fixed-point coefficient table for one axis: [`float_taps`] scaled by 2048.
fn taps(src: usize, dst: usize, mode: Interpolation, clamp: bool) -> Taps {
    let (first, weights) = float_taps(src, dst, mode, clamp);
    let coefs = weights
        .iter()
        .map(|w| {
            w.iter()
                .map(|w| (w * COEF_SCALE).round_ties_even().clamp(-32768.0, 32767.0) as i32)
                .collect()
        })
        .collect();
    Taps { first, coefs }
}

/// OpenCV's f32 coefficients for one axis (`Area` here: enlarging by area), with the first
/// source index of each destination index. Linear interpolation clamps the source position at
/// the edges on the horizontal axis only; the vertical pass reads clamped rows instead.
fn float_taps(
    src: usize,
    dst: usize,
    mode: Interpolation,
    clamp: bool,
) -> (Vec<isize>, Vec<Vec<f32>>) {
    let inv_scale = dst as f64 / src as f64;
    let scale = 1.0 / inv_scale;
    let mut first = Vec::with_capacity(dst);
    let mut coefs = Vec::with_capacity(dst);
    for d in 0..dst {
        let (mut s, mut f) = if mode == Interpolation::Area {
            let s = (d as f64 * scale).floor();
            let f = ((d as f64 + 1.0) - (s + 1.0) * inv_scale) as f32;
            (s as isize, if f <= 0.0 { 0.0 } else { f - f.floor() })
        } else {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let s = f.floor();
            (s as isize, f - s)
        };
        let weights: Vec<f32> = match mode {
            Interpolation::Lanczos4 => {
                s -= 3;
                lanczos4(f).to_vec()
            }
            _ => {
                if clamp && s < 0 {
                    (f, s) = (0.0, 0);
                }
                if clamp && s >= src as isize - 1 {
                    (f, s) = (0.0, src as isize - 1);
                }
                vec![1.0 - f, f]
            }
        };
        first.push(s);
        coefs.push(weights);
    }
    (first, coefs)
}

/// OpenCV's `interpolateLanczos4`: the 8 Lanczos (a = 4) weights for fractional offset `x`,
/// normalised to sum to one in f32.
fn lanczos4(x: f32) -> [f32; 8] {
    const S45: f64 = std::f64::consts::FRAC_1_SQRT_2;
    const CS: [(f64, f64); 8] = [
        (1.0, 0.0),
        (-S45, -S45),
        (0.0, 1.0),
        (S45, -S45),
        (-1.0, 0.0),
        (S45, S45),
        (0.0, -1.0),
        (-S45, S45),
    ];
    let mut c = [0f32; 8];
    if x < f32::EPSILON {
        c[3] = 1.0;
        return c;
    }
    let x = x as f64;
    let y0 = -(x + 3.0) * std::f64::consts::PI * 0.25;
    let (s0, c0) = (y0.sin(), y0.cos());
    let mut sum = 0f32;
    for (i, (a, b)) in CS.iter().enumerate() {
        let y = -(x + 3.0 - i as f64) * std::f64::consts::PI * 0.25;
        c[i] = ((a * s0 + b * c0) / (y * y)) as f32;
        sum += c[i];
    }
    let inv = 1.0 / sum;
    for v in &mut c {
        *v *= inv;
    }
    c
}

/// The two fixed-point passes: rows scaled by 2048 in `i32`, then the vertical combination.
/// `simd_linear` is OpenCV's vectorised `INTER_LINEAR` vertical pass (4 bits dropped first).
fn separable(
    src: &[u8],
    (sw, sh): (usize, usize),
    cn: usize,
    (dw, dh): (usize, usize),
    x: &Taps,
    y: &Taps,
    simd_linear: bool,
) -> Vec<u8> {
    let clamp = |i: isize, n: usize| i.clamp(0, n as isize - 1) as usize;
    let horizontal = |row: usize| -> Vec<i32> {
        let line = &src[row * sw * cn..(row + 1) * sw * cn];
        let mut out = vec![0i32; dw * cn];
        for dx in 0..dw {
            for (k, &a) in x.coefs[dx].iter().enumerate() {
                let sx = clamp(x.first[dx] + k as isize, sw);
                for c in 0..cn {
                    out[dx * cn + c] += line[sx * cn + c] as i32 * a;
                }
            }
        }
        out
    };
    let rows: Vec<Vec<i32>> = (0..sh).map(horizontal).collect();
    let mut out = vec![0u8; dw * dh * cn];
    for dy in 0..dh {
        let dst = &mut out[dy * dw * cn..(dy + 1) * dw * cn];
        for (i, d) in dst.iter_mut().enumerate() {
            let mut acc = 0i64;
            for (k, &b) in y.coefs[dy].iter().enumerate() {
                let v = rows[clamp(y.first[dy] + k as isize, sh)][i] as i64;
                acc += if simd_linear {
                    ((v >> 4) * b as i64) >> 16
                } else {
                    v * b as i64
                };
            }
            let v = if simd_linear {
                (acc + 2) >> 2
            } else {
                (acc + (1 << 21)) >> 22
            };
            *d = v.clamp(0, 255) as u8;
        }
    }
    out
}

/// `INTER_AREA` reduction: whole-pixel factors average blocks (2x2 rounding half up as
/// OpenCV's SIMD path, others through an f32 product rounded half to even); other factors
/// weight the covered fractions of source pixels in f32.
fn area(src: &[u8], (sw, sh): (usize, usize), cn: usize, (dw, dh): (usize, usize)) -> Vec<u8> {
    let mut out = vec![0u8; dw * dh * cn];
    if sw % dw == 0 && sh % dh == 0 {
        let (fx, fy) = (sw / dw, sh / dh);
        let n = (fx * fy) as u32;
        let inv = 1.0f32 / n as f32;
        for dy in 0..dh {
            for dx in 0..dw {
                for c in 0..cn {
                    let mut sum = 0u32;
                    for yy in 0..fy {
                        for xx in 0..fx {
                            sum += src[((dy * fy + yy) * sw + dx * fx + xx) * cn + c] as u32;
                        }
                    }
                    out[(dy * dw + dx) * cn + c] = if n == 4 {
                        ((sum + 2) >> 2) as u8
                    } else {
                        (sum as f32 * inv).round_ties_even().clamp(0.0, 255.0) as u8
                    };
                }
            }
        }
        return out;
    }
    let xt = area_taps(sw, dw);
    let yt = area_taps(sh, dh);
    let mut row = vec![0f32; dw * cn];
    let mut acc = vec![0f32; dw * cn];
    for dy in 0..dh {
        acc.iter_mut().for_each(|v| *v = 0.0);
        for &(sy, by) in &yt[dy] {
            let line = &src[sy * sw * cn..(sy + 1) * sw * cn];
            for dx in 0..dw {
                for c in 0..cn {
                    let mut v = 0f32;
                    for &(sx, bx) in &xt[dx] {
                        v += line[sx * cn + c] as f32 * bx;
                    }
                    row[dx * cn + c] = v;
                }
            }
            for (a, r) in acc.iter_mut().zip(&row) {
                *a += r * by;
            }
        }
        for (o, a) in out[dy * dw * cn..(dy + 1) * dw * cn].iter_mut().zip(&acc) {
            *o = a.round_ties_even().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// OpenCV's `computeResizeAreaTab`: the source indices each destination index covers, with the
/// covered fraction of each over the cell width.
fn area_taps(src: usize, dst: usize) -> Vec<Vec<(usize, f32)>> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|d| {
            let fs1 = d as f64 * scale;
            let fs2 = fs1 + scale;
            let cell = scale.min(src as f64 - fs1);
            let s2 = (fs2.floor() as usize).min(src - 1);
            let s1 = (fs1.ceil() as usize).min(s2);
            let mut taps = Vec::new();
            if s1 as f64 - fs1 > 1e-3 {
                taps.push((s1 - 1, ((s1 as f64 - fs1) / cell) as f32));
            }
            for s in s1..s2 {
                taps.push((s, (1.0 / cell) as f32));
            }
            if fs2 - s2 as f64 > 1e-3 {
                taps.push((s2, ((fs2 - s2 as f64).min(1.0).min(cell) / cell) as f32));
            }
            taps
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn working_size_rounds_to_multiples_of_64() {
        assert_eq!(working_size(64, 64, 512), (512, 512));
        assert_eq!(working_size(768, 512, 512), (768, 512));
        // 100 x 70 at 512: k = 7.314..., 731.4 -> 704 (11 x 64), 512.
        assert_eq!(working_size(100, 70, 512), (704, 512));
        // 1.5 x 64 = 96 -> 2 (ties to even) x 64.
        assert_eq!(working_size(96, 64, 64), (128, 64));
    }

    #[test]
    fn same_size_is_a_copy_and_constant_images_stay_constant() {
        let img = RgbImage::from_fn(10, 6, |x, y| image::Rgb([x as u8, y as u8, 7]));
        for mode in [
            Interpolation::Linear,
            Interpolation::Area,
            Interpolation::Lanczos4,
        ] {
            assert_eq!(resize_rgb(&img, 10, 6, mode), img);
            let flat = RgbImage::from_pixel(9, 7, image::Rgb([200, 13, 90]));
            for (w, h) in [(18, 14), (3, 7), (5, 4)] {
                let out = resize_rgb(&flat, w, h, mode);
                assert!(
                    out.pixels().all(|p| p.0 == [200, 13, 90]),
                    "{mode:?} {w}x{h}"
                );
            }
        }
    }

    #[test]
    fn working_image_refuses_empty_and_elongated_images() {
        assert!(working_image(&RgbImage::new(0, 10), 512).is_err());
        assert!(working_image(&RgbImage::new(1, 100), 512).is_err());
        let ok = working_image(&RgbImage::new(80, 10), 64).unwrap();
        assert_eq!(ok.dimensions(), (512, 64));
        // 1.5 rounds to 2 and 2.5 to 2, as numpy rounds halves to even.
        assert_eq!(checked_working_size(192, 128, 64).unwrap(), (128, 64));
        assert_eq!(checked_working_size(160, 64, 64).unwrap(), (128, 64));
        assert_eq!(checked_working_size(80, 60, 512).unwrap(), (704, 512));
        // A thin strip would need 512 x 32768 pixels.
        let err = checked_working_size(4096, 64, 512).unwrap_err().to_string();
        assert!(err.contains("16:1"), "{err}");
        // 16 / 64 rounds to no side at all.
        assert!(checked_working_size(10, 10, 16).is_err());
    }

    #[test]
    fn linear_halving_equals_area() {
        // OpenCV takes its INTER_AREA path for an exact 8-bit halving with INTER_LINEAR; the
        // fixed-point bilinear passes give the same bytes (checked on a pattern of varied values).
        let img = GrayImage::from_fn(512, 256, |x, y| image::Luma([(x ^ (y * 7)) as u8]));
        assert_eq!(
            resize_gray(&img, 256, 128, Interpolation::Linear),
            resize_gray(&img, 256, 128, Interpolation::Area)
        );
    }

    #[test]
    fn float_resizes_keep_constants_and_average_blocks() {
        let flat = vec![0.75f32; 9 * 7];
        for mode in [
            Interpolation::Linear,
            Interpolation::Area,
            Interpolation::Lanczos4,
        ] {
            for (w, h) in [(18, 14), (3, 7), (5, 4), (20, 3)] {
                let out = resize_f32(&flat, (9, 7), (w, h), mode);
                assert_eq!(out.len(), w * h);
                // Normalised weights in f32: within a few ulps of the constant.
                assert!(
                    out.iter().all(|v| (v - 0.75).abs() < 1e-6),
                    "{mode:?} {w}x{h}: {out:?}"
                );
            }
        }
        let block = [1.0f32, 2.0, 10.0, 20.0, 3.0, 4.0, 30.0, 40.0];
        let out = resize_f32(&block, (4, 2), (2, 1), Interpolation::Area);
        assert_eq!(out, vec![2.5, 25.0]);
    }

    #[test]
    fn float_linear_interpolates_between_centres() {
        // 2 -> 4: destination centres at source -0.25 (clamped), 0.25, 0.75, 1.25 (clamped).
        let out = resize_linear_f32(&[0.0, 8.0], (2, 1), (4, 1));
        assert_eq!(out, vec![0.0, 2.0, 6.0, 8.0]);
        let same = [1.0, 2.0, 3.0];
        assert_eq!(resize_linear_f32(&same, (3, 1), (3, 1)), same.to_vec());
    }

    #[test]
    fn area_halving_rounds_half_up() {
        let img = GrayImage::from_raw(2, 2, vec![0, 1, 0, 1]).unwrap();
        assert_eq!(resize_gray(&img, 1, 1, Interpolation::Area).as_raw(), &[1]);
    }
}
