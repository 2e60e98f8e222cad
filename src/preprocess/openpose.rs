//! OpenPose body keypoints as a ControlNet control image: the body part of controlnet_aux
//! 0.0.10's `OpenposeDetector` (Cao et al. 2017, "Realtime Multi-Person 2D Pose Estimation using
//! Part Affinity Fields").
//!
//! Weights: `body_pose_model.pth` of the Hugging Face repository `lllyasviel/Annotators` (a
//! pickled PyTorch state dict with the published key names `conv1_1.weight` ...
//! `Mconv7_stage6_L2.bias`), read with candle's pickle reader. Channel widths are read from the
//! weight shapes, so a narrower network of the same layout loads with the same code.
//!
//! The network is `bodypose_model`: a VGG-19 front (conv1_1 .. conv4_4_CPM, three 2x2 max pools,
//! so outputs are 1/8 of the input) and six stages of two branches each, L1 predicting 38 part
//! affinity fields (PAFs: an x/y vector field per limb) and L2 19 part heatmaps (18 keypoints and
//! background); each stage after the first reads the previous stage's two outputs concatenated
//! with the front's features.
//!
//! Around it, the reference's body estimation with its constants: the image (at 512 on its short
//! side, multiples of 64) is scaled to a height of 184 (`scale_search = [0.5]` times the box
//! size 368), padded right and down to a multiple of 8 with grey 128, fed as BGR / 256 - 0.5;
//! heatmaps and PAFs are upsampled x8 (Lanczos), cropped and resized to the image; each heatmap
//! is smoothed with scipy's `gaussian_filter(sigma=3)` and its local maxima above 0.1 are the
//! keypoint candidates; each limb's candidate pairs are scored by the PAF line integral over 10
//! samples (each above 0.05 on more than 80 % of them, plus a length prior), matched greedily,
//! and limbs are assembled into people, dropping people with fewer than 4 parts or a mean score
//! below 0.4. People are drawn as in `draw_bodypose`: 17 limbs as filled ellipses of half-width 4
//! in 60 % colours, then 18 keypoints as discs of radius 4, on black. OpenCV's resizes and
//! rasterisers are reimplemented ([`super::resize`], [`cv`]) so the image matches the reference's.
//!
//! Hands and face (`openpose_hand`, `openpose_face`, `openpose_full`) need two more networks and
//! are not part of this detector.

mod cv;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;

use self::cv::Canvas;
use super::resize::{self, Interpolation};
use super::Detector;
use crate::models::layers::{conv2d, Conv2d};
use crate::{Error, Result};

/// The resolution the reference detects at (`detect_resolution=512`): the image's short side.
pub const DETECT_RESOLUTION: usize = 512;
/// `boxsize` of the reference: the network sees the image at `0.5 * 368 = 184` pixels high.
const BOX_SIZE: f64 = 368.0;
const SCALE_SEARCH: f64 = 0.5;
const STRIDE: usize = 8;
const PAD_VALUE: u8 = 128;
/// Heatmap peak threshold (`thre1`) and PAF sample threshold (`thre2`).
const PEAK_THRESHOLD: f64 = 0.1;
const PAF_THRESHOLD: f64 = 0.05;
/// PAF samples along a candidate limb (`mid_num`).
const PAF_SAMPLES: usize = 10;
const GAUSSIAN_SIGMA: f64 = 3.0;

/// Pairs of keypoints (1-based, the reference's `limbSeq`) joined by a limb; the last two are
/// ear-shoulder links that only help assembly and are not drawn.
const LIMBS: [(usize, usize); 19] = [
    (2, 3),
    (2, 6),
    (3, 4),
    (4, 5),
    (6, 7),
    (7, 8),
    (2, 9),
    (9, 10),
    (10, 11),
    (2, 12),
    (12, 13),
    (13, 14),
    (2, 1),
    (1, 15),
    (15, 17),
    (1, 16),
    (16, 18),
    (3, 17),
    (6, 18),
];

