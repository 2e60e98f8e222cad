//! Loading the tiny fixture models: diffusers folders, single-file checkpoints converted from the
//! LDM / SGM layout (compared tensor by tensor with the folders), variants, shards, tokenizers.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{copy_dir, fixtures, max_abs_store_diff, names, scratch, setup};
use sd_serve::weights::single_file::{
    convert_key, single_file_family, Conversion, ConversionContext, Target,
};
use sd_serve::weights::{
    detect_family, load_diffusers_folder, load_diffusers_folder_variant, load_single_file,
    load_single_file_with_tokenizers, Family, PipelineFiles,
};
use sd_serve::Error;

fn cpu() -> Device {
    Device::Cpu
}

fn folder(name: &str) -> PipelineFiles {
    load_diffusers_folder(&fixtures().join(name), &cpu(), DType::F32).unwrap()
}

/// Every component of `b` equals `a` (same keys, same values); returns the worst difference.
fn assert_same_weights(what: &str, a: &PipelineFiles, b: &PipelineFiles) -> f32 {
    let mut worst = max_abs_store_diff(&format!("{what} unet"), &a.unet.weights, &b.unet.weights);
    worst = worst.max(max_abs_store_diff(
        &format!("{what} vae"),
        &a.vae.weights,
        &b.vae.weights,
    ));
    worst = worst.max(max_abs_store_diff(
        &format!("{what} text_encoder"),
        &a.text_encoder.weights,
        &b.text_encoder.weights,
    ));
    assert_eq!(a.text_encoder_2.is_some(), b.text_encoder_2.is_some());
    if let (Some(x), Some(y)) = (&a.text_encoder_2, &b.text_encoder_2) {
        worst = worst.max(max_abs_store_diff(
            &format!("{what} text_encoder_2"),
            &x.weights,
            &y.weights,
        ));
    }
    worst
}

#[test]
fn folders_load_with_family_tokenizers_and_configs() {
    setup();
    let sd15 = folder("tiny-sd15");
    assert_eq!(sd15.family, Family::Sd1);
    assert!(sd15.text_encoder_2.is_none() && sd15.tokenizer_2.is_none());
    assert_eq!(sd15.tokenizer.pad_token, "<|endoftext|>");
    assert_eq!(sd15.tokenizer.model_max_length, 77);
    assert!(sd15.tokenizer.tokenizer_json.is_file());
    assert_eq!(sd15.scheduler_config["_class_name"], "PNDMScheduler");
    assert_eq!(sd15.unet.config["cross_attention_dim"], 8);

    let sd2 = folder("tiny-sd2");
    assert_eq!(sd2.family, Family::Sd2);
    assert_eq!(sd2.tokenizer.pad_token, "!");
    assert_eq!(sd2.scheduler_config["prediction_type"], "v_prediction");

    let xl = folder("tiny-sdxl");
    assert_eq!(xl.family, Family::Sdxl);
    assert_eq!(xl.tokenizer.pad_token, "<|endoftext|>");
    let tok2 = xl
        .tokenizer_2
        .as_ref()
        .expect("SDXL has a second tokenizer");
    assert_eq!(tok2.pad_token, "!");
    assert_eq!(tok2.model_max_length, 77);
    let te2 = xl
        .text_encoder_2
        .as_ref()
        .expect("SDXL has a second text encoder");
    assert_eq!(
        te2.weights.get("text_projection.weight").unwrap().dims(),
        &[16, 12]
    );
    assert_eq!(xl.vae.config["scaling_factor"], 0.13025);

    // Text encoders are read in the `text_model.*` layout, with no `position_ids` buffer.
    for p in [&sd15, &sd2, &xl] {
        for n in p.text_encoder.weights.names() {
            assert!(
                n.starts_with("text_model.") && !n.ends_with("position_ids"),
                "{n}"
            );
        }
        assert!(p
            .text_encoder
            .weights
            .get("text_model.embeddings.token_embedding.weight")
            .is_some());
    }
}

