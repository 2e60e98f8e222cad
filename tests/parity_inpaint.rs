//! Inpainting parity with diffusers' `StableDiffusionInpaintPipeline` and
//! `StableDiffusionXLInpaintPipeline` on the tiny fixture models: ordinary 4-channel UNets (the
//! known region put back after every step) at strength 1.0 and 0.6, and a 9-channel inpainting
//! UNet (SD1.5 and SDXL); then properties of masked requests (batch invariance, outpainting and `maskMargin`
//! outputs).

mod common;

use candle_core::Device;
use sd_serve::pipeline::{
    Canvas, GenerationRequest, InitImage, MaskImage, Outpaint, StableDiffusion,
};
use sd_serve::schedulers::SchedulerSpec;

use common::{
    check_against_golden, fixtures, golden_request, load_goldens, manifest, max_abs_diff, pipeline,
};

/// Same bounds as the txt2img/img2img parity (`parity_pipeline.rs`): 3-5 UNet evaluations with
/// guidance and two or three VAE passes (encoding the seed and the masked seed, decoding) in f32,
/// where the reference sums in another order; rounding differences of a few 1e-7 per op grow
/// with guidance. Seen: images <= 3.1e-6 on 0..1 pixels; latents <= 8.4e-5, compared
/// unnormalised (the strength-1.0 cases end with latents of std 9 to 16 on these random weights).
const IMAGE_TOL: f32 = 2e-5;
const LATENT_TOL: f32 = 2e-4;

fn seed_image() -> image::RgbImage {
    image::open(fixtures().join("goldens/init.png"))
        .expect("init.png")
        .to_rgb8()
}

/// The golden case's request with its mask.
fn request_for(case: &serde_json::Value) -> GenerationRequest {
    let mut req = golden_request(case);
    let mask = case["mask_image"].as_str().expect("mask image");
    req.mask = Some(MaskImage {
        image: image::open(fixtures().join(mask))
            .expect("mask image")
            .to_luma8(),
        margin: None,
    });
    req
}

#[test]
fn inpainting_matches_diffusers() {
    let manifest = manifest();
    let cases = manifest["inpaint"].as_array().expect("inpaint cases");
    assert!(cases.len() >= 5, "expected the golden inpaint cases");
    let mut report = Vec::new();
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let golden = load_goldens(case["file"].as_str().expect("file"));
        let sd = pipeline(case["model"].as_str().expect("model"));
        let req = request_for(case);

        // The mask as the loop reads it: binarized, nearest-sampled to latent size.
        let canvas = Canvas::for_request(&req)
            .unwrap()
            .expect("a masked request");
        let latent_mask = canvas.latent_mask(&Device::Cpu).unwrap();
        assert_eq!(
            max_abs_diff(&latent_mask, &golden["mask_latents"]),
            0.0,
            "{name}: latent mask"
        );

        report.push(denoise_and_compare(&sd, &req, case, &golden));
    }
    eprintln!("{}", report.join("\n"));
}

fn masked_request(seed: u64, num_images: usize, strength: f64) -> GenerationRequest {
    let mut req = GenerationRequest::new("a red bicycle leaning on a wall");
    req.negative_prompt = Some("blurry".into());
    req.width = 64;
    req.height = 64;
    req.steps = 4;
    req.seed = seed;
    req.num_images = num_images;
    req.scheduler = Some(SchedulerSpec::parse("Euler a").unwrap());
    req.init_image = Some(InitImage {
        image: seed_image(),
        strength,
    });
    req.mask = Some(MaskImage {
        image: image::GrayImage::from_fn(64, 64, |x, y| {
            image::Luma([if (16..40).contains(&x) && y > 20 {
                255
            } else {
                0
            }])
        }),
        margin: None,
    });
    req
}

fn generate(sd: &StableDiffusion, req: &GenerationRequest) -> candle_core::Tensor {
    sd.generate(req, &mut |_, _| true).unwrap().images
}

#[test]
fn an_inpainted_batch_equals_single_requests() {
    // diffusers samples the seed's latents with the first generator only when several images
    // share one call; here every image draws from its own seed, as if requested alone.
    for (model, strength) in [("tiny-sd15", 1.0), ("tiny-sd15-inpaint", 0.75)] {
        let sd = pipeline(model);
        let batch = generate(&sd, &masked_request(500, 2, strength));
        for i in 0..2 {
            let single = generate(&sd, &masked_request(500 + i as u64, 1, strength));
            let diff = max_abs_diff(&batch.narrow(0, i, 1).unwrap(), &single);
            eprintln!("{model}: batch image {i} vs single: max |diff| {diff:.2e}");
            assert!(diff < IMAGE_TOL, "{model}: image {i} differs by {diff}");
        }
    }
}