/// The PAF channel pair (x, y) of each limb (the reference's `mapIdx` minus 19).
const LIMB_PAFS: [(usize, usize); 19] = [
    (12, 13),
    (20, 21),
    (14, 15),
    (16, 17),
    (22, 23),
    (24, 25),
    (0, 1),
    (2, 3),
    (4, 5),
    (6, 7),
    (8, 9),
    (10, 11),
    (28, 29),
    (30, 31),
    (34, 35),
    (32, 33),
    (36, 37),
    (18, 19),
    (26, 27),
];

/// The 18 keypoint colours of `draw_bodypose` (RGB); limb `i` uses colour `i` at 60 %.
const COLORS: [[u8; 3]; 18] = [
    [255, 0, 0],
    [255, 85, 0],
    [255, 170, 0],
    [255, 255, 0],
    [170, 255, 0],
    [85, 255, 0],
    [0, 255, 0],
    [0, 255, 85],
    [0, 255, 170],
    [0, 255, 255],
    [0, 170, 255],
    [0, 85, 255],
    [0, 0, 255],
    [85, 0, 255],
    [170, 0, 255],
    [255, 0, 255],
    [255, 0, 170],
    [255, 0, 85],
];

const KEYPOINTS: usize = 18;
const DRAWN_LIMBS: usize = 17;
const STICK_WIDTH: i64 = 4;
const KEYPOINT_RADIUS: i64 = 4;

/// One layer of a `make_layers` block: a convolution (with or without ReLU) or a 2x2 max pool.
#[derive(Debug, Clone)]
enum Layer {
    Conv { conv: Conv2d, relu: bool },
    Pool,
}

/// A `make_layers` sequence.
#[derive(Debug, Clone)]
struct Block(Vec<Layer>);

impl Block {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for layer in &self.0 {
            xs = match layer {
                Layer::Conv { conv, relu } => {
                    let ys = conv.forward(&xs)?;
                    if *relu {
                        ys.relu()?
                    } else {
                        ys
                    }
                }
                Layer::Pool => xs.max_pool2d(2)?,
            };
        }
        Ok(xs)
    }
}

/// `bodypose_model`: the VGG front and six two-branch stages.
#[derive(Debug, Clone)]
struct BodyPoseNet {
    front: Block,
    /// `(L1, L2)` = (PAF branch, heatmap branch) of stages 1..=6.
    stages: Vec<(Block, Block)>,
}