#[test]
fn folder_tensors_take_the_requested_dtype() {
    setup();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let p = load_diffusers_folder(&fixtures().join("tiny-sd15"), &cpu(), dtype).unwrap();
        // The UNet is stored in f16 and the VAE in f32: both come out in `dtype`.
        for store in [&p.unet.weights, &p.vae.weights, &p.text_encoder.weights] {
            for n in store.names() {
                assert_eq!(store.get(n).unwrap().dtype(), dtype, "{n}");
            }
        }
    }
    // Values survive the f16 -> f32 conversion exactly (the fixtures are f16-representable).
    let a = load_diffusers_folder(&fixtures().join("tiny-sd15"), &cpu(), DType::F16).unwrap();
    let b = folder("tiny-sd15");
    assert_eq!(assert_same_weights("f16 vs f32", &a, &b), 0.0);
}

#[test]
fn var_builder_reads_the_store() {
    setup();
    let p = folder("tiny-sd15");
    let w = p.unet.weights.get("conv_in.weight").unwrap().clone();
    let vb = p.unet.weights.var_builder(DType::F32, &cpu());
    let got = vb.get(w.dims(), "conv_in.weight").unwrap();
    let diff = (got - &w).unwrap().abs().unwrap().sum_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    assert!(vb.get(w.dims(), "no.such.weight").is_err());
}

#[test]
fn single_file_families_are_detected() {
    setup();
    assert_eq!(
        single_file_family(&fixtures().join("tiny-sd15.safetensors")).unwrap(),
        Family::Sd1
    );
    assert_eq!(
        single_file_family(&fixtures().join("tiny-sdxl.safetensors")).unwrap(),
        Family::Sdxl
    );
    let sd2 = [
        "model.diffusion_model.out.2.bias",
        "cond_stage_model.model.ln_final.weight",
    ];
    assert_eq!(detect_family(sd2).unwrap(), Family::Sd2);
}

/// The fixture single file `<name>.safetensors`, read with the configs of folder `<name>`, and
/// that folder.
fn single_file_and_folder(name: &str) -> (PipelineFiles, PipelineFiles) {
    setup();
    let single = load_single_file(
        &fixtures().join(format!("{name}.safetensors")),
        Some(&fixtures().join(name)),
        &cpu(),
        DType::F32,
    )
    .unwrap();
    (single, folder(name))
}

#[test]
fn sd15_single_file_equals_folder() {
    let (single, f) = single_file_and_folder("tiny-sd15");
    assert_eq!(single.family, Family::Sd1);
    // f16 file vs folder, both read as f32: the fixture values are f16-exact, so equal.
    let worst = assert_same_weights("sd15 single file", &f, &single);
    assert_eq!(worst, 0.0);
    assert_eq!(single.unet.config, f.unet.config);
    assert_eq!(single.scheduler_config, f.scheduler_config);
    assert_eq!(single.tokenizer, f.tokenizer);
}

#[test]
fn sdxl_single_file_equals_folder() {
    let (single, f) = single_file_and_folder("tiny-sdxl");
    assert_eq!(single.family, Family::Sdxl);
    let worst = assert_same_weights("sdxl single file", &f, &single);
    assert_eq!(worst, 0.0);
    assert_eq!(single.tokenizer_2, f.tokenizer_2);
    assert_eq!(single.vae.config["scaling_factor"], 0.13025);
}

/// The OpenCLIP layout of an HF CLIP text encoder, written here independently of the loader:
/// q/k/v stacked into `in_proj`, `ln_1/ln_2`, `c_fc/c_proj`, `positional_embedding`.
fn to_open_clip(
    store: &sd_serve::weights::WeightStore,
    prefix: &str,
    layers: usize,
) -> HashMap<String, Tensor> {
    let g = |n: &str| store.get(&format!("text_model.{n}")).unwrap().clone();
    let mut out = HashMap::new();
    out.insert(
        format!("{prefix}token_embedding.weight"),
        g("embeddings.token_embedding.weight"),
    );
    out.insert(
        format!("{prefix}positional_embedding"),
        g("embeddings.position_embedding.weight"),
    );
    out.insert(
        format!("{prefix}ln_final.weight"),
        g("final_layer_norm.weight"),
    );
    out.insert(format!("{prefix}ln_final.bias"), g("final_layer_norm.bias"));
    for i in 0..layers {
        let src = format!("encoder.layers.{i}.");
        let dst = format!("{prefix}transformer.resblocks.{i}.");
        for kind in ["weight", "bias"] {
            let qkv: Vec<Tensor> = ["q", "k", "v"]
                .iter()
                .map(|p| g(&format!("{src}self_attn.{p}_proj.{kind}")))
                .collect();
            out.insert(
                format!("{dst}attn.in_proj_{kind}"),
                Tensor::cat(&qkv, 0).unwrap(),
            );
            for (from, to) in [
                ("self_attn.out_proj", "attn.out_proj"),
                ("layer_norm1", "ln_1"),
                ("layer_norm2", "ln_2"),
                ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"),
            ] {
                out.insert(
                    format!("{dst}{to}.{kind}"),
                    g(&format!("{src}{from}.{kind}")),
                );
            }
        }
    }
    out
}

