//! The Canny edge detector (Canny 1986, "A Computational Approach to Edge Detection") as OpenCV's
//! `cv2.Canny(gray, low, high)` computes it with its defaults, so that edge maps made here match
//! the ones ControlNet users make with OpenCV:
//!
//! 1. 3x3 Sobel derivatives in integers, the border replicated;
//! 2. the L1 magnitude `|dx| + |dy|` (OpenCV's default, `L2gradient=false`);
//! 3. non-maximum suppression along the gradient direction quantised to 0, 45, 90 or 135 degrees
//!    with OpenCV's fixed-point tangent test (tan 22.5 degrees as 13573 / 2^15), comparing
//!    against zero outside the image, with OpenCV's asymmetric ties (`>` on one side, `>=` on the
//!    other for the axis directions);
//! 4. hysteresis: pixels above `high` are edges, pixels above `low` that survived suppression
//!    become edges when 8-connected to one.
//!
//! The grayscale conversion is OpenCV 4's `COLOR_RGB2GRAY` in fixed point (BT.601 weights
//! 9798, 19235, 3735 / 2^15, rounded; the 2^14 weights of older releases differ on a few
//! pixels in a thousand).

use image::{GrayImage, RgbImage};

use crate::{Error, Result};

/// The thresholds ControlNet's canny annotator uses by default.
pub const DEFAULT_LOW: f64 = 100.0;
pub const DEFAULT_HIGH: f64 = 200.0;

/// OpenCV's `cvtColor(COLOR_RGB2GRAY)` for 8-bit images (OpenCV 4's 15-bit fixed point).
pub fn rgb_to_gray(image: &RgbImage) -> GrayImage {
    const SHIFT: u32 = 15;
    let (r, g, b) = (9798u32, 19235u32, 3735u32);
    GrayImage::from_fn(image.width(), image.height(), |x, y| {
        let p = image.get_pixel(x, y).0;
        let v = (p[0] as u32 * r + p[1] as u32 * g + p[2] as u32 * b + (1 << (SHIFT - 1))) >> SHIFT;
        image::Luma([v as u8])
    })
}

