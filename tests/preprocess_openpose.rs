//! Parity of the OpenPose body detector with controlnet_aux 0.0.10 (goldens from
//! `make_fixtures.py openpose`, see tests/fixtures/README.md "OpenPose"): the network on a tiny
//! random-weight `body_pose_model.pth`, the body estimation on made-up network outputs with two
//! known people, and the whole detector on the Canny test photo.

mod common;

use candle_core::{DType, Device, Tensor};
use sd_serve::preprocess::openpose::{
    draw_bodypose, estimate_from_network, resize_image, BodyEstimate, NetworkOutput,
    OpenposeDetector, DETECT_RESOLUTION,
};
use sd_serve::preprocess::Detector;

fn detector() -> OpenposeDetector {
    let m = common::manifest();
    let path = common::fixtures().join(m["openpose"]["model"].as_str().expect("model path"));
    OpenposeDetector::load(&path, &Device::Cpu).expect("loads body_pose_model.pth")
}

fn rgb(path: &str) -> image::RgbImage {
    let p = common::fixtures().join(path);
    image::open(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .to_rgb8()
}

/// Compares our estimate with the reference's `candidate` [N, 4] and `subset` [M, 20] arrays;
/// `score_tol` bounds the difference of a candidate's heatmap score.
fn assert_same_estimate(ours: &BodyEstimate, candidates: &Tensor, subset: &Tensor, score_tol: f64) {
    let c = common::flat64(candidates);
    assert_eq!(ours.candidates.len() * 4, c.len(), "candidate count");
    let worst = ours
        .candidates
        .iter()
        .zip(c.chunks_exact(4))
        .map(|(o, t)| (o.score - t[2]).abs())
        .fold(0.0, f64::max);
    eprintln!(
        "openpose: {} candidates, max score |diff| {worst:e}",
        ours.candidates.len()
    );
    for (k, (ours, theirs)) in ours.candidates.iter().zip(c.chunks_exact(4)).enumerate() {
        // Positions and ids are integers and must be equal.
        assert_eq!(
            (ours.x, ours.y, ours.id as f64),
            (theirs[0], theirs[1], theirs[3]),
            "candidate {k}"
        );
        assert!(
            (ours.score - theirs[2]).abs() < score_tol,
            "candidate {k} score {} vs {}",
            ours.score,
            theirs[2]
        );
    }
    let s = common::flat64(subset);
    assert_eq!(ours.people.len() * 20, s.len(), "people");
    for (p, (person, row)) in ours.people.iter().zip(s.chunks_exact(20)).enumerate() {
        for (part, (ours, id)) in person.parts.iter().zip(&row[..18]).enumerate() {
            let theirs = (*id >= 0.0).then_some(*id as usize);
            assert_eq!(*ours, theirs, "person {p} part {part}");
        }
        assert_eq!(person.count, row[19], "person {p} part count");
        // A sum of at most 18 candidate scores and 17 PAF integrals (these from the same maps).
        assert!(
            (person.score - row[18]).abs() < 40.0 * score_tol,
            "person {p} score {} vs {}",
            person.score,
            row[18]
        );
    }
}

/// Number of pixels (of any channel) that differ.
fn differing_pixels(a: &image::RgbImage, b: &image::RgbImage) -> usize {
    assert_eq!(a.dimensions(), b.dimensions(), "image sizes");
    a.pixels().zip(b.pixels()).filter(|(x, y)| x != y).count()
}

#[test]
fn network_matches_reference() {
    let det = detector();
    let g = common::load_goldens("openpose.safetensors");
    let init = rgb("goldens/init.png");
    let bgr: Vec<u8> = init.pixels().flat_map(|p| [p[2], p[1], p[0]]).collect();
    let input =
        OpenposeDetector::network_input(&bgr, init.width() as usize, init.height() as usize)
            .expect("input");
    let (pafs, heatmaps) = det.network(&input).expect("runs");
    let (ref_pafs, ref_heatmaps) = (&g["net_pafs"], &g["net_heatmaps"]);
    assert_eq!(pafs.dims(), ref_pafs.dims());
    assert_eq!(heatmaps.dims(), ref_heatmaps.dims());
    let dp = common::max_abs_diff(&pafs, ref_pafs);
    let dh = common::max_abs_diff(&heatmaps, ref_heatmaps);
    let scale = common::max_abs(ref_pafs).max(common::max_abs(ref_heatmaps));
    eprintln!("openpose network: max |diff| pafs {dp:e}, heatmaps {dh:e} (outputs up to {scale})");
    assert!(scale > 0.1, "the reference outputs are not trivial");
    // f32 throughout; candle's im2col matmul and torch's convolution sum the 27..3000 products
    // of each of the 55 convolutions in different orders: a few ulp per layer on values of
    // order 1 (measured 3e-6 on outputs up to 2.2).
    assert!(dp < 1e-5 && dh < 1e-5, "pafs {dp}, heatmaps {dh}");
}

#[test]
fn body_estimation_matches_reference_on_made_up_maps() {
    let m = common::manifest();
    let maps = &m["openpose"]["maps"];
    let size = |v: &serde_json::Value| {
        (
            v[1].as_u64().expect("width") as usize,
            v[0].as_u64().expect("height") as usize,
        )
    };
    let (image, scaled) = (size(&maps["image_size"]), size(&maps["scaled_size"]));
    let g = common::load_goldens("openpose.safetensors");
    let pafs = g["maps_pafs"].to_dtype(DType::F32).unwrap();
    let heatmaps = g["maps_heatmaps"].to_dtype(DType::F32).unwrap();
    let (_, _, height, width) = pafs.dims4().unwrap();
    let output = NetworkOutput {
        pafs: common::flat(&pafs),
        heatmaps: common::flat(&heatmaps),
        height,
        width,
    };
    let estimate = estimate_from_network(&output, scaled, image);
    assert_eq!(estimate.people.len(), 2, "two people");
    // The same f32 maps on both sides: the scores are f32 Lanczos sums (8 + 8 taps per resize),
    // whose order OpenCV's vector code may change: a few ulp of values below 1 (6e-8 each).
    assert_same_estimate(&estimate, &g["maps_candidates"], &g["maps_subset"], 1e-6);
    let drawn = draw_bodypose(&estimate, image.0 as u32, image.1 as u32);
    let reference = rgb(maps["output"].as_str().expect("output image"));
    let lit = reference.pixels().filter(|p| p.0 != [0, 0, 0]).count();
    assert!(
        lit > 1000,
        "the reference drawing has its people ({lit} pixels)"
    );
    // Same keypoints, and OpenCV's rasterisers reimplemented exactly: every pixel equal.
    assert_eq!(differing_pixels(&drawn, &reference), 0);
}

#[test]
fn detector_matches_reference_on_photo() {
    let det = detector();
    let m = common::manifest();
    let photo_case = &m["openpose"]["photo"];
    let photo = rgb(photo_case["image"].as_str().expect("image"));
    let g = common::load_goldens("openpose.safetensors");
    let resized = resize_image(&photo, DETECT_RESOLUTION).expect("resizes");
    let estimate = det.estimate(&resized).expect("estimates");
    assert!(
        !estimate.candidates.is_empty(),
        "the tiny network finds candidates"
    );
    // Here the maps come from the network, which differs from torch's by up to 1e-5 (see
    // `network_matches_reference`); two Lanczos resizes (weights summing to 1 in magnitude at
    // most 1.3 per axis) can amplify that about 3 times.
    assert_same_estimate(&estimate, &g["photo_candidates"], &g["photo_subset"], 3e-5);
    // `detect_at_detect_resolution` is this estimate drawn at the resized image's size.
    let ours = draw_bodypose(&estimate, resized.width(), resized.height());
    let reference = rgb(photo_case["output"].as_str().expect("output image"));
    assert_eq!(differing_pixels(&ours, &reference), 0);
    // The trait's output has the input's size (the drawing resized back, area averaging).
    let control = det.detect(&photo).expect("detects");
    let lit = control.pixels().filter(|p| p.0 != [0, 0, 0]).count();
    assert!(lit > 100, "the people survive the resize ({lit} pixels)");
    assert_eq!(control.dimensions(), photo.dimensions());
}

#[test]
fn load_names_a_missing_or_wrong_checkpoint() {
    let missing = common::fixtures().join("annotators/openpose/missing.pth");
    let err = OpenposeDetector::load(&missing, &Device::Cpu).expect_err("no file");
    assert!(err.to_string().contains("missing.pth"), "{err}");
    // A checkpoint of another kind (a ControlNet's weights) is refused, naming the first
    // missing layer.
    let dir = common::scratch("openpose-wrong");
    let path = dir.join("body_pose_model.pth");
    std::fs::copy(common::fixtures().join("embeddings/sd15_tinycat.pt"), &path).expect("copies");
    let err = OpenposeDetector::load(&path, &Device::Cpu).expect_err("wrong weights");
    assert!(err.to_string().contains("conv1_1"), "{err}");
}