/// An SD2 single file made from the tiny-sd2 folder: UNet and VAE under the LDM names of the
/// (structurally identical) tiny-sd15 checkpoint, the text encoder in OpenCLIP layout with one
/// extra final layer and a projection, which SD2 does not use (as in the real SD 2.x files).
fn write_sd2_single_file(path: &Path) {
    let sd2 = folder("tiny-sd2");
    let sd15_file = fixtures().join("tiny-sd15.safetensors");
    let sd15 = candle_core::safetensors::load(&sd15_file, &cpu()).unwrap();
    let ctx = ConversionContext {
        family: Family::Sd1,
        unet_layers_per_block: 2,
        vae_up_blocks: 4,
        openclip_layers: usize::MAX,
    };
    let mut out: HashMap<String, Tensor> = HashMap::new();
    for (key, t) in &sd15 {
        let Some((target, conversion)) = convert_key(key, &ctx) else {
            continue;
        };
        let name = match conversion {
            Conversion::Rename(n) | Conversion::ToLinear(n) => n,
            other => panic!("unexpected conversion {other:?}"),
        };
        let (store, is_vae) = match target {
            Target::Unet => (&sd2.unet.weights, false),
            Target::Vae => (&sd2.vae.weights, true),
            _ => continue,
        };
        let value = store
            .get(&name)
            .unwrap_or_else(|| panic!("tiny-sd2 lacks {name}"));
        // The LDM VAE attention stores 1x1 convolutions (SD2's UNet projections are linear in
        // both layouts).
        let value = if is_vae && t.rank() == 4 && value.rank() == 2 {
            value.unsqueeze(2).unwrap().unsqueeze(3).unwrap()
        } else {
            value.clone()
        };
        out.insert(key.clone(), value);
    }
    let layers = sd2.text_encoder.config["num_hidden_layers"]
        .as_u64()
        .unwrap() as usize;
    let mut te = to_open_clip(&sd2.text_encoder.weights, "cond_stage_model.model.", layers);
    let extra: Vec<(String, Tensor)> = te
        .iter()
        .filter(|(k, _)| k.contains(&format!("resblocks.{}.", layers - 1)))
        .map(|(k, v)| {
            (
                k.replace(
                    &format!("resblocks.{}.", layers - 1),
                    &format!("resblocks.{layers}."),
                ),
                v.clone(),
            )
        })
        .collect();
    te.extend(extra);
    te.insert(
        "cond_stage_model.model.text_projection".into(),
        Tensor::ones((8, 8), DType::F32, &cpu()).unwrap(),
    );
    te.insert(
        "cond_stage_model.model.logit_scale".into(),
        Tensor::new(4.6f32, &cpu()).unwrap(),
    );
    out.extend(te);
    out.insert(
        "alphas_cumprod".into(),
        Tensor::ones(1000, DType::F32, &cpu()).unwrap(),
    );
    candle_core::safetensors::save(&out, path).unwrap();
}

#[test]
fn sd2_open_clip_single_file_equals_folder() {
    setup();
    let dir = scratch("sd2-single");
    let path = dir.join("tiny-sd2.safetensors");
    write_sd2_single_file(&path);
    assert_eq!(single_file_family(&path).unwrap(), Family::Sd2);
    let single = load_single_file(
        &path,
        Some(&fixtures().join("tiny-sd2")),
        &cpu(),
        DType::F32,
    )
    .unwrap();
    assert_eq!(single.family, Family::Sd2);
    let worst = assert_same_weights("sd2 single file", &folder("tiny-sd2"), &single);
    assert_eq!(worst, 0.0);
    assert!(single
        .text_encoder
        .weights
        .get("text_projection.weight")
        .is_none());
}

