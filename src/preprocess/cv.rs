//! The OpenCV operations `controlnet_aux`'s annotators wrap around their networks, computed the
//! way OpenCV 4 computes them so control images match the reference's: `resize_image` (the
//! short side to the detect resolution, both sides rounded to multiples of 64, INTER_AREA to
//! shrink and INTER_LANCZOS4 to enlarge), bilinear resizes of float maps and of 8-bit images
//! (OpenCV's 11-bit fixed-point coefficients), Gaussian blurs and the annotators' `nms`.
//!
//! Resizes follow OpenCV's pixel-centre convention (`src = (dst + 0.5) * scale - 0.5`) with the
//! border replicated; blurs reflect the border without repeating the edge pixel (BORDER_DEFAULT).

use image::{GrayImage, RgbImage};

use crate::{Error, Result};

/// OpenCV's `INTER_RESIZE_COEF_BITS`: resize coefficients of 8-bit images are 11-bit fixed point.
const COEF_BITS: u32 = 11;
const COEF_SCALE: f32 = (1 << COEF_BITS) as f32;

/// The most pixels a detector's input may have after `resize_image` (a 512 short side with a
/// 16:1 aspect ratio): the short side is scaled up, so a thin strip of an image would otherwise
/// ask for gigabytes of activations.
pub const MAX_DETECT_PIXELS: u64 = 2048 * 2048;

/// The size `controlnet_aux.util.resize_image` gives an image of `width` x `height` for
/// `resolution`: the short side scaled to `resolution`, each side rounded (half to even, as
/// numpy rounds) to a multiple of 64. Sizes of 0 or above [`MAX_DETECT_PIXELS`] are refused.
pub fn resize_image_size(width: u32, height: u32, resolution: u32) -> Result<(u32, u32)> {
    let k = f64::from(resolution) / f64::from(width.min(height).max(1));
    let round64 = |side: u32| ((f64::from(side) * k / 64.0).round_ties_even() * 64.0) as u64;
    let (w, h) = (round64(width), round64(height));
    if w == 0 || h == 0 || w * h > MAX_DETECT_PIXELS {
        return Err(Error::invalid(format!(
            "a {width}x{height} image becomes {w}x{h} at detect resolution {resolution}; the \
             detector takes 64x64 up to {MAX_DETECT_PIXELS} pixels (an aspect ratio up to 16:1 \
             at resolution 512)"
        )));
    }
    Ok((w as u32, h as u32))
}

/// `controlnet_aux.util.resize_image`'s resize of `image` to `width` x `height`: INTER_LANCZOS4
/// when the short side grows, INTER_AREA otherwise.
pub fn resize_to_resolution(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    if image.dimensions() == (width, height) {
        return image.clone();
    }
    let enlarging = width.min(height) > image.width().min(image.height());
    let (sw, sh) = (image.width() as usize, image.height() as usize);
    let (dw, dh) = (width as usize, height as usize);
    let mut out = RgbImage::new(width, height);
    for c in 0..3 {
        let plane: Vec<u8> = image.pixels().map(|p| p[c]).collect();
        let resized = if enlarging {
            resize_fixed_point(
                &plane,
                (sw, sh),
                (dw, dh),
                (lanczos4_taps, lanczos4_taps),
                round_generic,
            )
        } else if dw <= sw && dh <= sh {
            resize_area(&plane, sw, sh, dw, dh)
        } else {
            resize_fixed_point(
                &plane,
                (sw, sh),
                (dw, dh),
                (area_enlarge_taps, area_enlarge_taps),
                round_linear,
            )
        };
        for (p, v) in out.pixels_mut().zip(resized) {
            p[c] = v;
        }
    }
    out
}

/// OpenCV's bilinear resize of a float32 map (`cv2.resize(..., INTER_LINEAR)`), row-major.
pub fn resize_linear_f32(src: &[f32], sw: usize, sh: usize, dw: usize, dh: usize) -> Vec<f32> {
    if (sw, sh) == (dw, dh) {
        return src.to_vec();
    }
    let xs = linear_taps(sw, dw);
    let ys = linear_taps_vertical(sh, dh);
    let rows: Vec<Vec<f32>> = (0..sh)
        .map(|y| {
            let row = &src[y * sw..(y + 1) * sw];
            xs.iter()
                .map(|t| row[t.index[0]] * t.weight[0] + row[t.index[1]] * t.weight[1])
                .collect()
        })
        .collect();
    let mut out = Vec::with_capacity(dw * dh);
    for t in &ys {
        let (r0, r1) = (&rows[t.index[0]], &rows[t.index[1]]);
        out.extend((0..dw).map(|x| r0[x] * t.weight[0] + r1[x] * t.weight[1]));
    }
    out
}

