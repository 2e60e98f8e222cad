//! A VAE override and LCM-LoRA sampling against diffusers on tiny-sd15: a second SD1 VAE loaded
//! from a diffusers folder and from an LDM-layout single file (`vae=AutoencoderKL` passed to the
//! pipeline, txt2img and img2img), and an LCM-LoRA merged with the LCM scheduler
//! (`load_lora_weights` + `fuse_lora` + `LCMScheduler`). Then the properties the engine relies
//! on: both VAE files give the same weights, the model's own VAE comes back exactly, and the
//! registry refuses a VAE of another latent space.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use sd_serve::pipeline::{StableDiffusion, Vae};
use sd_serve::weights::lora::{merge_loras, Lora};
use sd_serve::weights::single_file::load_vae_file;
use sd_serve::weights::Family;

use common::{
    fixtures, golden_request, load_goldens, manifest, max_abs_diff, max_abs_store_diff, pipeline,
    registry, scratch,
};

/// Images after 3-8 UNet evaluations with guidance and a VAE decode in f32: the margin of the
/// pipeline parity tests (the reference sums in another order, and guidance amplifies those
/// few-1e-7 roundings). Seen: 5.5e-6 (VAE override img2img), 6.9e-7 (LCM).
const IMAGE_TOL: f32 = 2e-5;

fn override_vae(id: &str) -> Vae {
    let entry = registry().resolve_vae(id).unwrap();
    let component = entry.load(&Device::Cpu, DType::F32).unwrap();
    Vae::load(&component, entry.family, &Device::Cpu, DType::F32).unwrap()
}

fn generate(sd: &StableDiffusion, case: &serde_json::Value) -> Tensor {
    sd.generate(&golden_request(case), &mut |_, _| true)
        .unwrap()
        .images
}

fn vae_cases() -> Vec<serde_json::Value> {
    manifest()["vae_override"]["cases"]
        .as_array()
        .expect("vae_override cases in the manifest")
        .clone()
}

#[test]
fn an_override_vae_gives_the_diffusers_images_from_a_folder_and_a_single_file() {
    let mut sd = pipeline("tiny-sd15");
    let mut report = Vec::new();
    for case in vae_cases() {
        let name = case["name"].as_str().unwrap();
        let golden = load_goldens(case["file"].as_str().unwrap());
        sd.set_vae(None).unwrap();
        let own = generate(&sd, &case);
        for id in ["tiny-sd15-vae-alt", "tiny-sd15-vae-alt-single"] {
            sd.set_vae(Some(&override_vae(id))).unwrap();
            let images = generate(&sd, &case);
            // The override is what made the image: the model's own VAE gives another one.
            assert!(
                max_abs_diff(&images, &own) > 0.05,
                "{name}: the VAE changed nothing"
            );
            let expected = match case["images_dtype"].as_str() {
                // An 8-bit golden (the pipeline's PIL image): ours rounded the same way may land
                // one level off where a value sits at a rounding boundary.
                Some("u8") => {
                    let ours = ((images * 255.0).unwrap().round().unwrap() / 255.0).unwrap();
                    let theirs = (golden["images"].to_dtype(DType::F32).unwrap() / 255.0).unwrap();
                    let diff = max_abs_diff(&ours, &theirs);
                    report.push(format!("{name} {id}: 8-bit images max |diff| {diff:.2e}"));
                    assert!(diff <= 1.0 / 255.0 + 1e-6, "{name} {id}: {diff}");
                    continue;
                }
                _ => &golden["images"],
            };
            let diff = max_abs_diff(&images, expected);
            report.push(format!("{name} {id}: images max |diff| {diff:.2e}"));
            assert!(diff < IMAGE_TOL, "{name} {id}: images differ by {diff}");
        }
        // Setting `None` puts the model's own VAE back, exactly.
        sd.set_vae(None).unwrap();
        assert_eq!(
            common::flat(&generate(&sd, &case)),
            common::flat(&own),
            "{name}: own VAE restored"
        );
    }
    println!("{}", report.join("\n"));
}

