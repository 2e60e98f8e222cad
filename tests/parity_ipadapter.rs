//! IP-Adapter parity with diffusers (`pipe.load_ip_adapter`, `set_ip_adapter_scale`,
//! `ip_adapter_image`) on the tiny fixture models (manifest `ipadapter`): the image encoder's
//! preprocessing and outputs, the plain and plus projections, then whole pipelines (SD1.5 plain
//! at scale 0.6, SD1.5 plus, SDXL plain); then properties (the image matters, weight 0 is the
//! plain pipeline, a mismatched adapter is refused).

mod common;

use candle_core::{DType, Device, Tensor};
use sd_serve::models::ip_adapter::{preprocess, ClipVisionModel, IpAdapterModel};
use sd_serve::pipeline::{GenerationRequest, IpAdapterUnit};

use common::{
    check_golden_cases, fixtures, golden_request, load_goldens, manifest, max_abs_diff, pipeline,
};

/// Preprocessing: the fixed-point antialiased bicubic is reproduced exactly, so the 8-bit pixels
/// agree; what is left is the f32 rounding of rescale and normalisation (a few 1e-7).
const PIXEL_TOL: f32 = 1e-5;
/// Encoder and projections from the same pixels, all f32: a few 1e-7 per op over 3 layers.
const ENCODER_TOL: f32 = 1e-4;
/// Same bounds as the txt2img and ControlNet parity (`parity_pipeline.rs`,
/// `parity_controlnet.rs`): 3 f32 steps with guidance, latents unnormalised (std 3 to 16),
/// images 0..1 after one f32 VAE decode.
const LATENT_TOL: f32 = 2e-4;
const IMAGE_TOL: f32 = 2e-5;

fn adapter_paths(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let m = manifest();
    let file = m["ipadapter"]["adapters"][name]["file"]
        .as_str()
        .unwrap_or_else(|| panic!("adapter {name} in the manifest"));
    let encoder = m["ipadapter"]["image_encoder"]["folder"]
        .as_str()
        .expect("image encoder folder");
    (fixtures().join(file), fixtures().join(encoder))
}

