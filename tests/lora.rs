//! LoRA merging against diffusers (`load_lora_weights` + `fuse_lora`, or `set_adapters` with two
//! LoRAs) on the tiny fixture models, kohya and PEFT files, SD1.5 and SDXL: the merged weights and
//! the images of a pipeline run with them. Then the properties the engine relies on: unmerging
//! restores every weight bit for bit, and a LoRA that does not fit the model is refused whole.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use sd_serve::pipeline::{GenerationRequest, StableDiffusion};
use sd_serve::schedulers::SchedulerSpec;
use sd_serve::weights::lora::{merge_loras, Lora, LoraFormat, LoraTarget};
use sd_serve::weights::{PipelineFiles, WeightStore};

use common::{fixtures, load_goldens, manifest, max_abs_diff, registry, setup};

/// Merged weights: the same f32 sum `W + w * s * up @ down` (s = alpha / r). With one LoRA the
/// results are identical; with two, diffusers adds the updates to W one after the other where we
/// add their sum once, a difference of an f32 rounding of weights below ~1.5: an ulp or two.
/// Seen: 0 for one LoRA, <= 6.0e-8 for two.
const WEIGHT_TOL: f32 = 1e-6;
/// Pipeline images after 3 Euler steps with guidance: the margin of the pipeline parity tests
/// (f32 rounding of two implementations, amplified by guidance). Seen: <= 1.9e-6.
const IMAGE_TOL: f32 = 2e-5;

fn files(model: &str, dtype: DType) -> PipelineFiles {
    setup();
    registry()
        .resolve(model)
        .and_then(|entry| entry.load(&Device::Cpu, dtype))
        .unwrap_or_else(|e| panic!("{model}: {e}"))
}

fn lora_path(id: &str) -> std::path::PathBuf {
    let file = manifest()["lora"]["files"][id]["file"]
        .as_str()
        .unwrap_or_else(|| panic!("manifest lora.files.{id}"))
        .to_string();
    fixtures().join(file)
}

fn lora(id: &str) -> Lora {
    let path = lora_path(id);
    Lora::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn component(files: &PipelineFiles, name: &str) -> WeightStore {
    match name {
        "unet" => files.unet.weights.clone(),
        "text_encoder" => files.text_encoder.weights.clone(),
        "text_encoder_2" => files.text_encoder_2.as_ref().unwrap().weights.clone(),
        other => panic!("unknown component {other}"),
    }
}

fn target_name(t: LoraTarget) -> &'static str {
    match t {
        LoraTarget::Unet => "unet",
        LoraTarget::TextEncoder => "text_encoder",
        LoraTarget::TextEncoder2 => "text_encoder_2",
    }
}

fn run_pipeline(files: &PipelineFiles, spec: &serde_json::Value) -> Tensor {
    let sd = StableDiffusion::load(files, &Device::Cpu, DType::F32).unwrap();
    let mut req = GenerationRequest::new(spec["prompt"].as_str().unwrap());
    req.negative_prompt = spec["negative_prompt"].as_str().map(str::to_string);
    let u = |k: &str| spec[k].as_u64().unwrap() as usize;
    (req.width, req.height, req.steps, req.num_images) =
        (u("width"), u("height"), u("steps"), u("num_images"));
    req.guidance_scale = spec["guidance"].as_f64().unwrap();
    req.seed = spec["seed"].as_u64().unwrap();
    req.scheduler = Some(SchedulerSpec::parse(spec["scheduler"].as_str().unwrap()).unwrap());
    sd.generate(&req, &mut |_, _| true).unwrap().images
}