/// OpenCV's bilinear resize of an 8-bit image (`cv2.resize(..., INTER_LINEAR)`): 11-bit
/// fixed-point coefficients; an exact halving takes OpenCV's INTER_AREA shortcut.
pub fn resize_linear_u8(image: &GrayImage, width: u32, height: u32) -> GrayImage {
    let (sw, sh) = (image.width() as usize, image.height() as usize);
    let (dw, dh) = (width as usize, height as usize);
    let out = if (sw, sh) == (dw, dh) {
        image.as_raw().clone()
    } else if sw == 2 * dw && sh == 2 * dh {
        resize_area(image.as_raw(), sw, sh, dw, dh)
    } else {
        resize_fixed_point(
            image.as_raw(),
            (sw, sh),
            (dw, dh),
            (linear_taps, linear_taps_vertical),
            round_linear,
        )
    };
    GrayImage::from_raw(width, height, out)
        .expect("resized plane has the asked size; this is a bug")
}

/// The source pixels and weights of one output pixel along one axis.
struct Taps {
    index: Vec<usize>,
    weight: Vec<f32>,
}

/// Bilinear taps across: two source pixels, the coordinate clamped at the borders as OpenCV
/// clamps it horizontally.
fn linear_taps(src: usize, dst: usize) -> Vec<Taps> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|d| {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let mut s = f.floor() as i64;
            let mut frac = f - s as f32;
            if s < 0 {
                s = 0;
                frac = 0.0;
            }
            if s >= src as i64 - 1 {
                s = src as i64 - 1;
                frac = 0.0;
            }
            let s = s as usize;
            Taps {
                index: vec![s, (s + 1).min(src - 1)],
                weight: vec![1.0 - frac, frac],
            }
        })
        .collect()
}

/// Bilinear taps down the image: OpenCV keeps the fraction at the borders and replicates the
/// edge row instead (the same value in exact arithmetic, not in its fixed point).
fn linear_taps_vertical(src: usize, dst: usize) -> Vec<Taps> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|d| {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let s = f.floor() as i64;
            let frac = f - s as f32;
            let clamp = |i: i64| i.clamp(0, src as i64 - 1) as usize;
            Taps {
                index: vec![clamp(s), clamp(s + 1)],
                weight: vec![1.0 - frac, frac],
            }
        })
        .collect()
}

/// INTER_AREA's taps when enlarging: bilinear with OpenCV's area-specific fraction.
fn area_enlarge_taps(src: usize, dst: usize) -> Vec<Taps> {
    let scale = src as f64 / dst as f64;
    let inv = dst as f64 / src as f64;
    (0..dst)
        .map(|d| {
            let s = (d as f64 * scale).floor() as i64;
            let f = ((d + 1) as f64 - (s + 1) as f64 * inv) as f32;
            let frac = if f <= 0.0 { 0.0 } else { f - f.floor() };
            let clamp = |i: i64| i.clamp(0, src as i64 - 1) as usize;
            Taps {
                index: vec![clamp(s), clamp(s + 1)],
                weight: vec![1.0 - frac, frac],
            }
        })
        .collect()
}

/// INTER_LANCZOS4's eight taps (`sinc(t) sinc(t / 4)`, normalised), the border replicated.
fn lanczos4_taps(src: usize, dst: usize) -> Vec<Taps> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|d| {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let s = f.floor() as i64;
            let x = f - s as f32;
            let mut weight = lanczos4_coefficients(x);
            let sum: f32 = weight.iter().sum();
            weight.iter_mut().for_each(|w| *w *= 1.0 / sum);
            let index = (0..8)
                .map(|i| (s - 3 + i).clamp(0, src as i64 - 1) as usize)
                .collect();
            Taps { index, weight }
        })
        .collect()
}