#[test]
fn the_single_file_vae_holds_the_folder_weights_under_any_prefix() {
    let reg = registry();
    let folder = reg
        .resolve_vae("tiny-sd15-vae-alt")
        .unwrap()
        .load(&Device::Cpu, DType::F32)
        .unwrap();
    let single = reg
        .resolve_vae("tiny-sd15-vae-alt-single")
        .unwrap()
        .load(&Device::Cpu, DType::F32)
        .unwrap();
    assert_eq!(
        max_abs_store_diff("vae", &folder.weights, &single.weights),
        0.0
    );
    // The same file with a full checkpoint's `first_stage_model.` prefix, and in diffusers names.
    let path = fixtures().join("vaes/tiny-sd15-vae-alt.safetensors");
    let ldm = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let dir = scratch("vae-prefixes");
    let prefixed: HashMap<String, Tensor> = ldm
        .iter()
        .map(|(k, t)| (format!("first_stage_model.{k}"), t.clone()))
        .collect();
    let diffusers: HashMap<String, Tensor> = folder
        .weights
        .names()
        .map(|k| (k.to_string(), folder.weights.get(k).unwrap().clone()))
        .collect();
    for (name, tensors) in [("prefixed", prefixed), ("diffusers", diffusers)] {
        let file = dir.join(format!("{name}.safetensors"));
        candle_core::safetensors::save(&tensors, &file).unwrap();
        let loaded = load_vae_file(&file, folder.config.clone(), &Device::Cpu, DType::F32)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            max_abs_store_diff(name, &folder.weights, &loaded.weights),
            0.0,
            "{name}"
        );
    }
    // A file without VAE weights says what it expected.
    let file = dir.join("not-a-vae.safetensors");
    let unet: HashMap<String, Tensor> = [(
        "model.diffusion_model.out.0.weight".to_string(),
        Tensor::ones(4, DType::F32, &Device::Cpu).unwrap(),
    )]
    .into();
    candle_core::safetensors::save(&unet, &file).unwrap();
    let err = load_vae_file(&file, folder.config, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("holds no VAE weights"), "{err}");
}

#[test]
fn vaes_fit_their_latent_space_only() {
    let reg = registry();
    let vae = reg.resolve_vae("civitai:88156@199239").unwrap();
    assert_eq!(vae.id, "tiny-sd15-vae-alt");
    // SD 2.x shares SD 1.x's latent space; SDXL has its own.
    assert!(vae.fits(Family::Sd1) && vae.fits(Family::Sd2) && !vae.fits(Family::Sdxl));
    let err = reg.resolve_vae("sd-vae-ft-mse").unwrap_err().to_string();
    assert!(
        err.contains("unknown VAE `sd-vae-ft-mse`") && err.contains("tiny-sd15-vae-alt"),
        "{err}"
    );
    // A VAE is not a model or a LoRA, nor a model a VAE.
    assert!(reg.resolve_id("tiny-sd15-vae-alt").is_err());
    assert!(reg.resolve_vae("tiny-sd15").is_err());
}

#[test]
fn lcm_lora_sampling_matches_diffusers() {
    let m = manifest();
    let lcm = &m["lcm"];
    let reg = registry();
    let entry = reg.lcm_lora(Family::Sd1).expect("the fixture LCM-LoRA");
    assert_eq!(
        entry.local_path().unwrap(),
        fixtures().join(lcm["lora"].as_str().unwrap())
    );
    assert!(reg.lcm_lora(Family::Sd2).is_none());
    let model = reg.resolve_id("tiny-sd15").unwrap();
    let mut files = model.load(&Device::Cpu, DType::F32).unwrap();
    let lora = Lora::load(&entry.local_path().unwrap(), &Device::Cpu).unwrap();
    let merged = merge_loras(&mut files, &[(&lora, 1.0)]).unwrap();
    assert_eq!(
        merged.layers().count() as u64,
        lcm["layers"].as_u64().unwrap()
    );
    let sd = StableDiffusion::load(&files, &Device::Cpu, DType::F32).unwrap();
    let plain = pipeline("tiny-sd15");
    let mut report = Vec::new();
    for case in lcm["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let golden = load_goldens(case["file"].as_str().unwrap());
        let images = generate(&sd, case);
        // Without the LoRA the same LCM request gives another image.
        assert!(
            max_abs_diff(&images, &generate(&plain, case)) > 0.05,
            "{name}"
        );
        let diff = if case["images_dtype"] == "u8" {
            // 8-bit golden: one level where a value sits at a rounding boundary (see above).
            let ours = ((images * 255.0).unwrap().round().unwrap() / 255.0).unwrap();
            let theirs = (golden["images"].to_dtype(DType::F32).unwrap() / 255.0).unwrap();
            let diff = max_abs_diff(&ours, &theirs);
            assert!(diff <= 1.0 / 255.0 + 1e-6, "{name}: {diff}");
            diff
        } else {
            let diff = max_abs_diff(&images, &golden["images"]);
            assert!(diff < IMAGE_TOL, "{name}: images differ by {diff}");
            diff
        };
        report.push(format!("lcm {name}: images max |diff| {diff:.2e}"));
    }
    println!("{}", report.join("\n"));
}