impl BodyPoseNet {
    fn load(weights: &HashMap<String, Tensor>, device: &Device) -> Result<Self> {
        let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, device);
        let conv = |name: &str, relu: bool| -> Result<Layer> {
            let w = weights
                .get(&format!("{name}.weight"))
                .ok_or_else(|| Error::model(format!("openpose body model: no `{name}.weight`")))?;
            let (out_c, in_c, k, k2) = w.dims4().map_err(|_| {
                Error::model(format!("openpose body model: `{name}.weight` is not 4-D"))
            })?;
            if k != k2 || k % 2 == 0 {
                return Err(Error::model(format!(
                    "openpose body model: `{name}.weight` has a {k}x{k2} kernel"
                )));
            }
            Ok(Layer::Conv {
                conv: conv2d(vb.pp(name), in_c, out_c, k, k / 2, 1)?,
                relu,
            })
        };
        let mut front = Vec::new();
        for (i, convs) in [2, 2, 4].iter().enumerate() {
            for j in 1..=*convs {
                front.push(conv(&format!("conv{}_{j}", i + 1), true)?);
            }
            front.push(Layer::Pool);
        }
        for name in ["conv4_1", "conv4_2", "conv4_3_CPM", "conv4_4_CPM"] {
            front.push(conv(name, true)?);
        }
        let mut stages = Vec::with_capacity(6);
        for branch_pair in 1..=6 {
            let mut pair = Vec::with_capacity(2);
            for branch in 1..=2 {
                let mut layers = Vec::new();
                if branch_pair == 1 {
                    for j in 1..=5 {
                        layers.push(conv(&format!("conv5_{j}_CPM_L{branch}"), j < 5)?);
                    }
                } else {
                    for j in 1..=7 {
                        // The reference lists `Mconv7_stage6_L1` twice among its no-ReLU
                        // layers and never `Mconv7_stage6_L2`: the final heatmaps pass a ReLU.
                        let relu = j < 7 || (branch_pair == 6 && branch == 2);
                        layers.push(conv(
                            &format!("Mconv{j}_stage{branch_pair}_L{branch}"),
                            relu,
                        )?);
                    }
                }
                pair.push(Block(layers));
            }
            let l2 = pair.pop().expect("two branches were built");
            let l1 = pair.pop().expect("two branches were built");
            stages.push((l1, l2));
        }
        Ok(Self {
            front: Block(front),
            stages,
        })
    }

    /// `[1, 3, H, W]` -> (PAFs `[1, 38, H/8, W/8]`, heatmaps `[1, 19, H/8, W/8]`).
    fn forward(&self, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        let features = self.front.forward(xs)?;
        let mut input = features.clone();
        let mut out = None;
        for (l1, l2) in &self.stages {
            let pafs = l1.forward(&input)?;
            let heatmaps = l2.forward(&input)?;
            input = Tensor::cat(&[&pafs, &heatmaps, &features], 1)?;
            out = Some((pafs, heatmaps));
        }
        Ok(out.expect("six stages"))
    }
}

/// The OpenPose body detector (controlnet_aux's `OpenposeDetector` with hands and face off).
#[derive(Debug, Clone)]
pub struct OpenposeDetector {
    net: BodyPoseNet,
    device: Device,
}

/// A keypoint candidate: a heatmap peak `(x, y)` in image pixels, its (unsmoothed) heatmap
/// score, and its id (index among all candidates, numbered part by part).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub x: f64,
    pub y: f64,
    pub score: f64,
    pub id: usize,
}

/// One assembled person, the reference's `subset` row: the candidate id of each of the 18
/// keypoints (`None` where missing), the total score and the number of parts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Person {
    pub parts: [Option<usize>; KEYPOINTS],
    pub score: f64,
    pub count: f64,
}

/// The result of the body estimation on one image.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BodyEstimate {
    /// All candidates, part 0's first (their ids are their indices).
    pub candidates: Vec<Candidate>,
    pub people: Vec<Person>,
}

/// The network outputs for one image, channel-major and row-major: 38 PAF and 19 heatmap
/// channels of `height x width` (the padded network input / 8).
#[derive(Debug, Clone)]
pub struct NetworkOutput {
    pub pafs: Vec<f32>,
    pub heatmaps: Vec<f32>,
    pub height: usize,
    pub width: usize,
}

