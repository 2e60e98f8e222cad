//! The M-LSD line detector against controlnet_aux 0.0.10's `MLSDdetector` (manifest `mlsd`)
//! with a tiny random-weight `mlsd_large_512_fp32.pth` of the published architecture: the tp
//! map, the decoded segments and the drawn control image, at a working size equal to the
//! input, twice the input (Lanczos), and half of it (area, then linear enlargement back).

mod common;

use candle_core::Device;
use sd_serve::preprocess::mlsd::MlsdDetector;
use sd_serve::preprocess::Detector;

use common::{fixtures, load_goldens, manifest, max_abs, max_abs_diff};

fn detector() -> MlsdDetector {
    let spec = &manifest()["mlsd"];
    let weights = fixtures().join(spec["weights"].as_str().unwrap());
    MlsdDetector::load(&weights, &Device::Cpu).unwrap()
}

#[test]
fn mlsd_matches_controlnet_aux() {
    let manifest = manifest();
    let spec = &manifest["mlsd"];
    let golden = load_goldens(spec["file"].as_str().unwrap());
    let score = spec["score_threshold"].as_f64().unwrap() as f32;
    let distance = spec["distance_threshold"].as_f64().unwrap() as f32;
    // The manifest's thresholds are the detector's defaults.
    assert_eq!(score, sd_serve::preprocess::mlsd::DEFAULT_SCORE_THRESHOLD);
    assert_eq!(
        distance,
        sd_serve::preprocess::mlsd::DEFAULT_DISTANCE_THRESHOLD
    );
    let base = detector();
    let cases = spec["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    let mut compared_tp = 0;
    for case in cases {
        let key = case["key"].as_str().unwrap();
        let path = case["image"].as_str().unwrap();
        let rgb = image::open(fixtures().join(path)).expect(path).to_rgb8();
        let detector = base
            .clone()
            .with_detect_resolution(case["detect_resolution"].as_u64().unwrap() as u32)
            .unwrap();

        let tp = detector.tp_map(&rgb).unwrap();
        let size = case["network_size"].as_array().unwrap();
        let (_, c, h, w) = tp.dims4().unwrap();
        assert_eq!(c, 9);
        assert_eq!(
            [h as u64, w as u64],
            [size[0].as_u64().unwrap(), size[1].as_u64().unwrap()]
        );
        if case["network_output"].as_bool().unwrap() {
            let expected = &golden[&format!("{key}_tp")];
            let diff = max_abs_diff(&tp, expected);
            let scale = max_abs(expected);
            eprintln!("{key}: tp map max |diff| {diff:e} (values up to {scale})");
            // f32; batch norms folded into the convolutions (one rounding instead of two per
            // layer) and sums in another order, over ~50 layers: ~1e-6 relative to the
            // largest value.
            assert!(diff <= 1e-5 * scale, "{key}: tp map differs by {diff}");
            compared_tp += 1;
        }

        // Segments, strongest first, as pred_lines returns them.
        let segments = detector.segments(&rgb).unwrap();
        let expected: Vec<f64> = golden[&format!("{key}_lines")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(
            segments.len() as u64,
            case["segments"].as_u64().unwrap(),
            "{key}: segment count"
        );
        assert_eq!(segments.len() * 4, expected.len());
        let worst = segments
            .iter()
            .flatten()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        let gap = case["truncation_gap"].as_f64().unwrap();
        eprintln!(
            "{key}: {} segments, end points max |diff| {worst:e} (nearest to an integer: {gap:e})",
            segments.len()
        );
        // End points are 2 * (index + f32 displacement): at most twice the tp map's bound
        // above (1e-5 of values up to ~25).
        assert!(worst < 5e-4, "{key}: end points differ by {worst}");
        // The drawing truncates end points to integers; the golden has none closer to an
        // integer than `gap`, so equal drawings follow from a smaller error.
        assert!(worst < gap, "{key}: error {worst} >= {gap}");

        // The drawn image: same integer end points, OpenCV's rasterisation and resize
        // reproduced exactly, so every pixel is equal.
        let out = detector.detect(&rgb).unwrap();
        let expected = golden[&format!("{key}_image")].clone();
        let (eh, ew) = expected.dims2().unwrap();
        assert_eq!(out.dimensions(), (ew as u32, eh as u32), "{key}: size");
        assert_eq!(out.dimensions(), rgb.dimensions());
        let expected: Vec<u8> = expected.flatten_all().unwrap().to_vec1().unwrap();
        let gray: Vec<u8> = out.pixels().map(|p| p.0[0]).collect();
        assert!(out.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
        let differing = gray.iter().zip(&expected).filter(|(a, b)| a != b).count();
        let lit = expected.iter().filter(|&&v| v > 0).count() as u64;
        assert_eq!(lit, case["drawn_pixels"].as_u64().unwrap());
        eprintln!("{key}: {lit} lit pixels, {differing} differ");
        assert_eq!(differing, 0, "{key}: {differing} pixels differ");
    }
    assert_eq!(compared_tp, 1);
}

#[test]
fn mlsd_without_segments_draws_nothing() {
    // A score threshold of 1 keeps no peak (sigmoid < 1): a black image, as the reference's.
    let detector = detector().with_thresholds(1.0, 0.1).unwrap();
    let rgb = image::open(fixtures().join("goldens/init.png"))
        .unwrap()
        .to_rgb8();
    let detector = detector.with_detect_resolution(64).unwrap();
    assert!(detector.segments(&rgb).unwrap().is_empty());
    let out = detector.detect(&rgb).unwrap();
    assert_eq!(out.dimensions(), rgb.dimensions());
    assert!(out.pixels().all(|p| p.0 == [0, 0, 0]));
}

#[test]
fn mlsd_refuses_bad_files_and_settings() {
    let lineart = fixtures().join("preprocessors/lineart/sk_model.pth");
    let err = MlsdDetector::load(&lineart, &Device::Cpu).unwrap_err();
    assert!(
        err.to_string().contains("backbone.features.0.0.weight"),
        "{err}"
    );
    assert!(detector().with_thresholds(1.5, 0.1).is_err());
    assert!(detector().with_thresholds(0.1, -1.0).is_err());
    assert!(detector().with_detect_resolution(0).is_err());
    assert!(detector().detect(&image::RgbImage::new(2, 40)).is_err());
}
