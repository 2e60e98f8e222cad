//! Inpainting and outpainting at the image level: the mask as the denoising loop reads it, and
//! the steps around the loop that change what it sees (outpainting's padded canvas and
//! `maskMargin`'s zoomed crop) and how its output returns into the final picture.
//!
//! Masks follow diffusers' `VaeImageProcessor` for masks: grayscale, resized to the output size,
//! binarized at 0.5 (a pixel >= 128 is repainted), and brought to latent size by nearest-neighbour
//! sampling as `torch.nn.functional.interpolate` does by default.

use candle_core::{Device, Tensor};
use image::imageops::{self, FilterType};
use image::{GrayImage, Luma, RgbImage};

use super::request::{GenerationRequest, VAE_SCALE_FACTOR};
use crate::{Error, Result};

/// Outpainting sides are whole multiples of this many pixels (Runware's rule, which keeps the
/// seed image on the latent grid of every model).
pub const OUTPAINT_MULTIPLE: u32 = 64;
/// Largest seam blur, in pixels.
pub const MAX_OUTPAINT_BLUR: u32 = 32;
/// `maskMargin` limits, in pixels of the output picture.
pub const MIN_MASK_MARGIN: u32 = 32;
pub const MAX_MASK_MARGIN: u32 = 128;

/// An inpainting mask: white (>= 128) is repainted, black is kept. Same size as the seed image.
#[derive(Debug, Clone)]
pub struct MaskImage {
    pub image: GrayImage,
    /// Context kept around the mask's bounding box when generating a zoomed crop of it
    /// (Runware's `maskMargin`); `None` generates the whole picture.
    pub margin: Option<u32>,
}

/// How far the seed image is extended on each side, and the width of the blended seam.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outpaint {
    pub top: u32,
    pub right: u32,
    pub bottom: u32,
    pub left: u32,
    /// Pixels of the seed image next to each extended side that are regenerated and blended
    /// from the original into the new content.
    pub blur: u32,
}