impl OpenposeDetector {
    /// Loads `body_pose_model.pth` (see the module docs) onto `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let tensors = candle_core::pickle::read_all(path).map_err(|e| {
            Error::model(format!(
                "openpose body model {}: cannot read the checkpoint: {e}",
                path.display()
            ))
        })?;
        let weights: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
            .collect::<Result<_>>()?;
        let net = BodyPoseNet::load(&weights, device)
            .map_err(|e| Error::model(format!("{}: {e}", path.display())))?;
        Ok(Self {
            net,
            device: device.clone(),
        })
    }

    /// The network on a `[1, 3, H, W]` input (BGR / 256 - 0.5, H and W multiples of 8):
    /// `(PAFs [1, 38, H/8, W/8], heatmaps [1, 19, H/8, W/8])`.
    pub fn network(&self, input: &Tensor) -> Result<(Tensor, Tensor)> {
        self.net.forward(&input.to_device(&self.device)?)
    }

    /// The reference's network input for a padded BGR image: `[1, 3, H, W]`, `bgr / 256 - 0.5`.
    pub fn network_input(bgr: &[u8], width: usize, height: usize) -> Result<Tensor> {
        let mut planes = vec![0f32; 3 * width * height];
        for (i, px) in bgr.chunks_exact(3).enumerate() {
            for c in 0..3 {
                planes[c * width * height + i] = px[c] as f32 / 256.0 - 0.5;
            }
        }
        Ok(Tensor::from_vec(
            planes,
            (1, 3, height, width),
            &Device::Cpu,
        )?)
    }

    /// The body estimation (`Body.__call__`) on an RGB image at detect resolution.
    pub fn estimate(&self, image: &RgbImage) -> Result<BodyEstimate> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let scale = SCALE_SEARCH * BOX_SIZE / h as f64;
        let (sw, sh) = ((w as f64 * scale) as usize, (h as f64 * scale) as usize);
        if sw == 0 || sh == 0 {
            return Err(Error::invalid(format!(
                "openpose: a {w}x{h} image is too narrow to detect poses in"
            )));
        }
        // The reference flips to BGR first; a resize treats the channels alike.
        let bgr: Vec<u8> = image.pixels().flat_map(|p| [p[2], p[1], p[0]]).collect();
        let k = (sh + sw) as f64 / (h + w) as f64;
        let interp = if k < 1.0 {
            Interpolation::Area
        } else {
            Interpolation::Lanczos4
        };
        let scaled = resize::resize_u8(&bgr, (w, h), 3, (sw, sh), interp);
        let (pw, ph) = (sw.div_ceil(STRIDE) * STRIDE, sh.div_ceil(STRIDE) * STRIDE);
        let mut padded = vec![PAD_VALUE; pw * ph * 3];
        for y in 0..sh {
            padded[y * pw * 3..(y * pw + sw) * 3]
                .copy_from_slice(&scaled[y * sw * 3..(y + 1) * sw * 3]);
        }
        let input = Self::network_input(&padded, pw, ph)?;
        let (pafs, heatmaps) = self.network(&input)?;
        let (_, _, oh, ow) = pafs.dims4()?;
        let output = NetworkOutput {
            pafs: pafs.flatten_all()?.to_vec1::<f32>()?,
            heatmaps: heatmaps.flatten_all()?.to_vec1::<f32>()?,
            height: oh,
            width: ow,
        };
        Ok(estimate_from_network(&output, (sw, sh), (w, h)))
    }

    /// The control image at detect resolution, as the reference returns it: the image resized
    /// to 512 on its short side (multiples of 64), its people drawn on black.
    pub fn detect_at_detect_resolution(&self, image: &RgbImage) -> Result<RgbImage> {
        let resized = resize_image(image, DETECT_RESOLUTION)?;
        let estimate = self.estimate(&resized)?;
        Ok(draw_bodypose(&estimate, resized.width(), resized.height()))
    }
}

impl Detector for OpenposeDetector {
    fn detect(&self, image: &RgbImage) -> Result<RgbImage> {
        let pose = self.detect_at_detect_resolution(image)?;
        if pose.dimensions() == image.dimensions() {
            return Ok(pose);
        }
        // Back to the input's size with the reference's own resize rule (area when shrinking).
        let (w, h) = (image.width() as usize, image.height() as usize);
        let k = (h + w) as f64 / (pose.height() + pose.width()) as f64;
        let interp = if k < 1.0 {
            Interpolation::Area
        } else {
            Interpolation::Lanczos4
        };
        let data = resize::resize_u8(
            pose.as_raw(),
            (pose.width() as usize, pose.height() as usize),
            3,
            (w, h),
            interp,
        );
        RgbImage::from_raw(w as u32, h as u32, data)
            .ok_or_else(|| Error::Internal("openpose: resized image has the wrong size".into()))
    }
}

