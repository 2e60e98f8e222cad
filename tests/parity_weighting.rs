//! Prompt weighting against its references: the A1111 algorithm as written out in
//! `make_fixtures.py` (its syntax, 75-token chunks with comma backtracking, `BREAK`, "Original"
//! emphasis, SDXL's zeroed empty negative prompt, padding with empty-prompt chunks) and the
//! `compel` package itself (`truncate_long_prompts=False`; SDXL through `CompelForSDXL`), on
//! tiny-sd15 and tiny-sdxl in f32 on the CPU.

mod common;

use std::collections::HashMap;

use candle_core::Tensor;
use sd_serve::pipeline::weighting::{a1111, compel_syntax};
use sd_serve::pipeline::{
    GenerationRequest, InitImage, MaskImage, PromptWeighting, StableDiffusion,
};

use common::{fixtures, load_goldens, manifest, max_abs_diff, read_json};

/// Embeddings: the CLIP encoders alone agree with transformers to 1.6e-6 (README, bound 1e-5);
/// weighting multiplies them by at most 1.3^2 here, A1111 rescales by a ratio of means (f32
/// sums in another order than torch's), compel mixes up to three encodings with tan-derived
/// f32 weights. Twice the encoder bound covers all of it.
const EMBEDDING_TOLERANCE: f32 = 2e-5;

fn syntax(name: &str) -> PromptWeighting {
    match name {
        "a1111" => PromptWeighting::A1111,
        "compel" => PromptWeighting::Compel,
        other => panic!("unknown syntax {other}"),
    }
}

#[test]
fn a1111_parse_matches_reference() {
    let parse = read_json(&fixtures().join("goldens/weighting_parse.json"));
    let cases = parse["a1111"].as_array().expect("a1111 cases");
    assert!(cases.len() >= 30);
    for case in cases {
        let prompt = case["prompt"].as_str().expect("prompt");
        let got = a1111::parse(prompt).unwrap_or_else(|e| panic!("{prompt:?}: {e}"));
        let want = case["pieces"].as_array().expect("pieces");
        assert_eq!(got.len(), want.len(), "{prompt:?}: {got:?} vs {want:?}");
        for ((text, weight), w) in got.iter().zip(want) {
            assert_eq!(text, w[0].as_str().expect("text"), "{prompt:?}: {got:?}");
            // The same f64 products in the same order: equal up to the last bit or two.
            let expected = w[1].as_f64().expect("weight");
            assert!(
                (weight - expected).abs() <= 1e-12,
                "{prompt:?}: {got:?} vs {want:?}"
            );
        }
    }
}

fn fragments_match(got: &[compel_syntax::Fragment], want: &serde_json::Value, prompt: &str) {
    let want = want.as_array().expect("fragments");
    assert_eq!(got.len(), want.len(), "{prompt:?}: {got:?} vs {want:?}");
    for ((text, weight), w) in got.iter().zip(want) {
        assert_eq!(
            text,
            w[0].as_str().expect("text"),
            "{prompt:?}: {got:?} vs {want:?}"
        );
        let expected = w[1].as_f64().expect("weight");
        assert!(
            (weight - expected).abs() <= 1e-12,
            "{prompt:?}: {got:?} vs {want:?}"
        );
    }
}

#[test]
fn compel_parse_matches_compel() {
    let parse = read_json(&fixtures().join("goldens/weighting_parse.json"));
    let cases = parse["compel"].as_array().expect("compel cases");
    assert!(cases.len() >= 50);
    for case in cases {
        let prompt = case["prompt"].as_str().expect("prompt");
        let got = compel_syntax::parse(prompt).unwrap_or_else(|e| panic!("{prompt:?}: {e}"));
        let want = &case["parsed"];
        let weights: Vec<f64> = want["weights"]
            .as_array()
            .expect("weights")
            .iter()
            .map(|w| w.as_f64().expect("weight"))
            .collect();
        assert_eq!(got.weights, weights, "{prompt:?}");
        let parts = want["parts"].as_array().expect("parts");
        assert_eq!(got.parts.len(), parts.len(), "{prompt:?}: {got:?}");
        for (part, w) in got.parts.iter().zip(parts) {
            match part {
                compel_syntax::Part::Prompt(fragments) => {
                    fragments_match(fragments, &w["prompt"], prompt)
                }
                compel_syntax::Part::Blend {
                    prompts,
                    weights,
                    normalize,
                } => {
                    let want_prompts = w["blend"].as_array().expect("blend prompts");
                    assert_eq!(prompts.len(), want_prompts.len(), "{prompt:?}");
                    for (p, wp) in prompts.iter().zip(want_prompts) {
                        fragments_match(p, wp, prompt);
                    }
                    let want_weights: Vec<f64> = w["weights"]
                        .as_array()
                        .expect("blend weights")
                        .iter()
                        .map(|x| x.as_f64().expect("weight"))
                        .collect();
                    assert_eq!(weights, &want_weights, "{prompt:?}");
                    assert_eq!(Some(*normalize), w["normalize"].as_bool(), "{prompt:?}");
                }
            }
        }
    }
}