impl Outpaint {
    /// The four sides with their names.
    pub fn sides(&self) -> [(&'static str, u32); 4] {
        [
            ("top", self.top),
            ("right", self.right),
            ("bottom", self.bottom),
            ("left", self.left),
        ]
    }

    /// The picture a seed image of `width` x `height` becomes.
    pub fn output_size(&self, width: u32, height: u32) -> (u32, u32) {
        (
            width.saturating_add(self.left).saturating_add(self.right),
            height.saturating_add(self.top).saturating_add(self.bottom),
        )
    }

    /// The sides are multiples of [`OUTPAINT_MULTIPLE`], at least one is not zero, and the blur
    /// is at most [`MAX_OUTPAINT_BLUR`].
    pub fn check(&self) -> Result<()> {
        for (name, value) in self.sides() {
            if !value.is_multiple_of(OUTPAINT_MULTIPLE) {
                return Err(Error::invalid(format!(
                    "outpainting `{name}` must be a multiple of {OUTPAINT_MULTIPLE}. Given: {value}"
                )));
            }
        }
        if self.sides().iter().all(|&(_, v)| v == 0) {
            return Err(Error::invalid(
                "outpainting extends no side: set at least one of `top`, `right`, `bottom`, `left`",
            ));
        }
        if self.blur > MAX_OUTPAINT_BLUR {
            return Err(Error::invalid(format!(
                "outpainting `blur` must be <= {MAX_OUTPAINT_BLUR}. Given: {}",
                self.blur
            )));
        }
        Ok(())
    }
}

/// A rectangle of the output picture, in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// The rectangle `maskMargin` generates (diffusers' `get_crop_region`): the bounding box of the
/// mask's non-black pixels, grown by `margin` on every side within the picture, then widened or
/// heightened around its centre to the aspect ratio of `width` x `height` (shifted back inside
/// the picture where it would leave it). A mask without any such pixel gives the whole picture.
pub fn crop_region(mask: &GrayImage, width: u32, height: u32, margin: u32) -> Region {
    let (w, h) = (mask.width() as i64, mask.height() as i64);
    let whole = Region {
        x: 0,
        y: 0,
        width: mask.width(),
        height: mask.height(),
    };
    let (mut left, mut top, mut right, mut bottom) = (w, h, -1i64, -1i64);
    for (x, y, p) in mask.enumerate_pixels() {
        if p.0[0] != 0 {
            let (x, y) = (x as i64, y as i64);
            left = left.min(x);
            right = right.max(x);
            top = top.min(y);
            bottom = bottom.max(y);
        }
    }
    if right < 0 || width == 0 || height == 0 {
        return whole;
    }
    let pad = margin as i64;
    let (mut x1, mut y1) = ((left - pad).max(0), (top - pad).max(0));
    let (mut x2, mut y2) = ((right + 1 + pad).min(w), (bottom + 1 + pad).min(h));
    let crop_ratio = (x2 - x1) as f64 / (y2 - y1) as f64;
    let target_ratio = width as f64 / height as f64;
    // Grow one axis around the centre, then slide back inside the picture.
    let grow = |lo: &mut i64, hi: &mut i64, wanted: f64, limit: i64| {
        let extra = (wanted - (*hi - *lo) as f64) as i64;
        *lo -= extra / 2;
        *hi += extra - extra / 2;
        if *hi > limit {
            let over = *hi - limit;
            *hi -= over;
            *lo -= over;
        }
        if *lo < 0 {
            *hi -= *lo;
            *lo = 0;
        }
        *hi = (*hi).min(limit);
    };
    if crop_ratio > target_ratio {
        grow(&mut y1, &mut y2, (x2 - x1) as f64 / target_ratio, h);
    } else {
        grow(&mut x1, &mut x2, (y2 - y1) as f64 * target_ratio, w);
    }
    Region {
        x: x1 as u32,
        y: y1 as u32,
        width: (x2 - x1) as u32,
        height: (y2 - y1) as u32,
    }
}

/// What the denoising loop starts from when a request has a mask or outpaints: the seed image
/// and the mask at the request's size, and how a generated picture becomes the output.
#[derive(Debug, Clone)]
pub struct Canvas {
    /// `width` x `height` RGB: the seed image (resized, padded or cropped as the request says).
    pub image: RgbImage,
    /// `width` x `height` grayscale, white = repaint.
    pub mask: GrayImage,
    paste: Option<PasteBack>,
}

/// The output picture before the generated part is blended in, where that part goes, and how
/// much of it shows at each pixel.
#[derive(Debug, Clone)]
struct PasteBack {
    base: RgbImage,
    region: Region,
    /// Size of `base`; 255 = the generated pixel, 0 = the base pixel.
    alpha: GrayImage,
}

impl Canvas {
    /// The canvas of a request that has a mask or outpaints; `None` for txt2img and img2img.
    pub fn for_request(req: &GenerationRequest) -> Result<Option<Self>> {
        check(req)?;
        let Some(init) = &req.init_image else {
            return Ok(None);
        };
        let (width, height) = (req.width as u32, req.height as u32);
        match (&req.mask, &req.outpaint) {
            (None, None) => Ok(None),
            (mask, Some(outpaint)) => Ok(Some(outpaint_canvas(
                &init.image,
                mask.as_ref().map(|m| &m.image),
                outpaint,
            ))),
            (Some(mask), None) => {
                let image = resized(&init.image, width, height);
                let mask_image = resized(&mask.image, width, height);
                Ok(Some(match mask.margin {
                    None => Canvas {
                        image,
                        mask: mask_image,
                        paste: None,
                    },
                    Some(margin) => margin_canvas(image, mask_image, margin),
                }))
            }
        }
    }

    /// The part of the output picture the loop generates when it is a zoomed crop
    /// (`maskMargin`), in output pixels; `None` when the loop generates the whole picture.
    pub fn zoomed_region(&self) -> Option<Region> {
        let paste = self.paste.as_ref()?;
        let r = paste.region;
        let (w, h) = paste.base.dimensions();
        ((r.x, r.y, r.width, r.height) != (0, 0, w, h)).then_some(r)
    }

    /// Whether [`Self::finish`] changes a generated picture (outpainting, `maskMargin`).
    pub fn pastes_back(&self) -> bool {
        self.paste.is_some()
    }

    /// The output picture for one generated picture (`width` x `height`): unchanged for plain
    /// inpainting (as diffusers returns it), blended back into the seed image otherwise.
    pub fn finish(&self, generated: image::RgbImage) -> image::RgbImage {
        let Some(paste) = &self.paste else {
            return generated;
        };
        let region = paste.region;
        let generated = resized(&generated, region.width, region.height);
        let mut out = paste.base.clone();
        for (x, y, g) in generated.enumerate_pixels() {
            let (ox, oy) = (region.x + x, region.y + y);
            let a = paste.alpha.get_pixel(ox, oy).0[0] as u32;
            let base = out.get_pixel_mut(ox, oy);
            for c in 0..3 {
                let v = (g.0[c] as u32 * a + base.0[c] as u32 * (255 - a) + 127) / 255;
                base.0[c] = v as u8;
            }
        }
        out
    }