fn load_adapter(name: &str) -> IpAdapterModel {
    let (file, encoder) = adapter_paths(name);
    IpAdapterModel::load(&file, &encoder, &Device::Cpu, DType::F32)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn init_image() -> image::RgbImage {
    image::open(fixtures().join("goldens/init.png"))
        .expect("init.png")
        .to_rgb8()
}

#[test]
fn image_encoder_and_projections_match_transformers_and_diffusers() {
    let golden = load_goldens("ipadapter_encoder.safetensors");
    let (_, encoder_dir) = adapter_paths("ip-adapter_sd15");
    let encoder = ClipVisionModel::load(&encoder_dir, &Device::Cpu, DType::F32).unwrap();
    let size = encoder.config().image_size;

    let pixels = preprocess(&init_image(), size, &Device::Cpu).unwrap();
    let diff = max_abs_diff(&pixels, &golden["pixel_values"]);
    eprintln!("pixel_values max |diff| {diff:.2e}");
    assert!(diff < PIXEL_TOL, "preprocessed pixels differ by {diff}");

    // A wider image: resized on its short side, cropped at the centre of the long one.
    let synthetic = image::open(fixtures().join("goldens/canny_synthetic.png"))
        .expect("canny_synthetic.png")
        .to_rgb8();
    let pixels = preprocess(&synthetic, size, &Device::Cpu).unwrap();
    let diff = max_abs_diff(&pixels, &golden["pixel_values_synthetic"]);
    eprintln!("pixel_values_synthetic max |diff| {diff:.2e}");
    assert!(
        diff < PIXEL_TOL,
        "preprocessed pixels of the wide image differ by {diff}"
    );

    // From the reference's pixels, the encoder and projections are compared alone.
    let reference_pixels = &golden["pixel_values"];
    let out = encoder.forward(reference_pixels).unwrap();
    let zero = encoder
        .forward(&reference_pixels.zeros_like().unwrap())
        .unwrap();
    let plain = load_adapter("ip-adapter_sd15");
    let plus = load_adapter("ip-adapter-plus_sd15");
    assert!(!plain.is_plus() && plus.is_plus());
    let zeros = out.image_embeds.zeros_like().unwrap();
    let checks: [(&str, Tensor); 7] = [
        ("image_embeds", out.image_embeds.clone()),
        ("penultimate", out.penultimate.clone()),
        ("zero_penultimate", zero.penultimate.clone()),
        ("plain_tokens", plain.project(&out.image_embeds).unwrap()),
        ("plain_zero_tokens", plain.project(&zeros).unwrap()),
        ("plus_tokens", plus.project(&out.penultimate).unwrap()),
        ("plus_zero_tokens", plus.project(&zero.penultimate).unwrap()),
    ];
    for (name, ours) in checks {
        let diff = max_abs_diff(&ours, &golden[name]);
        eprintln!("{name}: max |diff| {diff:.2e}");
        assert!(diff < ENCODER_TOL, "{name} differs by {diff}");
    }
}

fn request_for(case: &serde_json::Value) -> GenerationRequest {
    let mut req = golden_request(case);
    req.ip_adapters.push(IpAdapterUnit {
        model: case["adapter"].as_str().expect("adapter").to_string(),
        image: init_image(),
        weight: case["scale"].as_f64().expect("scale"),
    });
    req
}

#[test]
fn ip_adapter_pipelines_match_diffusers() {
    let manifest = manifest();
    let cases = manifest["ipadapter"]["cases"]
        .as_array()
        .expect("ipadapter cases");
    assert_eq!(cases.len(), 3, "expected the golden IP-Adapter cases");
    check_golden_cases(cases, (LATENT_TOL, IMAGE_TOL), request_for, |sd, req| {
        let adapter = load_adapter(&req.ip_adapters[0].model);
        sd.denoise_latents_adapted(req, &[], &[&adapter], &mut |_, _| true)
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
fn the_image_and_weight_matter() {
    let sd = pipeline("tiny-sd15");
    let adapter = load_adapter("ip-adapter_sd15");
    let run = |req: &GenerationRequest| {
        sd.denoise_latents_adapted(req, &[], &[&adapter], &mut |_, _| true)
            .unwrap()
    };
    let plain = sd
        .denoise_latents(&small_request(), &mut |_, _| true)
        .unwrap();
    let mut req = small_request();
    req.ip_adapters.push(IpAdapterUnit::new("a", init_image()));
    let adapted = run(&req);
    let effect = max_abs_diff(&adapted, &plain);
    eprintln!("adapter vs none: {effect:.3e}");
    assert!(effect > 1e-2, "no effect");

    // Another image gives another result.
    req.ip_adapters[0].image = image::RgbImage::from_pixel(40, 24, image::Rgb([250, 20, 60]));
    let other = run(&req);
    let effect = max_abs_diff(&other, &adapted);
    eprintln!("another image: {effect:.3e}");
    assert!(effect > 1e-2, "image ignored");

    // Weight 0 adds nothing: the plain result, exactly.
    req.ip_adapters[0].weight = 0.0;
    assert_eq!(max_abs_diff(&run(&req), &plain), 0.0);

    // Without the loaded model the request is refused, not run plain.
    req.ip_adapters[0].weight = 1.0;
    let e = sd
        .denoise_latents(&req, &mut |_, _| true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("IP-Adapter"), "{e}");
}

#[test]
fn an_adapter_for_another_model_is_refused() {
    let sd = pipeline("tiny-sdxl");
    let adapter = load_adapter("ip-adapter_sd15");
    let mut req = small_request();
    req.ip_adapters
        .push(IpAdapterUnit::new("sd15-adapter", init_image()));
    let e = sd
        .denoise_latents_adapted(&req, &[], &[&adapter], &mut |_, _| true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sd15-adapter"), "{e}");
}

#[test]
fn out_of_range_weights_are_refused() {
    let mut req = small_request();
    req.ip_adapters.push(IpAdapterUnit::new("a", init_image()));
    for weight in [-0.1, 1.5, f64::NAN] {
        req.ip_adapters[0].weight = weight;
        let e = req.validate().unwrap_err().to_string();
        assert!(e.contains("weight of IP-Adapter `a`"), "{e}");
    }
}