/// OpenCV's `interpolateLanczos4` before normalisation, for the fraction `x`.
fn lanczos4_coefficients(x: f32) -> Vec<f32> {
    use std::f64::consts::{FRAC_1_SQRT_2 as S45, PI};
    const CS: [[f64; 2]; 8] = [
        [1.0, 0.0],
        [-S45, -S45],
        [0.0, 1.0],
        [S45, -S45],
        [-1.0, 0.0],
        [S45, S45],
        [0.0, -1.0],
        [-S45, S45],
    ];
    let y0 = -f64::from(x + 3.0) * PI * 0.25;
    let (s0, c0) = (y0.sin(), y0.cos());
    (0..8)
        .map(|i| {
            let t = x + 3.0 - i as f32;
            if t.abs() >= 1e-6 {
                let y = -f64::from(t) * PI * 0.25;
                ((CS[i][0] * s0 + CS[i][1] * c0) / (y * y)) as f32
            } else {
                1e30
            }
        })
        .collect()
}

/// Taps of one axis for a source and a destination length.
type TapsFn = fn(usize, usize) -> Vec<Taps>;

/// OpenCV's 8-bit separable resize: coefficients in 11-bit fixed point, a horizontal pass into
/// integers, then a vertical pass rounded by `round`.
fn resize_fixed_point(
    src: &[u8],
    (sw, sh): (usize, usize),
    (dw, dh): (usize, usize),
    (x_taps, y_taps): (TapsFn, TapsFn),
    round: fn(&[i32], &[i32]) -> u8,
) -> Vec<u8> {
    let fixed = |t: Vec<Taps>| -> Vec<(Vec<usize>, Vec<i32>)> {
        t.into_iter()
            .map(|t| {
                let w = t
                    .weight
                    .iter()
                    .map(|w| (w * COEF_SCALE).round_ties_even() as i32)
                    .collect();
                (t.index, w)
            })
            .collect()
    };
    let xs = fixed(x_taps(sw, dw));
    let ys = fixed(y_taps(sh, dh));
    let rows: Vec<Vec<i32>> = (0..sh)
        .map(|y| {
            let row = &src[y * sw..(y + 1) * sw];
            xs.iter()
                .map(|(idx, w)| {
                    idx.iter()
                        .zip(w)
                        .map(|(&i, &c)| i32::from(row[i]) * c)
                        .sum()
                })
                .collect()
        })
        .collect();
    let mut out = Vec::with_capacity(dw * dh);
    let mut column = Vec::new();
    for (idx, w) in &ys {
        let taps: Vec<&Vec<i32>> = idx.iter().map(|&i| &rows[i]).collect();
        out.extend((0..dw).map(|x| {
            column.clear();
            column.extend(taps.iter().map(|row| row[x]));
            round(&column, w)
        }));
    }
    out
}

/// The vertical pass of OpenCV's bilinear 8-bit resize (its SSE2 form, which rounds each
/// product's top bits separately).
fn round_linear(values: &[i32], weights: &[i32]) -> u8 {
    let part = |v: i32, w: i32| (w * (v >> 4)) >> 16;
    let sum = part(values[0], weights[0]) + part(values[1], weights[1]);
    ((sum + 2) >> 2).clamp(0, 255) as u8
}

/// The vertical pass of OpenCV's generic 8-bit resize: 22 fraction bits, rounded.
fn round_generic(values: &[i32], weights: &[i32]) -> u8 {
    let sum: i64 = values
        .iter()
        .zip(weights)
        .map(|(&v, &w)| i64::from(v) * i64::from(w))
        .sum();
    ((sum + (1 << (2 * COEF_BITS - 1))) >> (2 * COEF_BITS)).clamp(0, 255) as u8
}