    /// The mask binarized, `[1, 1, H, W]` of 0.0 / 1.0 (1 = repaint).
    pub fn mask_tensor(&self, device: &Device) -> Result<Tensor> {
        let (w, h) = self.mask.dimensions();
        let data: Vec<f32> = self.mask.as_raw().iter().map(|&v| binary(v)).collect();
        Ok(Tensor::from_vec(
            data,
            (1, 1, h as usize, w as usize),
            device,
        )?)
    }

    /// The binarized mask at latent size, `[1, 1, H/8, W/8]`: each latent cell takes the pixel at
    /// `floor(index * in / out)` on each axis (torch's default nearest-neighbour resize).
    pub fn latent_mask(&self, device: &Device) -> Result<Tensor> {
        let (w, h) = (self.mask.width() as usize, self.mask.height() as usize);
        let (lw, lh) = (w / VAE_SCALE_FACTOR, h / VAE_SCALE_FACTOR);
        let nearest = |i: usize, size_in: usize, size_out: usize| -> u32 {
            let scale = size_in as f32 / size_out as f32;
            ((i as f32 * scale).floor() as usize).min(size_in - 1) as u32
        };
        let mut data = Vec::with_capacity(lw * lh);
        for y in 0..lh {
            for x in 0..lw {
                let p = self.mask.get_pixel(nearest(x, w, lw), nearest(y, h, lh));
                data.push(binary(p.0[0]));
            }
        }
        Ok(Tensor::from_vec(data, (1, 1, lh, lw), device)?)
    }
}

/// diffusers' binarization of a mask pixel: `value / 255 >= 0.5`.
fn binary(value: u8) -> f32 {
    if value >= 128 {
        1.0
    } else {
        0.0
    }
}

/// The mask and outpainting rules a request must meet (sizes, sides, margins).
pub fn check(req: &GenerationRequest) -> Result<()> {
    let init = match (&req.init_image, &req.mask, &req.outpaint) {
        (Some(init), _, _) => init,
        (None, None, None) => return Ok(()),
        (None, Some(_), _) => {
            return Err(Error::invalid(
                "a mask needs a seed image to repaint: send the image with it",
            ))
        }
        (None, None, Some(_)) => {
            return Err(Error::invalid(
                "outpainting needs a seed image to extend: send the image with it",
            ))
        }
    };
    let (iw, ih) = init.image.dimensions();
    if let Some(mask) = &req.mask {
        let (mw, mh) = mask.image.dimensions();
        if (mw, mh) != (iw, ih) {
            return Err(Error::invalid(format!(
                "the mask must be the size of the seed image ({iw}x{ih}). Given: {mw}x{mh}"
            )));
        }
        if let Some(margin) = mask.margin {
            if !(MIN_MASK_MARGIN..=MAX_MASK_MARGIN).contains(&margin) {
                return Err(Error::invalid(format!(
                    "`maskMargin` must be between {MIN_MASK_MARGIN} and {MAX_MASK_MARGIN}. Given: {margin}"
                )));
            }
            if req.outpaint.is_some() {
                return Err(Error::invalid(
                    "`maskMargin` applies to inpainting only, not with outpainting",
                ));
            }
        }
    }
    if let Some(outpaint) = &req.outpaint {
        outpaint.check()?;
        let (ow, oh) = outpaint.output_size(iw, ih);
        if (ow as usize, oh as usize) != (req.width, req.height) {
            return Err(Error::invalid(format!(
                "outpainting a {iw}x{ih} seed image by top {}, right {}, bottom {}, left {} gives \
                 {ow}x{oh}: `width` and `height` must be {ow} and {oh}. Given: {}x{}",
                outpaint.top, outpaint.right, outpaint.bottom, outpaint.left, req.width, req.height
            )));
        }
        if outpaint.blur > iw / 2 || outpaint.blur > ih / 2 {
            return Err(Error::invalid(format!(
                "outpainting `blur` must be at most half the seed image's smaller side ({}). Given: {}",
                iw.min(ih) / 2,
                outpaint.blur
            )));
        }
    }
    Ok(())
}

/// `image` at `width` x `height` (Lanczos, as PIL resizes masks and images for diffusers).
fn resized<P: image::Pixel + 'static>(
    image: &image::ImageBuffer<P, Vec<P::Subpixel>>,
    width: u32,
    height: u32,
) -> image::ImageBuffer<P, Vec<P::Subpixel>> {
    if image.dimensions() == (width, height) {
        image.clone()
    } else {
        imageops::resize(image, width, height, FilterType::Lanczos3)
    }
}

