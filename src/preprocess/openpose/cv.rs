//! The OpenCV 4 routines the OpenPose reference calls, reimplemented with OpenCV's own
//! arithmetic so the control image matches the reference pixel for pixel: `cv2.resize` with
//! `INTER_LANCZOS4` and `INTER_AREA` (fixed-point for 8-bit images, float for heatmaps), and the
//! 8-connected rasteriser behind `cv2.ellipse2Poly`, `cv2.fillConvexPoly` and filled `cv2.circle`.

/// OpenCV's `INTER_RESIZE_COEF_BITS`: 8-bit resizes use 11-bit fixed-point coefficients.
const COEF_BITS: u32 = 11;
const COEF_SCALE: f32 = (1 << COEF_BITS) as f32;

/// An interpolation of `cv2.resize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Interpolation {
    /// `INTER_AREA`: pixel-area averaging when shrinking (a bilinear variant when enlarging).
    Area,
    /// `INTER_LANCZOS4`: an 8x8 Lanczos window.
    Lanczos4,
}

/// `cvRound` on a float: round half to even, as the hardware conversion does.
fn round_f32(v: f32) -> i32 {
    v.round_ties_even() as i32
}

fn saturate_u8(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}

fn saturate_i16(v: f32) -> i16 {
    round_f32(v).clamp(i16::MIN as i32, i16::MAX as i32) as i16
}

/// OpenCV's `interpolateLanczos4`: the 8 normalised window weights for fractional offset `x`.
fn lanczos4_weights(x: f32) -> [f32; 8] {
    const S45: f64 = std::f64::consts::FRAC_1_SQRT_2;
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
    let mut coeffs = [0f32; 8];
    let mut sum = 0f32;
    let y0 = -((x + 3.0) as f64) * std::f64::consts::PI * 0.25;
    let (s0, c0) = (y0.sin(), y0.cos());
    for (i, c) in coeffs.iter_mut().enumerate() {
        let y0_ = x + 3.0 - i as f32;
        *c = if y0_.abs() >= 1e-6 {
            let y = -(y0_ as f64) * std::f64::consts::PI * 0.25;
            ((CS[i][0] * s0 + CS[i][1] * c0) / (y * y)) as f32
        } else {
            1e30
        };
        sum += *c;
    }
    let inv = 1.0 / sum;
    for c in coeffs.iter_mut() {
        *c *= inv;
    }
    coeffs
}

/// The sample type of a resize: 8-bit with fixed-point weights, or f32.
trait Sample: Copy + Default {
    fn to_work(self) -> f64;
}

impl Sample for u8 {
    fn to_work(self) -> f64 {
        self as f64
    }
}

impl Sample for f32 {
    fn to_work(self) -> f64 {
        self as f64
    }
}

/// Per-output-position source offset and weights of one axis (OpenCV's `xofs`/`alpha`).
struct AxisTable {
    /// First source index of each output position (before the window's `- (ksize/2 - 1)`).
    offset: Vec<i64>,
    weights: Vec<[f32; 8]>,
    /// Outputs in `[min, max)` have their whole window inside the source.
    min: usize,
    max: usize,
}

fn axis_table(
    src: usize,
    dst: usize,
    scale: f64,
    inv_scale: f64,
    interp: Interpolation,
) -> AxisTable {
    let ksize = match interp {
        Interpolation::Lanczos4 => 8i64,
        Interpolation::Area => 2,
    };
    let half = ksize / 2;
    let (mut min, mut max) = (0usize, dst);
    let mut offset = Vec::with_capacity(dst);
    let mut weights = Vec::with_capacity(dst);
    for d in 0..dst {
        let (mut s, mut f);
        if interp == Interpolation::Area {
            s = (d as f64 * scale).floor() as i64;
            f = ((d + 1) as f64 - (s + 1) as f64 * inv_scale) as f32;
            f = if f <= 0.0 { 0.0 } else { f - f.floor() };
        } else {
            f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            s = f.floor() as i64;
            f -= s as f32;
        }
        if s < half - 1 {
            min = d + 1;
            if s < 0 && interp == Interpolation::Area {
                f = 0.0;
                s = 0;
            }
        }
        if s + half >= src as i64 {
            max = max.min(d);
            if s >= src as i64 - 1 && interp == Interpolation::Area {
                f = 0.0;
                s = src as i64 - 1;
            }
        }
        let mut w = [0f32; 8];
        match interp {
            Interpolation::Lanczos4 => w = lanczos4_weights(f),
            Interpolation::Area => {
                w[0] = 1.0 - f;
                w[1] = f;
            }
        }
        offset.push(s);
        weights.push(w);
    }
    AxisTable {
        offset,
        weights,
        min,
        max,
    }
}