/// OpenCV's INTER_AREA shrink: each output pixel the area-weighted mean of the source pixels it
/// covers (integer factors average whole blocks and round half up).
fn resize_area(src: &[u8], sw: usize, sh: usize, dw: usize, dh: usize) -> Vec<u8> {
    if sw.is_multiple_of(dw) && sh.is_multiple_of(dh) {
        let (fx, fy) = (sw / dw, sh / dh);
        let area = (fx * fy) as u32;
        let mut out = Vec::with_capacity(dw * dh);
        for y in 0..dh {
            for x in 0..dw {
                let mut sum = 0u32;
                for yy in y * fy..(y + 1) * fy {
                    sum += src[yy * sw + x * fx..yy * sw + (x + 1) * fx]
                        .iter()
                        .map(|&v| u32::from(v))
                        .sum::<u32>();
                }
                out.push(if area == 4 {
                    ((sum + 2) >> 2) as u8
                } else {
                    (sum as f32 * (1.0 / area as f32)).round_ties_even() as u8
                });
            }
        }
        return out;
    }
    let xs = area_taps(sw, dw);
    let ys = area_taps(sh, dh);
    let rows: Vec<Vec<f32>> = (0..sh)
        .map(|y| {
            let row = &src[y * sw..(y + 1) * sw];
            xs.iter()
                .map(|t| {
                    t.index
                        .iter()
                        .zip(&t.weight)
                        .map(|(&i, &w)| f32::from(row[i]) * w)
                        .sum()
                })
                .collect()
        })
        .collect();
    let mut out = Vec::with_capacity(dw * dh);
    for t in &ys {
        let taps: Vec<(&Vec<f32>, f32)> = t
            .index
            .iter()
            .map(|&i| &rows[i])
            .zip(t.weight.iter().copied())
            .collect();
        out.extend((0..dw).map(|x| {
            let v: f32 = taps.iter().map(|(row, w)| row[x] * w).sum();
            v.round_ties_even().clamp(0.0, 255.0) as u8
        }));
    }
    out
}

/// INTER_AREA's shrink taps along one axis (`computeResizeAreaTab`).
fn area_taps(src: usize, dst: usize) -> Vec<Taps> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|d| {
            let f1 = d as f64 * scale;
            let f2 = f1 + scale;
            let cell = scale.min(src as f64 - f1);
            let s2 = (f2.floor() as usize).min(src - 1);
            let s1 = (f1.ceil() as usize).min(s2);
            let mut t = Taps {
                index: Vec::new(),
                weight: Vec::new(),
            };
            if s1 as f64 - f1 > 1e-3 {
                t.index.push(s1 - 1);
                t.weight.push(((s1 as f64 - f1) / cell) as f32);
            }
            for s in s1..s2 {
                t.index.push(s);
                t.weight.push((1.0 / cell) as f32);
            }
            if f2 - s2 as f64 > 1e-3 {
                t.index.push(s2);
                t.weight
                    .push(((f2 - s2 as f64).min(1.0).min(cell) / cell) as f32);
            }
            t
        })
        .collect()
}

/// BORDER_REFLECT_101: `-1` maps to `1`, `len` to `len - 2`.
fn reflect101(i: i64, len: usize) -> usize {
    let n = len as i64;
    if n == 1 {
        return 0;
    }
    let mut i = i;
    while i < 0 || i >= n {
        i = if i < 0 { -i } else { 2 * n - 2 - i };
    }
    i as usize
}