/// controlnet_aux's `resize_image`: `resolution` on the short side, both sides rounded to a
/// multiple of 64, Lanczos when enlarging and area averaging when shrinking.
pub fn resize_image(image: &RgbImage, resolution: usize) -> Result<RgbImage> {
    let resolution = u32::try_from(resolution)
        .map_err(|_| Error::invalid(format!("openpose: resolution {resolution} is too large")))?;
    resize::working_image(image, resolution)
}

/// `smart_resize_k(x, 8, 8)`, the crop of the padding and `smart_resize(x, image)` of one
/// network output channel: Lanczos x8, crop to `scaled`, then to the image size.
fn upsample_channel(
    channel: &[f32],
    (ow, oh): (usize, usize),
    (sw, sh): (usize, usize),
    (w, h): (usize, usize),
) -> Vec<f64> {
    let (uw, uh) = (ow * STRIDE, oh * STRIDE);
    let up = resize::resize_f32(channel, (ow, oh), (uw, uh), Interpolation::Lanczos4);
    let mut cropped = Vec::with_capacity(sw * sh);
    for y in 0..sh {
        cropped.extend_from_slice(&up[y * uw..y * uw + sw]);
    }
    let k = (h + w) as f64 / (sh + sw) as f64;
    let interp = if k < 1.0 {
        Interpolation::Area
    } else {
        Interpolation::Lanczos4
    };
    resize::resize_f32(&cropped, (sw, sh), (w, h), interp)
        .into_iter()
        .map(f64::from)
        .collect()
}

/// scipy's `gaussian_filter1d` weights: `exp(-x^2 / (2 sigma^2))` for `|x| <= 4 sigma + 0.5`,
/// normalised with numpy's pairwise sum.
fn gaussian_weights(sigma: f64) -> Vec<f64> {
    let radius = (4.0 * sigma + 0.5) as i64;
    let phi: Vec<f64> = (-radius..=radius)
        .map(|x| (-0.5 / (sigma * sigma) * (x * x) as f64).exp())
        .collect();
    let sum = numpy_sum(&phi);
    phi.iter().map(|p| p / sum).collect()
}

/// numpy's pairwise summation for fewer than 128 values: eight running sums, combined in a
/// tree, then the remainder.
fn numpy_sum(a: &[f64]) -> f64 {
    if a.len() < 8 {
        return a.iter().fold(0.0, |s, v| s + v);
    }
    let mut r = [0f64; 8];
    r.copy_from_slice(&a[..8]);
    let full = a.len() - a.len() % 8;
    for chunk in a[8..full].chunks_exact(8) {
        for (ri, v) in r.iter_mut().zip(chunk) {
            *ri += v;
        }
    }
    let mut s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for v in &a[full..] {
        s += v;
    }
    s
}

/// scipy's `correlate1d` with a symmetric kernel and `mode='reflect'` along one line: the
/// centre tap first, then the pairs `(left + right) * w` from the outermost in. `ext` is scratch.
fn correlate_line(line: &[f64], weights: &[f64], ext: &mut Vec<f64>, out: &mut [f64]) {
    let n = line.len() as i64;
    let r = weights.len() / 2;
    // reflect: (d c b a | a b c d | d c b a), repeated for lines shorter than the kernel.
    ext.clear();
    ext.extend((-(r as i64)..n + r as i64).map(|i| {
        let period = 2 * n;
        let mut j = i.rem_euclid(period);
        if j >= n {
            j = period - 1 - j;
        }
        line[j as usize]
    }));
    let centre = weights[r];
    for (i, o) in out.iter_mut().enumerate() {
        let c = i + r;
        let mut acc = ext[c] * centre;
        for (k, w) in weights[..r].iter().enumerate() {
            let d = r - k;
            acc += (ext[c - d] + ext[c + d]) * w;
        }
        *o = acc;
    }
}