/// `cv2.resize(src, (dst_w, dst_h), interpolation)` of an interleaved `cn`-channel image.
fn resize<T: Sample + ResizeOut>(
    src: &[T],
    (sw, sh): (usize, usize),
    cn: usize,
    (dw, dh): (usize, usize),
    interp: Interpolation,
) -> Vec<T> {
    debug_assert_eq!(src.len(), sw * sh * cn);
    if (sw, sh) == (dw, dh) {
        return src.to_vec();
    }
    let inv_x = dw as f64 / sw as f64;
    let inv_y = dh as f64 / sh as f64;
    let (scale_x, scale_y) = (1.0 / inv_x, 1.0 / inv_y);
    if interp == Interpolation::Area && scale_x >= 1.0 && scale_y >= 1.0 {
        let (ix, iy) = (scale_x.round_ties_even(), scale_y.round_ties_even());
        if (scale_x - ix).abs() < f64::EPSILON && (scale_y - iy).abs() < f64::EPSILON {
            return T::area_fast(src, (sw, sh), cn, (dw, dh), (ix as usize, iy as usize));
        }
        return area(src, (sw, sh), cn, (dw, dh), (scale_x, scale_y));
    }
    let xt = axis_table(sw, dw, scale_x, inv_x, interp);
    let yt = axis_table(sh, dh, scale_y, inv_y, interp);
    let ksize = if interp == Interpolation::Lanczos4 {
        8
    } else {
        2
    };
    let half = ksize as i64 / 2;
    // Horizontal pass on every source row (OpenCV computes rows lazily; the values are the same).
    let mut rows = vec![0f64; sh * dw * cn];
    for y in 0..sh {
        let srow = &src[y * sw * cn..(y + 1) * sw * cn];
        let drow = &mut rows[y * dw * cn..(y + 1) * dw * cn];
        for dx in 0..dw {
            let w = &xt.weights[dx];
            let s0 = xt.offset[dx];
            let inside = dx >= xt.min && dx < xt.max;
            for c in 0..cn {
                drow[dx * cn + c] = if ksize == 2 && !inside && dx >= xt.max {
                    // Right border of the bilinear pass: the edge pixel times one.
                    T::h_one(srow[s0 as usize * cn + c])
                } else {
                    let taps = (0..ksize).map(|k| {
                        let sx = (s0 - (half - 1) + k as i64).clamp(0, sw as i64 - 1) as usize;
                        (srow[sx * cn + c], w[k])
                    });
                    T::h_sum(taps)
                };
            }
        }
    }
    let mut out = vec![T::default(); dw * dh * cn];
    for dy in 0..dh {
        let w = &yt.weights[dy];
        let s0 = yt.offset[dy];
        let rows_k: Vec<&[f64]> = (0..ksize)
            .map(|k| {
                let sy = (s0 - (half - 1) + k as i64).clamp(0, sh as i64 - 1) as usize;
                &rows[sy * dw * cn..(sy + 1) * dw * cn]
            })
            .collect();
        let orow = &mut out[dy * dw * cn..(dy + 1) * dw * cn];
        for (x, o) in orow.iter_mut().enumerate() {
            *o = T::v_sum(rows_k.iter().zip(w.iter()).map(|(r, b)| (r[x], *b)), ksize);
        }
    }
    out
}