#[test]
fn merged_weights_and_images_match_diffusers() {
    let manifest = manifest();
    let cases = manifest["lora"]["cases"].as_array().expect("lora cases");
    assert_eq!(cases.len(), 6, "kohya, peft and both, for SD1.5 and SDXL");
    let mut report = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let golden = load_goldens(case["file"].as_str().unwrap());
        let mut files = files(case["model"].as_str().unwrap(), DType::F32);
        let loras: Vec<(Lora, f64)> = case["loras"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    lora(l["file"].as_str().unwrap()),
                    l["weight"].as_f64().unwrap(),
                )
            })
            .collect();
        let refs: Vec<(&Lora, f64)> = loras.iter().map(|(l, w)| (l, *w)).collect();
        let merged = merge_loras(&mut files, &refs).unwrap_or_else(|e| panic!("{name}: {e}"));

        // The same layers as diffusers, no more and no fewer.
        let ours: BTreeSet<(String, String)> = merged
            .layers()
            .map(|(t, n)| (target_name(t).to_string(), n.to_string()))
            .collect();
        let theirs: BTreeSet<(String, String)> = case["touched"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(c, mods)| {
                mods.as_array()
                    .unwrap()
                    .iter()
                    .map(move |m| (c.clone(), format!("{}.weight", m.as_str().unwrap())))
            })
            .collect();
        assert_eq!(ours, theirs, "{name}: merged layers");

        let mut worst = 0f32;
        for (key, expected) in &golden {
            let Some((comp, weight)) = key.split_once('.') else {
                continue;
            };
            if !matches!(comp, "unet" | "text_encoder" | "text_encoder_2") {
                continue;
            }
            let store = component(&files, comp);
            let ours = store.get(weight).unwrap_or_else(|| panic!("{name}: {key}"));
            worst = worst.max(max_abs_diff(ours, expected));
        }
        report.push(format!("{name}: merged weights max |diff| {worst:.2e}"));
        assert!(
            worst < WEIGHT_TOL,
            "{name}: merged weights differ by {worst}"
        );

        if let Some(spec) = case.get("pipeline") {
            let images = run_pipeline(&files, spec);
            let diff = max_abs_diff(&images, &golden["images"]);
            report.push(format!("{name}: images max |diff| {diff:.2e}"));
            assert!(diff < IMAGE_TOL, "{name}: images differ by {diff}");
        }
        merged.unmerge(&mut files);
    }
    eprintln!("{}", report.join("\n"));
}

/// The raw bits of every tensor of a store, by name.
fn bits(store: &WeightStore) -> HashMap<String, Vec<u32>> {
    store
        .names()
        .map(|n| {
            let t = store.get(n).unwrap().flatten_all().unwrap();
            let v: Vec<u32> = match t.dtype() {
                DType::F32 => t
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
                DType::F16 => t
                    .to_vec1::<half::f16>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits() as u32)
                    .collect(),
                other => panic!("{n}: {other:?}"),
            };
            (n.to_string(), v)
        })
        .collect()
}

fn all_bits(files: &PipelineFiles) -> Vec<HashMap<String, Vec<u32>>> {
    let mut out = vec![bits(&files.unet.weights), bits(&files.text_encoder.weights)];
    if let Some(te2) = &files.text_encoder_2 {
        out.push(bits(&te2.weights));
    }
    out
}

#[test]
fn unmerge_restores_every_weight_bit_for_bit() {
    for (model, ids) in [
        ("tiny-sd15", ["sd15_kohya", "sd15_peft"]),
        ("tiny-sdxl", ["sdxl_kohya", "sdxl_peft"]),
    ] {
        let loras = ids.map(lora);
        for dtype in [DType::F32, DType::F16] {
            let mut files = files(model, dtype);
            let before = all_bits(&files);
            let merged = merge_loras(&mut files, &[(&loras[0], 1.3), (&loras[1], -0.7)]).unwrap();
            let during = all_bits(&files);
            let changed: usize = before
                .iter()
                .zip(&during)
                .map(|(b, d)| b.iter().filter(|(k, v)| d[*k] != **v).count())
                .sum();
            assert_eq!(changed, merged.layers().count(), "{model} {dtype:?}");
            assert!(merged.backup_bytes() > 0);
            merged.unmerge(&mut files);
            assert!(
                all_bits(&files) == before,
                "{model} {dtype:?}: not restored"
            );
        }
    }
}

