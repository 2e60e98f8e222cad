//! The OpenCV 4 drawing routines the OpenPose reference calls, reimplemented with OpenCV's own
//! arithmetic so the control image matches the reference pixel for pixel: the 8-connected
//! rasteriser behind `cv2.ellipse2Poly`, `cv2.fillConvexPoly` and filled `cv2.circle` (its
//! resizes are [`crate::preprocess::resize`]'s).

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