/// The type-specific arithmetic of the separable passes (OpenCV's `HResize*`/`VResize*` with
/// `int`/`short` fixed point for 8-bit images and plain float otherwise). Intermediate values
/// travel as f64 holding the exact int or f32 value.
trait ResizeOut: Sized {
    fn h_sum(taps: impl Iterator<Item = (Self, f32)>) -> f64;
    fn h_one(v: Self) -> f64;
    fn v_sum(taps: impl Iterator<Item = (f64, f32)>, ksize: usize) -> Self;
    fn area_fast(
        src: &[Self],
        size: (usize, usize),
        cn: usize,
        dst: (usize, usize),
        scale: (usize, usize),
    ) -> Vec<Self>;
    fn from_f32(v: f32) -> Self;
}

impl ResizeOut for u8 {
    fn h_sum(taps: impl Iterator<Item = (u8, f32)>) -> f64 {
        taps.map(|(s, a)| s as i64 * saturate_i16(a * COEF_SCALE) as i64)
            .sum::<i64>() as f64
    }
    fn h_one(v: u8) -> f64 {
        (v as i64 * (1 << COEF_BITS)) as f64
    }
    fn v_sum(taps: impl Iterator<Item = (f64, f32)>, ksize: usize) -> u8 {
        let taps: Vec<(i64, i64)> = taps
            .map(|(s, b)| (s as i64, saturate_i16(b * COEF_SCALE) as i64))
            .collect();
        if ksize == 2 {
            // VResizeLinear<uchar>: each product pre-shifted to 16 bits, then rounded by 2 bits.
            let v =
                ((taps[0].1 * (taps[0].0 >> 4)) >> 16) + ((taps[1].1 * (taps[1].0 >> 4)) >> 16) + 2;
            saturate_u8((v >> 2) as i32)
        } else {
            let v: i64 = taps.iter().map(|(s, b)| s * b).sum();
            saturate_u8(((v + (1 << (2 * COEF_BITS - 1))) >> (2 * COEF_BITS)) as i32)
        }
    }
    fn area_fast(
        src: &[u8],
        (sw, _sh): (usize, usize),
        cn: usize,
        (dw, dh): (usize, usize),
        (fx, fy): (usize, usize),
    ) -> Vec<u8> {
        let mut out = vec![0u8; dw * dh * cn];
        let scale = 1.0f32 / (fx * fy) as f32;
        for dy in 0..dh {
            for dx in 0..dw {
                for c in 0..cn {
                    let mut sum = 0i32;
                    for sy in 0..fy {
                        for sx in 0..fx {
                            sum += src[((dy * fy + sy) * sw + dx * fx + sx) * cn + c] as i32;
                        }
                    }
                    out[(dy * dw + dx) * cn + c] = if fx == 2 && fy == 2 {
                        ((sum + 2) >> 2) as u8
                    } else {
                        saturate_u8(round_f32(sum as f32 * scale))
                    };
                }
            }
        }
        out
    }
    fn from_f32(v: f32) -> u8 {
        saturate_u8(round_f32(v))
    }
}

impl ResizeOut for f32 {
    fn h_sum(taps: impl Iterator<Item = (f32, f32)>) -> f64 {
        let mut v = 0f32;
        for (s, a) in taps {
            v += s * a;
        }
        v as f64
    }
    fn h_one(v: f32) -> f64 {
        v as f64
    }
    fn v_sum(taps: impl Iterator<Item = (f64, f32)>, _ksize: usize) -> f32 {
        let mut first = true;
        let mut v = 0f32;
        for (s, b) in taps {
            let p = s as f32 * b;
            v = if first { p } else { v + p };
            first = false;
        }
        v
    }
    fn area_fast(
        src: &[f32],
        (sw, _sh): (usize, usize),
        cn: usize,
        (dw, dh): (usize, usize),
        (fx, fy): (usize, usize),
    ) -> Vec<f32> {
        let mut out = vec![0f32; dw * dh * cn];
        let scale = 1.0f32 / (fx * fy) as f32;
        for dy in 0..dh {
            for dx in 0..dw {
                for c in 0..cn {
                    let mut sum = 0f32;
                    for sy in 0..fy {
                        for sx in 0..fx {
                            sum += src[((dy * fy + sy) * sw + dx * fx + sx) * cn + c];
                        }
                    }
                    out[(dy * dw + dx) * cn + c] = sum * scale;
                }
            }
        }
        out
    }
    fn from_f32(v: f32) -> f32 {
        v
    }
}

