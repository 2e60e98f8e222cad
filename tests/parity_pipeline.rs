//! Whole-pipeline parity with diffusers (txt2img and img2img, each family) on the tiny fixture
//! models, and the seed properties: a batch gives the images of single requests.

mod common;

use candle_core::{DType, Device, Tensor};
use sd_serve::pipeline::{GenerationRequest, StableDiffusion};
use std::collections::HashMap;

use sd_serve::schedulers::dpm_sde::DpmSolverSde;
use sd_serve::schedulers::{Scheduler, SchedulerConfig, SchedulerSpec};
use sd_serve::weights::Component;

use common::{
    flat64, golden_request, load_goldens, manifest, max_abs_diff, pipeline, StandInSdeNoise,
};

/// Pipeline outputs go through 4-10 UNet evaluations with guidance and a VAE decode in f32; the
/// reference sums in another order (oneDNN vs gemm), which leaves rounding differences of a few
/// 1e-7 per op that guidance (x5..7.5) amplifies. Seen: images <= 3.2e-6 on 0..1 pixels.
const IMAGE_TOL: f32 = 2e-5;
/// Latents are compared unnormalised: Euler/DPM start at sigma_max ~ 14.6, so the same relative
/// rounding is ~15x larger in absolute terms. Seen: <= 7.2e-5.
const LATENT_TOL: f32 = 2e-4;

#[test]
fn pipelines_match_diffusers() {
    let manifest = manifest();
    let cases = manifest["pipelines"]
        .as_array()
        .expect("pipelines in manifest");
    assert!(cases.len() >= 8, "expected the golden pipeline cases");
    let mut report = Vec::new();
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let golden = load_goldens(case["file"].as_str().expect("file"));
        let sd = pipeline(case["model"].as_str().expect("model"));
        let mut req = golden_request(case);
        if let Some(latents) = golden.get("latents_input") {
            req.latents = Some(latents.clone());
        }
        let mut steps_seen = 0;
        let mut progress = |_, _| {
            steps_seen += 1;
            true
        };
        let latents = match case["noise_sampler"].as_str() {
            None => sd.denoise_latents(&req, &mut progress),
            Some(sampler) => {
                let scheduler = stand_in_scheduler(&sd, case, &golden, sampler);
                sd.denoise_latents_with(&req, scheduler, &mut progress)
            }
        }
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let images = sd.decode(&latents).unwrap();
        let expected_steps = golden["latents_steps"].dim(0).unwrap();
        assert_eq!(steps_seen, expected_steps, "{name}: denoising steps");
        let diff = max_abs_diff(&images, &golden["images"]);
        report.push(format!("{name}: images max |diff| {diff:.2e}"));
        assert!(diff < IMAGE_TOL, "{name}: images differ by {diff}");
    }
    eprintln!("{}", report.join("\n"));
}

/// The case's scheduler drawing the fixture's deterministic stand-in noise instead of a
/// Brownian path (diffusers' DPM++ SDE noise is not reproducible from the seed).
fn stand_in_scheduler(
    sd: &StableDiffusion,
    case: &serde_json::Value,
    golden: &HashMap<String, Tensor>,
    sampler: &str,
) -> Box<dyn Scheduler> {
    let name = case["name"].as_str().unwrap();
    assert_eq!(sampler, "sde_stand_in", "{name}: unknown noise sampler");
    assert_eq!(case["scheduler"], "DPMSolverSDEScheduler", "{name}");
    let overrides = SchedulerConfig::from_json(&case["scheduler_overrides"]).unwrap();
    let config = sd.scheduler_config().overridden_by(&overrides).unwrap();
    let calls = flat64(&golden["sde_noise_calls"]);
    let steps = case["steps"].as_u64().unwrap() as usize;
    let noise = StandInSdeNoise::new(&calls, name);
    Box::new(DpmSolverSde::with_noise(&config, steps, Box::new(noise)).unwrap())
}

#[test]
fn final_latents_match_diffusers() {
    // The same as above one level down: the latents before decoding, for the txt2img cases.
    let manifest = manifest();
    for case in manifest["pipelines"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        if case["strength"].is_number() || case["noise_sampler"].is_string() {
            continue;
        }
        let golden = load_goldens(case["file"].as_str().unwrap());
        let sd = pipeline(case["model"].as_str().unwrap());
        let mut req = golden_request(case);
        if let Some(latents) = golden.get("latents_input") {
            req.latents = Some(latents.clone());
        }
        let latents = sd.denoise_latents(&req, &mut |_, _| true).unwrap();
        let diff = max_abs_diff(&latents, &golden["latents_final"]);
        eprintln!("{name}: final latents max |diff| {diff:.2e}");
        assert!(diff < LATENT_TOL, "{name}: final latents differ by {diff}");
    }
}

