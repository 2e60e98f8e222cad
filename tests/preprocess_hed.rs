//! The HED edge detector against `controlnet_aux` 0.0.10's `HEDdetector` (manifest `hed`): a
//! random-weight `ControlNetHED_Apache2` of small widths stored as `ControlNetHED.pth`, its
//! soft-edge map before quantisation, and the final control images of the soft, `safe` and
//! scribble variants at three detect resolutions (the image as it is, shrunk with INTER_AREA,
//! enlarged with INTER_LANCZOS4).

mod common;

use candle_core::Device;
use image::{GrayImage, RgbImage};
use sd_serve::preprocess::hed::{Hed, HedMode};
use sd_serve::preprocess::Detector;

use common::{fixtures, flat, load_goldens, manifest};

fn detector(spec: &serde_json::Value) -> Hed {
    let path = fixtures().join(spec["weights"].as_str().expect("weights"));
    Hed::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn input(spec: &serde_json::Value) -> RgbImage {
    let path = fixtures().join(spec["input"].as_str().expect("input"));
    image::open(&path).expect("input image").to_rgb8()
}

#[test]
fn hed_soft_edges_match_controlnet_aux() {
    let manifest = manifest();
    let spec = &manifest["hed"];
    let hed = detector(spec)
        .with_detect_resolution(128)
        .expect("resolution");
    let image = input(spec);
    let edges = hed.soft_edges(&image).expect("soft edges");
    let golden = &load_goldens("hed.safetensors")["edge_128"];
    let (h, w) = golden.dims2().expect("2-D golden");
    assert_eq!((edges.width, edges.height), (w, h));
    let expected = flat(golden);
    let max_diff = edges
        .values
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - f64::from(*b)).abs())
        .fold(0.0, f64::max);
    let spread = expected.iter().filter(|&&v| v > 0.1 && v < 0.9).count();
    eprintln!(
        "HED soft edges: max |diff| {max_diff:.3e}; {spread} of {} values in 0.1..0.9",
        expected.len()
    );
    // The edges must not be saturated for the comparison to mean something.
    assert!(spread > expected.len() / 2, "{spread} values in 0.1..0.9");
    // float32 convolutions (13 layers, accumulated in another order than torch's) move the
    // logits by a few ulps of their magnitude (~1e-6); the sigmoid's slope is at most 1/4.
    assert!(max_diff < 1e-5, "max |diff| {max_diff}");
}

#[test]
fn hed_control_images_match_controlnet_aux() {
    let manifest = manifest();
    let spec = &manifest["hed"];
    let image = input(spec);
    let cases = spec["cases"].as_array().expect("cases");
    assert!(cases.len() >= 5);
    let mut report = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let width = case["width"].as_u64().unwrap() as u32;
        let crop = image::imageops::crop_imm(&image, 0, 0, width, image.height()).to_image();
        let mode = if case["scribble"].as_bool().unwrap() {
            HedMode::Scribble
        } else {
            HedMode::Soft {
                safe: case["safe"].as_bool().unwrap(),
            }
        };
        let res = case["detect_resolution"].as_u64().unwrap() as u32;
        let hed = detector(spec)
            .with_mode(mode)
            .with_detect_resolution(res)
            .unwrap();
        let out = hed.detect(&crop).expect("detect");
        assert_eq!(out.dimensions(), crop.dimensions(), "{name}: size");
        assert!(
            out.pixels().all(|p| p[0] == p[1] && p[1] == p[2]),
            "{name}: gray"
        );
        let ours = image::DynamicImage::ImageRgb8(out).to_luma8();
        let path = fixtures().join(case["image"].as_str().unwrap());
        let expected: GrayImage = image::open(&path).expect("golden").to_luma8();
        let diffs: Vec<u8> = ours
            .as_raw()
            .iter()
            .zip(expected.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .collect();
        let max = diffs.iter().copied().max().unwrap_or(0);
        let differing = diffs.iter().filter(|&&d| d > 0).count();
        let mean = expected.as_raw().iter().map(|&v| f64::from(v)).sum::<f64>()
            / expected.as_raw().len() as f64;
        report.push(format!(
            "{name}: max diff {max}, {differing} of {} pixels differ, golden mean {mean:.1}",
            diffs.len()
        ));
        // An all-black or all-white image would compare nothing.
        assert!(mean > 20.0 && mean < 235.0, "{name}: golden mean {mean}");
        // The 8-bit scaling truncates: an edge value within float32 noise of a multiple of
        // 1/255 may land one level lower or higher. The scribble thresholds (127 after a float
        // blur, 4 after the fixed-point one) can flip such a pixel to the other extreme, so
        // there only the count is bounded (0.5% of the pixels).
        if mode == HedMode::Scribble {
            assert!(
                differing * 200 <= diffs.len(),
                "{name}: {differing} pixels differ"
            );
        } else {
            assert!(max <= 1, "{name}: max diff {max}");
            assert!(
                differing * 100 <= diffs.len(),
                "{name}: {differing} pixels differ"
            );
        }
    }
    eprintln!("{}", report.join("\n"));
}

