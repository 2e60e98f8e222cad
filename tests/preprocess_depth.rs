//! The DPT depth detector against transformers 5.23 (manifest `depth_normal`): the image
//! processor's output size and 8-bit resize, the tiny DPT's predicted depth, and the
//! depth-estimation pipeline's 8-bit depth map, on the fixture image and the synthetic image.

mod common;

use candle_core::{Device, Tensor};
use sd_serve::preprocess::depth::{DptDepth, DptImageProcessor};
use sd_serve::preprocess::resample::{self, Filter};
use sd_serve::preprocess::Detector;

use common::{fixtures, flat, load_goldens, manifest};

fn detector() -> DptDepth {
    let spec = &manifest()["depth_normal"];
    let dir = fixtures().join(spec["model"].as_str().expect("model"));
    DptDepth::load(&dir, &Device::Cpu).expect("tiny DPT loads")
}

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

#[test]
fn output_sizes_match_transformers() {
    let spec = &manifest()["depth_normal"];
    let cases = spec["resize_sizes"].as_array().expect("resize_sizes");
    assert!(cases.len() >= 20);
    for case in cases {
        let pair = |k: &str| {
            let v = case[k].as_array().unwrap();
            (
                v[0].as_u64().unwrap() as usize,
                v[1].as_u64().unwrap() as usize,
            )
        };
        let processor = DptImageProcessor {
            size: pair("size"),
            keep_aspect_ratio: case["keep_aspect_ratio"].as_bool().unwrap(),
            ensure_multiple_of: case["ensure_multiple_of"].as_u64().unwrap() as usize,
            ..DptImageProcessor::default()
        };
        let (h, w) = pair("input");
        assert_eq!(processor.output_size(h, w), pair("output"), "{case}");
    }
}

#[test]
fn resize_matches_torchvision() {
    let spec = &manifest()["depth_normal"];
    let golden = load_goldens(spec["file"].as_str().unwrap());
    let dpt = detector();
    assert_eq!(dpt.processor().resample, Filter::Bilinear);
    for case in spec["cases"].as_array().unwrap() {
        let key = case["key"].as_str().unwrap();
        let image = image::open(fixtures().join(case["image"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        let mut processor = dpt.processor().clone();
        processor.resample = Filter::from_pil(case["resample"].as_i64().unwrap()).unwrap();
        let resized = processor.resize(&image).unwrap();
        let expected = &golden[&format!("{key}_resized")];
        let (h, w, _) = expected.dims3().unwrap();
        assert_eq!(
            (resized.height() as usize, resized.width() as usize),
            (h, w)
        );
        // Enlargements use the same fixed-point weights and rounding as torch's uint8 kernel:
        // exact.
        let differing = resized
            .as_raw()
            .iter()
            .zip(u8s(expected))
            .filter(|(a, b)| **a != *b)
            .count();
        assert_eq!(differing, 0, "{key}: {differing} bytes differ");
    }
}

#[test]
fn resampler_matches_torchvision_when_shrinking_and_stretching() {
    let spec = &manifest()["depth_normal"];
    let golden = load_goldens(spec["file"].as_str().unwrap());
    let cases = spec["resample_cases"].as_array().expect("resample_cases");
    assert!(cases.len() >= 4);
    for case in cases {
        let image = image::open(fixtures().join(case["image"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        let size = case["size"].as_array().unwrap();
        let (h, w) = (size[0].as_u64().unwrap(), size[1].as_u64().unwrap());
        let filter = Filter::from_pil(case["resample"].as_i64().unwrap()).unwrap();
        let resized = resample::resize_rgb(&image, w as u32, h as u32, filter).unwrap();
        let expected = u8s(&golden[case["tensor"].as_str().unwrap()]);
        // Same fixed-point weights, precision and rounding as torch's uint8 kernel: exact.
        assert_eq!(resized.as_raw(), &expected, "{case}");
    }
}

#[test]
fn predicted_depth_and_depth_map_match_transformers() {
    let spec = &manifest()["depth_normal"];
    assert_eq!(spec["depth_scaling"], "min-max");
    let golden = load_goldens(spec["file"].as_str().unwrap());
    let dpt = detector();
    let mut report = Vec::new();
    for case in spec["cases"].as_array().unwrap() {
        let key = case["key"].as_str().unwrap();
        let Some(expected) = golden.get(&format!("{key}_predicted_depth")) else {
            continue;
        };
        let image = image::open(fixtures().join(case["image"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        let depth = dpt
            .predict(&dpt.pixel_values(&image).unwrap())
            .unwrap()
            .squeeze(0)
            .unwrap();
        assert_eq!(depth.dims(), expected.dims(), "{key}");
        let (got, want) = (flat(&depth), flat(expected));
        let range = want.iter().copied().fold(0f32, f32::max);
        let zeros = want.iter().filter(|&&v| v == 0.0).count();
        // The map must have structure for the comparison to mean something: a spread of values
        // and some of the ReLU's zeros.
        assert!(range > 10.0 && zeros > 0 && zeros < want.len() / 2, "{key}");
        let max_diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // f32 throughout on both sides; only summation order differs (candle's matmul and
        // im2col convolutions vs torch's) through 4 transformer layers and 13 convolutions, a
        // few ulps (f32 eps 1.2e-7) of the activations each: measured 4e-6 of the depth range.
        assert!(
            max_diff <= 2e-5 * range,
            "{key}: predicted depth max diff {max_diff} (range {range})"
        );

        let control = dpt.detect(&image).unwrap();
        assert_eq!(control.dimensions(), image.dimensions());
        assert!(control
            .pixels()
            .all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
        let expected_gray = u8s(&golden[&format!("{key}_depth_gray")]);
        let gray: Vec<u8> = control.pixels().map(|p| p.0[0]).collect();
        let diffs: Vec<i32> = gray
            .iter()
            .zip(&expected_gray)
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .collect();
        let differing = diffs.iter().filter(|&&d| d != 0).count();
        let worst = diffs.iter().copied().max().unwrap();
        let levels = expected_gray
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        report.push(format!(
            "{key}: depth max diff {max_diff:.2e} (range {range:.1}); depth map {differing} of {} \
             pixels differ, by at most {worst}; {levels} gray levels",
            gray.len()
        ));
        // The 8-bit map truncates `255 (d - min) / (max - min)`: a value within float noise of
        // an integer may land on either side, so one level, on a few pixels in a thousand.
        assert!(worst <= 1, "{key}: a pixel differs by {worst}");
        assert!(
            differing * 200 <= gray.len(),
            "{key}: {differing} pixels differ"
        );
        assert!(levels > 50, "{key}: only {levels} gray levels");
    }
    eprintln!("{}", report.join("\n"));
    assert_eq!(report.len(), 2);
}

#[test]
fn missing_or_foreign_folders_are_refused() {
    let err = DptDepth::load(&fixtures().join("no-such-dpt"), &Device::Cpu)
        .err()
        .expect("a missing folder is an error")
        .to_string();
    assert!(err.contains("no-such-dpt"), "{err}");
    // A diffusers ControlNet folder is not a DPT: its weights are missing.
    let cn = fixtures().join("controlnets");
    let first = std::fs::read_dir(&cn)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.join("config.json").is_file())
        .expect("a ControlNet folder");
    assert!(DptDepth::load(&first, &Device::Cpu).is_err());
}
