//! The segmentation preprocessor (UperNet + ConvNeXt) against transformers 5.23 on a tiny
//! random-weight model of the public architecture (manifest `segmentation`): the image
//! processor's pixels, the decode head's logits, the class map at the image's size, and the
//! ADE20K-coloured control image the `sd-controlnet-seg` card makes.

mod common;

use candle_core::{Device, Tensor};
use sd_serve::preprocess::segmentation::{colorize, UperNetSegmenter, ADE20K_PALETTE};
use sd_serve::preprocess::Detector;

use common::{copy_dir, fixtures, flat, load_goldens, manifest, max_abs, max_abs_diff, scratch};

struct Case {
    model: UperNetSegmenter,
    image: image::RgbImage,
    golden: std::collections::HashMap<String, Tensor>,
    spec: serde_json::Value,
}

fn case() -> Case {
    let spec = manifest()["segmentation"].clone();
    let dir = fixtures().join(spec["model"].as_str().expect("model"));
    let model = UperNetSegmenter::load(&dir, &Device::Cpu).expect("load the tiny UperNet");
    let path = fixtures().join(spec["image"].as_str().expect("image"));
    let image = image::open(&path).expect("test image").to_rgb8();
    let golden = load_goldens(spec["file"].as_str().expect("file"));
    Case {
        model,
        image,
        golden,
        spec,
    }
}

#[test]
fn pixels_and_logits_match_transformers() {
    let c = case();
    let pixels = c.model.preprocess(&c.image).unwrap();
    let expected_pixels = &c.golden["pixel_values"];
    assert_eq!(pixels.dims(), expected_pixels.dims());
    let pixel_diff = max_abs_diff(&pixels, expected_pixels);
    eprintln!("pixel values: max |diff| {pixel_diff:e}");
    // The 8-bit resize is torch's integer kernel reproduced bit for bit, and the normalisation
    // is the same two f32 operations with the same f32 constants: equal values.
    assert_eq!(pixel_diff, 0.0, "pixel values differ");

    let expected = &c.golden["logits"];
    let logits = c.model.logits(expected_pixels).unwrap();
    assert_eq!(logits.dims(), expected.dims());
    let scale = max_abs(expected);
    let diff = max_abs_diff(&logits, expected);
    eprintln!("logits: max |diff| {diff:e} (max |logit| {scale})");
    // f32 throughout; the sums are taken in another order (BatchNorm folded into the
    // convolutions, the depthwise convolution as 49 shifted multiply-adds, other GEMM blocking):
    // a few ulps per layer over ~20 layers leaves ~1e-6 relative; 1e-5 of the logit scale
    // bounds that with room, and is far below what a wrong layer gives (order 1).
    assert!(
        diff <= 1e-5 * scale,
        "logits differ by {diff} (scale {scale})"
    );
    assert!(scale > 1.0, "the logits are degenerate ({scale})");
}

#[test]
fn class_map_and_control_image_match_the_model_card() {
    let c = case();
    let (w, h) = c.image.dimensions();
    let expected: Vec<u8> = flat(&c.golden["classes"])
        .iter()
        .map(|&v| v as u8)
        .collect();
    let margin = flat(&c.golden["margin"]);
    assert_eq!(expected.len(), (w * h) as usize);
    let classes = c.model.segment(&c.image).unwrap();
    assert_eq!(classes.len(), expected.len());

    // Our own upsampled scores, to check that a differing pixel is a near-tie on our side too.
    let pixels = c.model.preprocess(&c.image).unwrap();
    let (_, _, ih, iw) = pixels.dims4().unwrap();
    let logits = c.model.logits(&pixels).unwrap();
    let scores = c
        .model
        .class_scores(&logits, (iw, ih), w as usize, h as usize)
        .unwrap();
    let scores = flat(&scores);
    let plane = (w * h) as usize;
    let mut differing = Vec::new();
    for (i, (&ours, &theirs)) in classes.iter().zip(&expected).enumerate() {
        if ours == theirs {
            continue;
        }
        let gap = scores[ours as usize * plane + i] - scores[theirs as usize * plane + i];
        differing.push((i, ours, theirs, margin[i], gap));
    }
    eprintln!(
        "class map: {} of {} pixels differ {:?}; reference margins below 1e-3: {}",
        differing.len(),
        plane,
        differing,
        margin.iter().filter(|&&m| m < 1e-3).count()
    );
    // The logits agree to ~1e-6 relative (see the logits test): a pixel may only change class
    // where the reference's two best classes are within 1e-3 of each other, and then our two
    // scores for them must be as close. Such ties sit on class boundaries; at most 1% of them.
    for &(i, ours, theirs, m, gap) in &differing {
        assert!(
            m < 1e-3 && gap < 1e-3,
            "pixel {i}: class {ours} for {theirs}, reference margin {m}, our gap {gap}"
        );
    }
    assert!(
        differing.len() * 100 <= plane,
        "{} pixels differ",
        differing.len()
    );
    let present: std::collections::BTreeSet<u8> = expected.iter().copied().collect();
    assert!(
        present.len() >= 5,
        "the class map is nearly uniform: {present:?}"
    );

    // The coloured control image: the model card's palette loop, from the class map.
    let png = fixtures().join(c.spec["control_image"].as_str().expect("control_image"));
    let expected_image = image::open(&png).expect("golden control image").to_rgb8();
    assert_eq!(colorize(&expected, w, h).unwrap(), expected_image);
    let control = c.model.detect(&c.image).unwrap();
    assert_eq!(control.dimensions(), (w, h));
    let mismatched: Vec<usize> = control
        .pixels()
        .zip(expected_image.pixels())
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect();
    // Only the near-tie pixels above may show another class's colour.
    let tied: Vec<usize> = differing.iter().map(|d| d.0).collect();
    assert_eq!(mismatched, tied);
    assert_eq!(ADE20K_PALETTE[0], [120, 120, 120], "wall is class 0");
}

#[test]
fn unsupported_settings_are_refused_by_name() {
    let spec = manifest()["segmentation"].clone();
    let dir = fixtures().join(spec["model"].as_str().expect("model"));
    let tmp = scratch("segmentation-refusals");
    let copy = tmp.as_ref().join("model");
    copy_dir(&dir, &copy, &|_| false);
    let processor = copy.join("preprocessor_config.json");
    let original = std::fs::read_to_string(&processor).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&original).unwrap();
    cfg["resample"] = 0.into();
    std::fs::write(&processor, cfg.to_string()).unwrap();
    let err = UperNetSegmenter::load(&copy, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("resample 0"), "{err}");

    std::fs::remove_file(&processor).unwrap();
    let err = UperNetSegmenter::load(&copy, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("preprocessor_config.json"), "{err}");

    std::fs::write(&processor, &original).unwrap();
    let config = copy.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    cfg["backbone_config"]["hidden_act"] = "relu".into();
    std::fs::write(&config, cfg.to_string()).unwrap();
    let err = UperNetSegmenter::load(&copy, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("hidden_act relu"), "{err}");

    let empty = image::RgbImage::new(0, 0);
    let model = UperNetSegmenter::load(&dir, &Device::Cpu).unwrap();
    assert!(model.detect(&empty).is_err());
}