#[test]
fn switching_loras_on_a_loaded_model() {
    // The engine's cycle: merge, rebuild the adapted modules, generate; unmerge, rebuild, and the
    // model gives exactly its images without the LoRA again.
    let mut files = files("tiny-sd15", DType::F32);
    let mut sd = StableDiffusion::load(&files, &Device::Cpu, DType::F32).unwrap();
    let mut req = GenerationRequest::new("a lighthouse at dusk");
    (req.width, req.height, req.steps, req.seed) = (64, 64, 2, 5);
    let generate = |sd: &StableDiffusion| sd.generate(&req, &mut |_, _| true).unwrap().images;
    let plain = generate(&sd);

    let kohya = lora("sd15_kohya");
    let merged = merge_loras(&mut files, &[(&kohya, 0.8)]).unwrap();
    sd.rebuild_adapted(&files).unwrap();
    let adapted = generate(&sd);
    assert!(
        max_abs_diff(&adapted, &plain) > 1e-3,
        "the LoRA changes the image"
    );
    // Rebuilding equals loading the merged files afresh.
    let fresh = StableDiffusion::load(&files, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(max_abs_diff(&generate(&fresh), &adapted), 0.0);

    merged.unmerge(&mut files);
    sd.rebuild_adapted(&files).unwrap();
    assert_eq!(max_abs_diff(&generate(&sd), &plain), 0.0);
}

#[test]
fn file_layouts_are_recognised() {
    assert_eq!(lora("sd15_kohya").format(), LoraFormat::Kohya);
    assert_eq!(lora("sdxl_peft").format(), LoraFormat::Peft);
    assert!(lora("sdxl_kohya").adapts_second_text_encoder());
    assert!(!lora("sd15_peft").adapts_second_text_encoder());
    let m = manifest();
    for id in ["sd15_kohya", "sd15_peft", "sdxl_kohya", "sdxl_peft"] {
        assert_eq!(
            lora(id).len() as u64,
            m["lora"]["files"][id]["layers"].as_u64().unwrap(),
            "{id}"
        );
    }
}

/// The tensors of a fixture LoRA file.
fn tensors(id: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(lora_path(id), &Device::Cpu).unwrap()
}

#[test]
fn legacy_diffusers_names_merge_like_peft_names() {
    // The attention-processor spelling of older diffusers files, on the PEFT file's layers
    // (without its header, so alpha = rank in both).
    let peft = tensors("sd15_peft");
    let mut legacy = HashMap::new();
    for (key, t) in &peft {
        let key = key
            .replace(".lora_A.weight", ".lora.down.weight")
            .replace(".lora_B.weight", ".lora.up.weight");
        let key = ["to_q", "to_k", "to_v"]
            .iter()
            .fold(key, |k, p| {
                k.replace(&format!(".{p}.lora."), &format!(".processor.{p}_lora."))
            })
            .replace(".to_out.0.lora.", ".processor.to_out_lora.")
            .replace(".self_attn.q_proj.lora.", ".self_attn.to_q_lora.")
            .replace(".mlp.fc1.lora.", ".mlp.fc1.lora_linear_layer.");
        legacy.insert(key, t.clone());
    }
    assert!(legacy
        .keys()
        .any(|k| k.contains("processor.to_q_lora.down")));
    assert!(legacy.keys().any(|k| k.contains("self_attn.to_q_lora.up")));
    let a = Lora::from_tensors("peft", peft, None).unwrap();
    let b = Lora::from_tensors("legacy", legacy, None).unwrap();
    assert_eq!(b.format(), LoraFormat::DiffusersLegacy);
    let mut fa = files("tiny-sd15", DType::F32);
    let mut fb = files("tiny-sd15", DType::F32);
    let ma = merge_loras(&mut fa, &[(&a, 0.9)]).unwrap();
    let mb = merge_loras(&mut fb, &[(&b, 0.9)]).unwrap();
    assert_eq!(ma.layers().count(), mb.layers().count());
    for (target, name) in ma.layers() {
        let c = target_name(target);
        let (x, y) = (component(&fa, c), component(&fb, c));
        assert_eq!(
            max_abs_diff(x.get(name).unwrap(), y.get(name).unwrap()),
            0.0
        );
    }
}

/// `before + weight * scale * up @ down` of one kohya layer, computed here from the file's tensors.
fn kohya_update(
    raw: &HashMap<String, Tensor>,
    key: &str,
    before: &Tensor,
    weight: f64,
    scale: f64,
) -> Tensor {
    let down = raw[&format!("{key}.lora_down.weight")]
        .to_dtype(DType::F32)
        .unwrap();
    let up = raw[&format!("{key}.lora_up.weight")]
        .to_dtype(DType::F32)
        .unwrap();
    let delta = up
        .flatten_from(1)
        .unwrap()
        .matmul(&down.flatten_from(1).unwrap())
        .unwrap();
    let delta = (delta * (weight * scale)).unwrap();
    (before + delta.reshape(before.dims()).unwrap()).unwrap()
}

#[test]
fn conv_updates_fit_linear_layers_of_the_same_size() {
    // SD1's proj_in / proj_out are 1x1 convolutions, SD2's linear layers of the same size (the
    // tiny SD2 has the SD1 block layout): an SD1 kohya LoRA merges into both.
    let kohya = lora("sd15_kohya");
    let raw = tensors("sd15_kohya");
    let mut files = files("tiny-sd2", DType::F32);
    let name = "down_blocks.1.attentions.1.proj_in.weight";
    let before = files.unet.weights.get(name).unwrap().clone();
    assert_eq!(before.rank(), 2);
    let key = "lora_unet_down_blocks_1_attentions_1_proj_in";
    assert_eq!(
        raw[&format!("{key}.lora_down.weight")].rank(),
        4,
        "a 1x1 convolution"
    );
    let merged = merge_loras(&mut files, &[(&kohya, 0.6)]).unwrap();
    // alpha 2, rank 4.
    let expected = kohya_update(&raw, key, &before, 0.6, 0.5);
    let got = files.unet.weights.get(name).unwrap();
    assert!(max_abs_diff(got, &expected) < 1e-6);
    merged.unmerge(&mut files);
}

#[test]
fn kohya_alpha_is_per_layer_and_defaults_to_rank() {
    // diffusers keeps one alpha per file (see the fixtures README); kohya and A1111 scale each
    // layer by its own alpha / rank, and by 1 where a layer has no alpha.
    let mut raw = tensors("sd15_kohya");
    let no_alpha = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let alpha_one = "lora_te_text_model_encoder_layers_1_mlp_fc1";
    raw.remove(&format!("{no_alpha}.alpha")).unwrap();
    raw.insert(
        format!("{alpha_one}.alpha"),
        Tensor::new(1f32, &Device::Cpu).unwrap(),
    );
    let edited = Lora::from_tensors("edited", raw.clone(), None).unwrap();
    let mut files = files("tiny-sd15", DType::F32);
    // (component, kohya layer, weight, alpha / rank)
    let cases = [
        (
            LoraTarget::Unet,
            no_alpha,
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            1.0,
        ),
        (
            LoraTarget::TextEncoder,
            alpha_one,
            "text_model.encoder.layers.1.mlp.fc1.weight",
            0.25,
        ),
        (
            LoraTarget::Unet,
            "lora_unet_mid_block_attentions_0_proj_out",
            "mid_block.attentions.0.proj_out.weight",
            0.5,
        ),
    ];
    let before: Vec<Tensor> = cases
        .iter()
        .map(|(t, _, name, _)| {
            component(&files, target_name(*t))
                .get(name)
                .unwrap()
                .clone()
        })
        .collect();
    let merged = merge_loras(&mut files, &[(&edited, -1.5)]).unwrap();
    for ((target, key, name, scale), before) in cases.iter().zip(&before) {
        let expected = kohya_update(&raw, key, before, -1.5, *scale);
        let store = component(&files, target_name(*target));
        assert!(
            max_abs_diff(store.get(name).unwrap(), &expected) < 1e-6,
            "{key}"
        );
    }
    merged.unmerge(&mut files);
}

#[test]
fn unmatched_layers_are_listed_and_nothing_is_merged() {
    let mut t = tensors("sd15_kohya");
    let key = "lora_unet_down_blocks_7_attentions_0_proj_in";
    let other = "lora_te_text_model_encoder_layers_9_mlp_fc1";
    for k in [key, other] {
        t.insert(
            format!("{k}.lora_down.weight"),
            Tensor::zeros((4, 8), DType::F16, &Device::Cpu).unwrap(),
        );
        t.insert(
            format!("{k}.lora_up.weight"),
            Tensor::zeros((8, 4), DType::F16, &Device::Cpu).unwrap(),
        );
    }
    let bad = Lora::from_tensors("extra", t, None).unwrap();
    let mut files = files("tiny-sd15", DType::F32);
    let before = all_bits(&files);
    let e = merge_loras(&mut files, &[(&bad, 1.0)])
        .unwrap_err()
        .to_string();
    assert!(e.contains(key) && e.contains(other), "{e}");
    assert!(e.contains("2 of its"), "{e}");
    assert!(
        all_bits(&files) == before,
        "a refused merge changes nothing"
    );

    // A tensor of no known LoRA layout is refused when the file is read.
    let mut t = tensors("sd15_peft");
    t.insert(
        "unet.conv_in.weight".into(),
        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = Lora::from_tensors("odd", t, None).unwrap_err().to_string();
    assert!(e.contains("unet.conv_in.weight"), "{e}");

    // A pair that is not rank-r matrices is refused, not indexed blindly.
    let mut t = tensors("sd15_kohya");
    t.insert(
        "lora_unet_conv_in.lora_down.weight".into(),
        Tensor::new(1f32, &Device::Cpu).unwrap(),
    );
    t.insert(
        "lora_unet_conv_in.lora_up.weight".into(),
        Tensor::zeros((8, 4), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = Lora::from_tensors("scalar", t, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lora_unet_conv_in") && e.contains("rank-r"),
        "{e}"
    );

    // LyCORIS LoHa is named, not ignored.
    let mut t = tensors("sd15_kohya");
    t.insert(
        "lora_unet_conv_in.hada_w1_a".into(),
        Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = Lora::from_tensors("loha", t, None).unwrap_err().to_string();
    assert!(e.contains("LoHa"), "{e}");
}

#[test]
fn a_lora_of_another_family_is_refused() {
    let mut files = files("tiny-sd15", DType::F32);
    for id in ["sdxl_kohya", "sdxl_peft"] {
        let e = merge_loras(&mut files, &[(&lora(id), 1.0)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("SDXL LoRA") && e.contains("sd1"), "{id}: {e}");
    }
    // An SD1.5 LoRA on SDXL: its UNet layers are not there.
    let mut files = files_sdxl();
    let e = merge_loras(&mut files, &[(&lora("sd15_kohya"), 1.0)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("another model family"), "{e}");
    assert!(e.contains("lora_unet_down_blocks_0_attentions_0"), "{e}");
}

fn files_sdxl() -> PipelineFiles {
    files("tiny-sdxl", DType::F32)
}

// ---- Timing (ignored by default) ----

/// A full-size SDXL UNet with zero weights: merge cost does not depend on the values.
fn sdxl_unet_store(dtype: DType) -> (serde_json::Value, WeightStore) {
    use candle_nn::var_builder::SimpleBackend;
    use candle_nn::{Init, VarBuilder};
    use sd_serve::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
    use std::sync::{Arc, Mutex};

    struct Recording(Arc<Mutex<HashMap<String, Tensor>>>);
    impl SimpleBackend for Recording {
        fn get(
            &self,
            s: candle_core::Shape,
            name: &str,
            _: Init,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            let t = Tensor::zeros(s, dtype, dev)?;
            self.0.lock().unwrap().insert(name.to_string(), t.clone());
            Ok(t)
        }
        fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
            candle_core::bail!("no shape for {name}")
        }
        fn contains_tensor(&self, _: &str) -> bool {
            true
        }
    }
    let config =
        sd_serve::weights::single_file::builtin_config(sd_serve::weights::Family::Sdxl, "unet")
            .unwrap();
    let map = Arc::new(Mutex::new(HashMap::new()));
    let vb = VarBuilder::from_backend(Box::new(Recording(map.clone())), dtype, Device::Cpu);
    let cfg: UNet2DConditionConfig = serde_json::from_value(config.clone()).unwrap();
    drop(UNet2DConditionModel::new(vb, &cfg).unwrap());
    let tensors = std::mem::take(&mut *map.lock().unwrap());
    (config, WeightStore::from_tensors(tensors))
}

/// The LoRA switch figure the README and the issue report: merge, rebuild and unmerge times on a
/// full-size SDXL UNet, printed, with the merge and the exact restore still checked.
/// `cargo test --release --test lora -- --ignored --nocapture sdxl_switch_time`
#[test]
#[ignore = "measurement run: a full-size SDXL UNet with random weights needs about 8 GB of memory \
            and minutes on a CPU, too much for every test run; run it by name to get the figure"]
fn sdxl_switch_time() {
    let dtype = DType::F16;
    let (config, unet) = sdxl_unet_store(dtype);
    let params: usize = unet
        .names()
        .map(|n| unet.get(n).unwrap().elem_count())
        .sum();
    // A rank-32 kohya LoRA over every attention projection (q, k, v, out of attn1 and attn2).
    let rank = 32;
    let mut t = HashMap::new();
    for name in unet.names() {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        let last = module.rsplit('.').next().unwrap();
        let is_attention =
            module.contains(".attn") && ["to_q", "to_k", "to_v", "0"].contains(&last);
        if !is_attention {
            continue;
        }
        let (out, inp) = unet.get(name).unwrap().dims2().unwrap();
        let key = format!("lora_unet_{}", module.replace('.', "_"));
        let randn = |shape: (usize, usize)| {
            Tensor::randn(0f32, 0.02, shape, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap()
        };
        t.insert(format!("{key}.lora_down.weight"), randn((rank, inp)));
        t.insert(format!("{key}.lora_up.weight"), randn((out, rank)));
        t.insert(
            format!("{key}.alpha"),
            Tensor::new(16f32, &Device::Cpu).unwrap(),
        );
    }
    let expected_layers = t.len() / 3;
    let lora = Lora::from_tensors("sdxl-attention-r32", t, None).unwrap();
    let mut files = tiny_files_with_unet(config.clone(), unet);
    let probe = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight";
    let original = files.unet.weights.get(probe).unwrap().clone();

    let start = Instant::now();
    let merged = merge_loras(&mut files, &[(&lora, 0.8)]).unwrap();
    let merge_s = start.elapsed().as_secs_f64();
    let all_equal = files
        .unet
        .weights
        .get(probe)
        .unwrap()
        .eq(&original)
        .unwrap()
        .flatten_all()
        .unwrap()
        .min(0)
        .unwrap()
        .to_scalar::<u8>()
        .unwrap();
    assert_eq!(all_equal, 0, "the merge changed {probe}");
    let start = Instant::now();
    let cfg: sd_serve::models::unet::UNet2DConditionConfig =
        serde_json::from_value(config).unwrap();
    let unet = sd_serve::models::unet::UNet2DConditionModel::new(
        files.unet.weights.var_builder(dtype, &Device::Cpu),
        &cfg,
    )
    .unwrap();
    let rebuild_s = start.elapsed().as_secs_f64();
    drop(unet);
    let layers = merged.layers().count();
    let backup = merged.backup_bytes();
    let start = Instant::now();
    merged.unmerge(&mut files);
    let unmerge_s = start.elapsed().as_secs_f64();
    assert_eq!(
        layers, expected_layers,
        "every attention projection is merged"
    );
    let restored = files.unet.weights.get(probe).unwrap();
    let diff = restored
        .to_dtype(DType::F32)
        .unwrap()
        .sub(&original.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0, "unmerge restores {probe} exactly");

    // What a switch by reloading would cost at least: the UNet's weights read back from a
    // safetensors file that is still in the page cache.
    let scratch = common::scratch("lora-timing");
    let path = scratch.join("unet.safetensors");
    let tensors: HashMap<String, Tensor> = files
        .unet
        .weights
        .names()
        .map(|n| (n.to_string(), files.unet.weights.get(n).unwrap().clone()))
        .collect();
    candle_core::safetensors::save(&tensors, &path).unwrap();
    drop(tensors);
    let start = Instant::now();
    // SAFETY: the file is written above and not modified while mapped.
    let mapped = unsafe { candle_core::safetensors::MmapedSafetensors::new(&path) }.unwrap();
    let reloaded: Vec<Tensor> = mapped
        .tensors()
        .iter()
        .map(|(name, _)| mapped.load(name, &Device::Cpu).unwrap())
        .collect();
    let reload_s = start.elapsed().as_secs_f64();
    drop(reloaded);
    eprintln!(
        "SDXL UNet ({:.2}B params, {dtype:?}, CPU): rank-{rank} LoRA on {layers} attention \
         layers ({:.2} GB kept for unmerge): merge {merge_s:.2} s, UNet rebuild {rebuild_s:.3} s, \
         unmerge {unmerge_s:.4} s; reading the UNet from a cached file {reload_s:.2} s",
        params as f64 / 1e9,
        backup as f64 / 1e9
    );
}

/// The tiny SD1.5 files with the UNet replaced (text encoders and VAE do not matter here).
fn tiny_files_with_unet(config: serde_json::Value, unet: WeightStore) -> PipelineFiles {
    let mut files = files("tiny-sd15", DType::F16);
    files.unet.config = config;
    files.unet.weights = unet;
    files
}