/// `cv2.GaussianBlur(x, (0, 0), sigma)` of a float32 map: a `round(8 sigma + 1) | 1`-tap kernel.
pub fn gaussian_blur_f32(src: &[f32], w: usize, h: usize, sigma: f64) -> Vec<f32> {
    let size = ((sigma * 8.0 + 1.0).round() as usize) | 1;
    let half = (size / 2) as i64;
    let raw: Vec<f64> = (0..size as i64)
        .map(|i| {
            let x = (i - half) as f64;
            (-(x * x) / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let total: f64 = raw.iter().sum();
    let kernel: Vec<f32> = raw.iter().map(|k| (k / total) as f32).collect();
    let mut rows = vec![0f32; w * h];
    for y in 0..h {
        for x in 0..w {
            rows[y * w + x] = kernel
                .iter()
                .enumerate()
                .map(|(k, &c)| src[y * w + reflect101(x as i64 + k as i64 - half, w)] * c)
                .sum();
        }
    }
    let mut out = vec![0f32; w * h];
    for y in 0..h {
        for x in 0..w {
            out[y * w + x] = kernel
                .iter()
                .enumerate()
                .map(|(k, &c)| rows[reflect101(y as i64 + k as i64 - half, h) * w + x] * c)
                .sum();
        }
    }
    out
}

/// OpenCV 4's bit-exact 8-bit Gaussian kernel for sigma 3 (19 taps in 8 fraction bits: the
/// sampled Gaussian rounded so that the taps sum to exactly 256), as `cv2.GaussianBlur` uses it
/// on `uint8` images.
const GAUSSIAN_U8_SIGMA3: [i64; 19] = [
    0, 1, 3, 4, 9, 14, 20, 28, 32, 34, 32, 28, 20, 14, 9, 4, 3, 1, 0,
];

/// `cv2.GaussianBlur(x, (0, 0), 3.0)` of an 8-bit image, in OpenCV's exact fixed point.
pub fn gaussian_blur_u8_sigma3(image: &GrayImage) -> GrayImage {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let src = image.as_raw();
    let half = (GAUSSIAN_U8_SIGMA3.len() / 2) as i64;
    let mut rows = vec![0i64; w * h];
    for y in 0..h {
        for x in 0..w {
            rows[y * w + x] = GAUSSIAN_U8_SIGMA3
                .iter()
                .enumerate()
                .map(|(k, &c)| {
                    i64::from(src[y * w + reflect101(x as i64 + k as i64 - half, w)]) * c
                })
                .sum();
        }
    }
    let out = (0..h)
        .flat_map(|y| (0..w).map(move |x| (y, x)))
        .map(|(y, x)| {
            let v: i64 = GAUSSIAN_U8_SIGMA3
                .iter()
                .enumerate()
                .map(|(k, &c)| rows[reflect101(y as i64 + k as i64 - half, h) * w + x] * c)
                .sum();
            ((v + (1 << 15)) >> 16).clamp(0, 255) as u8
        })
        .collect();
    GrayImage::from_raw(w as u32, h as u32, out)
        .expect("blurred plane has the image's size; this is a bug")
}

/// `controlnet_aux.util.nms(x, t, s)`: blur with sigma `s`, keep the pixels that are a maximum
/// of their 3-pixel line in any of four directions, and set those above `t` to 255, the rest 0.
pub fn nms(image: &GrayImage, threshold: f32, sigma: f64) -> GrayImage {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let src: Vec<f32> = image.as_raw().iter().map(|&v| f32::from(v)).collect();
    let x = gaussian_blur_f32(&src, w, h, sigma);
    // Horizontal, vertical, the main and the anti-diagonal; pixels outside do not count.
    const DIRECTIONS: [[(i64, i64); 2]; 4] = [
        [(-1, 0), (1, 0)],
        [(0, -1), (0, 1)],
        [(-1, -1), (1, 1)],
        [(1, -1), (-1, 1)],
    ];
    let at = |cx: i64, cy: i64| -> Option<f32> {
        (cx >= 0 && cy >= 0 && (cx as usize) < w && (cy as usize) < h)
            .then(|| x[cy as usize * w + cx as usize])
    };
    let out = (0..h)
        .flat_map(|y| (0..w).map(move |xx| (y, xx)))
        .map(|(y, xx)| {
            let v = x[y * w + xx];
            let peak = DIRECTIONS.iter().any(|dir| {
                dir.iter()
                    .all(|&(dx, dy)| at(xx as i64 + dx, y as i64 + dy).is_none_or(|n| n <= v))
            });
            if peak && v > threshold {
                255
            } else {
                0
            }
        })
        .collect();
    GrayImage::from_raw(w as u32, h as u32, out)
        .expect("nms plane has the image's size; this is a bug")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_image_rounds_like_controlnet_aux() {
        // 1.5 rounds to 2 and 2.5 to 2, as numpy rounds halves to even.
        assert_eq!(resize_image_size(192, 128, 64).unwrap(), (128, 64));
        assert_eq!(resize_image_size(96, 64, 64).unwrap(), (128, 64));
        assert_eq!(resize_image_size(160, 64, 64).unwrap(), (128, 64));
        assert_eq!(resize_image_size(80, 60, 512).unwrap(), (704, 512));
        // A thin strip would need 512 x 32768 pixels.
        let err = resize_image_size(4096, 64, 512).unwrap_err().to_string();
        assert!(err.contains("16:1"), "{err}");
        assert!(resize_image_size(10, 10, 16).is_err());
    }
}