/// scipy's `gaussian_filter(map, sigma)`: axis 0 (columns) first, then axis 1 (rows).
fn gaussian_filter(map: &[f64], (w, h): (usize, usize), sigma: f64) -> Vec<f64> {
    let weights = gaussian_weights(sigma);
    let mut ext = Vec::new();
    let mut tmp = vec![0f64; w * h];
    let mut col = vec![0f64; h];
    let mut col_out = vec![0f64; h];
    for x in 0..w {
        for (y, c) in col.iter_mut().enumerate() {
            *c = map[y * w + x];
        }
        correlate_line(&col, &weights, &mut ext, &mut col_out);
        for (y, c) in col_out.iter().enumerate() {
            tmp[y * w + x] = *c;
        }
    }
    let mut out = vec![0f64; w * h];
    for (src, dst) in tmp.chunks_exact(w).zip(out.chunks_exact_mut(w)) {
        correlate_line(src, &weights, &mut ext, dst);
    }
    out
}

/// The body estimation after the network (`Body.__call__` from the heatmap resize on):
/// `scaled` is the size of the image the network saw before padding, `image` the size of the
/// image the keypoints are for.
pub fn estimate_from_network(
    output: &NetworkOutput,
    scaled: (usize, usize),
    image: (usize, usize),
) -> BodyEstimate {
    let (ow, oh) = (output.width, output.height);
    let plane = ow * oh;
    let (w, h) = image;
    let channel = |data: &[f32], c: usize| {
        upsample_channel(&data[c * plane..(c + 1) * plane], (ow, oh), scaled, image)
    };

    // Keypoint candidates: local maxima of the smoothed heatmaps.
    let mut all_peaks: Vec<Vec<Candidate>> = Vec::with_capacity(KEYPOINTS);
    let mut next_id = 0;
    for part in 0..KEYPOINTS {
        let map = channel(&output.heatmaps, part);
        let smooth = gaussian_filter(&map, (w, h), GAUSSIAN_SIGMA);
        let mut peaks = Vec::new();
        for y in 0..h {
            for x in 0..w {
                let v = smooth[y * w + x];
                let neighbour = |dx: i64, dy: i64| {
                    let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                    if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                        0.0
                    } else {
                        smooth[ny as usize * w + nx as usize]
                    }
                };
                if v >= neighbour(0, -1)
                    && v >= neighbour(0, 1)
                    && v >= neighbour(-1, 0)
                    && v >= neighbour(1, 0)
                    && v > PEAK_THRESHOLD
                {
                    peaks.push(Candidate {
                        x: x as f64,
                        y: y as f64,
                        score: map[y * w + x],
                        id: next_id,
                    });
                    next_id += 1;
                }
            }
        }
        all_peaks.push(peaks);
    }

    // Limb connections scored by the PAF line integral.
    struct Connection {
        a: usize,
        b: usize,
        score: f64,
    }
    let mut connections: Vec<Option<Vec<Connection>>> = Vec::with_capacity(LIMBS.len());
    for (k, &(pa, pb)) in LIMBS.iter().enumerate() {
        let cand_a = &all_peaks[pa - 1];
        let cand_b = &all_peaks[pb - 1];
        if cand_a.is_empty() || cand_b.is_empty() {
            connections.push(None);
            continue;
        }
        let paf_x = channel(&output.pafs, LIMB_PAFS[k].0);
        let paf_y = channel(&output.pafs, LIMB_PAFS[k].1);
        let mut scored: Vec<(usize, usize, f64)> = Vec::new();
        for (i, a) in cand_a.iter().enumerate() {
            for (j, b) in cand_b.iter().enumerate() {
                let (vx, vy) = (b.x - a.x, b.y - a.y);
                let norm = (vx * vx + vy * vy).sqrt().max(0.001);
                let (ux, uy) = (vx / norm, vy / norm);
                let mut values = [0f64; PAF_SAMPLES];
                for (s, v) in values.iter_mut().enumerate() {
                    let px = linspace(a.x, b.x, s);
                    let py = linspace(a.y, b.y, s);
                    let idx = py.round_ties_even() as usize * w + px.round_ties_even() as usize;
                    *v = paf_x[idx] * ux + paf_y[idx] * uy;
                }
                let mean = values.iter().fold(0.0, |s, v| s + v) / PAF_SAMPLES as f64;
                let prior = (0.5 * h as f64 / norm - 1.0).min(0.0);
                let score = mean + prior;
                let above = values.iter().filter(|v| **v > PAF_THRESHOLD).count();
                if above as f64 > 0.8 * PAF_SAMPLES as f64 && score > 0.0 {
                    scored.push((i, j, score));
                }
            }
        }
        // Stable, best first (Python's `sorted(..., reverse=True)` keeps ties in order).
        scored.sort_by(|x, y| y.2.partial_cmp(&x.2).unwrap_or(std::cmp::Ordering::Equal));
        let mut chosen: Vec<(Connection, usize, usize)> = Vec::new();
        for (i, j, score) in scored {
            if chosen.iter().all(|(_, ci, cj)| *ci != i && *cj != j) {
                chosen.push((
                    Connection {
                        a: cand_a[i].id,
                        b: cand_b[j].id,
                        score,
                    },
                    i,
                    j,
                ));
                if chosen.len() >= cand_a.len().min(cand_b.len()) {
                    break;
                }
            }
        }
        connections.push(Some(chosen.into_iter().map(|(c, _, _)| c).collect()));
    }

    let candidates: Vec<Candidate> = all_peaks.into_iter().flatten().collect();

    // People: rows of 18 candidate ids (-1 = missing), total score, part count.
    let mut subset: Vec<[f64; 20]> = Vec::new();
    for (k, limb) in connections.iter().enumerate() {
        let Some(limb) = limb else { continue };
        let (ia, ib) = (LIMBS[k].0 - 1, LIMBS[k].1 - 1);
        for conn in limb {
            let (part_a, part_b) = (conn.a as f64, conn.b as f64);
            let mut found = 0;
            let mut idx = [0usize; 2];
            for (j, row) in subset.iter().enumerate() {
                if row[ia] == part_a || row[ib] == part_b {
                    if found < 2 {
                        idx[found] = j;
                    }
                    found += 1;
                }
            }
            if found == 1 {
                let row = &mut subset[idx[0]];
                if row[ib] != part_b {
                    row[ib] = part_b;
                    row[19] += 1.0;
                    row[18] += candidates[conn.b].score + conn.score;
                }
            } else if found == 2 {
                let (j1, j2) = (idx[0], idx[1]);
                let overlap = (0..18).any(|p| subset[j1][p] >= 0.0 && subset[j2][p] >= 0.0);
                if !overlap {
                    let other = subset[j2];
                    let row = &mut subset[j1];
                    for p in 0..18 {
                        row[p] += other[p] + 1.0;
                    }
                    row[18] += other[18];
                    row[19] += other[19];
                    row[18] += conn.score;
                    subset.remove(j2);
                } else {
                    let row = &mut subset[j1];
                    row[ib] = part_b;
                    row[19] += 1.0;
                    row[18] += candidates[conn.b].score + conn.score;
                }
            } else if found == 0 && k < 17 {
                let mut row = [-1f64; 20];
                row[ia] = part_a;
                row[ib] = part_b;
                row[19] = 2.0;
                row[18] = (candidates[conn.a].score + candidates[conn.b].score) + conn.score;
                subset.push(row);
            }
        }
    }
    subset.retain(|row| !(row[19] < 4.0 || row[18] / row[19] < 0.4));

    let people = subset
        .iter()
        .map(|row| {
            let mut parts = [None; KEYPOINTS];
            for (p, part) in parts.iter_mut().enumerate() {
                if row[p] >= 0.0 {
                    *part = Some(row[p] as usize);
                }
            }
            Person {
                parts,
                score: row[18],
                count: row[19],
            }
        })
        .collect();
    BodyEstimate { candidates, people }
}

