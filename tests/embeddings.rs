//! Textual inversion embeddings against diffusers' `load_textual_inversion` on the tiny fixture
//! models: the four file layouts, the token ids of prompts that use them (multi-vector tokens
//! expanded, ids past the vocabulary in load order), the prompt embeddings (SDXL: both encoders
//! and the pooled output), and a short pipeline's final latents. Then the rules of
//! `pipeline::textual_inversion` (tokens appended when absent, weight 0, refusals), and the
//! Runware `embeddings` parameter through a real server.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::server::{client, decode, TestServer, KEY};
use sd_serve::pipeline::prompt::PlaceholderToken;
use sd_serve::pipeline::{GenerationRequest, PromptEmbedding, StableDiffusion};
use sd_serve::schedulers::SchedulerSpec;
use sd_serve::weights::embeddings::{EmbeddingFormat, TextualInversion};
use serde_json::{json, Value};

use common::{load_goldens, manifest, max_abs, max_abs_diff, pipeline, registry, setup};

/// Prompt embeddings, f32 against f32: only the summation order of matmuls, softmax and LayerNorm
/// differs from torch (the CLIP parity tests' bound), relative to the largest value, since the
/// embeddings. vectors (3x the spread of the token table) make activations larger. Seen: 6.3e-7
/// relative.
const EMBEDS_REL_TOL: f32 = 1e-5;
/// Final latents after 3 Euler steps with guidance, unnormalised (sigma_max ~ 14.6): the pipeline
/// parity tests. latent bound. Seen: 6.7e-5 (SD1.5), 7.6e-6 (SDXL).
const LATENT_TOL: f32 = 2e-4;