#[test]
fn the_known_region_stays_the_seed_with_an_ordinary_unet() {
    // With the mask all black nothing is repainted: the loop ends on the seed's own latents.
    let sd = pipeline("tiny-sd15");
    let mut req = masked_request(7, 1, 1.0);
    req.mask = Some(MaskImage {
        image: image::GrayImage::new(64, 64),
        margin: None,
    });
    let a = sd.denoise_latents(&req, &mut |_, _| true).unwrap();
    req.prompt = "something else entirely".into();
    let b = sd.denoise_latents(&req, &mut |_, _| true).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

#[test]
fn an_inpainting_unet_needs_a_mask() {
    let sd = pipeline("tiny-sd15-inpaint");
    let mut req = GenerationRequest::new("a cat");
    req.width = 64;
    req.height = 64;
    req.steps = 2;
    let err = sd.generate(&req, &mut |_, _| true).unwrap_err().to_string();
    assert!(err.contains("inpainting model"), "{err}");
}

#[test]
fn outpainting_extends_the_seed_and_keeps_it() {
    for model in ["tiny-sd15", "tiny-sd15-inpaint"] {
        let sd = pipeline(model);
        let mut req = GenerationRequest::new("a wide landscape");
        req.width = 128;
        req.height = 128;
        req.steps = 2;
        req.seed = 3;
        req.init_image = Some(InitImage {
            image: seed_image(),
            strength: 1.0,
        });
        req.outpaint = Some(Outpaint {
            top: 64,
            left: 64,
            ..Default::default()
        });
        let out = sd.generate(&req, &mut |_, _| true).unwrap();
        assert_eq!(out.images.dims(), &[1, 128, 128, 3], "{model}");
        let rgb = out.to_rgb().unwrap().pop().unwrap();
        // The seed image sits in the bottom-right quarter, pixel for pixel.
        let seed = seed_image();
        for (x, y) in [(0, 0), (63, 63), (10, 50)] {
            assert_eq!(
                rgb.get_pixel(64 + x, 64 + y),
                seed.get_pixel(x, y),
                "{model}"
            );
        }
        // A side that is not a multiple of 64, or a size that does not add up, is refused.
        req.outpaint = Some(Outpaint {
            top: 32,
            left: 64,
            ..Default::default()
        });
        let err = sd.generate(&req, &mut |_, _| true).unwrap_err().to_string();
        assert!(err.contains("multiple of 64"), "{err}");
    }
}

/// A 9-channel SDXL inpainting UNet (manifest `inpaint_sdxl`) against diffusers'
/// `StableDiffusionXLInpaintPipeline`: the UNet reads the latents, the mask and the masked
/// image's latents beside SDXL's added conditioning.
#[test]
fn sdxl_inpainting_unet_matches_diffusers() {
    let manifest = manifest();
    let cases = manifest["inpaint_sdxl"]["cases"]
        .as_array()
        .expect("SDXL inpainting UNet cases");
    assert!(cases.len() >= 2, "expected the golden cases");
    let sd = pipeline(manifest["inpaint_sdxl"]["model"].as_str().expect("model"));
    let mut report = Vec::new();
    for case in cases {
        let name = case["name"].as_str().expect("name");
        assert_eq!(case["unet_in_channels"], 9, "{name}");
        let golden = load_goldens(case["file"].as_str().expect("file"));
        let req = request_for(case);
        report.push(denoise_and_compare(&sd, &req, case, &golden));
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn mask_margin_keeps_the_seed_away_from_the_mask() {
    let sd = pipeline("tiny-sd15");
    let mut req = masked_request(9, 1, 1.0);
    req.width = 128;
    req.height = 128;
    let mask = image::GrayImage::from_fn(64, 64, |x, y| {
        image::Luma([if (40..48).contains(&x) && (40..48).contains(&y) {
            255
        } else {
            0
        }])
    });
    req.mask = Some(MaskImage {
        image: mask,
        margin: Some(32),
    });
    let out = sd.generate(&req, &mut |_, _| true).unwrap();
    assert_eq!(out.images.dims(), &[1, 128, 128, 3]);
    let rgb = out.to_rgb().unwrap().pop().unwrap();
    // Outside the crop (the 16x16 masked box at 80..96 plus 32 pixels), the seed image resized
    // to the output size, untouched.
    let seed = image::imageops::resize(
        &seed_image(),
        128,
        128,
        image::imageops::FilterType::Lanczos3,
    );
    for (x, y) in [(0, 0), (20, 100), (127, 10)] {
        assert_eq!(rgb.get_pixel(x, y), seed.get_pixel(x, y));
    }
}

/// Denoises `req`, checks the step count against the case and the final latents (and images,
/// where the golden has them) against diffusers; returns the report line.
fn denoise_and_compare(
    sd: &StableDiffusion,
    req: &GenerationRequest,
    case: &serde_json::Value,
    golden: &std::collections::HashMap<String, candle_core::Tensor>,
) -> String {
    let name = case["name"].as_str().expect("name");
    let mut steps_seen = 0;
    let latents = sd
        .denoise_latents(req, &mut |_, _| {
            steps_seen += 1;
            true
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(
        steps_seen,
        case["num_steps"].as_u64().unwrap() as usize,
        "{name}: denoising steps"
    );
    check_against_golden(name, sd, &latents, golden, (LATENT_TOL, IMAGE_TOL))
}