/// `np.linspace(start, stop, 10)[i]`: `i * step + start`, the last one exactly `stop`.
fn linspace(start: f64, stop: f64, i: usize) -> f64 {
    if i == PAF_SAMPLES - 1 {
        return stop;
    }
    let div = (PAF_SAMPLES - 1) as f64;
    let step = (stop - start) / div;
    if step == 0.0 {
        (i as f64 / div) * (stop - start) + start
    } else {
        i as f64 * step + start
    }
}

/// `draw_bodypose` for every person on a black `width x height` canvas (the keypoints are
/// normalised by the image size and scaled back, as the reference does).
pub fn draw_bodypose(estimate: &BodyEstimate, width: u32, height: u32) -> RgbImage {
    let mut image = RgbImage::new(width, height);
    let (fw, fh) = (width as f64, height as f64);
    {
        let mut canvas = Canvas {
            data: &mut image,
            width: width as i64,
            height: height as i64,
        };
        for person in &estimate.people {
            let keypoints: Vec<Option<(f64, f64)>> = person
                .parts
                .iter()
                .map(|p| p.map(|i| (estimate.candidates[i].x / fw, estimate.candidates[i].y / fh)))
                .collect();
            for (limb, color) in LIMBS.iter().take(DRAWN_LIMBS).zip(COLORS) {
                let (Some(k1), Some(k2)) = (keypoints[limb.0 - 1], keypoints[limb.1 - 1]) else {
                    continue;
                };
                let (y0, y1) = (k1.0 * fw, k2.0 * fw);
                let (x0, x1) = (k1.1 * fh, k2.1 * fh);
                let mx = (x0 + x1) / 2.0;
                let my = (y0 + y1) / 2.0;
                let length = ((x0 - x1).powi(2) + (y0 - y1).powi(2)).sqrt();
                let angle = (x0 - x1).atan2(y0 - y1) * (180.0 / std::f64::consts::PI);
                let polygon = cv::ellipse2poly(
                    (my as i64, mx as i64),
                    ((length / 2.0) as i64, STICK_WIDTH),
                    angle as i64,
                );
                let dim = color.map(|c| (c as f64 * 0.6) as u8);
                canvas.fill_convex_poly(&polygon, dim);
            }
            for (k, color) in keypoints.iter().zip(COLORS) {
                if let Some((x, y)) = k {
                    canvas.fill_circle(((x * fw) as i64, (y * fh) as i64), KEYPOINT_RADIUS, color);
                }
            }
        }
    }
    image
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_sum_matches_sequential_sum_on_exact_values() {
        let v: Vec<f64> = (0..25).map(|i| i as f64).collect();
        assert_eq!(numpy_sum(&v), 300.0);
    }

    #[test]
    fn gaussian_filter_keeps_a_constant_map() {
        let map = vec![0.5f64; 30 * 20];
        let out = gaussian_filter(&map, (30, 20), 3.0);
        assert!(out.iter().all(|v| (v - 0.5).abs() < 1e-12));
    }

    #[test]
    fn linspace_ends_exactly() {
        assert_eq!(linspace(3.0, 10.0, 0), 3.0);
        assert_eq!(linspace(3.0, 10.0, 9), 10.0);
        assert_eq!(linspace(4.0, 4.0, 5), 4.0);
    }

    #[test]
    fn resize_image_refuses_empty_and_elongated_images() {
        assert!(resize_image(&RgbImage::new(0, 4), 512).is_err());
        assert!(resize_image(&RgbImage::new(100, 2), 512).is_err());
        let out = resize_image(&RgbImage::new(88, 72), 512).expect("resizes");
        assert_eq!(out.dimensions(), (640, 512));
    }
}
