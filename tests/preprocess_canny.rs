//! The Canny preprocessor against `cv2.Canny` (opencv-python-headless, manifest
//! `controlnet.canny`): OpenCV's RGB -> gray conversion and its edge maps on the fixture image
//! and a harder synthetic image (steps at several angles, a ring, a one-pixel line, a weak edge,
//! noise), at three threshold pairs.

mod common;

use candle_core::Tensor;
use sd_serve::preprocess::canny;

use common::{fixtures, load_goldens, manifest};

fn to_u8(t: &Tensor) -> (Vec<u8>, usize, usize) {
    let (h, w) = t.dims2().expect("2-D golden");
    (t.flatten_all().unwrap().to_vec1::<u8>().unwrap(), w, h)
}

#[test]
fn canny_matches_opencv() {
    let manifest = manifest();
    let spec = &manifest["controlnet"]["canny"];
    assert_eq!(spec["l2_gradient"], false);
    let golden = load_goldens(spec["file"].as_str().expect("file"));
    let cases = spec["cases"].as_array().expect("canny cases");
    assert!(cases.len() >= 6);
    let mut report = Vec::new();
    for case in cases {
        let path = case["image"].as_str().expect("image");
        let rgb = image::open(fixtures().join(path)).expect(path).to_rgb8();
        let gray = canny::rgb_to_gray(&rgb);
        let key = path.trim_start_matches("goldens/").trim_end_matches(".png");
        let key = if key == "init" { "init" } else { "synthetic" };
        let (expected_gray, w, h) = to_u8(&golden[&format!("{key}_gray")]);
        assert_eq!((w as u32, h as u32), gray.dimensions());
        assert_eq!(gray.as_raw(), &expected_gray, "{path}: grayscale");

        let low = case["low"].as_f64().unwrap();
        let high = case["high"].as_f64().unwrap();
        let edges = canny::canny(&gray, low, high).unwrap();
        let (expected, _, _) = to_u8(&golden[case["tensor"].as_str().unwrap()]);
        let differing = edges
            .as_raw()
            .iter()
            .zip(&expected)
            .filter(|(a, b)| a != b)
            .count();
        let edge_pixels = expected.iter().filter(|&&v| v == 255).count();
        report.push(format!(
            "{key} {low}/{high}: {edge_pixels} edge pixels, {differing} differ"
        ));
        assert_eq!(
            differing, 0,
            "{key} {low}/{high}: {differing} pixels differ"
        );
    }
    eprintln!("{}", report.join("\n"));
    // The comparison means something only where OpenCV found edges.
    let total_edges: u64 = cases
        .iter()
        .map(|c| c["edge_pixels"].as_u64().unwrap())
        .sum();
    assert!(
        total_edges > 1000,
        "the goldens have {total_edges} edge pixels"
    );
}