/// The seed image placed inside the extended picture, its edge pixels repeated outwards (a start
/// whose colours continue the image, for strengths below 1); repainted: the new area, the seam
/// band of `blur` pixels inside the seed image, and the user's mask if any.
fn outpaint_canvas(seed: &RgbImage, mask: Option<&GrayImage>, outpaint: &Outpaint) -> Canvas {
    let (sw, sh) = seed.dimensions();
    let (width, height) = outpaint.output_size(sw, sh);
    let (left, top) = (outpaint.left as i64, outpaint.top as i64);
    let image = RgbImage::from_fn(width, height, |x, y| {
        let sx = (x as i64 - left).clamp(0, sw as i64 - 1) as u32;
        let sy = (y as i64 - top).clamp(0, sh as i64 - 1) as u32;
        *seed.get_pixel(sx, sy)
    });
    // How much of the seed pixel to keep, 0..1: 0 outside it, ramping up over `blur` pixels from
    // each extended side.
    let ramp = |distance: u32| -> f32 {
        if outpaint.blur == 0 {
            1.0
        } else {
            ((distance + 1) as f32 / (outpaint.blur + 1) as f32).min(1.0)
        }
    };
    let keep = |x: u32, y: u32| -> f32 {
        let inside = x >= outpaint.left
            && x < outpaint.left + sw
            && y >= outpaint.top
            && y < outpaint.top + sh;
        if !inside {
            return 0.0;
        }
        let (sx, sy) = (x - outpaint.left, y - outpaint.top);
        let mut k: f32 = 1.0;
        if outpaint.top > 0 {
            k = k.min(ramp(sy));
        }
        if outpaint.bottom > 0 {
            k = k.min(ramp(sh - 1 - sy));
        }
        if outpaint.left > 0 {
            k = k.min(ramp(sx));
        }
        if outpaint.right > 0 {
            k = k.min(ramp(sw - 1 - sx));
        }
        if let Some(m) = mask {
            k *= 1.0 - binary(m.get_pixel(sx, sy).0[0]);
        }
        k
    };
    let mut repaint = GrayImage::new(width, height);
    let mut alpha = GrayImage::new(width, height);
    for y in 0..height {
        for x in 0..width {
            let k = keep(x, y);
            repaint.put_pixel(x, y, Luma([if k < 1.0 { 255 } else { 0 }]));
            alpha.put_pixel(x, y, Luma([((1.0 - k) * 255.0).round() as u8]));
        }
    }
    Canvas {
        paste: Some(PasteBack {
            base: image.clone(),
            region: Region {
                x: 0,
                y: 0,
                width,
                height,
            },
            alpha,
        }),
        image,
        mask: repaint,
    }
}

