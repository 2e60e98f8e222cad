//! UNet2DConditionModel against diffusers: tiny SD1.5-, SD2- and SDXL-shaped UNets with random
//! weights (tests/fixtures/<model>/unet) and the outputs diffusers computed for them
//! (tests/fixtures/goldens/unet_<model>.safetensors).

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use sd_serve::models::layers::{scaled_dot_product_attention, AttentionPrecision};
use sd_serve::models::unet::{
    AddedConditions, OneOrMany, UNet2DConditionConfig, UNet2DConditionModel,
};
use sd_serve::Error;

use common::{fixtures, load_goldens, manifest, max_abs, max_abs_diff, read_json, var_builder};

const MODELS: [&str; 3] = ["tiny-sd15", "tiny-sd2", "tiny-sdxl"];

/// A GPU when the crate is built with `cuda` and one is present, else the CPU.
fn device() -> Device {
    Device::cuda_if_available(0).expect("device")
}

fn config(model: &str) -> UNet2DConditionConfig {
    let path = fixtures().join(model).join("unet/config.json");
    serde_json::from_value(read_json(&path)).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

fn load_unet(model: &str, dtype: DType) -> UNet2DConditionModel {
    let weights = fixtures()
        .join(model)
        .join("unet/diffusion_pytorch_model.safetensors");
    let vb = var_builder(&weights, dtype, &device());
    UNet2DConditionModel::new(vb, &config(model)).expect("unet builds")
}

/// Inputs and diffusers' output of one case of a golden file.
struct Case {
    name: String,
    sample: Tensor,
    timestep: f64,
    encoder_hidden_states: Tensor,
    added: Option<AddedConditions>,
    expected: Tensor,
}

/// The cases `goldens/manifest.json` lists for `model`'s UNet.
fn cases(model: &str) -> Vec<Case> {
    let manifest = manifest();
    let entry = manifest["unet"]
        .as_array()
        .expect("manifest unet list")
        .iter()
        .find(|e| e["model"] == format!("{model}/unet"))
        .unwrap_or_else(|| panic!("no unet golden for {model}"));
    let tensors = load_goldens(entry["file"].as_str().expect("file"));
    let tensor = |case: &serde_json::Value, key: &str| {
        case[key].as_str().map(|name| {
            tensors[name]
                .to_device(&device())
                .and_then(|t| t.to_dtype(DType::F32))
                .expect("golden tensor")
        })
    };
    entry["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|case| {
            let sample = tensor(case, "sample").expect("sample");
            let timestep = case["timestep"].as_f64().expect("timestep");
            Case {
                name: format!("{:?} t={timestep}", sample.dims()),
                sample,
                timestep,
                encoder_hidden_states: tensor(case, "encoder_hidden_states").expect("context"),
                added: tensor(case, "text_embeds").map(|text_embeds| AddedConditions {
                    text_embeds,
                    time_ids: tensor(case, "time_ids").expect("time_ids"),
                }),
                expected: tensor(case, "output").expect("output"),
            }
        })
        .collect()
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

// f32 on both sides with outputs of magnitude ~1; only the order of accumulation differs (gemm
// blocking, im2col convolutions, one-pass layer-norm statistics): ~1e-6 seen, 10x headroom.
const F32_TOLERANCE: f32 = 1e-5;

fn check_parity(model: &str) {
    let unet = load_unet(model, DType::F32);
    for case in cases(model) {
        let out = run(&unet, &case);
        let err = max_abs_diff(&out, &case.expected);
        println!(
            "{model} {}: max abs error {err:e} (output max {:.3})",
            case.name,
            max_abs(&case.expected)
        );
        assert!(
            err < F32_TOLERANCE,
            "{model} {}: max abs error {err} vs diffusers",
            case.name
        );
    }
}

// Each model's cases include an odd latent (5x7 -> 3x4 -> 2x2 and back), where the up path must
// upsample to the skip connections' sizes.

#[test]
fn tiny_sd15_matches_diffusers() {
    check_parity("tiny-sd15");
}

#[test]
fn tiny_sd2_matches_diffusers() {
    check_parity("tiny-sd2");
}

#[test]
fn tiny_sdxl_matches_diffusers() {
    check_parity("tiny-sdxl");
}

/// Latent sizes a request can reach (any multiple of 8 pixels) must run, odd sides included.
#[test]
fn odd_latent_sizes_run() {
    for model in MODELS {
        let unet = load_unet(model, DType::F32);
        let case = &cases(model)[0];
        for (h, w) in [(9, 7), (1, 1), (3, 10)] {
            let sample = case.sample.narrow(0, 0, 1).unwrap();
            let sample = sample
                .pad_with_same(2, 0, h.max(8) - 8)
                .unwrap()
                .pad_with_same(3, 0, w.max(8) - 8)
                .unwrap()
                .narrow(2, 0, h)
                .unwrap()
                .narrow(3, 0, w)
                .unwrap();
            let added = case.added.as_ref().map(|a| AddedConditions {
                text_embeds: a.text_embeds.narrow(0, 0, 1).unwrap(),
                time_ids: a.time_ids.narrow(0, 0, 1).unwrap(),
            });
            let context = case.encoder_hidden_states.narrow(0, 0, 1).unwrap();
            let out = unet
                .forward(&sample, case.timestep, &context, added.as_ref())
                .unwrap_or_else(|e| panic!("{model} {h}x{w}: {e}"));
            assert_eq!(out.dims(), &[1, 4, h, w], "{model}");
            assert!(
                max_abs(&out).is_finite(),
                "{model} {h}x{w}: non-finite output"
            );
        }
    }
}

#[test]
fn half_precision_is_finite_and_close_to_f32() {
    for model in MODELS {
        let case = &cases(model)[0];
        let reference = run(&load_unet(model, DType::F32), case);
        let scale = max_abs(&reference);
        // f16 keeps 11 significant bits (relative step 4.9e-4), bf16 8 (3.9e-3); rounding
        // compounds over ~30 layers with residual sums, so allow about 10x the unit step of the
        // output's magnitude.
        for (dtype, relative) in [(DType::F16, 5e-3f32), (DType::BF16, 4e-2)] {
            let out = run(&load_unet(model, dtype), case);
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
    let case = &cases(model)[0];
    let plain = run(&unet, case);

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
    let case = &cases(model)[0];
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
    let mut json = read_json(&fixtures().join("tiny-sd15/unet/config.json"));
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

/// Deterministic values in -1..1 spread like noise.
fn pseudo_random(shape: (usize, usize, usize, usize), phase: f64, dev: &Device) -> Tensor {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    Tensor::arange(0u32, n as u32, dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .affine(12.9898, phase)
        .unwrap()
        .sin()
        .unwrap()
        .reshape(shape)
        .unwrap()
}

/// Naive attention in f64 over `[B, N, H, D]` tensors.
fn attention_f64(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
    let [q, k, v] = [q, k, v].map(|t| {
        t.to_dtype(DType::F64)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    });
    let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
    let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
    probs
        .matmul(&v)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// Over 4096 keys the softmax denominator is in the thousands, where f16 and bf16 can no longer
/// add a single term: the reduction has to run in f32.
#[test]
fn half_precision_attention_accumulates_in_f32() {
    let dev = device();
    let q = pseudo_random((1, 4, 2, 16), 0.1, &dev);
    let k = pseudo_random((1, 4096, 2, 16), 0.2, &dev);
    let v = (pseudo_random((1, 4096, 2, 16), 0.3, &dev) + 1.0).unwrap();
    let scale = 0.25;
    let reference = attention_f64(&q, &k, &v, scale);
    // The output is a mean of values near 1: a few units of the half type's rounding at 1.
    for (dtype, tolerance) in [
        (DType::F32, 1e-5f32),
        (DType::F16, 5e-3),
        (DType::BF16, 4e-2),
    ] {
        for precision in [
            AttentionPrecision::Softmax,
            AttentionPrecision::Scores,
            AttentionPrecision::Full,
        ] {
            let [q, k, v] = [&q, &k, &v].map(|t| t.to_dtype(dtype).unwrap());
            let out = scaled_dot_product_attention(&q, &k, &v, scale, precision, None).unwrap();
            assert_eq!(out.dtype(), dtype);
            let err = max_abs_diff(&out.to_dtype(DType::F32).unwrap(), &reference);
            println!("attention {dtype:?} {precision:?}: max abs error {err:e}");
            assert!(err < tolerance, "{dtype:?} {precision:?}: {err}");
        }
    }
}

/// Records the name and shape of every weight a model asks for; hands out zero-strided zeros.
#[derive(Default)]
struct WeightRecorder(Mutex<BTreeMap<String, Vec<usize>>>);

struct SharedRecorder(Arc<WeightRecorder>);

impl SimpleBackend for SharedRecorder {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let previous = (self.0)
            .0
            .lock()
            .unwrap()
            .insert(name.to_string(), shape.dims().to_vec());
        assert!(previous.is_none(), "{name} requested twice");
        Tensor::zeros((), dtype, dev)?.broadcast_as(shape)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: unchecked access")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// The weights a config makes the model load, name -> shape.
fn requested_weights(config_json: &str) -> BTreeMap<String, Vec<usize>> {
    let cfg: UNet2DConditionConfig = serde_json::from_str(config_json).expect("config parses");
    let recorder = Arc::new(WeightRecorder::default());
    let backend: Box<dyn SimpleBackend> = Box::new(SharedRecorder(recorder.clone()));
    let vb = VarBuilder::from_backend(backend, DType::F16, Device::Cpu);
    UNet2DConditionModel::new(vb, &cfg).expect("unet builds");
    let weights = recorder.0.lock().unwrap().clone();
    weights
}

/// The published configs of SD 1.5, SD 2.1 and SDXL base build models asking for exactly the
/// weights diffusers' models have: tensor count and parameter total as diffusers 0.42 counts
/// them, and spot checks of names and shapes.
#[test]
fn full_size_configs_request_diffusers_weights() {
    // (name, config, tensor count, parameter count, (weight, shape) spot checks)
    type Expected = (
        &'static str,
        &'static str,
        usize,
        usize,
        &'static [(&'static str, &'static [usize])],
    );
    let cases: [Expected; 3] = [
        (
            "sd15",
            SD15_CONFIG,
            686,
            859_520_964,
            &[
                (
                    "down_blocks.0.attentions.0.proj_in.weight",
                    &[320, 320, 1, 1],
                ),
                (
                    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                    &[320, 768],
                ),
                (
                    "up_blocks.3.resnets.2.conv_shortcut.weight",
                    &[320, 640, 1, 1],
                ),
                (
                    "down_blocks.2.downsamplers.0.conv.weight",
                    &[1280, 1280, 3, 3],
                ),
            ],
        ),
        (
            "sd21",
            SD21_CONFIG,
            686,
            865_910_724,
            &[
                ("down_blocks.0.attentions.0.proj_in.weight", &[320, 320]),
                (
                    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight",
                    &[1280, 1024],
                ),
            ],
        ),
        (
            "sdxl",
            SDXL_CONFIG,
            1680,
            2_567_463_684,
            &[
                ("add_embedding.linear_1.weight", &[1280, 2816]),
                (
                    "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight",
                    &[1280, 2048],
                ),
                (
                    "mid_block.attentions.0.transformer_blocks.9.ff.net.0.proj.weight",
                    &[10240, 1280],
                ),
                (
                    "up_blocks.0.attentions.2.transformer_blocks.9.norm3.bias",
                    &[1280],
                ),
                ("up_blocks.1.upsamplers.0.conv.weight", &[640, 640, 3, 3]),
            ],
        ),
    ];
    for (name, json, count, params, spots) in cases {
        let weights = requested_weights(json);
        let total: usize = weights.values().map(|s| s.iter().product::<usize>()).sum();
        assert_eq!((weights.len(), total), (count, params), "{name}");
        for (key, shape) in spots {
            assert_eq!(
                weights.get(*key).map(Vec::as_slice),
                Some(*shape),
                "{name} {key}"
            );
        }
    }
}

const SD15_CONFIG: &str = r#"{
  "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
  "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false, "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
  "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;

const SD21_CONFIG: &str = r#"{
  "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0", "act_fn": "silu",
  "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false, "cross_attention_dim": 1024,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true, "freq_shift": 0,
  "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
  "norm_num_groups": 32, "num_class_embeds": null, "only_cross_attention": false,
  "out_channels": 4, "sample_size": 96,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
  "use_linear_projection": true, "upcast_attention": true
}"#;

const SDXL_CONFIG: &str = r#"{
  "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
  "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
  "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
  "block_out_channels": [320, 640, 1280], "center_input_sample": false,
  "class_embed_type": null, "class_embeddings_concat": false, "conv_in_kernel": 3,
  "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": null,
  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
  "downsample_padding": 1, "dual_cross_attention": false, "encoder_hid_dim": null,
  "encoder_hid_dim_type": null, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_only_cross_attention": null, "mid_block_scale_factor": 1,
  "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
  "num_attention_heads": null, "num_class_embeds": null, "only_cross_attention": false,
  "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
  "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": false,
  "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": null,
  "time_embedding_act_fn": null, "time_embedding_dim": null, "time_embedding_type": "positional",
  "timestep_post_act": null, "transformer_layers_per_block": [1, 2, 10],
  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
  "upcast_attention": null, "use_linear_projection": true
}"#;
