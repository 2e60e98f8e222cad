//! SDXL refiner parity with diffusers on the tiny fixture models: `StableDiffusionXLPipeline`
//! with `denoising_end = f` and `output_type="latent"`, then `StableDiffusionXLImg2ImgPipeline`
//! on the refiner (`tiny-sdxl-refiner`) with `denoising_start = f` on those latents (manifest
//! `refiner`); then the request rules around a refiner.

mod common;

use sd_serve::pipeline::{GenerationRequest, InitImage, MaskImage, Refiner};
use sd_serve::schedulers::SchedulerSpec;
use sd_serve::weights::Family;

use common::{fixtures, load_goldens, manifest, max_abs_diff, pipeline};

/// Same bounds as the SDXL txt2img parity (`parity_pipeline.rs`): a few UNet evaluations with
/// guidance and one VAE decode in f32, where the reference sums in another order; rounding
/// differences of a few 1e-7 per op grow through the steps. Latents are compared unnormalised.
const IMAGE_TOL: f32 = 2e-5;
const LATENT_TOL: f32 = 2e-4;

const REFINER: &str = "tiny-sdxl-refiner";

fn refined_request(case: &serde_json::Value) -> GenerationRequest {
    let u = |k: &str| case[k].as_u64().unwrap_or_else(|| panic!("case field {k}")) as usize;
    let mut req = GenerationRequest::new(case["prompt"].as_str().expect("prompt"));
    req.negative_prompt = case["negative_prompt"].as_str().map(str::to_string);
    req.width = u("width");
    req.height = u("height");
    req.steps = u("steps");
    req.guidance_scale = case["guidance"].as_f64().expect("guidance");
    req.seed = case["seed"].as_u64().expect("seed");
    req.num_images = u("num_images");
    req.scheduler = Some(SchedulerSpec::parse(case["scheduler"].as_str().unwrap()).unwrap());
    req.refiner = Some(Refiner {
        model: case["refiner"].as_str().expect("refiner").to_string(),
        start: case["denoising_start"].as_f64().expect("denoising_start"),
    });
    req
}

/// Runs `f` with a progress callback and returns its result with the number of steps reported.
fn counting<T>(f: impl FnOnce(&mut dyn FnMut(usize, usize) -> bool) -> T) -> (T, usize) {
    let mut steps = 0;
    let out = f(&mut |_, _| {
        steps += 1;
        true
    });
    (out, steps)
}

#[test]
fn base_then_refiner_matches_diffusers() {
    let manifest = manifest();
    let cases = manifest["refiner"].as_array().expect("refiner cases");
    assert!(cases.len() >= 3, "expected the golden refiner cases");
    let base = pipeline("tiny-sdxl");
    let refiner = pipeline(REFINER);
    assert_eq!(refiner.family, Family::SdxlRefiner);
    let mut report = Vec::new();
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let golden = load_goldens(case["file"].as_str().expect("file"));
        let req = refined_request(case);

        let (latents, base_steps) = counting(|p| base.denoise_latents(&req, p));
        let latents = latents.unwrap_or_else(|e| panic!("{name}: base: {e}"));
        assert_eq!(
            base_steps as u64,
            case["base_steps"].as_u64().unwrap(),
            "{name}: base steps"
        );
        let base_diff = max_abs_diff(&latents, &golden["base_latents"]);
        assert!(
            base_diff < LATENT_TOL,
            "{name}: base latents differ by {base_diff}"
        );

        let (refined, refiner_steps) = counting(|p| refiner.refine_latents(&req, &latents, p));
        let refined = refined.unwrap_or_else(|e| panic!("{name}: refiner: {e}"));
        assert_eq!(
            refiner_steps as u64,
            case["refiner_steps"].as_u64().unwrap(),
            "{name}: refiner steps"
        );
        let diff = max_abs_diff(&refined, &golden["latents_final"]);
        let mut line =
            format!("{name}: base latents max |diff| {base_diff:.2e}, refined {diff:.2e}");
        assert!(
            diff < LATENT_TOL,
            "{name}: refined latents differ by {diff}"
        );
        if let Some(expected) = golden.get("images") {
            let images = refiner.decode(&refined).unwrap();
            let diff = max_abs_diff(&images, expected);
            line += &format!(", images {diff:.2e}");
            assert!(diff < IMAGE_TOL, "{name}: images differ by {diff}");
            // The whole path in one call gives the same images.
            let out = base
                .generate_refined(&refiner, &req, &mut |_, _| true)
                .unwrap();
            assert_eq!(max_abs_diff(&out.images, &images), 0.0, "{name}");
        }
        report.push(line);
    }
    eprintln!("{}", report.join("\n"));
}

fn small_request() -> GenerationRequest {
    let mut req = GenerationRequest::new("a lighthouse at dusk");
    req.width = 64;
    req.height = 64;
    req.steps = 4;
    req.guidance_scale = 5.0;
    req.seed = 7;
    req.scheduler = Some(SchedulerSpec::parse("Euler").unwrap());
    req
}