/// One entry of OpenCV's `computeResizeAreaTab`: source `si` adds `alpha` times itself to
/// destination `di`.
struct Decimate {
    si: usize,
    di: usize,
    alpha: f32,
}

fn area_table(src: usize, dst: usize, scale: f64) -> Vec<Decimate> {
    let mut tab = Vec::new();
    for dx in 0..dst {
        let fsx1 = dx as f64 * scale;
        let fsx2 = fsx1 + scale;
        let cell = scale.min(src as f64 - fsx1);
        let mut sx2 = fsx2.floor() as i64;
        sx2 = sx2.min(src as i64 - 1);
        let sx1 = (fsx1.ceil() as i64).min(sx2);
        if sx1 as f64 - fsx1 > 1e-3 {
            tab.push(Decimate {
                si: (sx1 - 1) as usize,
                di: dx,
                alpha: ((sx1 as f64 - fsx1) / cell) as f32,
            });
        }
        for sx in sx1..sx2 {
            tab.push(Decimate {
                si: sx as usize,
                di: dx,
                alpha: (1.0 / cell) as f32,
            });
        }
        if fsx2 - sx2 as f64 > 1e-3 {
            tab.push(Decimate {
                si: sx2 as usize,
                di: dx,
                alpha: ((fsx2 - sx2 as f64).min(1.0).min(cell) / cell) as f32,
            });
        }
    }
    tab
}

/// `INTER_AREA` shrinking by a non-integer factor (OpenCV's `resizeArea_` with float sums).
fn area<T: Sample + ResizeOut>(
    src: &[T],
    (sw, sh): (usize, usize),
    cn: usize,
    (dw, dh): (usize, usize),
    (scale_x, scale_y): (f64, f64),
) -> Vec<T> {
    let xtab = area_table(sw, dw, scale_x);
    let ytab = area_table(sh, dh, scale_y);
    let width = dw * cn;
    let mut out = vec![T::default(); dh * width];
    let mut buf = vec![0f32; width];
    let mut sum = vec![0f32; width];
    let mut prev_dy = ytab.first().map_or(0, |e| e.di);
    for e in &ytab {
        let row = &src[e.si * sw * cn..(e.si + 1) * sw * cn];
        buf.iter_mut().for_each(|b| *b = 0.0);
        for x in &xtab {
            for c in 0..cn {
                buf[x.di * cn + c] += row[x.si * cn + c].to_work() as f32 * x.alpha;
            }
        }
        if e.di != prev_dy {
            let orow = &mut out[prev_dy * width..(prev_dy + 1) * width];
            for ((o, s), b) in orow.iter_mut().zip(sum.iter_mut()).zip(&buf) {
                *o = T::from_f32(*s);
                *s = e.alpha * b;
            }
            prev_dy = e.di;
        } else {
            for (s, b) in sum.iter_mut().zip(&buf) {
                *s += e.alpha * b;
            }
        }
    }
    let orow = &mut out[prev_dy * width..(prev_dy + 1) * width];
    for (o, s) in orow.iter_mut().zip(&sum) {
        *o = T::from_f32(*s);
    }
    out
}

/// `cv2.resize` of an interleaved 8-bit image with `cn` channels.
pub(crate) fn resize_u8(
    src: &[u8],
    size: (usize, usize),
    cn: usize,
    dst: (usize, usize),
    interp: Interpolation,
) -> Vec<u8> {
    resize(src, size, cn, dst, interp)
}

/// `cv2.resize` of a single-channel float32 map.
pub(crate) fn resize_f32(
    src: &[f32],
    size: (usize, usize),
    dst: (usize, usize),
    interp: Interpolation,
) -> Vec<f32> {
    if interp == Interpolation::Lanczos4 && size != dst {
        lanczos_f32(src, size, dst)
    } else {
        resize(src, size, 1, dst, interp)
    }
}