/// Edge map (255 on edges, 0 elsewhere) of `gray` with hysteresis thresholds `low` and `high`
/// (swapped when given the other way round, as OpenCV does).
pub fn canny(gray: &GrayImage, low: f64, high: f64) -> Result<GrayImage> {
    if !low.is_finite() || !high.is_finite() || low < 0.0 || high < 0.0 {
        return Err(Error::invalid(format!(
            "canny thresholds must be finite numbers >= 0. Given: low {low}, high {high}"
        )));
    }
    let (low, high) = if low > high { (high, low) } else { (low, high) };
    // OpenCV compares integer magnitudes with the thresholds' floors.
    let (low, high) = (low.floor() as i32, high.floor() as i32);
    let (w, h) = (gray.width() as usize, gray.height() as usize);
    if w == 0 || h == 0 {
        return Ok(GrayImage::new(gray.width(), gray.height()));
    }
    let px = |x: isize, y: isize| -> i32 {
        let x = x.clamp(0, w as isize - 1) as u32;
        let y = y.clamp(0, h as isize - 1) as u32;
        gray.get_pixel(x, y).0[0] as i32
    };

    // Sobel 3x3 with a replicated border.
    let mut dx = vec![0i32; w * h];
    let mut dy = vec![0i32; w * h];
    for y in 0..h as isize {
        for x in 0..w as isize {
            let i = y as usize * w + x as usize;
            dx[i] = (px(x + 1, y - 1) + 2 * px(x + 1, y) + px(x + 1, y + 1))
                - (px(x - 1, y - 1) + 2 * px(x - 1, y) + px(x - 1, y + 1));
            dy[i] = (px(x - 1, y + 1) + 2 * px(x, y + 1) + px(x + 1, y + 1))
                - (px(x - 1, y - 1) + 2 * px(x, y - 1) + px(x + 1, y - 1));
        }
    }
    // L1 magnitude, with a zero frame around it: suppression compares border pixels with 0.
    let (mw, mh) = (w + 2, h + 2);
    let mut mag = vec![0i32; mw * mh];
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            mag[(y + 1) * mw + x + 1] = dx[i].abs() + dy[i].abs();
        }
    }

    // Non-maximum suppression. 0: candidate (above low, a local maximum), 1: not an edge,
    // 2: edge. The frame is "not an edge", so hysteresis never leaves the image.
    const TG22: i64 = 13573;
    const SHIFT: u32 = 15;
    const CANDIDATE: u8 = 0;
    const NONE: u8 = 1;
    const EDGE: u8 = 2;
    let mut map = vec![NONE; mw * mh];
    let mut stack: Vec<usize> = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let c = (y + 1) * mw + x + 1;
            let m = mag[c];
            if m <= low {
                continue;
            }
            let (xs, ys) = (dx[y * w + x] as i64, dy[y * w + x] as i64);
            let ax = xs.abs();
            let ay = ys.abs() << SHIFT;
            let tg22x = ax * TG22;
            let maximum = if ay < tg22x {
                // Mostly horizontal gradient: compare left and right.
                m > mag[c - 1] && m >= mag[c + 1]
            } else {
                let tg67x = tg22x + (ax << (SHIFT + 1));
                if ay > tg67x {
                    // Mostly vertical: compare above and below.
                    m > mag[c - mw] && m >= mag[c + mw]
                } else {
                    // Diagonal: the neighbours along the gradient's diagonal.
                    let s: isize = if (xs ^ ys) < 0 { -1 } else { 1 };
                    let above = (c as isize - mw as isize - s) as usize;
                    let below = (c as isize + mw as isize + s) as usize;
                    m > mag[above] && m > mag[below]
                }
            };
            if maximum {
                if m > high {
                    map[c] = EDGE;
                    stack.push(c);
                } else {
                    map[c] = CANDIDATE;
                }
            }
        }
    }

    // Hysteresis: grow edges into 8-connected candidates.
    let neighbours = [
        -(mw as isize) - 1,
        -(mw as isize),
        -(mw as isize) + 1,
        -1,
        1,
        mw as isize - 1,
        mw as isize,
        mw as isize + 1,
    ];
    while let Some(c) = stack.pop() {
        for d in neighbours {
            let n = (c as isize + d) as usize;
            if map[n] == CANDIDATE {
                map[n] = EDGE;
                stack.push(n);
            }
        }
    }

    Ok(GrayImage::from_fn(w as u32, h as u32, |x, y| {
        let c = (y as usize + 1) * mw + x as usize + 1;
        image::Luma([if map[c] == EDGE { 255 } else { 0 }])
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_gives_one_line() {
        // A vertical step from 0 to 200: columns 7 and 8 have the same magnitude, and the
        // `>` (left) / `>=` (right) pair keeps exactly one of them, the left.
        let gray = GrayImage::from_fn(16, 8, |x, _| image::Luma([if x < 8 { 0 } else { 200 }]));
        let edges = canny(&gray, DEFAULT_LOW, DEFAULT_HIGH).unwrap();
        for y in 0..8 {
            let row: Vec<u32> = (0..16)
                .filter(|&x| edges.get_pixel(x, y).0[0] == 255)
                .collect();
            assert_eq!(row, vec![7], "row {y}");
        }
    }

    #[test]
    fn flat_images_have_no_edges_and_bad_thresholds_are_refused() {
        let gray = GrayImage::from_pixel(9, 7, image::Luma([77]));
        let edges = canny(&gray, 1.0, 2.0).unwrap();
        assert!(edges.pixels().all(|p| p.0[0] == 0));
        assert!(canny(&gray, f64::NAN, 2.0).is_err());
        assert!(canny(&gray, -1.0, 2.0).is_err());
    }

    #[test]
    fn gray_uses_opencv_weights() {
        let rgb = RgbImage::from_fn(3, 1, |x, _| match x {
            0 => image::Rgb([255, 0, 0]),
            1 => image::Rgb([0, 255, 0]),
            _ => image::Rgb([0, 0, 255]),
        });
        let gray = rgb_to_gray(&rgb);
        // (255 * w + 2^14) >> 15 for w = 9798, 19235, 3735.
        assert_eq!(gray.as_raw(), &vec![76, 150, 29]);
    }
}