/// A golden `[h, w]` u8 tensor as a gray image.
fn gray_golden(
    golden: &std::collections::HashMap<String, candle_core::Tensor>,
    key: &str,
) -> GrayImage {
    let t = &golden[key];
    let (h, w) = t.dims2().expect("2-D golden");
    let bytes = t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    GrayImage::from_raw(w as u32, h as u32, bytes).unwrap()
}

/// Pixels that differ, and the largest difference.
fn compare(ours: &GrayImage, expected: &GrayImage) -> (usize, u8) {
    assert_eq!(ours.dimensions(), expected.dimensions());
    let diffs = ours
        .as_raw()
        .iter()
        .zip(expected.as_raw())
        .map(|(a, b)| a.abs_diff(*b));
    diffs.fold((0, 0), |(n, m), d| (n + usize::from(d > 0), m.max(d)))
}

#[test]
fn opencv_operations_match_cv2() {
    use sd_serve::preprocess::cv;
    use sd_serve::preprocess::resize::{self, Interpolation};
    let golden = load_goldens("hed.safetensors");
    let input = gray_golden(&golden, "cv_input");
    let rgb = image::DynamicImage::ImageLuma8(input.clone()).to_rgb8();
    let mut report = Vec::new();
    let mut check = |name: &str, ours: GrayImage, bound: u8| {
        let (differing, max) = compare(&ours, &gray_golden(&golden, name));
        report.push(format!("{name}: {differing} pixels differ, max {max}"));
        assert!(max <= bound, "{name}: max diff {max}");
    };
    // resize_image's shrink (INTER_AREA, uneven factors), INTER_AREA growing the long side, and
    // the LANCZOS4 enlargement: OpenCV's arithmetic, but the area weights are summed in float
    // and the Lanczos coefficients come from sin/cos before their 11-bit rounding, so a value
    // on a .5 boundary may round the other way (one level).
    for (name, w, h, mode) in [
        ("cv_area_16x13", 16, 13, Interpolation::Area),
        ("cv_area_50x20", 50, 20, Interpolation::Area),
        ("cv_lanczos4_70x61", 70, 61, Interpolation::Lanczos4),
    ] {
        let out = resize::resize_rgb(&rgb, w, h, mode);
        check(name, image::DynamicImage::ImageRgb8(out).to_luma8(), 1);
    }
    // Bilinear 8-bit resizes: OpenCV's integer fixed point from float32 fractions, exact.
    check(
        "cv_linear_50x40",
        resize::resize_gray(&input, 50, 40, Interpolation::Linear),
        0,
    );
    check(
        "cv_linear_20x15",
        resize::resize_gray(&input, 20, 15, Interpolation::Linear),
        0,
    );
    // The 8-bit blur in OpenCV's exact fixed point, and nms (a float blur, then thresholds: a
    // pixel within float rounding of a neighbour or of 127 could flip; none does here).
    check("cv_blur_u8", cv::gaussian_blur_u8_sigma3(&input), 0);
    check("cv_nms", cv::nms(&input, 127.0, 3.0), 0);
    eprintln!("{}", report.join("\n"));

    // The float bilinear resize of the side outputs: float32 products and sums as OpenCV's.
    let small = &golden["cv_float_input"];
    let (h, w) = small.dims2().unwrap();
    let ours = resize::resize_linear_f32(&flat(small), (w, h), (37, 29));
    let expected = flat(&golden["cv_float_linear_37x29"]);
    let max = ours
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("float bilinear: max |diff| {max:.3e}");
    // Values of a few units: OpenCV's SIMD kernels may fuse the multiply-adds (1 ulp ~ 5e-7).
    assert!(max < 1e-5, "float bilinear: max |diff| {max}");
}
