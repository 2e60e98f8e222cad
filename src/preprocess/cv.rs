//! The OpenCV operations `controlnet_aux`'s annotators wrap around their networks besides
//! resizing (which is [`super::resize`]), computed the way OpenCV 4 computes them so control
//! images match the reference's: Gaussian blurs (float and 8-bit) and the annotators' `nms`.
//! Blurs reflect the border without repeating the edge pixel (BORDER_DEFAULT).

use image::GrayImage;

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