#[test]
fn builtin_configs_without_config_folder() {
    setup();
    let path = fixtures().join("tiny-sd15.safetensors");
    let tok = fixtures().join("tiny-sd15");
    let p = load_single_file_with_tokenizers(&path, None, Some(&tok), &cpu(), DType::F32).unwrap();
    // The configs are those of stable-diffusion-v1-5; the key conversion is the same.
    assert_eq!(p.unet.config["cross_attention_dim"], 768);
    assert_eq!(p.text_encoder.config["hidden_act"], "quick_gelu");
    assert_eq!(p.scheduler_config["_class_name"], "PNDMScheduler");
    assert_eq!(p.vae.config["scaling_factor"], 0.18215);
    assert_eq!(
        names(&p.unet.weights),
        names(&folder("tiny-sd15").unet.weights)
    );

    let xl = load_single_file_with_tokenizers(
        &fixtures().join("tiny-sdxl.safetensors"),
        None,
        Some(&fixtures().join("tiny-sdxl")),
        &cpu(),
        DType::F32,
    )
    .unwrap();
    assert_eq!(xl.unet.config["addition_embed_type"], "text_time");
    assert_eq!(
        xl.text_encoder_2.as_ref().unwrap().config["num_hidden_layers"],
        32
    );
    assert_eq!(xl.scheduler_config["_class_name"], "EulerDiscreteScheduler");
    assert_eq!(xl.tokenizer_2.as_ref().unwrap().pad_token, "!");

    // SD2 without a config: stable-diffusion-2-1 (768 px, v-prediction), as diffusers decides.
    let dir = scratch("sd2-builtin");
    let sd2 = dir.join("tiny-sd2.safetensors");
    write_sd2_single_file(&sd2);
    let p = load_single_file_with_tokenizers(
        &sd2,
        None,
        Some(&fixtures().join("tiny-sd2")),
        &cpu(),
        DType::F32,
    )
    .unwrap();
    assert_eq!(p.scheduler_config["prediction_type"], "v_prediction");
    assert_eq!(p.unet.config["cross_attention_dim"], 1024);
    // Built-in SD2 keeps 23 OpenCLIP layers: all 5 of this file are converted.
    assert!(p
        .text_encoder
        .weights
        .get("text_model.encoder.layers.4.mlp.fc1.weight")
        .is_some());

    // No config and no tokenizer: an error saying what to add.
    let e = load_single_file(&path, None, &cpu(), DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("needs a tokenizer") && e.contains("config"),
        "{e}"
    );
}

#[test]
fn config_folder_of_another_family_is_refused() {
    setup();
    let e = load_single_file(
        &fixtures().join("tiny-sd15.safetensors"),
        Some(&fixtures().join("tiny-sdxl")),
        &cpu(),
        DType::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("sd1") && e.contains("sdxl"), "{e}");
}

#[test]
fn pickle_checkpoints_are_refused() {
    setup();
    let dir = scratch("pickle");
    let ckpt = dir.join("model.ckpt");
    std::fs::write(&ckpt, b"not really a pickle").unwrap();
    let e = load_single_file(&ckpt, None, &cpu(), DType::F32).unwrap_err();
    assert!(matches!(e, Error::Model(_)));
    assert!(e.to_string().contains("pickle"), "{e}");
}

