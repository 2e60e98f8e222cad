//! The normal-map detector against the `lllyasviel/sd-controlnet-normal` model card's recipe in
//! Python (OpenCV 3x3 Sobel, background threshold 0.4, z = 2 pi; manifest `depth_normal`), on the
//! tiny DPT's depth: the recipe alone on the reference depth, and the whole detector.

mod common;

use candle_core::{Device, Tensor};
use sd_serve::preprocess::normal::{normal_from_depth, DepthNormal};
use sd_serve::preprocess::Detector;

use common::{fixtures, flat, load_goldens, manifest};

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

/// (pixels that differ, largest difference) between two byte buffers.
fn compare(got: &[u8], want: &[u8]) -> (usize, i32) {
    assert_eq!(got.len(), want.len());
    let diffs: Vec<i32> = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as i32 - *b as i32).abs())
        .collect();
    (
        diffs.iter().filter(|&&d| d != 0).count(),
        diffs.into_iter().max().unwrap_or(0),
    )
}

#[test]
fn recipe_matches_the_model_card() {
    let spec = &manifest()["depth_normal"];
    let golden = load_goldens(spec["file"].as_str().unwrap());
    let depth = &golden["init_predicted_depth"];
    let (h, w) = depth.dims2().unwrap();
    let normal = normal_from_depth(&flat(depth), w, h).unwrap();
    let want = u8s(&golden["init_normal"]);
    let background = want
        .chunks(3)
        .filter(|p| p[0] == 127 && p[1] == 127)
        .count();
    // Both background (flat) and tilted pixels are present.
    assert!(background > want.len() / 30 && background < want.len() / 3 * 9 / 10);
    let (differing, worst) = compare(normal.as_raw(), &want);
    eprintln!(
        "recipe: {differing} of {} bytes differ, by at most {worst}",
        want.len()
    );
    // Same f32 arithmetic; OpenCV's Sobel sums its taps in another order, which can move a
    // value across an integer before truncation: one level, on a few bytes in a thousand.
    assert!(
        worst <= 1 && differing * 200 <= want.len(),
        "{differing} differ, worst {worst}"
    );
}

#[test]
fn detector_matches_the_model_card_on_dpt_depth() {
    let spec = &manifest()["depth_normal"];
    let golden = load_goldens(spec["file"].as_str().unwrap());
    let dir = fixtures().join(spec["model"].as_str().unwrap());
    let detector = DepthNormal::load(&dir, &Device::Cpu).unwrap();
    let mut compared = 0;
    for case in spec["cases"].as_array().unwrap() {
        let key = case["key"].as_str().unwrap();
        let Some(expected) = golden.get(&format!("{key}_normal_rgb")) else {
            continue;
        };
        let image = image::open(fixtures().join(case["image"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        let normal = detector.detect(&image).unwrap();
        assert_eq!(normal.dimensions(), image.dimensions());
        let want = u8s(expected);
        let (differing, worst) = compare(normal.as_raw(), &want);
        eprintln!(
            "{key}: {differing} of {} bytes differ, by at most {worst}",
            want.len()
        );
        // The depth differs from torch's by float noise (see preprocess_depth); through the
        // truncation to 8 bits and the bilinear resize that is at most one level here and there.
        assert!(
            worst <= 1 && differing * 100 <= want.len(),
            "{key}: {differing} differ, worst {worst}"
        );
        compared += 1;
    }
    assert_eq!(compared, 2);
}
