//! UNet2DConditionModel against diffusers: tiny SD1.5-, SD2- and SDXL-shaped UNets with random
//! weights (tests/fixtures/<model>/unet) and the outputs diffusers computed for them
//! (tests/fixtures/goldens/unet_<model>.safetensors).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sd_serve::models::unet::{
    AddedConditions, OneOrMany, UNet2DConditionConfig, UNet2DConditionModel,
};
use sd_serve::Error;

const MODELS: [&str; 3] = ["tiny-sd15", "tiny-sd2", "tiny-sdxl"];

/// A GPU when the crate is built with `cuda` and one is present, else the CPU.
fn device() -> Device {
    Device::cuda_if_available(0).expect("device")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn config(model: &str) -> UNet2DConditionConfig {
    let path = fixtures().join(model).join("unet/config.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

fn load_unet(model: &str, dtype: DType) -> UNet2DConditionModel {
    let weights = fixtures()
        .join(model)
        .join("unet/diffusion_pytorch_model.safetensors");
    // SAFETY: the fixture file is not modified while the test runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], dtype, &device()) }
        .expect("unet weights");
    UNet2DConditionModel::new(vb, &config(model)).expect("unet builds")
}

/// Inputs and diffusers' output of one case of a golden file.
struct Case {
    sample: Tensor,
    timestep: f64,
    encoder_hidden_states: Tensor,
    added: Option<AddedConditions>,
    expected: Tensor,
}

fn golden(model: &str, prefix: &str) -> Case {
    let path = fixtures().join(format!("goldens/unet_{model}.safetensors"));
    let mut t: HashMap<String, Tensor> =
        candle_core::safetensors::load(&path, &device()).expect("golden file");
    let mut take = |name: &str| t.remove(&format!("{prefix}{name}"));
    let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
    let timestep = take("timestep").expect("timestep");
    let timestep = timestep
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0];
    let added = match (take("text_embeds"), take("time_ids")) {
        (Some(text_embeds), Some(time_ids)) => Some(AddedConditions {
            text_embeds: f32(text_embeds),
            time_ids: f32(time_ids),
        }),
        _ => None,
    };
    Case {
        sample: f32(take("sample").expect("sample")),
        timestep,
        encoder_hidden_states: f32(take("encoder_hidden_states").expect("encoder_hidden_states")),
        added,
        expected: f32(take("out").expect("out")),
    }
}

fn run(unet: &UNet2DConditionModel, case: &Case) -> Tensor {
    unet.forward(
        &case.sample,
        case.timestep,
        &case.encoder_hidden_states,
        case.added.as_ref(),
    )
    .expect("forward")
    .to_dtype(DType::F32)
    .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

// f32 on both sides; only the order of accumulation differs (gemm blocking, im2col
// convolutions, one-pass layer-norm statistics), worth a few ulps per op over ~100 ops.
const F32_TOLERANCE: f32 = 1e-4;

fn check_parity(model: &str, prefix: &str) {
    let unet = load_unet(model, DType::F32);
    let case = golden(model, prefix);
    let out = run(&unet, &case);
    let err = max_abs_diff(&out, &case.expected);
    println!(
        "{model} {prefix}{:?}: max abs error {err:e} (output max {:.3})",
        case.sample.dims(),
        max_abs(&case.expected)
    );
    assert!(
        err < F32_TOLERANCE,
        "{model}: max abs error {err} vs diffusers"
    );
}

#[test]
fn tiny_sd15_matches_diffusers() {
    check_parity("tiny-sd15", "");
}

#[test]
fn tiny_sd2_matches_diffusers() {
    check_parity("tiny-sd2", "");
}

#[test]
fn tiny_sdxl_matches_diffusers() {
    check_parity("tiny-sdxl", "");
}

/// A 9x7 latent (a 72x56 image) halves to 5x4, 3x2: the up path must upsample to the skip sizes.
#[test]
fn odd_latent_size_matches_diffusers() {
    for model in MODELS {
        check_parity(model, "odd_");
    }
}

/// candle 0.11's CPU backend has no bf16 convolution (its GPU backends do).
fn has_conv2d(dtype: DType) -> bool {
    let x = Tensor::zeros((1, 1, 3, 3), dtype, &device()).unwrap();
    x.conv2d(&x, 1, 1, 1, 1).is_ok()
}

#[test]
fn half_precision_is_finite_and_close_to_f32() {
    for model in MODELS {
        let case = golden(model, "");
        let reference = run(&load_unet(model, DType::F32), &case);
        let scale = max_abs(&reference);
        // f16 keeps 11 significant bits (relative step 4.9e-4), bf16 8 (3.9e-3); rounding
        // compounds over ~30 layers with residual sums, so allow about 10x the unit step of the
        // output's magnitude.
        for (dtype, relative) in [(DType::F16, 5e-3f32), (DType::BF16, 4e-2)] {
            if !has_conv2d(dtype) {
                println!(
                    "{model} {dtype:?}: skipped, candle has no {dtype:?} conv2d on {:?}",
                    device()
                );
                continue;
            }
            let out = run(&load_unet(model, dtype), &case);
            let err = max_abs_diff(&out, &reference);
            println!("{model} {dtype:?}: max abs error vs f32 {err:e} (output max {scale:.3})");
            assert!(err.is_finite(), "{model} {dtype:?}: non-finite output");
            assert!(
                err < relative * scale,
                "{model} {dtype:?}: max abs error {err} vs f32 (output max {scale})"
            );
        }
    }
}

#[test]
fn controlnet_residuals_are_added_to_skips_and_middle() {
    let model = "tiny-sd15";
    let unet = load_unet(model, DType::F32);
    let case = golden(model, "");
    let plain = run(&unet, &case);

    // The skip connections of this UNet: conv_in, then per level its ResNet blocks and
    // downsampler; zero residuals of the right shapes must change nothing.
    let cfg = config(model);
    let (b, _, h, w) = case.sample.dims4().unwrap();
    let mut shapes = vec![(cfg.block_out_channels[0], h, w)];
    let (mut h, mut w) = (h, w);
    let levels = cfg.block_out_channels.len();
    let OneOrMany::One(layers) = cfg.layers_per_block else {
        panic!("fixture has one layers_per_block for all levels")
    };
    for (i, &ch) in cfg.block_out_channels.iter().enumerate() {
        for _ in 0..layers {
            shapes.push((ch, h, w));
        }
        if i + 1 < levels {
            (h, w) = (h.div_ceil(2), w.div_ceil(2));
            shapes.push((ch, h, w));
        }
    }
    let zeros: Vec<Tensor> = shapes
        .iter()
        .map(|&(c, h, w)| Tensor::zeros((b, c, h, w), DType::F32, &device()).unwrap())
        .collect();
    let mid_channels = cfg.block_out_channels[levels - 1];
    let mid_zero = Tensor::zeros((b, mid_channels, h, w), DType::F32, &device()).unwrap();
    let with = |down: &[Tensor], mid: &Tensor| {
        unet.forward_with_residuals(
            &case.sample,
            case.timestep,
            &case.encoder_hidden_states,
            None,
            Some(down),
            Some(mid),
        )
    };
    let out = with(&zeros, &mid_zero).expect("zero residuals");
    assert_eq!(max_abs_diff(&out, &plain), 0.0);

    let mid_one = (mid_zero.clone() + 1.0).unwrap();
    let out = with(&zeros, &mid_one).expect("mid residual");
    assert!(
        max_abs_diff(&out, &plain) > 1e-3,
        "mid residual had no effect"
    );

    let mut last_one = zeros.clone();
    let last = last_one.len() - 1;
    last_one[last] = (&last_one[last] + 1.0).unwrap();
    let out = with(&last_one, &mid_zero).expect("down residual");
    assert!(
        max_abs_diff(&out, &plain) > 1e-3,
        "down residual had no effect"
    );

    let err = with(&zeros[1..], &mid_zero).expect_err("wrong residual count");
    assert!(matches!(err, Error::Model(_)), "{err}");
}

#[test]
fn sdxl_requires_added_conditions() {
    let model = "tiny-sdxl";
    let unet = load_unet(model, DType::F32);
    assert!(unet.needs_added_conditions());
    let case = golden(model, "");
    let err = unet
        .forward(
            &case.sample,
            case.timestep,
            &case.encoder_hidden_states,
            None,
        )
        .expect_err("no added conditions");
    assert!(err.to_string().contains("text_embeds"), "{err}");
}

fn build_error(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let path = fixtures().join("tiny-sd15/unet/config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut json);
    let cfg: UNet2DConditionConfig = serde_json::from_value(json).expect("config parses");
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    match UNet2DConditionModel::new(vb, &cfg) {
        Err(err @ Error::Model(_)) => err.to_string(),
        Err(other) => panic!("expected a model error, got {other}"),
        Ok(_) => panic!("config was accepted"),
    }
}

#[test]
fn unsupported_settings_are_refused_by_name() {
    let cases: [(&str, serde_json::Value); 8] = [
        ("class_embed_type", "timestep".into()),
        ("num_class_embeds", 10.into()),
        ("dual_cross_attention", true.into()),
        ("addition_embed_type", "text_image".into()),
        ("time_embedding_type", "fourier".into()),
        ("time_cond_proj_dim", 256.into()),
        ("attention_type", "gated".into()),
        ("some_future_setting", 1.into()),
    ];
    for (setting, value) in cases {
        let msg = build_error(|json| {
            json[setting] = value;
        });
        assert!(msg.contains(setting), "{setting}: {msg}");
    }
    let msg = build_error(|json| {
        json["down_block_types"][0] = "SimpleCrossAttnDownBlock2D".into();
    });
    assert!(msg.contains("SimpleCrossAttnDownBlock2D"), "{msg}");
    let msg = build_error(|json| {
        json["mid_block_type"] = "UNetMidBlock2DSimpleCrossAttn".into();
    });
    assert!(msg.contains("mid_block_type"), "{msg}");
    let msg = build_error(|json| {
        json["layers_per_block"] = serde_json::json!([1, 2]);
    });
    assert!(msg.contains("layers_per_block"), "{msg}");
}