#[test]
fn missing_files_are_named() {
    setup();
    let src = fixtures().join("tiny-sd15");
    let dir = scratch("missing-unet-weights");
    copy_dir(&src, &dir, &|p| {
        p.ends_with("unet/diffusion_pytorch_model.safetensors")
    });
    let e = load_diffusers_folder(&dir, &cpu(), DType::F32).unwrap_err();
    assert!(matches!(e, Error::Model(_)));
    assert!(
        e.to_string()
            .contains("unet/diffusion_pytorch_model.safetensors"),
        "{e}"
    );

    let dir = scratch("missing-scheduler");
    copy_dir(&src, &dir, &|p| p.ends_with("scheduler_config.json"));
    let e = load_diffusers_folder(&dir, &cpu(), DType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("scheduler/scheduler_config.json"), "{e}");

    let dir = scratch("missing-index");
    copy_dir(&src, &dir, &|p| p.ends_with("model_index.json"));
    let e = load_diffusers_folder(&dir, &cpu(), DType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model_index.json"), "{e}");

    let e = load_single_file(
        &fixtures().join("nope.safetensors"),
        None,
        &cpu(),
        DType::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("nope.safetensors"), "{e}");
}

#[test]
fn fp16_variant_and_sharded_weights() {
    setup();
    let src = fixtures().join("tiny-sd15");
    let reference = folder("tiny-sd15");

    // Only a `.fp16` UNet file: chosen for variant fp16, and as the fallback without a variant.
    let dir = scratch("variant");
    copy_dir(&src, &dir, &|_| false);
    std::fs::rename(
        dir.join("unet/diffusion_pytorch_model.safetensors"),
        dir.join("unet/diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    for variant in [Some("fp16"), None] {
        let p = load_diffusers_folder_variant(&dir, variant, &cpu(), DType::F32).unwrap();
        assert_eq!(assert_same_weights("variant", &reference, &p), 0.0);
    }

    // The UNet split in two shards behind a `.safetensors.index.json`.
    let dir = scratch("sharded");
    copy_dir(&src, &dir, &|p| {
        p.ends_with("unet/diffusion_pytorch_model.safetensors")
    });
    let unet = &reference.unet.weights;
    let mut all: Vec<&str> = unet.names().collect();
    all.sort();
    let (first, second) = all.split_at(all.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [first, second].iter().enumerate() {
        let file = format!("diffusion_pytorch_model-0000{}-of-00002.safetensors", i + 1);
        let tensors: HashMap<String, Tensor> = part
            .iter()
            .map(|n| (n.to_string(), unet.get(n).unwrap().clone()))
            .collect();
        candle_core::safetensors::save(&tensors, dir.join("unet").join(&file)).unwrap();
        for n in part.iter() {
            weight_map.insert(n.to_string(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.join("unet/diffusion_pytorch_model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let p = load_diffusers_folder(&dir, &cpu(), DType::F32).unwrap();
    assert_eq!(assert_same_weights("sharded", &reference, &p), 0.0);
}

/// Pads / truncates like transformers: bos + tokens + eos, at most 77 with eos last, then pad.
fn pad77(mut ids: Vec<u32>, pad: u32) -> Vec<u32> {
    if ids.len() > 77 {
        ids.truncate(76);
        ids.push(49407);
    }
    ids.resize(77, pad);
    ids
}

#[test]
fn tokenizer_json_is_written_for_vocab_and_merges_folders() {
    setup();
    let goldens: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("goldens/tokenizer.json")).unwrap(),
    )
    .unwrap();
    let clip: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("clip-tokenizer/tokenizer.json")).unwrap(),
    )
    .unwrap();
    // A tokenizer folder as the hub repos ship it: vocab.json + merges.txt, no tokenizer.json.
    let merges: Vec<String> = clip["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap()))
        .collect();
    for (model, convention) in [("tiny-sd2", "pad_bang"), ("tiny-sd15", "pad_eos")] {
        let dir = scratch(&format!("vocab-merges-{model}"));
        copy_dir(&fixtures().join(model), &dir, &|p| {
            p.ends_with("tokenizer/tokenizer.json")
        });
        std::fs::write(
            dir.join("tokenizer/vocab.json"),
            clip["model"]["vocab"].to_string(),
        )
        .unwrap();
        std::fs::write(
            dir.join("tokenizer/merges.txt"),
            format!("#version: 0.2\n{}\n", merges.join("\n")),
        )
        .unwrap();
        let p = load_diffusers_folder(&dir, &cpu(), DType::F32).unwrap();
        assert!(
            !p.tokenizer.tokenizer_json.starts_with(&dir),
            "written to the cache folder"
        );
        let tok = tokenizers::Tokenizer::from_file(&p.tokenizer.tokenizer_json).unwrap();
        let expected = &goldens["padded"][convention];
        let pad_id = expected["pad_id"].as_u64().unwrap() as u32;
        for (name, text) in goldens["prompts"].as_object().unwrap() {
            let ids = tok
                .encode(text.as_str().unwrap(), true)
                .unwrap()
                .get_ids()
                .to_vec();
            let want: Vec<u32> = expected["ids"][name]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(pad77(ids, pad_id), want, "{model} {name}");
        }
    }
    if let Some(cache) = std::env::var_os("SD_SERVE_CACHE") {
        let _ = std::fs::remove_dir_all(cache);
    }
}