/// `maskMargin`: the loop generates the crop around the mask at the full output size (more
/// pixels for the masked area); the result is scaled back to the crop and blended into the seed
/// image through the mask, feathered outwards by a Gaussian of `margin / 8` pixels so the seam is
/// soft while staying inside the crop (three deviations are under the margin).
fn margin_canvas(image: RgbImage, mask: GrayImage, margin: u32) -> Canvas {
    let (width, height) = image.dimensions();
    let region = crop_region(&mask, width, height, margin);
    let crop_rgb =
        imageops::crop_imm(&image, region.x, region.y, region.width, region.height).to_image();
    let crop_mask =
        imageops::crop_imm(&mask, region.x, region.y, region.width, region.height).to_image();
    let binary_mask = GrayImage::from_fn(width, height, |x, y| {
        Luma([if binary(mask.get_pixel(x, y).0[0]) > 0.0 {
            255
        } else {
            0
        }])
    });
    // Doubling the blurred mask makes it 1 from the mask's edge inwards and fall smoothly to 0
    // outside it, so the mask itself is generated whole and the blend lies in the context.
    let blurred = imageops::blur(&binary_mask, margin as f32 / 8.0);
    let alpha = GrayImage::from_fn(width, height, |x, y| {
        let soft = (blurred.get_pixel(x, y).0[0] as u32 * 2).min(255) as u8;
        Luma([soft.max(binary_mask.get_pixel(x, y).0[0])])
    });
    Canvas {
        image: resized(&crop_rgb, width, height),
        mask: resized(&crop_mask, width, height),
        paste: Some(PasteBack {
            base: image,
            region,
            alpha,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::InitImage;

    fn request(seed: (u32, u32), size: (usize, usize)) -> GenerationRequest {
        let mut req = GenerationRequest::new("a cat");
        req.width = size.0;
        req.height = size.1;
        req.init_image = Some(InitImage {
            image: RgbImage::from_pixel(seed.0, seed.1, image::Rgb([10, 20, 30])),
            strength: 1.0,
        });
        req
    }

    fn mask_with_box(w: u32, h: u32, x: u32, y: u32, bw: u32, bh: u32) -> GrayImage {
        GrayImage::from_fn(w, h, |px, py| {
            let inside = px >= x && px < x + bw && py >= y && py < y + bh;
            Luma([if inside { 255 } else { 0 }])
        })
    }

    #[test]
    fn outpaint_output_is_the_seed_plus_the_sides() {
        let mut req = request((64, 128), (192, 192));
        req.outpaint = Some(Outpaint {
            top: 0,
            right: 64,
            bottom: 64,
            left: 64,
            blur: 8,
        });
        let canvas = Canvas::for_request(&req).unwrap().unwrap();
        assert_eq!(canvas.image.dimensions(), (192, 192));
        assert_eq!(canvas.mask.dimensions(), (192, 192));
        // New area repainted, the seed's centre kept, the seam band repainted.
        assert_eq!(canvas.mask.get_pixel(10, 10).0[0], 255);
        assert_eq!(canvas.mask.get_pixel(96, 64).0[0], 0);
        assert_eq!(canvas.mask.get_pixel(64 + 3, 64).0[0], 255);
        assert_eq!(canvas.mask.get_pixel(64 + 8, 64).0[0], 0);
        // The top was not extended: no band there.
        assert_eq!(canvas.mask.get_pixel(96, 0).0[0], 0);
        // The output keeps the seed pixels away from the seams and takes the new ones outside.
        let generated = RgbImage::from_pixel(192, 192, image::Rgb([200, 200, 200]));
        let out = canvas.finish(generated);
        assert_eq!(out.dimensions(), (192, 192));
        assert_eq!(out.get_pixel(96, 64).0, [10, 20, 30]);
        assert_eq!(out.get_pixel(10, 10).0, [200, 200, 200]);
        let seam = out.get_pixel(64 + 3, 64).0[0];
        assert!(seam > 10 && seam < 200, "seam pixel {seam} is a blend");
    }

    #[test]
    fn outpaint_sides_must_be_multiples_of_64() {
        let mut req = request((64, 64), (128, 64));
        req.outpaint = Some(Outpaint {
            right: 32,
            left: 32,
            ..Default::default()
        });
        let err = check(&req).unwrap_err().to_string();
        assert!(
            err.contains("`right`") && err.contains("multiple of 64"),
            "{err}"
        );
        req.outpaint = Some(Outpaint::default());
        let err = check(&req).unwrap_err().to_string();
        assert!(err.contains("extends no side"), "{err}");
    }

    #[test]
    fn outpaint_size_must_match_the_request() {
        let mut req = request((64, 64), (128, 128));
        req.outpaint = Some(Outpaint {
            right: 64,
            ..Default::default()
        });
        let err = check(&req).unwrap_err().to_string();
        assert!(
            err.contains("128x64") && err.contains("Given: 128x128"),
            "{err}"
        );
        req.height = 64;
        check(&req).unwrap();
    }

    #[test]
    fn mask_must_match_the_seed_image() {
        let mut req = request((64, 64), (64, 64));
        req.mask = Some(MaskImage {
            image: GrayImage::new(64, 32),
            margin: None,
        });
        let err = check(&req).unwrap_err().to_string();
        assert!(
            err.contains("64x64") && err.contains("Given: 64x32"),
            "{err}"
        );
        req.init_image = None;
        let err = check(&req).unwrap_err().to_string();
        assert!(err.contains("seed image"), "{err}");
    }

    #[test]
    fn mask_margin_limits() {
        let mut req = request((64, 64), (64, 64));
        for (margin, ok) in [(31, false), (32, true), (128, true), (129, false)] {
            req.mask = Some(MaskImage {
                image: GrayImage::new(64, 64),
                margin: Some(margin),
            });
            assert_eq!(check(&req).is_ok(), ok, "margin {margin}");
        }
    }

    #[test]
    fn crop_region_grows_the_box_by_the_margin_to_the_aspect_ratio() {
        // A 20x10 box at (100, 100) in a 256x256 picture, margin 32: 84x74, then made square.
        let mask = mask_with_box(256, 256, 100, 100, 20, 10);
        let r = crop_region(&mask, 256, 256, 32);
        assert_eq!((r.width, r.height), (84, 84));
        assert_eq!((r.x, r.y), (68, 63));
        // Near a corner the region slides back inside the picture.
        let mask = mask_with_box(256, 256, 0, 0, 10, 40);
        let r = crop_region(&mask, 256, 256, 32);
        assert_eq!((r.x, r.y, r.width, r.height), (0, 0, 72, 72));
        // A 2:1 output widens the region to 2:1.
        let mask = mask_with_box(512, 256, 200, 100, 16, 16);
        let r = crop_region(&mask, 512, 256, 32);
        assert_eq!((r.width, r.height), (160, 80));
        // An empty mask: the whole picture.
        let r = crop_region(&GrayImage::new(64, 64), 64, 64, 32);
        assert_eq!((r.x, r.y, r.width, r.height), (0, 0, 64, 64));
    }

    #[test]
    fn mask_margin_generates_the_crop_and_pastes_it_back() {
        let mut req = request((128, 128), (128, 128));
        req.mask = Some(MaskImage {
            image: mask_with_box(128, 128, 60, 60, 8, 8),
            margin: Some(32),
        });
        let canvas = Canvas::for_request(&req).unwrap().unwrap();
        // The 8x8 box plus 32 on each side is 72x72, generated at 128x128: the box is larger.
        assert_eq!(canvas.image.dimensions(), (128, 128));
        let white = canvas.mask.pixels().filter(|p| p.0[0] >= 128).count();
        assert!(
            white > 8 * 8 * 2,
            "the masked area is zoomed: {white} pixels"
        );
        let out = canvas.finish(RgbImage::from_pixel(128, 128, image::Rgb([250, 250, 250])));
        assert_eq!(out.dimensions(), (128, 128));
        // Far from the mask the seed image is untouched; the mask's centre is generated.
        assert_eq!(out.get_pixel(5, 5).0, [10, 20, 30]);
        assert_eq!(out.get_pixel(64, 64).0, [250, 250, 250]);
        // The zoomed region is the crop around the mask (the control images follow it).
        assert_eq!(
            canvas.zoomed_region(),
            Some(crop_region(&req.mask.as_ref().unwrap().image, 128, 128, 32))
        );
        assert_eq!(
            canvas.zoomed_region(),
            Some(Region {
                x: 28,
                y: 28,
                width: 72,
                height: 72
            })
        );
    }

    #[test]
    fn only_mask_margin_zooms() {
        let mut req = request((128, 128), (128, 128));
        req.mask = Some(MaskImage {
            image: mask_with_box(128, 128, 60, 60, 8, 8),
            margin: None,
        });
        let plain = Canvas::for_request(&req).unwrap().unwrap();
        assert_eq!(plain.zoomed_region(), None);
        let mut req = request((64, 64), (128, 64));
        req.outpaint = Some(Outpaint {
            right: 64,
            ..Outpaint::default()
        });
        let outpaint = Canvas::for_request(&req).unwrap().unwrap();
        assert!(outpaint.pastes_back());
        assert_eq!(outpaint.zoomed_region(), None);
    }

    #[test]
    fn latent_mask_samples_every_eighth_pixel_and_binarizes() {
        let mut mask = GrayImage::new(16, 16);
        mask.put_pixel(0, 0, Luma([128]));
        mask.put_pixel(8, 0, Luma([127]));
        mask.put_pixel(9, 9, Luma([255]));
        let canvas = Canvas {
            image: RgbImage::new(16, 16),
            mask,
            paste: None,
        };
        let m = canvas.latent_mask(&Device::Cpu).unwrap();
        assert_eq!(m.dims(), &[1, 1, 2, 2]);
        let v: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, vec![1.0, 0.0, 0.0, 0.0]);
    }
}
