//! ControlNet parity with diffusers' `StableDiffusionControlNetPipeline` and
//! `StableDiffusionXLControlNetPipeline` on the tiny fixture models and ControlNets (manifest
//! `controlnet`): one ControlNet, a scale with a start fraction, guess mode (`ControlMode::ControlNet`),
//! two ControlNets (MultiControlNet) with their own scales and end fractions; then properties
//! of the control (it changes the output, scale 0 and an empty window do not). ControlNet
//! inpainting against `StableDiffusionControlNetInpaintPipeline` and its SDXL form (manifest
//! `controlnet_extra`) and with an inpaint ControlNet's condition, the seed image with its masked
//! pixels at -1 (manifest `controlnet_inpaint_condition`), and the single-file ControlNet
//! (original layout) against its folder.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use sd_serve::models::controlnet::ControlNetModel;
use sd_serve::pipeline::{
    ControlCondition, ControlMode, ControlNetUnit, GenerationRequest, MaskImage,
};
use sd_serve::weights::{load_controlnet_file, WeightStore};

use common::{
    check_golden_cases, fixtures, golden_request, load_goldens, manifest, max_abs_diff,
    max_abs_store_diff, pipeline, registry, scratch, Pipelines,
};

/// Same bounds as the txt2img parity (`parity_pipeline.rs`, `parity_inpaint.rs`): 3 steps of a
/// UNet plus a ControlNet with guidance in f32 (inpainting adds two VAE encodings of the seed),
/// where the reference sums in another order (and
/// computes the guess-mode `logspace` ramp in its own way, which may round the last bit
/// differently); rounding differences of a few 1e-7 per op grow with guidance. Latents are
/// compared unnormalised (std 3 to 16 on these random weights); images are 0..1 pixels after one
/// f32 VAE decode.
const IMAGE_TOL: f32 = 2e-5;
const LATENT_TOL: f32 = 2e-4;