/// The 8 clamped source indices and weights of each output position of a Lanczos axis.
fn lanczos_taps(src: usize, dst: usize) -> (Vec<usize>, Vec<f32>) {
    let inv = dst as f64 / src as f64;
    let table = axis_table(src, dst, 1.0 / inv, inv, Interpolation::Lanczos4);
    let mut idx = Vec::with_capacity(dst * 8);
    let mut w = Vec::with_capacity(dst * 8);
    for (s0, weights) in table.offset.iter().zip(&table.weights) {
        for (k, wk) in weights.iter().enumerate() {
            idx.push((s0 - 3 + k as i64).clamp(0, src as i64 - 1) as usize);
            w.push(*wk);
        }
    }
    (idx, w)
}

/// `INTER_LANCZOS4` on a float map: the same sums as [`resize`] (horizontal taps in order, then
/// vertical taps in order, in f32), written out for speed; the heatmaps go through it 56 times
/// per image.
fn lanczos_f32(src: &[f32], (sw, sh): (usize, usize), (dw, dh): (usize, usize)) -> Vec<f32> {
    let (xi, xw) = lanczos_taps(sw, dw);
    let (yi, yw) = lanczos_taps(sh, dh);
    let mut rows = vec![0f32; sh * dw];
    for (srow, drow) in src.chunks_exact(sw).zip(rows.chunks_exact_mut(dw)) {
        for (dx, d) in drow.iter_mut().enumerate() {
            let (i, w) = (&xi[dx * 8..dx * 8 + 8], &xw[dx * 8..dx * 8 + 8]);
            let mut v = 0f32;
            for k in 0..8 {
                v += srow[i[k]] * w[k];
            }
            *d = v;
        }
    }
    let mut out = vec![0f32; dh * dw];
    for (dy, orow) in out.chunks_exact_mut(dw).enumerate() {
        let (i, w) = (&yi[dy * 8..dy * 8 + 8], &yw[dy * 8..dy * 8 + 8]);
        let r: [&[f32]; 8] = std::array::from_fn(|k| &rows[i[k] * dw..(i[k] + 1) * dw]);
        for (x, o) in orow.iter_mut().enumerate() {
            let mut v = r[0][x] * w[0];
            for k in 1..8 {
                v += r[k][x] * w[k];
            }
            *o = v;
        }
    }
    out
}

/// An 8-bit RGB canvas the drawing routines write into.
pub(crate) struct Canvas<'a> {
    pub data: &'a mut [u8],
    pub width: i64,
    pub height: i64,
}