fn embedding(id: &str) -> Arc<TextualInversion> {
    setup();
    let entry = registry().resolve_embedding(id).unwrap();
    let path = entry.local_path().unwrap();
    Arc::new(TextualInversion::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{id}: {e}")))
}

fn prompt_embedding(id: &str, weight: f64) -> PromptEmbedding {
    let entry = registry().resolve_embedding(id).unwrap();
    PromptEmbedding {
        id: entry.id.clone(),
        token: entry.token.clone(),
        embedding: embedding(id),
        weight,
        negative: entry.negative,
    }
}

/// The case's embeddings, in the manifest's order (= diffusers' load order).
fn case_embeddings(case: &Value) -> Vec<PromptEmbedding> {
    case["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| prompt_embedding(e["id"].as_str().unwrap(), e["weight"].as_f64().unwrap()))
        .collect()
}

fn cases() -> Vec<Value> {
    manifest()["embeddings"]["cases"]
        .as_array()
        .unwrap()
        .clone()
}

fn model_with(case: &Value) -> StableDiffusion {
    setup();
    let mut sd = pipeline(case["model"].as_str().unwrap());
    sd.set_embeddings(&case_embeddings(case))
        .unwrap_or_else(|e| panic!("{}: {e}", case["name"]));
    sd
}

fn request(case: &Value) -> GenerationRequest {
    let mut req = GenerationRequest::new(case["prompt"].as_str().unwrap());
    req.negative_prompt = case["negative_prompt"].as_str().map(str::to_string);
    req
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_dtype(candle_core::DType::U32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn rel_diff(ours: &Tensor, golden: &Tensor) -> f32 {
    max_abs_diff(ours, golden) / max_abs(golden).max(1.0)
}

#[test]
fn every_file_layout_loads() {
    let files = &manifest()["embeddings"]["files"];
    let expected = [
        ("tinycat", EmbeddingFormat::A1111Pickle, Some("tinycat")),
        ("tinyglow", EmbeddingFormat::A1111Safetensors, None),
        ("tiny-dog", EmbeddingFormat::Diffusers, Some("<tiny-dog>")),
        ("tinyxl", EmbeddingFormat::SdxlPair, None),
    ];
    for (id, format, token) in expected {
        let e = embedding(id);
        assert_eq!(e.format, format, "{id}");
        assert_eq!(e.file_token.as_deref(), token, "{id}");
        assert_eq!(
            e.len() as u64,
            files[id]["vectors"].as_u64().unwrap(),
            "{id}"
        );
        assert_eq!(e.vectors_2.is_some(), format == EmbeddingFormat::SdxlPair);
        // The registry's token is the one diffusers was given.
        let entry = registry().resolve_embedding(id).unwrap();
        assert_eq!(entry.token, files[id]["token"].as_str().unwrap());
    }
    // SDXL: clip_l for the first encoder (8 wide), clip_g for the second (12 wide).
    let xl = embedding("tinyxl");
    assert_eq!(xl.vectors.dims(), &[2, 8]);
    assert_eq!(xl.vectors_2.as_ref().unwrap().dims(), &[2, 12]);
}

#[test]
fn unreadable_files_are_named() {
    let dir = common::scratch("embeddings-bad");
    let not_zip = dir.join("old.pt");
    std::fs::write(&not_zip, b"\x80\x02}q\x00.").unwrap();
    let err = TextualInversion::load(&not_zip, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("old.pt") && err.contains("torch.save zip"),
        "{err}"
    );
    let other = dir.join("x.ckpt");
    std::fs::write(&other, b"").unwrap();
    let err = TextualInversion::load(&other, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown file type `.ckpt`"), "{err}");
}

#[test]
fn token_ids_match_diffusers() {
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        let sd = model_with(&case);
        let golden = load_goldens(case["file"].as_str().unwrap());
        let (first, second) = sd.text_encoders();
        let mut checked = 0;
        for (suffix, encoder) in [("", Some(first)), ("_2", second)] {
            let Some(encoder) = encoder else { continue };
            for (key, text) in [
                ("input_ids", case["prompt"].as_str()),
                ("negative_input_ids", case["negative_prompt"].as_str()),
            ] {
                let Some(text) = text else { continue };
                let want = ids(&golden[&format!("{key}{suffix}")]);
                let got = encoder.tokenizer.encode_ids(text).unwrap();
                assert_eq!(got, want, "{name} {key}{suffix}: {text:?}");
                checked += 1;
            }
        }
        assert!(checked >= 1, "{name}");
    }
}

#[test]
fn prompt_embeddings_match_diffusers() {
    let mut worst: f32 = 0.0;
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        let sd = model_with(&case);
        let golden = load_goldens(case["file"].as_str().unwrap());
        let (cond, uncond) = sd.prompt_embeddings(&request(&case), true).unwrap();
        let mut compare = |what: &str, ours: &Tensor| {
            let diff = rel_diff(ours, &golden[what]);
            assert!(diff <= EMBEDS_REL_TOL, "{name} {what}: {diff}");
            worst = worst.max(diff);
        };
        compare("prompt_embeds", &cond.hidden);
        if let Some(pooled) = &cond.pooled {
            // The second encoder pools at the largest id, here the embedding's last vector, as
            // transformers does with the legacy eos id of SD configs.
            compare("pooled_prompt_embeds", pooled);
        }
        if golden.contains_key("negative_prompt_embeds") {
            compare("negative_prompt_embeds", &uncond.unwrap().hidden);
        }
        // The embeddings matter: the plain model encodes the same prompt otherwise.
        let plain = pipeline(case["model"].as_str().unwrap());
        let (plain_cond, _) = plain.prompt_embeddings(&request(&case), true).unwrap();
        assert!(
            max_abs_diff(&plain_cond.hidden, &cond.hidden) > 1e-2,
            "{name}"
        );
    }
    eprintln!("worst relative prompt embedding difference: {worst:e}");
}

#[test]
fn pipeline_latents_match_diffusers() {
    let mut ran = 0;
    for case in cases() {
        let Some(spec) = case.get("pipeline") else {
            continue;
        };
        let name = case["name"].as_str().unwrap();
        let sd = model_with(&case);
        let golden = load_goldens(case["file"].as_str().unwrap());
        let mut req = request(&case);
        let u = |k: &str| spec[k].as_u64().unwrap() as usize;
        (req.width, req.height, req.steps, req.num_images) =
            (u("width"), u("height"), u("steps"), u("num_images"));
        req.guidance_scale = spec["guidance"].as_f64().unwrap();
        req.seed = spec["seed"].as_u64().unwrap();
        req.scheduler = Some(SchedulerSpec::parse(spec["scheduler"].as_str().unwrap()).unwrap());
        let latents = sd.denoise_latents(&req, &mut |_, _| true).unwrap();
        let diff = max_abs_diff(&latents, &golden["latents_final"]);
        eprintln!("{name}: final latents differ by {diff:e}");
        assert!(diff < LATENT_TOL, "{name}: final latents differ by {diff}");
        // Without the embeddings the latents are far from these (diffusers saw the same).
        let without = spec["max_abs_diff_without_embeddings"].as_f64().unwrap() as f32;
        let plain = pipeline(case["model"].as_str().unwrap())
            .denoise_latents(&req, &mut |_, _| true)
            .unwrap();
        let plain_diff = max_abs_diff(&plain, &golden["latents_final"]);
        assert!(
            (plain_diff - without).abs() < 1e-3 * without.max(1.0),
            "{name}: {plain_diff} vs {without}"
        );
        ran += 1;
    }
    assert_eq!(ran, 2, "an SD1.5 and an SDXL pipeline case");
}

#[test]
fn placeholders_match_as_the_tokenizers_library_matches_added_tokens() {
    setup();
    let sd = pipeline("tiny-sd15");
    let base = &sd.text_encoders().0.tokenizer;
    let tokenizer = base
        .with_placeholders(&[
            PlaceholderToken {
                text: "cat".into(),
                first_id: 49408,
                count: 1,
            },
            PlaceholderToken {
                text: "TinyCat".into(),
                first_id: 49409,
                count: 2,
            },
        ])
        .unwrap();
    let tokens = |text: &str| {
        let ids = tokenizer.encode_ids(text).unwrap();
        let end = ids.iter().position(|&i| i == 49407).unwrap();
        ids[1..end].to_vec()
    };
    // transformers, with `tinycat` added: `xtinycatx` -> `x`, `tinycat`, `x` (ids 343, -, 343);
    // `a` is 320. Inside words, in any case, the longest text first.
    assert_eq!(tokens("xTINYCATx"), [343, 49409, 49410, 343]);
    assert_eq!(tokens("a cat"), [320, 49408]);
    assert_eq!(tokens("a tinycat cat"), [320, 49409, 49410, 49408]);
    assert_eq!(
        tokenizer.placeholders_in("no such token").unwrap(),
        Vec::<usize>::new()
    );
    assert_eq!(tokenizer.placeholders_in("TinyCat").unwrap(), [1]);
    // The tokenizer it came from is unchanged.
    assert_eq!(base.encode_ids("a cat").unwrap()[..3], [49406, 320, 2368]);
}

fn encode(sd: &StableDiffusion, prompt: &str, negative: Option<&str>) -> (Tensor, Option<Tensor>) {
    let mut req = GenerationRequest::new(prompt);
    req.negative_prompt = negative.map(str::to_string);
    let (cond, uncond) = sd.prompt_embeddings(&req, true).unwrap();
    (cond.hidden, uncond.map(|u| u.hidden))
}

#[test]
fn an_unwritten_token_is_appended_where_the_embedding_belongs() {
    setup();
    let mut sd = pipeline("tiny-sd15");
    sd.set_embeddings(&[prompt_embedding("tinycat", 1.0)])
        .unwrap();
    // Not written: appended to the prompt.
    let (appended, _) = encode(&sd, "a photo of a horse", None);
    let (written, _) = encode(&sd, "a photo of a horse tinycat", None);
    assert_eq!(max_abs_diff(&appended, &written), 0.0);
    // Written in any letter case: used there, nothing appended.
    let (upper, _) = encode(&sd, "a TinyCat photo", None);
    let (lower, _) = encode(&sd, "a tinycat photo", None);
    assert_eq!(max_abs_diff(&upper, &lower), 0.0);
    // Written in the negative prompt only: used there, and not appended to the prompt.
    let (cond, uncond) = encode(&sd, "a photo", Some("tinycat, blurry"));
    let plain = pipeline("tiny-sd15");
    let (plain_cond, plain_uncond) = encode(&plain, "a photo", Some("tinycat, blurry"));
    assert_eq!(max_abs_diff(&cond, &plain_cond), 0.0);
    assert!(max_abs_diff(&uncond.unwrap(), &plain_uncond.unwrap()) > 1e-2);

    // A negative embedding goes to the negative prompt, created when there is none.
    let glow = prompt_embedding("tinyglow", 1.0);
    assert!(glow.negative);
    sd.set_embeddings(&[glow]).unwrap();
    let (cond, uncond) = encode(&sd, "a photo", Some("blurry"));
    let (_, written) = encode(&sd, "a photo", Some("blurry tinyglow"));
    assert_eq!(max_abs_diff(&cond, &encode(&plain, "a photo", None).0), 0.0);
    assert_eq!(max_abs_diff(&uncond.unwrap(), &written.unwrap()), 0.0);
    let (_, created) = encode(&sd, "a photo", None);
    let (_, only) = encode(&sd, "a photo", Some("tinyglow"));
    assert_eq!(max_abs_diff(&created.unwrap(), &only.unwrap()), 0.0);
}

#[test]
fn weight_zero_leaves_the_embedding_out_and_clearing_restores_the_model() {
    setup();
    let plain = pipeline("tiny-sd15");
    let mut sd = pipeline("tiny-sd15");
    let prompt = "a photo of tinycat riding a horse";
    sd.set_embeddings(&[prompt_embedding("tinycat", 0.0)])
        .unwrap();
    assert_eq!(
        max_abs_diff(
            &encode(&sd, prompt, None).0,
            &encode(&plain, prompt, None).0
        ),
        0.0
    );
    // A negative weight points the vectors the other way: not the plain prompt, not weight 1.
    sd.set_embeddings(&[prompt_embedding("tinycat", -1.0)])
        .unwrap();
    let negative = encode(&sd, prompt, None).0;
    sd.set_embeddings(&[prompt_embedding("tinycat", 1.0)])
        .unwrap();
    let positive = encode(&sd, prompt, None).0;
    assert!(max_abs_diff(&negative, &positive) > 1e-2);
    assert!(max_abs_diff(&negative, &encode(&plain, prompt, None).0) > 1e-2);
    sd.set_embeddings(&[]).unwrap();
    assert_eq!(
        max_abs_diff(
            &encode(&sd, prompt, None).0,
            &encode(&plain, prompt, None).0
        ),
        0.0
    );
}

#[test]
fn embeddings_that_do_not_fit_are_refused() {
    setup();
    let mut sd15 = pipeline("tiny-sd15");
    let err = sd15
        .set_embeddings(&[prompt_embedding("tinyxl", 1.0)])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`tinyxl`") && err.contains("one text encoder"),
        "{err}"
    );
    let mut sdxl = pipeline("tiny-sdxl");
    let err = sdxl
        .set_embeddings(&[prompt_embedding("tinycat", 1.0)])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`tinycat`") && err.contains("`clip_l` and `clip_g`"),
        "{err}"
    );
    let mut same_token = prompt_embedding("tinyglow", 1.0);
    same_token.token = "TinyCat".into();
    let err = sd15
        .set_embeddings(&[prompt_embedding("tinycat", 1.0), same_token])
        .unwrap_err()
        .to_string();
    assert!(err.contains("both use the token"), "{err}");
    // A refused set leaves the previous one.
    sd15.set_embeddings(&[prompt_embedding("tinycat", 1.0)])
        .unwrap();
    let before = encode(&sd15, "tinycat", None).0;
    assert!(sd15
        .set_embeddings(&[prompt_embedding("tinyxl", 1.0)])
        .is_err());
    assert_eq!(
        max_abs_diff(&encode(&sd15, "tinycat", None).0, &before),
        0.0
    );
}

// ---- Runware, through a real server ----

async fn post(server: &TestServer, tasks: Value) -> Value {
    let r = client()
        .post(server.url("/v1"))
        .bearer_auth(KEY)
        .json(&tasks)
        .send()
        .await
        .unwrap();
    r.json().await.unwrap()
}

fn task(embeddings: Option<Value>) -> Value {
    let mut t = json!({
        "taskType": "imageInference",
        "taskUUID": uuid::Uuid::new_v4().to_string(),
        "positivePrompt": "a red fox in the snow",
        "negativePrompt": "blurry",
        "model": "civitai:102438@133677",
        "width": 128,
        "height": 128,
        "steps": 2,
        "seed": 4242,
        "outputFormat": "PNG",
        "outputType": "base64Data",
    });
    if let Some(e) = embeddings {
        t["embeddings"] = e;
    }
    t
}

fn image_of(body: &Value) -> image::RgbImage {
    use base64::Engine as _;
    let b64 = body["data"][0]["imageBase64Data"]
        .as_str()
        .unwrap_or_else(|| panic!("an image: {body}"));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    decode(&bytes).to_rgb8()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runware_embeddings_change_the_image_and_bad_ones_are_refused() {
    let server = TestServer::start("embeddings-runware").await;
    let mut images = HashMap::new();
    // One task per payload, so they run in this order on the worker.
    let runs = [
        ("plain", None),
        (
            "cat",
            Some(json!([{"model": "civitai:7808@9208", "weight": 1.5}])),
        ),
        (
            "cat again",
            Some(json!([{"model": "tinycat", "weight": 1.5}])),
        ),
        ("cat default", Some(json!([{"model": "tinycat"}]))),
        ("cat 1", Some(json!([{"model": "tinycat", "weight": 1}]))),
        (
            "cat and glow",
            Some(json!([{"model": "tinycat"}, {"model": "tinyglow", "weight": -2}])),
        ),
        ("zero", Some(json!([{"model": "tinycat", "weight": 0}]))),
        ("plain again", None),
    ];
    for (name, embeddings) in runs {
        let body = post(&server, json!([task(embeddings)])).await;
        assert!(body.get("errors").is_none(), "{name}: {body}");
        assert_eq!(body["data"][0]["seed"], 4242, "{name}");
        images.insert(name, image_of(&body));
    }
    assert_ne!(
        images["plain"], images["cat"],
        "the embedding changes the image"
    );
    assert_eq!(
        images["cat"], images["cat again"],
        "same request, same image"
    );
    assert_ne!(images["cat"], images["cat default"], "the weight matters");
    assert_eq!(
        images["cat default"], images["cat 1"],
        "`weight` defaults to 1"
    );
    assert_ne!(images["cat default"], images["cat and glow"]);
    assert_eq!(
        images["zero"], images["plain"],
        "weight 0 leaves the embedding out"
    );
    assert_eq!(images["plain again"], images["plain"]);

    let refused: [(Value, &str, &str); 6] = [
        (
            json!([{"model": "civitai:1@1"}]),
            "invalidEmbeddings",
            "unknown embedding",
        ),
        (
            json!([{"model": "tinyxl"}]),
            "invalidEmbeddings",
            "is for sdxl models",
        ),
        (
            json!([{"model": "tinycat", "weight": 4.5}]),
            "invalidEmbeddings",
            "embeddings.weight",
        ),
        (json!([{"weight": 1}]), "missingEmbeddings", "needs `model`"),
        (
            json!({"model": "tinycat"}),
            "invalidEmbeddings",
            "must be an array",
        ),
        (
            json!([{"model": "tinycat"}, {"model": "civitai:7808@9208"}]),
            "invalidEmbeddings",
            "listed twice",
        ),
    ];
    for (embeddings, code, says) in refused {
        let t = task(Some(embeddings.clone()));
        let body = post(&server, json!([t])).await;
        let error = &body["errors"][0];
        assert_eq!(error["parameter"], "embeddings", "{embeddings}: {body}");
        assert_eq!(error["code"], code, "{embeddings}: {body}");
        assert_eq!(error["taskUUID"], t["taskUUID"]);
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(says), "{embeddings}: {message}");
    }
    server.stop().await;
}

// ---- Command line ----

fn generate(extra: &[&str], output: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sd-serve"))
        .args(["generate", "--model", "tiny-sd15", "--models"])
        .arg(common::fixtures().join("models.toml"))
        .args([
            "--prompt",
            "a lighthouse at dusk",
            "--seed",
            "42",
            "--steps",
            "2",
        ])
        .arg("--output")
        .arg(output)
        .args(extra)
        .output()
        .expect("sd-serve runs")
}

#[test]
fn generate_uses_registry_embeddings_and_models_lists_them() {
    let dir = common::scratch("embeddings-cli");
    let run = |name: &str, extra: &[&str]| {
        let out = dir.join(format!("{name}.png"));
        let r = generate(extra, &out);
        assert!(
            r.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        image::open(&out).unwrap().to_rgb8()
    };
    let plain = run("plain", &[]);
    let by_id = run("id", &["--embedding", "tinycat"]);
    let by_alias = run("alias", &["--embedding", "civitai:7808@9208:1"]);
    let heavier = run("heavier", &["--embedding", "tinycat:2"]);
    assert_ne!(plain, by_id);
    assert_eq!(by_id, by_alias, "the default weight is 1");
    assert_ne!(by_id, heavier);
    for (arg, says) in [
        ("no-such", "unknown embedding `no-such`"),
        ("tinyxl", "is for sdxl models"),
    ] {
        let failed = generate(&["--embedding", arg], &dir.join("failed.png"));
        assert!(!failed.status.success(), "{arg}");
        let stderr = String::from_utf8_lossy(&failed.stderr);
        assert!(stderr.contains(says), "{arg}: {stderr}");
    }
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_sd-serve"))
        .args(["models", "--models"])
        .arg(common::fixtures().join("models.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&listed.stdout);
    assert!(
        stdout.contains("tinyglow\tembedding sd1")
            && stdout.contains("token <tiny-dog>")
            && stdout.contains("(negative)"),
        "{stdout}"
    );
}