fn case_request(case: &serde_json::Value) -> GenerationRequest {
    let mut req = GenerationRequest::new(case["prompt"].as_str().expect("prompt"));
    req.negative_prompt = case["negative_prompt"].as_str().map(str::to_string);
    req.clip_skip = case["clip_skip"].as_u64().map(|k| k as usize);
    req.prompt_weighting = syntax(case["syntax"].as_str().expect("syntax"));
    req
}

#[test]
fn weighted_embeddings_match_references() {
    let manifest = manifest();
    let cases = manifest["weighting"]["cases"].as_array().expect("cases");
    assert!(cases.len() >= 16);
    let mut pipelines: HashMap<String, StableDiffusion> = HashMap::new();
    let mut goldens: HashMap<String, HashMap<String, Tensor>> = HashMap::new();
    let mut worst: HashMap<String, f32> = HashMap::new();
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let model = case["model"].as_str().expect("model").to_string();
        let file = case["file"].as_str().expect("file").to_string();
        let sd = pipelines
            .entry(model.clone())
            .or_insert_with(|| common::pipeline(&model));
        let gold = goldens
            .entry(file.clone())
            .or_insert_with(|| load_goldens(&file));
        let req = case_request(case);
        let (cond, uncond) = sd
            .prompt_embeddings(&req, true)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let uncond = uncond.expect("guided requests have negative embeddings");
        let len = case["sequence_length"].as_u64().expect("length") as usize;
        assert_eq!(cond.hidden.dim(1).unwrap(), len, "{name}");
        let group = format!("{model} {}", case["syntax"].as_str().expect("syntax"));
        let mut check = |what: &str, ours: &Tensor| {
            let key = format!("{name}.{what}");
            let reference = gold.get(&key).unwrap_or_else(|| panic!("golden {key}"));
            assert_eq!(ours.dims(), reference.dims(), "{key}");
            let diff = max_abs_diff(ours, reference);
            assert!(diff <= EMBEDDING_TOLERANCE, "{key}: max abs diff {diff}");
            let w = worst.entry(group.clone()).or_insert(0.0);
            *w = w.max(diff);
        };
        check("cond_hidden", &cond.hidden);
        check("uncond_hidden", &uncond.hidden);
        if case["has_pooled"].as_bool() == Some(true) {
            check("cond_pooled", cond.pooled.as_ref().expect("SDXL pooled"));
            check(
                "uncond_pooled",
                uncond.pooled.as_ref().expect("SDXL pooled"),
            );
        } else {
            assert!(cond.pooled.is_none(), "{name}");
        }
    }
    let mut report: Vec<_> = worst.into_iter().collect();
    report.sort_by(|a, b| a.0.cmp(&b.0));
    for (group, diff) in report {
        println!("prompt weighting, {group}: largest embedding difference {diff:e}");
    }
}

/// The UNet reads 77 * k text positions: a weighted long prompt runs through txt2img, img2img
/// and inpainting on both families, gives finite images, and differs from the same prompt
/// truncated.
#[test]
fn long_prompts_run_through_the_unet() {
    let manifest = manifest();
    let cases = manifest["weighting"]["cases"].as_array().expect("cases");
    for model in ["tiny-sd15", "tiny-sdxl"] {
        let sd = common::pipeline(model);
        let long = cases
            .iter()
            .find(|c| c["model"] == model && c["name"].as_str().unwrap().ends_with("a1111_long"))
            .expect("a long A1111 case");
        let mut req = case_request(long);
        req.width = 64;
        req.height = 64;
        req.steps = 2;
        req.seed = 5;
        req.num_images = 2;
        let seed_image = image::RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 4) as u8, ((x + y) * 2) as u8])
        });
        let mask =
            image::GrayImage::from_fn(64, 64, |x, _| image::Luma([if x > 24 { 255 } else { 0 }]));
        let starts: [(&str, Option<InitImage>, Option<MaskImage>); 3] = [
            ("txt2img", None, None),
            (
                "img2img",
                Some(InitImage {
                    image: seed_image.clone(),
                    strength: 0.75,
                }),
                None,
            ),
            (
                "inpaint",
                Some(InitImage {
                    image: seed_image,
                    strength: 1.0,
                }),
                Some(MaskImage {
                    image: mask,
                    margin: None,
                }),
            ),
        ];
        for (what, init, mask) in starts {
            req.init_image = init;
            req.mask = mask;
            req.prompt_weighting = PromptWeighting::A1111;
            let weighted = sd.generate(&req, &mut |_, _| true).unwrap().images;
            assert!(common::all_finite(&weighted), "{model} {what}");
            req.prompt_weighting = PromptWeighting::None;
            let plain = sd.generate(&req, &mut |_, _| true).unwrap().images;
            let diff = max_abs_diff(&weighted, &plain);
            assert!(
                diff > 1e-4,
                "{model} {what}: weighting changed nothing ({diff})"
            );
        }
    }
}