impl Canvas<'_> {
    /// OpenCV's `ICV_HLINE`: pixels `x1..=x2` of row `y` (already clipped).
    fn hline(&mut self, y: i64, x1: i64, x2: i64, color: [u8; 3]) {
        for x in x1..=x2 {
            let i = ((y * self.width + x) * 3) as usize;
            self.data[i..i + 3].copy_from_slice(&color);
        }
    }

    fn put(&mut self, x: i64, y: i64, color: [u8; 3]) {
        let i = ((y * self.width + x) * 3) as usize;
        self.data[i..i + 3].copy_from_slice(&color);
    }

    /// OpenCV's `clipLine` (int64 version): false when the segment misses the image.
    fn clip_line(&self, p1: &mut (i64, i64), p2: &mut (i64, i64)) -> bool {
        let (right, bottom) = (self.width - 1, self.height - 1);
        if self.width <= 0 || self.height <= 0 {
            return false;
        }
        let code = |x: i64, y: i64| {
            (x < 0) as i32 + (x > right) as i32 * 2 + (y < 0) as i32 * 4 + (y > bottom) as i32 * 8
        };
        let (mut x1, mut y1, mut x2, mut y2) = (p1.0, p1.1, p2.0, p2.1);
        let mut c1 = code(x1, y1);
        let mut c2 = code(x2, y2);
        if (c1 & c2) == 0 && (c1 | c2) != 0 {
            if c1 & 12 != 0 {
                let a = if c1 < 8 { 0 } else { bottom };
                x1 += (a - y1) * (x2 - x1) / (y2 - y1);
                y1 = a;
                c1 = (x1 < 0) as i32 + (x1 > right) as i32 * 2;
            }
            if c2 & 12 != 0 {
                let a = if c2 < 8 { 0 } else { bottom };
                x2 += (a - y2) * (x2 - x1) / (y2 - y1);
                y2 = a;
                c2 = (x2 < 0) as i32 + (x2 > right) as i32 * 2;
            }
            if (c1 & c2) == 0 && (c1 | c2) != 0 {
                if c1 != 0 {
                    let a = if c1 == 1 { 0 } else { right };
                    y1 += (a - x1) * (y2 - y1) / (x2 - x1);
                    x1 = a;
                    c1 = 0;
                }
                if c2 != 0 {
                    let a = if c2 == 1 { 0 } else { right };
                    y2 += (a - x2) * (y2 - y1) / (x2 - x1);
                    x2 = a;
                    c2 = 0;
                }
            }
        }
        *p1 = (x1, y1);
        *p2 = (x2, y2);
        (c1 | c2) == 0
    }

    /// OpenCV's `Line` with 8-connectivity (a `LineIterator` walked left to right).
    fn line(&mut self, mut p1: (i64, i64), mut p2: (i64, i64), color: [u8; 3]) {
        let outside = |p: (i64, i64)| p.0 < 0 || p.0 >= self.width || p.1 < 0 || p.1 >= self.height;
        if (outside(p1) || outside(p2)) && !self.clip_line(&mut p1, &mut p2) {
            return;
        }
        let mut dx = p2.0 - p1.0;
        let mut dy = p2.1 - p1.1;
        if dx < 0 {
            dx = -dx;
            dy = -dy;
            p1 = p2;
        }
        let (mut major, mut minor) = ((1i64, 0i64), (0i64, 1i64));
        if dy < 0 {
            dy = -dy;
            minor = (0, -1);
        }
        if dy > dx {
            std::mem::swap(&mut dx, &mut dy);
            std::mem::swap(&mut major, &mut minor);
        }
        let mut err = dx - (dy + dy);
        let plus_delta = dx + dx;
        let minus_delta = -(dy + dy);
        let (mut x, mut y) = p1;
        for _ in 0..=dx {
            self.put(x, y, color);
            let step_minor = err < 0;
            err += minus_delta + if step_minor { plus_delta } else { 0 };
            x += major.0 + if step_minor { minor.0 } else { 0 };
            y += major.1 + if step_minor { minor.1 } else { 0 };
        }
    }

    /// `cv2.fillConvexPoly(img, pts, color)` with `LINE_8` and no fractional bits.
    pub(crate) fn fill_convex_poly(&mut self, v: &[(i64, i64)], color: [u8; 3]) {
        const SHIFT: u32 = 16;
        const HALF: i64 = 1 << (SHIFT - 1);
        let npts = v.len();
        if npts == 0 {
            return;
        }
        let (mut xmin, mut xmax, mut ymin, mut ymax) = (v[0].0, v[0].0, v[0].1, v[0].1);
        let mut imin = 0;
        let mut p0 = v[npts - 1];
        for (i, &p) in v.iter().enumerate() {
            if p.1 < ymin {
                ymin = p.1;
                imin = i;
            }
            ymax = ymax.max(p.1);
            xmax = xmax.max(p.0);
            xmin = xmin.min(p.0);
            self.line(p0, p, color);
            p0 = p;
        }
        if npts < 3 || xmax < 0 || ymax < 0 || xmin >= self.width || ymin >= self.height {
            return;
        }
        let ymax = ymax.min(self.height - 1);
        #[derive(Clone, Copy)]
        struct Edge {
            idx: usize,
            di: usize,
            x: i64,
            dx: i64,
            ye: i64,
        }
        let mut edge = [
            Edge {
                idx: imin,
                di: 1,
                x: -(1 << SHIFT),
                dx: 0,
                ye: ymin,
            },
            Edge {
                idx: imin,
                di: npts - 1,
                x: -(1 << SHIFT),
                dx: 0,
                ye: ymin,
            },
        ];
        let mut edges = npts as i64;
        let mut y = ymin;
        loop {
            for e in edge.iter_mut() {
                if y >= e.ye {
                    let mut idx0 = e.idx;
                    let mut idx = (idx0 + e.di) % npts;
                    loop {
                        let more = edges > 0;
                        edges -= 1;
                        if !more {
                            break;
                        }
                        let ty = v[idx].1;
                        if ty > y {
                            let xs = v[idx0].0 << SHIFT;
                            let xe = v[idx].0 << SHIFT;
                            e.ye = ty;
                            e.dx = ((xe - xs) * 2 + (ty - y)) / (2 * (ty - y));
                            e.x = xs;
                            e.idx = idx;
                            break;
                        }
                        idx0 = idx;
                        idx = (idx + e.di) % npts;
                    }
                }
            }
            if edges < 0 {
                break;
            }
            if y >= 0 {
                let (l, r) = if edge[0].x > edge[1].x {
                    (1, 0)
                } else {
                    (0, 1)
                };
                let mut x1 = (edge[l].x + HALF) >> SHIFT;
                let mut x2 = (edge[r].x + HALF) >> SHIFT;
                if x2 >= 0 && x1 < self.width {
                    x1 = x1.max(0);
                    x2 = x2.min(self.width - 1);
                    self.hline(y, x1, x2, color);
                }
            }
            edge[0].x += edge[0].dx;
            edge[1].x += edge[1].dx;
            y += 1;
            if y > ymax {
                break;
            }
        }
    }

    /// `cv2.circle(img, center, radius, color, thickness=-1)` (OpenCV's midpoint `Circle`).
    pub(crate) fn fill_circle(&mut self, (cx, cy): (i64, i64), radius: i64, color: [u8; 3]) {
        let (w, h) = (self.width, self.height);
        let (mut err, mut dx, mut dy, mut plus, mut minus) =
            (0i64, radius, 0i64, 1i64, (radius << 1) - 1);
        let inside = cx >= radius && cx < w - radius && cy >= radius && cy < h - radius;
        while dx >= dy {
            let (y11, y12, y21, y22) = (cy - dy, cy + dy, cy - dx, cy + dx);
            let (mut x11, mut x12, mut x21, mut x22) = (cx - dx, cx + dx, cx - dy, cx + dy);
            if inside {
                self.hline(y11, x11, x12, color);
                self.hline(y12, x11, x12, color);
                self.hline(y21, x21, x22, color);
                self.hline(y22, x21, x22, color);
            } else if x11 < w && x12 >= 0 && y21 < h && y22 >= 0 {
                x11 = x11.max(0);
                x12 = x12.min(w - 1);
                if (0..h).contains(&y11) {
                    self.hline(y11, x11, x12, color);
                }
                if (0..h).contains(&y12) {
                    self.hline(y12, x11, x12, color);
                }
                if x21 < w && x22 >= 0 {
                    x21 = x21.max(0);
                    x22 = x22.min(w - 1);
                    if (0..h).contains(&y21) {
                        self.hline(y21, x21, x22, color);
                    }
                    if (0..h).contains(&y22) {
                        self.hline(y22, x21, x22, color);
                    }
                }
            }
            dy += 1;
            err += plus;
            plus += 2;
            let mask = if err <= 0 { 0 } else { -1 };
            err -= minus & mask;
            dx += mask;
            minus -= mask & 2;
        }
    }
}