fn with_refiner(model: &str, start: f64) -> GenerationRequest {
    let mut req = small_request();
    req.refiner = Some(Refiner {
        model: model.to_string(),
        start,
    });
    req
}

#[test]
fn a_refiner_starting_at_the_end_runs_no_step() {
    let base = pipeline("tiny-sdxl");
    let refiner = pipeline(REFINER);
    let plain = base
        .denoise_latents(&small_request(), &mut |_, _| true)
        .unwrap();
    let req = with_refiner(REFINER, 1.0);
    let (latents, base_steps) = counting(|p| base.denoise_latents(&req, p));
    let latents = latents.unwrap();
    assert_eq!(base_steps, 4);
    assert_eq!(max_abs_diff(&latents, &plain), 0.0);
    let (refined, refiner_steps) = counting(|p| refiner.refine_latents(&req, &latents, p));
    assert_eq!(refiner_steps, 0);
    assert_eq!(max_abs_diff(&refined.unwrap(), &plain), 0.0);
}

/// The message of the error `r` must be.
fn err<T>(r: sd_serve::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn refiner_requests_are_checked() {
    let base = pipeline("tiny-sdxl");
    let refiner = pipeline(REFINER);
    let sd15 = pipeline("tiny-sd15");

    // Starts outside (0, 1] are refused by name.
    for start in [0.0, -0.5, 1.5, f64::NAN] {
        let e = err(with_refiner(REFINER, start).validate());
        assert!(e.contains("refiner's start"), "{start}: {e}");
    }
    // A refiner on an SD1 base is refused before any step.
    let req = with_refiner(REFINER, 0.5);
    let e = err(sd15.denoise_latents(&req, &mut |_, _| panic!("no step may run")));
    assert!(e.contains("SDXL") && e.contains("sd1"), "{e}");
    // An SD1 model cannot refine.
    let latents = base.denoise_latents(&req, &mut |_, _| true).unwrap();
    let e = err(sd15.refine_latents(&req, &latents, &mut |_, _| true));
    assert!(e.contains("sdxl-refiner") && e.contains("sd1"), "{e}");
    // Latents of another shape are refused.
    let wrong = latents.narrow(2, 0, 4).unwrap();
    let e = err(refiner.refine_latents(&req, &wrong, &mut |_, _| true));
    assert!(e.contains("latents"), "{e}");
    // A refiner does not generate alone.
    let e = err(refiner.generate(&small_request(), &mut |_, _| panic!("no step may run")));
    assert!(e.contains("SDXL refiner"), "{e}");
    // `generate` alone would skip the refiner's share.
    let e = err(base.generate(&req, &mut |_, _| true));
    assert!(e.contains("generate_refined"), "{e}");
    // A refiner never inpaints.
    let mut masked = with_refiner(REFINER, 0.5);
    masked.init_image = Some(InitImage {
        image: image::RgbImage::new(64, 64),
        strength: 0.8,
    });
    masked.mask = Some(MaskImage {
        image: image::GrayImage::from_pixel(64, 64, image::Luma([255])),
        margin: None,
    });
    let e = err(masked.validate());
    assert!(e.contains("refiner") && e.contains("inpainting"), "{e}");
}

#[test]
fn an_sdxl_base_can_refine_and_img2img_hands_over_too() {
    let base = pipeline("tiny-sdxl");
    // SDXL's own base as refiner: its own conditioning (two encoders, six time ids).
    let req = with_refiner("tiny-sdxl", 0.5);
    let out = base
        .generate_refined(&base, &req, &mut |_, _| true)
        .unwrap();
    let plain = base.generate(&small_request(), &mut |_, _| true).unwrap();
    // Same model and schedule on both sides, with fresh generators for the second share of a
    // deterministic sampler: the split is seamless.
    let diff = max_abs_diff(&out.images, &plain.images);
    assert!(
        diff < 1e-5,
        "split run differs from the whole run by {diff}"
    );

    // img2img with a refiner: strength starts the base, the refiner's start ends it.
    let refiner = pipeline(REFINER);
    let mut req = with_refiner(REFINER, 0.5);
    let image = image::open(fixtures().join("goldens/init.png"))
        .unwrap()
        .to_rgb8();
    req.init_image = Some(InitImage {
        image,
        strength: 0.75,
    });
    let (latents, base_steps) = counting(|p| base.denoise_latents(&req, p));
    // Steps 751, 501, 251, 1 from index 1 (strength 0.75 of 4 steps): 501 is above the
    // cut-off 500, 251 not.
    assert_eq!(base_steps, 1);
    let (refined, refiner_steps) = counting(|p| refiner.refine_latents(&req, &latents.unwrap(), p));
    assert_eq!(refiner_steps, 2);
    assert!(common::all_finite(&refined.unwrap()));
}
