//! The line-art detector against controlnet_aux 0.0.10's `LineartDetector` (manifest `lineart`)
//! with a tiny random-weight `sk_model.pth` of the published architecture: the generator's
//! output at the working resolution, and the final control image for a working size equal to
//! the input, a 2x area reduction with linear enlargement back, and a Lanczos enlargement.

mod common;

use candle_core::{Device, Tensor};
use sd_serve::preprocess::lineart::LineartDetector;
use sd_serve::preprocess::Detector;

use common::{fixtures, load_goldens, manifest, max_abs_diff};

fn golden_gray(t: &Tensor) -> (Vec<u8>, u32, u32) {
    let (h, w) = t.dims2().expect("2-D golden");
    let v = t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    (v, w as u32, h as u32)
}

#[test]
fn lineart_matches_controlnet_aux() {
    let manifest = manifest();
    let spec = &manifest["lineart"];
    let golden = load_goldens(spec["file"].as_str().unwrap());
    let weights = fixtures().join(spec["weights"].as_str().unwrap());
    let detector = LineartDetector::load(&weights, &Device::Cpu).unwrap();
    assert_eq!(
        detector.residual_blocks() as u64,
        spec["residual_blocks"].as_u64().unwrap()
    );
    let cases = spec["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    let mut compared_network = 0;
    for case in cases {
        let key = case["key"].as_str().unwrap();
        let path = case["image"].as_str().unwrap();
        let rgb = image::open(fixtures().join(path)).expect(path).to_rgb8();
        let detector = detector
            .clone()
            .with_detect_resolution(case["detect_resolution"].as_u64().unwrap() as u32)
            .unwrap();

        let line = detector.line_map(&rgb).unwrap();
        let size = case["network_size"].as_array().unwrap();
        let (_, _, h, w) = line.dims4().unwrap();
        assert_eq!(
            [h as u64, w as u64],
            [size[0].as_u64().unwrap(), size[1].as_u64().unwrap()]
        );
        // Pixels whose byte may legitimately differ: generator values within the output's
        // float error of a byte boundary (known where the golden has the generator output and
        // the working size is the input's, so no resize mixes pixels).
        let mut near_boundary = None;
        if case["network_output"].as_bool().unwrap() {
            let expected = &golden[&format!("{key}_line")];
            let diff = max_abs_diff(&line, expected);
            eprintln!("{key}: generator output max |diff| {diff:e}");
            // f32 throughout; convolution sums and the instance norms' means and variances
            // are accumulated in another order than torch's, and each of the eleven instance
            // norms divides by a standard deviation over few (2 to 8) channels' pixels: ~1e-5
            // in an output that is at most 1.
            assert!(diff < 5e-5, "{key}: generator output differs by {diff}");
            compared_network += 1;
            if [h as u32, w as u32] == [rgb.height(), rgb.width()] {
                let values: Vec<f32> = expected.flatten_all().unwrap().to_vec1().unwrap();
                let margin = 255.0 * diff;
                near_boundary = Some(
                    values
                        .iter()
                        .filter(|v| {
                            let x = *v * 255.0;
                            (x - x.round()).abs() <= margin
                        })
                        .count(),
                );
            }
        }

        let out = detector.detect(&rgb).unwrap();
        let (expected, w, h) = golden_gray(&golden[&format!("{key}_image")]);
        assert_eq!(out.dimensions(), (w, h), "{key}: output size");
        assert_eq!(
            out.dimensions(),
            rgb.dimensions(),
            "{key}: the input's size"
        );
        let mut differing = 0;
        let mut worst = 0;
        for (p, &e) in out.pixels().zip(&expected) {
            assert!(p.0[0] == p.0[1] && p.0[1] == p.0[2], "{key}: gray output");
            let d = (p.0[0] as i32 - e as i32).abs();
            worst = worst.max(d);
            differing += (d != 0) as usize;
        }
        let dark = expected.iter().filter(|&&v| v < 128).count();
        eprintln!(
            "{key}: {differing} of {} pixels differ (max {worst}), {dark} dark pixels",
            expected.len()
        );
        // The resizes are OpenCV's bit for bit; the bytes are the generator's output times
        // 255 truncated, so a value within the output's float error of an integer can fall
        // on the other side: at most one level, on a handful of pixels.
        assert!(worst <= 1, "{key}: a pixel differs by {worst}");
        assert!(
            differing * 200 <= expected.len(),
            "{key}: {differing} pixels differ"
        );
        if let Some(near) = near_boundary {
            eprintln!("{key}: {near} generator values within its error of a byte boundary");
            assert!(
                differing <= near,
                "{key}: {differing} > {near} pixels differ"
            );
        }
        // Guards against a degenerate golden (all white or all black).
        assert!(
            dark > 0 && dark < expected.len(),
            "{key}: {dark} dark pixels"
        );
    }
    assert_eq!(compared_network, 1);
}

#[test]
fn lineart_refuses_bad_files_and_resolutions() {
    let missing = fixtures().join("preprocessors/lineart/absent.pth");
    assert!(LineartDetector::load(&missing, &Device::Cpu).is_err());
    // A checkpoint of another network lacks the generator's keys.
    let other = fixtures().join("preprocessors/mlsd/mlsd_large_512_fp32.pth");
    let err = LineartDetector::load(&other, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("model0.1.weight"), "{err}");
    let spec = &manifest()["lineart"];
    let weights = fixtures().join(spec["weights"].as_str().unwrap());
    let detector = LineartDetector::load(&weights, &Device::Cpu).unwrap();
    let err = detector.detect(&image::RgbImage::new(0, 0)).unwrap_err();
    assert!(err.to_string().contains("non-empty"), "{err}");
    assert!(detector.with_detect_resolution(32).is_err());
}