/// OpenCV's table of sines at whole degrees (float), indexed 0..=450 so that
/// `SIN[450 - a]` is the cosine of `a`.
fn sin_table(deg: i64) -> f32 {
    // OpenCV stores 7-decimal floats; rounding the exact sine to 7 decimals gives the same table.
    let d = deg.rem_euclid(360) as f64;
    let exact = (d.to_radians()).sin();
    let seven = (exact * 1e7).round() / 1e7;
    seven as f32
}

/// `cv2.ellipse2Poly(center, axes, angle, 0, 360, 1)`: the polygon of a full ellipse, one
/// vertex per degree, rounded and with consecutive duplicates removed.
pub(crate) fn ellipse2poly(center: (i64, i64), axes: (i64, i64), angle: i64) -> Vec<(i64, i64)> {
    let mut angle = angle;
    while angle < 0 {
        angle += 360;
    }
    while angle > 360 {
        angle -= 360;
    }
    let alpha = sin_table(450 - angle) as f64;
    let beta = sin_table(angle) as f64;
    let (cx, cy) = (center.0 as f64, center.1 as f64);
    let mut pts: Vec<(i64, i64)> = Vec::with_capacity(361);
    for i in 0..=360i64 {
        let x = axes.0 as f64 * sin_table(450 - i) as f64;
        let y = axes.1 as f64 * sin_table(i) as f64;
        let px = cx + x * alpha - y * beta;
        let py = cy + x * beta + y * alpha;
        let p = (px.round_ties_even() as i64, py.round_ties_even() as i64);
        if pts.last() != Some(&p) {
            pts.push(p);
        }
    }
    if pts.len() == 1 {
        pts = vec![center, center];
    }
    pts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sine_table_matches_opencv_entries() {
        // Entries copied from OpenCV's table at a few angles (as printed there, 7 decimals).
        assert_eq!(sin_table(1), 0.0174524f32);
        assert_eq!(sin_table(30), 0.5f32);
        assert_eq!(sin_table(60), 0.8660254f32);
        assert_eq!(sin_table(89), 0.9998477f32);
        assert_eq!(sin_table(90), 1.0f32);
        assert_eq!(sin_table(181), -0.0174524f32);
        assert_eq!(sin_table(450 - 30), 0.8660254f32);
    }

    #[test]
    fn lanczos_weights_sum_to_one_and_peak_at_zero_offset() {
        let w = lanczos4_weights(0.0);
        assert!((w[3] - 1.0).abs() < 1e-6);
        let w = lanczos4_weights(0.5625);
        let s: f32 = w.iter().sum();
        assert!((s - 1.0).abs() < 1e-5, "{s}");
        // Offset 0.5625 past sample 3: sample 4 (0.4375 away) weighs more than sample 3.
        assert!(w[4] > w[3] && w[3] > 0.0);
    }

    #[test]
    fn fast_lanczos_equals_the_generic_path() {
        let src: Vec<f32> = (0..23 * 29)
            .map(|i| ((i * 37 % 101) as f32 / 50.0).sin())
            .collect();
        for dst in [(232, 184), (640, 512), (17, 40)] {
            let fast = lanczos_f32(&src, (29, 23), dst);
            let generic = resize(&src, (29, 23), 1, dst, Interpolation::Lanczos4);
            assert_eq!(fast, generic, "{dst:?}");
        }
    }

    #[test]
    fn area_shrink_averages_blocks() {
        let src: Vec<u8> = (0..16).map(|v| v as u8 * 10).collect();
        let out = resize_u8(&src, (4, 4), 1, (2, 2), Interpolation::Area);
        // (0+10+40+50+2)/4 = 25 (rounded down by >> 2 after +2)
        assert_eq!(out, vec![25, 45, 105, 125]);
    }

    #[test]
    fn filled_circle_of_radius_4_is_a_9_pixel_wide_disc() {
        let mut data = vec![0u8; 20 * 20 * 3];
        let mut c = Canvas {
            data: &mut data,
            width: 20,
            height: 20,
        };
        c.fill_circle((10, 10), 4, [255, 0, 0]);
        let lit = |x: usize, y: usize| data[(y * 20 + x) * 3] == 255;
        assert!(lit(6, 10) && lit(14, 10) && lit(10, 6) && lit(10, 14));
        assert!(!lit(5, 10) && !lit(15, 10) && !lit(6, 6));
    }
}