fn generate(sd: &StableDiffusion, req: &GenerationRequest) -> Tensor {
    sd.generate(req, &mut |_, _| true).unwrap().images
}

#[test]
fn batch_of_three_equals_three_single_requests() {
    for model in ["tiny-sd15", "tiny-sdxl"] {
        let sd = pipeline(model);
        let mut req = GenerationRequest::new("a red bicycle leaning on a wall");
        req.negative_prompt = Some("blurry".into());
        req.width = 64;
        req.height = 48;
        req.steps = 4;
        req.seed = 1000;
        req.scheduler = Some(SchedulerSpec::parse("Euler a").unwrap());
        req.num_images = 3;
        let batch = generate(&sd, &req);
        req.num_images = 1;
        for i in 0..3 {
            req.seed = 1000 + i as u64;
            let single = generate(&sd, &req);
            let diff = max_abs_diff(&batch.narrow(0, i, 1).unwrap(), &single);
            eprintln!("{model}: batch image {i} vs single request: max |diff| {diff:.2e}");
            // Only the matmul blocking differs with the batch size: rounding-level differences
            // (seen: <= 1.6e-6), held to the same bound as parity with diffusers.
            assert!(
                diff < IMAGE_TOL,
                "{model}: image {i} of the batch differs by {diff}"
            );
        }
    }
}

#[test]
fn different_seeds_give_different_images() {
    let sd = pipeline("tiny-sd15");
    let mut req = GenerationRequest::new("a red bicycle");
    req.width = 64;
    req.height = 64;
    req.steps = 3;
    req.seed = 1;
    let a = generate(&sd, &req);
    req.seed = 2;
    let b = generate(&sd, &req);
    assert!(max_abs_diff(&a, &b) > 1e-2);
}

#[test]
fn cancelling_stops_between_steps() {
    let sd = pipeline("tiny-sd15");
    let mut req = GenerationRequest::new("a cat");
    req.width = 64;
    req.height = 64;
    req.steps = 6;
    let mut seen = 0;
    let result = sd.generate(&req, &mut |step, _| {
        seen = step;
        step < 2
    });
    assert!(matches!(result, Err(sd_serve::Error::Cancelled)));
    assert_eq!(seen, 2);
}

#[test]
fn invalid_requests_are_refused_with_the_field_named() {
    let sd = pipeline("tiny-sd15");
    let mut req = GenerationRequest::new("a cat");
    req.width = 60;
    let err = sd.generate(&req, &mut |_, _| true).unwrap_err().to_string();
    assert!(
        err.contains("`width`") && err.contains("multiple of 8"),
        "{err}"
    );
    let mut req = GenerationRequest::new("a cat");
    req.steps = 0;
    let err = sd.generate(&req, &mut |_, _| true).unwrap_err().to_string();
    assert!(err.contains("`steps`"), "{err}");
    let mut req = GenerationRequest::new("a cat");
    req.width = 64;
    req.height = 64;
    req.latents = Some(Tensor::zeros((1, 4, 4, 4), DType::F32, &Device::Cpu).unwrap());
    let err = sd.generate(&req, &mut |_, _| true).unwrap_err().to_string();
    assert!(err.contains("`latents`"), "{err}");
}

fn no_upcast(vae: &mut Component) {
    vae.config["force_upcast"] = false.into();
}

/// A tiny fixture model loaded for `dtype`, with its VAE config edited by `edit_vae` first.
fn pipeline_in(
    model: &str,
    dtype: DType,
    edit_vae: impl FnOnce(&mut Component),
) -> StableDiffusion {
    let mut files = common::registry()
        .resolve(model)
        .and_then(|entry| entry.load(&Device::Cpu, dtype))
        .unwrap_or_else(|e| panic!("{model}: {e}"));
    edit_vae(&mut files.vae);
    StableDiffusion::load(&files, &Device::Cpu, dtype).unwrap_or_else(|e| panic!("{model}: {e}"))
}

/// Final latents of a short f32 txt2img run: what the decoder sees in real use.
fn sdxl_latents() -> Tensor {
    let sd = pipeline("tiny-sdxl");
    let mut req = GenerationRequest::new("a lighthouse at dusk");
    req.width = 64;
    req.height = 48;
    req.steps = 4;
    req.seed = 7;
    req.num_images = 2;
    sd.denoise_latents(&req, &mut |_, _| true).unwrap()
}