fn load_controlnet(name: &str) -> ControlNetModel {
    ControlNetModel::load(
        &fixtures().join("controlnets").join(name),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn rgb(path: &str) -> image::RgbImage {
    image::open(fixtures().join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .to_rgb8()
}

/// The golden case's request and its units' model names.
fn request_for(case: &serde_json::Value) -> GenerationRequest {
    let mut req = golden_request(case);
    let guess = case["guess_mode"].as_bool().expect("guess_mode");
    for unit in case["units"].as_array().expect("units") {
        let f = |k: &str| unit[k].as_f64().unwrap_or_else(|| panic!("unit field {k}"));
        let model = unit["model"].as_str().expect("model");
        req.controlnets.push(ControlNetUnit {
            condition: match unit["condition"].as_str() {
                Some("inpaint") => ControlCondition::Inpaint,
                Some("image") | None => ControlCondition::Image,
                Some(other) => panic!("unknown condition {other}"),
            },
            model: model.to_string(),
            image: rgb(unit["image"].as_str().expect("image")),
            scale: f("scale"),
            start: f("start"),
            end: f("end"),
            mode: if guess {
                ControlMode::ControlNet
            } else {
                ControlMode::Balanced
            },
        });
    }
    req
}

/// The ControlNets of the request's units, in order.
fn load_controlnets(req: &GenerationRequest) -> Vec<ControlNetModel> {
    req.controlnets
        .iter()
        .map(|u| load_controlnet(&u.model))
        .collect()
}

#[test]
fn controlnet_pipelines_match_diffusers() {
    let manifest = manifest();
    let cases = manifest["controlnet"]["cases"]
        .as_array()
        .expect("controlnet cases");
    assert!(cases.len() >= 4, "expected the golden ControlNet cases");
    check_golden_cases(cases, (LATENT_TOL, IMAGE_TOL), request_for, |sd, req| {
        let nets = load_controlnets(req);
        let net_refs: Vec<&ControlNetModel> = nets.iter().collect();
        sd.denoise_latents_controlled(req, &net_refs, &mut |_, _| true)
    });
}

fn small_request() -> GenerationRequest {
    let mut req = GenerationRequest::new("a red bicycle");
    req.negative_prompt = Some("blurry".into());
    req.width = 64;
    req.height = 64;
    req.steps = 3;
    req.seed = 9;
    req
}

#[test]
fn the_control_image_and_scale_matter() {
    let sd = pipeline("tiny-sd15");
    let net = load_controlnet("tiny-sd15-controlnet-a");
    let run = |req: &GenerationRequest| {
        sd.denoise_latents_controlled(req, &[&net], &mut |_, _| true)
            .unwrap()
    };
    let plain = sd
        .denoise_latents(&small_request(), &mut |_, _| true)
        .unwrap();

    let mut req = small_request();
    req.controlnets
        .push(ControlNetUnit::new("a", rgb("goldens/init.png")));
    let controlled = run(&req);
    let effect = max_abs_diff(&controlled, &plain);
    eprintln!("control vs none: {effect:.3e}");
    assert!(effect > 1e-2, "no effect");

    // Another control image gives another result.
    req.controlnets[0].image = rgb("goldens/canny_synthetic_64.png");
    let other = run(&req);
    let effect = max_abs_diff(&other, &controlled);
    eprintln!("another control image: {effect:.3e}");
    assert!(effect > 1e-2, "image ignored");

    // Scale 0 adds zero residuals: the plain result, exactly.
    req.controlnets[0].scale = 0.0;
    assert_eq!(max_abs_diff(&run(&req), &plain), 0.0);

    // Each mode differs from the others.
    req.controlnets[0].scale = 1.0;
    let mut by_mode = Vec::new();
    for mode in [
        ControlMode::Balanced,
        ControlMode::Prompt,
        ControlMode::ControlNet,
    ] {
        req.controlnets[0].mode = mode;
        by_mode.push(run(&req));
    }
    assert!(max_abs_diff(&by_mode[0], &by_mode[1]) > 1e-3);
    assert!(max_abs_diff(&by_mode[1], &by_mode[2]) > 1e-3);

    // A control image of another size is resized to the output size.
    req.controlnets[0].mode = ControlMode::Balanced;
    req.controlnets[0].image = rgb("goldens/canny_synthetic.png");
    let resized = run(&req);
    assert!(resized.dims() == plain.dims());
}

#[test]
fn a_controlnet_of_another_family_is_refused() {
    let sd = pipeline("tiny-sdxl");
    let net = load_controlnet("tiny-sd15-controlnet-a");
    let mut req = small_request();
    req.controlnets
        .push(ControlNetUnit::new("sd15-net", rgb("goldens/init.png")));
    let e = sd
        .denoise_latents_controlled(&req, &[&net], &mut |_, _| true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sd15-net") && e.contains("SDXL"), "{e}");
}

/// The case's request with its mask (manifest `controlnet_extra.inpaint_cases`).
fn inpaint_request_for(case: &serde_json::Value) -> GenerationRequest {
    let mut req = request_for(case);
    let mask = case["mask_image"].as_str().expect("mask image");
    req.mask = Some(MaskImage {
        image: image::open(fixtures().join(mask))
            .expect("mask image")
            .to_luma8(),
        margin: None,
    });
    req
}

/// Runs the ControlNet inpainting golden `cases` against their goldens; one report line each.
fn check_inpaint_cases(cases: &[serde_json::Value]) -> Vec<String> {
    let mut report = Vec::new();
    let mut pipelines = Pipelines::default();
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let model = case["model"].as_str().expect("model");
        let sd = pipelines.get(model);
        let golden = load_goldens(case["file"].as_str().expect("file"));
        let req = inpaint_request_for(case);
        assert!(req.init_image.is_some() && req.mask.is_some(), "{name}");
        let nets = load_controlnets(&req);
        let net_refs: Vec<&ControlNetModel> = nets.iter().collect();
        let latents = sd
            .denoise_latents_controlled(&req, &net_refs, &mut |_, _| true)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let diff = max_abs_diff(&latents, &golden["latents_final"]);
        let mut line = format!("{name}: final latents max |diff| {diff:.2e}");
        assert!(diff < LATENT_TOL, "{name}: final latents differ by {diff}");
        if let Some(expected) = golden.get("images") {
            // diffusers' ControlNet inpainting returns the decoded picture as it is (no paste).
            let out = sd
                .generate_controlled(&req, &net_refs, &mut |_, _| true)
                .unwrap();
            let diff = max_abs_diff(&out.images, expected);
            line += &format!(", images {diff:.2e}");
            assert!(diff < IMAGE_TOL, "{name}: images differ by {diff}");
        }
        // Without the ControlNets the same masked request gives another result.
        let mut plain = req.clone();
        plain.controlnets.clear();
        let plain = sd.denoise_latents(&plain, &mut |_, _| true).unwrap();
        assert!(max_abs_diff(&plain, &latents) > 1e-2, "{name}: no effect");
        // An inpaint condition read as a plain image (no -1 pixels) gives another result too.
        if req
            .controlnets
            .iter()
            .any(|u| u.condition == ControlCondition::Inpaint)
        {
            let mut as_image = req.clone();
            for unit in &mut as_image.controlnets {
                unit.condition = ControlCondition::Image;
            }
            let as_image = sd
                .denoise_latents_controlled(&as_image, &net_refs, &mut |_, _| true)
                .unwrap();
            let effect = max_abs_diff(&as_image, &latents);
            line += &format!(", effect of the -1 pixels {effect:.2e}");
            assert!(effect > 1e-2, "{name}: the masked pixels change nothing");
        }
        report.push(line);
    }
    report
}

#[test]
fn controlnet_inpainting_matches_diffusers() {
    let manifest = manifest();
    let cases = manifest["controlnet_extra"]["inpaint_cases"]
        .as_array()
        .expect("ControlNet inpainting cases");
    assert!(cases.len() >= 3, "expected the golden cases");
    eprintln!("{}", check_inpaint_cases(cases).join("\n"));
}

/// The inpaint ControlNet's condition (manifest `controlnet_inpaint_condition`): diffusers'
/// `StableDiffusionControlNetInpaintPipeline` fed `make_inpaint_condition(init, mask)` as a
/// tensor, alone and beside a canny-style unit.
#[test]
fn inpaint_condition_matches_diffusers() {
    let manifest = manifest();
    let cases = manifest["controlnet_inpaint_condition"]["cases"]
        .as_array()
        .expect("inpaint condition cases");
    assert!(cases.len() >= 2, "expected the golden cases");
    eprintln!("{}", check_inpaint_cases(cases).join("\n"));
}

#[test]
fn an_inpaint_condition_needs_a_mask() {
    let sd = pipeline("tiny-sd15");
    let net = load_controlnet("tiny-sd15-controlnet-a");
    let mut req = small_request();
    req.controlnets.push(ControlNetUnit {
        condition: ControlCondition::Inpaint,
        ..ControlNetUnit::new("inpaint-net", rgb("goldens/init.png"))
    });
    let e = sd
        .denoise_latents_controlled(&req, &[&net], &mut |_, _| true)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("inpaint-net") && e.contains("needs a seed image and a mask"),
        "{e}"
    );
}

const SINGLE_FILE: &str = "controlnets/tiny-sd15-controlnet-a.safetensors";
const FOLDER: &str = "controlnets/tiny-sd15-controlnet-a";

fn folder_tensors() -> WeightStore {
    let path = fixtures()
        .join(FOLDER)
        .join("diffusion_pytorch_model.safetensors");
    WeightStore::from_tensors(candle_core::safetensors::load(&path, &Device::Cpu).unwrap())
}

fn folder_config() -> serde_json::Value {
    common::read_json(&fixtures().join(FOLDER).join("config.json"))
}

#[test]
fn single_file_controlnet_converts_to_the_folder_tensors() {
    let folder = folder_tensors();
    let path = fixtures().join(SINGLE_FILE);
    let single = load_controlnet_file(&path, folder_config(), &Device::Cpu, DType::F16).unwrap();
    // The file holds the folder's f16 values under other names: equal, bit for bit.
    assert_eq!(
        max_abs_store_diff("single file", &single.weights, &folder),
        0.0
    );

    // The same file without the `control_model.` prefix (as standalone files ship).
    let raw = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    assert!(raw.keys().all(|k| k.starts_with("control_model.")));
    assert!(raw.keys().any(|k| k.contains("input_hint_block.14.")));
    let bare: HashMap<String, Tensor> = raw
        .into_iter()
        .map(|(k, v)| (k["control_model.".len()..].to_string(), v))
        .collect();
    let dir = scratch("controlnet-single-bare");
    let bare_path = dir.join("control_bare.safetensors");
    candle_core::safetensors::save(&bare, &bare_path).unwrap();
    let single =
        load_controlnet_file(&bare_path, folder_config(), &Device::Cpu, DType::F16).unwrap();
    assert_eq!(max_abs_store_diff("bare", &single.weights, &folder), 0.0);

    // A file that is not a ControlNet says so.
    let unet_like: HashMap<String, Tensor> = [(
        "model.diffusion_model.out.0.weight".to_string(),
        Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
    )]
    .into_iter()
    .collect();
    let other = dir.join("not_a_controlnet.safetensors");
    candle_core::safetensors::save(&unet_like, &other).unwrap();
    let e = load_controlnet_file(&other, folder_config(), &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("holds no ControlNet"), "{e}");
}

#[test]
fn single_file_controlnet_entry_matches_diffusers() {
    // The registry's single-file entry (same weights as tiny-sd15-controlnet-a) through the
    // golden case `sd15_single`: the same output as diffusers' pipeline with the folder.
    let entry = registry()
        .resolve_controlnet("tiny-sd15-controlnet-single")
        .unwrap();
    let net = ControlNetModel::load_entry(&entry, &Device::Cpu, DType::F32).unwrap();
    let manifest = manifest();
    let case = manifest["controlnet"]["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "sd15_single")
        .expect("the sd15_single case");
    let golden = load_goldens(case["file"].as_str().unwrap());
    let sd = pipeline("tiny-sd15");
    let req = request_for(case);
    assert_eq!(req.controlnets.len(), 1);
    let latents = sd
        .denoise_latents_controlled(&req, &[&net], &mut |_, _| true)
        .unwrap();
    let diff = max_abs_diff(&latents, &golden["latents_final"]);
    eprintln!("single-file ControlNet, sd15_single: final latents max |diff| {diff:.2e}");
    assert!(diff < LATENT_TOL, "final latents differ by {diff}");
}

/// `maskMargin` with ControlNets: the loop generates the crop around the mask at the full size,
/// and every control image follows the seed image into that crop (resized to the output size,
/// cropped, resized back), the inpaint condition taking the cropped mask. The latents equal, bit
/// for bit, those of the request that inpaints the crop directly, its seed, mask and control
/// images cropped by hand.
#[test]
fn mask_margin_crops_the_control_images_like_the_seed() {
    use image::imageops::{self, FilterType};
    use sd_serve::pipeline::inpaint::crop_region;
    use sd_serve::pipeline::InitImage;

    let sd = pipeline("tiny-sd15");
    let net = load_controlnet("tiny-sd15-controlnet-a");
    let (w, h) = (128u32, 128u32);
    let seed = imageops::resize(&rgb("goldens/init.png"), w, h, FilterType::Lanczos3);
    let mask = image::GrayImage::from_fn(w, h, |x, y| {
        image::Luma([if (84..104).contains(&x) && (12..28).contains(&y) {
            255
        } else {
            0
        }])
    });
    let margin = 32;
    let mut req = small_request();
    req.width = w as usize;
    req.height = h as usize;
    req.init_image = Some(InitImage {
        image: seed.clone(),
        strength: 1.0,
    });
    req.mask = Some(MaskImage {
        image: mask.clone(),
        margin: Some(margin),
    });
    // A canny-style unit whose image has another size (resized first), and an inpaint unit.
    let control = rgb("goldens/canny_synthetic.png");
    req.controlnets.push(ControlNetUnit {
        scale: 0.8,
        ..ControlNetUnit::new("a", control.clone())
    });
    req.controlnets.push(ControlNetUnit {
        condition: ControlCondition::Inpaint,
        ..ControlNetUnit::new("a", seed.clone())
    });
    let nets = [&net, &net];
    let zoomed = sd
        .denoise_latents_controlled(&req, &nets, &mut |_, _| true)
        .unwrap();

    let region = crop_region(&mask, w, h, margin);
    assert!(
        region.width < w && region.height < h,
        "the crop is part of the picture: {region:?}"
    );
    let crop = |img: &image::RgbImage| {
        let whole = imageops::resize(img, w, h, FilterType::Lanczos3);
        let part = imageops::crop_imm(&whole, region.x, region.y, region.width, region.height);
        imageops::resize(&part.to_image(), w, h, FilterType::Lanczos3)
    };
    let mut by_hand = req.clone();
    by_hand.init_image.as_mut().unwrap().image = crop(&seed);
    let mask_part = imageops::crop_imm(&mask, region.x, region.y, region.width, region.height);
    by_hand.mask = Some(MaskImage {
        image: imageops::resize(&mask_part.to_image(), w, h, FilterType::Lanczos3),
        margin: None,
    });
    by_hand.controlnets[0].image = crop(&control);
    by_hand.controlnets[1].image = crop(&seed);
    let direct = sd
        .denoise_latents_controlled(&by_hand, &nets, &mut |_, _| true)
        .unwrap();
    assert_eq!(max_abs_diff(&zoomed, &direct), 0.0);

    // The ControlNets act on the zoomed generation.
    let mut plain = req.clone();
    plain.controlnets.clear();
    let plain = sd.denoise_latents(&plain, &mut |_, _| true).unwrap();
    let effect = max_abs_diff(&plain, &zoomed);
    eprintln!("maskMargin with ControlNets vs without: {effect:.3e}");
    assert!(effect > 1e-2, "no effect");
}