#[test]
fn sdxl_vae_in_an_f16_pipeline_decodes_in_f32() {
    let f32_pipe = pipeline("tiny-sdxl");
    let f16_pipe = pipeline_in("tiny-sdxl", DType::F16, |_| {});
    assert_eq!(f16_pipe.dtype(), DType::F16);
    assert_eq!(f16_pipe.vae_dtype(), DType::F32);

    let latents = sdxl_latents();
    let reference = f32_pipe.decode(&latents).unwrap();
    let upcast = f16_pipe.decode(&latents).unwrap();
    assert_eq!(upcast.dtype(), DType::F32);
    assert!(common::all_finite(&upcast));
    // The upcast VAE is the f32 VAE: the fixture's weights are f16-exact, so loading them for an
    // f16 pipeline and widening loses nothing, and the same f32 latents go through the same f32
    // arithmetic. Anything but equality means a cast was lost on the way.
    assert_eq!(max_abs_diff(&upcast, &reference), 0.0);

    // What the f16 denoising loop hands over: latents rounded to f16 (relative 4.9e-4). The
    // decoder is smooth, so images move by about that relative amount of their O(1) range.
    let rounded = f16_pipe
        .decode(&latents.to_dtype(DType::F16).unwrap())
        .unwrap();
    let diff = max_abs_diff(&rounded, &reference);
    eprintln!("tiny-sdxl: decode of f16-rounded latents vs f32: max |diff| {diff:.2e}");
    assert!(common::all_finite(&rounded));
    assert!(diff < 2e-3, "f16-rounded latents move the images by {diff}");
}

/// Why the upcast matters: SDXL's trained decoder carries activations past f16's 65504, which
/// become inf and then NaN at the next normalisation. The tiny random decoder stays small, so
/// its first convolution is made 8192 times louder (a power of two: the weights stay exact in
/// f16), which puts its activations in that range; f32 holds them, and the output GroupNorm
/// brings the image back to scale.
fn loud_decoder(vae: &mut Component) {
    for name in ["decoder.conv_in.weight", "decoder.conv_in.bias"] {
        let loud = (vae.weights.get(name).expect("decoder.conv_in in the VAE") * 8192.0).unwrap();
        vae.weights.insert(name.to_string(), loud);
    }
}

#[test]
fn sdxl_vae_upcast_keeps_f16_pipelines_free_of_overflow() {
    let latents = sdxl_latents();
    let f16_vae = pipeline_in("tiny-sdxl", DType::F16, |vae| {
        loud_decoder(vae);
        no_upcast(vae);
    });
    assert!(!common::all_finite(&f16_vae.decode(&latents).unwrap()));

    let upcast = pipeline_in("tiny-sdxl", DType::F16, loud_decoder)
        .decode(&latents)
        .unwrap();
    assert!(common::all_finite(&upcast));
    let reference = pipeline_in("tiny-sdxl", DType::F32, loud_decoder)
        .decode(&latents)
        .unwrap();
    assert_eq!(max_abs_diff(&upcast, &reference), 0.0);
}

#[test]
fn vaes_that_need_no_upcast_run_in_the_pipeline_dtype() {
    // `force_upcast: false` (e.g. the fp16-fix SDXL VAE): f16 throughout.
    let f16_vae = pipeline_in("tiny-sdxl", DType::F16, no_upcast);
    assert_eq!(f16_vae.vae_dtype(), DType::F16);
    let latents = sdxl_latents();
    let ours = f16_vae.decode(&latents).unwrap();
    let reference = pipeline("tiny-sdxl").decode(&latents).unwrap();
    assert!(common::all_finite(&ours));
    // The f16 VAE bounds of parity_vae.rs (3e-2 max, 2e-3 mean on -1..1 outputs), halved for
    // images in 0..1. Seen: 1.4e-3.
    let (max, mean) = (
        max_abs_diff(&ours, &reference),
        common::mean_abs_diff(&ours, &reference),
    );
    eprintln!("tiny-sdxl f16 VAE vs f32: max |diff| {max:.2e}, mean {mean:.2e}");
    assert!(max < 1.5e-2 && mean < 1e-3, "max {max}, mean {mean}");

    // SD 1.x/2.x VAEs run in f16 as in diffusers (whose SD pipeline never upcasts), even though
    // their configs carry the default `force_upcast: true`; bf16 has f32's range.
    assert_eq!(
        pipeline_in("tiny-sd15", DType::F16, |_| {}).vae_dtype(),
        DType::F16
    );
    assert_eq!(
        pipeline_in("tiny-sdxl", DType::BF16, |_| {}).vae_dtype(),
        DType::BF16
    );
}
