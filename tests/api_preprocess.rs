//! Model-based preprocessors through the dialects against a real server: the fixture registry's
//! `[[preprocessor]]` entries (the tiny HED, DPT, UperNet, line-art and M-LSD detectors) serve
//! ModelsLab `auto_hint` (softedge, depth) and Runware `imageControlNetPreProcess` (softedge,
//! scribble, depth, lineart, mlsd, seg), each returning the detector's own output at the input's
//! size; a known type without an entry, a configured type with no detector built in, a name of
//! another network (`normalbae`), a transformers folder given as a local `path`, the OpenPose
//! body detector (its hand and face variants refused), and a weights
//! file that appears after a failed load are each answered as documented.

mod common;

use candle_core::Device;
use common::fixtures;
use common::runware::{b64, data_uri, disc_png, runware};
use common::server::{client, decode, TestServer, KEY};
use sd_serve::preprocess::depth::DptDepth;
use sd_serve::preprocess::hed::{Hed, HedMode};
use sd_serve::preprocess::lineart::LineartDetector;
use sd_serve::preprocess::mlsd::MlsdDetector;
use sd_serve::preprocess::normal::DepthNormal;
use sd_serve::preprocess::openpose::OpenposeDetector;
use sd_serve::preprocess::segmentation::UperNetSegmenter;
use sd_serve::preprocess::Detector;
use serde_json::{json, Value};

async fn download(url: &str) -> Vec<u8> {
    let r = client().get(url).send().await.unwrap();
    assert_eq!(r.status(), 200, "{url}");
    r.bytes().await.unwrap().to_vec()
}

const CONTROLNET: &str = "/api/v6/images/controlnet";

async fn modelslab(server: &TestServer, body: &Value) -> Value {
    let r = client()
        .post(server.url(CONTROLNET))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// The fixture's HED detector as the server loads it (default detect resolution).
fn fixture_hed(mode: HedMode) -> Hed {
    let path = fixtures().join("annotators/hed/ControlNetHED.pth");
    Hed::load(&path, &candle_core::Device::Cpu)
        .unwrap()
        .with_mode(mode)
}

/// One `imageControlNetPreProcess` task; the reply body.
async fn preprocess(server: &TestServer, input: &[u8], extra: Value) -> Value {
    let mut task = json!({"taskType": "imageControlNetPreProcess",
        "taskUUID": common::runware::new_uuid(), "inputImage": data_uri(input),
        "outputType": "URL", "outputFormat": "PNG"});
    for (k, v) in extra.as_object().unwrap() {
        task[k] = v.clone();
    }
    runware(server, &json!([task])).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modelslab_auto_hint_runs_hed_soft_edges() {
    let server = TestServer::start("pp-modelslab").await;
    let photo = b64(&disc_png(64, 64, 0));
    let body = |extra: Value| {
        let mut b = json!({"key": KEY, "model_id": "tiny-sd15", "prompt": "a fox",
            "negative_prompt": "blurry", "init_image": photo, "controlnet_model": "softedge",
            "auto_hint": "yes", "num_inference_steps": "2", "seed": "5"});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let r = modelslab(&server, &body(json!({}))).await;
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(
        r["meta"]["controlnet_model"],
        "tiny-sd15-controlnet-softedge"
    );
    let hinted = download(r["output"][0].as_str().unwrap()).await;
    assert_eq!(decode(&hinted).to_rgb8().dimensions(), (64, 64));
    // The same request again: the detector is loaded once and gives the same control image.
    let r = modelslab(&server, &body(json!({}))).await;
    assert_eq!(download(r["output"][0].as_str().unwrap()).await, hinted);
    // Without auto_hint the photo itself is the control image: another picture.
    let r = modelslab(&server, &body(json!({"auto_hint": "no"}))).await;
    assert_ne!(download(r["output"][0].as_str().unwrap()).await, hinted);

    // A ControlNet reading normal maps, with no `[[preprocessor]]` entry for them.
    let r = modelslab(
        &server,
        &body(json!({"controlnet_model": "tiny-sd15-controlnet-normal"})),
    )
    .await;
    assert_eq!(r["status"], "error", "{r}");
    let message = r["message"].as_str().unwrap();
    for needle in [
        "`auto_hint`",
        "[[preprocessor]]",
        "type = \"normal\"",
        "Intel/dpt-large",
    ] {
        assert!(message.contains(needle), "`{needle}` not in {message}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runware_preprocess_runs_hed_variants() {
    let server = TestServer::start("pp-runware").await;
    let input = disc_png(96, 80, 0);
    let rgb = decode(&input).to_rgb8();
    let mut guides = Vec::new();
    for (kind, mode) in [
        ("softedge", HedMode::Soft { safe: false }),
        ("scribble", HedMode::Scribble),
        ("HED", HedMode::Soft { safe: false }),
    ] {
        let reply = preprocess(&server, &input, json!({"preProcessorType": kind})).await;
        let item = &reply["data"][0];
        assert_eq!(item["taskType"], "imageControlNetPreProcess", "{reply}");
        let guide = decode(&download(item["guideImageURL"].as_str().unwrap()).await).to_rgb8();
        assert_eq!(guide.dimensions(), (96, 80), "{kind}: the input's size");
        // The detector the entry names, with controlnet_aux's defaults.
        let expected = fixture_hed(mode).detect(&rgb).unwrap();
        assert_eq!(guide, expected, "{kind}: the fixture detector's output");
        guides.push(guide);
    }
    assert_ne!(
        guides[0], guides[1],
        "scribble post-processes the soft edges"
    );
    assert!(
        guides[1].pixels().all(|p| p[0] == 0 || p[0] == 255),
        "scribbles are binary"
    );

    // A known type without an entry; a Canny threshold with another type.
    let reply = preprocess(&server, &input, json!({"preProcessorType": "normal"})).await;
    let error = &reply["errors"][0];
    assert_eq!(error["code"], "unsupportedParameter", "{reply}");
    assert_eq!(error["parameter"], "preProcessorType");
    let message = error["message"].as_str().unwrap();
    for needle in ["[[preprocessor]]", "type = \"normal\"", "Intel/dpt-large"] {
        assert!(message.contains(needle), "`{needle}` not in {message}");
    }
    let reply = preprocess(
        &server,
        &input,
        json!({"preProcessorType": "softedge", "lowThresholdCanny": 50}),
    )
    .await;
    assert_eq!(
        reply["errors"][0]["parameter"], "lowThresholdCanny",
        "{reply}"
    );
    // Types with no implementation keep their refusal.
    let reply = preprocess(&server, &input, json!({"preProcessorType": "tile"})).await;
    assert_eq!(
        reply["errors"][0]["code"], "unsupportedParameter",
        "{reply}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preprocessor_load_failures_are_reported_and_retried() {
    let dir = common::scratch("pp-registry");
    let weights = dir.join("ControlNetHED.pth");
    let dpt = fixtures().join("preprocessors/dpt-tiny");
    let pose = fixtures().join("annotators/openpose/body_pose_model.pth");
    let toml = format!(
        "[[preprocessor]]\ntype = \"hed\"\npath = \"{}\"\n\n\
         [[preprocessor]]\ntype = \"lineart_anime\"\npath = \"{}\"\n\n\
         [[preprocessor]]\ntype = \"normal\"\npath = \"{}\"\n\n\
         [[preprocessor]]\ntype = \"openpose\"\npath = \"{}\"\n",
        weights.display(),
        fixtures()
            .join("preprocessors/lineart/sk_model.pth")
            .display(),
        dpt.display(),
        pose.display()
    );
    let models = dir.join("models.toml");
    std::fs::write(&models, toml).unwrap();
    let server = TestServer::start_with("pp-failures", |c| c.models = Some(models.clone())).await;
    let input = disc_png(64, 64, 0);

    // Configured, but no anime line-art network is built into this server.
    let reply = preprocess(
        &server,
        &input,
        json!({"preProcessorType": "lineart_anime"}),
    )
    .await;
    let message = reply["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("`lineart_anime`") && message.contains("not built in"),
        "{reply}"
    );

    // A transformers folder as a local `path`: the normal map from DPT depth.
    let reply = preprocess(&server, &input, json!({"preProcessorType": "normal"})).await;
    let url = reply["data"][0]["guideImageURL"]
        .as_str()
        .unwrap_or_else(|| panic!("{reply}"));
    let guide = decode(&download(url).await).to_rgb8();
    let expected = DepthNormal::load(&dpt, &Device::Cpu)
        .unwrap()
        .detect(&decode(&input).to_rgb8())
        .unwrap();
    assert_eq!(guide, expected, "normal: the fixture detector's output");
    // The OpenPose body detector; its hand and face variants stay refused by name.
    let reply = preprocess(&server, &input, json!({"preProcessorType": "openpose"})).await;
    let url = reply["data"][0]["guideImageURL"]
        .as_str()
        .unwrap_or_else(|| panic!("{reply}"));
    let guide = decode(&download(url).await).to_rgb8();
    let expected = OpenposeDetector::load(&pose, &Device::Cpu)
        .unwrap()
        .detect(&decode(&input).to_rgb8())
        .unwrap();
    assert_eq!(guide, expected, "openpose: the fixture detector's output");
    for variant in ["openpose_hand", "openpose_face", "openpose_full"] {
        let reply = preprocess(&server, &input, json!({"preProcessorType": variant})).await;
        assert_eq!(
            reply["errors"][0]["code"], "unsupportedParameter",
            "{reply}"
        );
        let message = reply["errors"][0]["message"].as_str().unwrap_or_default();
        assert!(message.contains(&format!("`{variant}`")), "{reply}");
    }
    // NormalBae is another network: refused by name, though a `normal` entry exists.
    let reply = preprocess(&server, &input, json!({"preProcessorType": "normalbae"})).await;
    assert_eq!(
        reply["errors"][0]["code"], "unsupportedParameter",
        "{reply}"
    );
    let message = reply["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("`normalbae`"), "{reply}");

    // The HED weights are missing: reported; once the file is there the next request loads it.
    let reply = preprocess(&server, &input, json!({"preProcessorType": "softedge"})).await;
    let message = reply["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("does not exist"), "{reply}");
    std::fs::copy(
        fixtures().join("annotators/hed/ControlNetHED.pth"),
        &weights,
    )
    .unwrap();
    let reply = preprocess(&server, &input, json!({"preProcessorType": "softedge"})).await;
    assert!(reply["data"][0]["guideImageURL"].is_string(), "{reply}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modelslab_auto_hint_runs_depth() {
    let server = TestServer::start("pp-modelslab-depth").await;
    let photo_png = disc_png(64, 64, 0);
    let body = |extra: Value| {
        let mut b = json!({"key": KEY, "model_id": "tiny-sd15", "prompt": "a fox",
            "negative_prompt": "blurry", "init_image": b64(&photo_png), "controlnet_model": "depth",
            "num_inference_steps": "2", "seed": "6"});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let r = modelslab(&server, &body(json!({"auto_hint": "yes"}))).await;
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(r["meta"]["controlnet_model"], "tiny-sd15-controlnet-depth");
    let hinted = download(r["output"][0].as_str().unwrap()).await;

    // The fixture's DPT detector run here, sent as a ready control image: the same picture, so
    // auto_hint ran that detector on the photo.
    let depth = DptDepth::load(&fixtures().join("preprocessors/dpt-tiny"), &Device::Cpu)
        .unwrap()
        .detect(&decode(&photo_png).to_rgb8())
        .unwrap();
    let mut depth_png = Vec::new();
    depth
        .write_to(
            &mut std::io::Cursor::new(&mut depth_png),
            image::ImageFormat::Png,
        )
        .unwrap();
    let r = modelslab(
        &server,
        &body(json!({"auto_hint": "no", "control_image": b64(&depth_png)})),
    )
    .await;
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(download(r["output"][0].as_str().unwrap()).await, hinted);
    // The photo itself as the control image: another picture.
    let r = modelslab(&server, &body(json!({"auto_hint": "no"}))).await;
    assert_ne!(download(r["output"][0].as_str().unwrap()).await, hinted);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runware_preprocess_runs_the_fixture_detectors() {
    let server = TestServer::start("pp-runware-detectors").await;
    let dir = fixtures().join("preprocessors");
    let cpu = Device::Cpu;
    let detectors: Vec<(&str, Box<dyn Detector>)> = vec![
        (
            "depth",
            Box::new(DptDepth::load(&dir.join("dpt-tiny"), &cpu).unwrap()),
        ),
        (
            "lineart",
            Box::new(LineartDetector::load(&dir.join("lineart/sk_model.pth"), &cpu).unwrap()),
        ),
        (
            "mlsd",
            Box::new(MlsdDetector::load(&dir.join("mlsd/mlsd_large_512_fp32.pth"), &cpu).unwrap()),
        ),
        (
            "seg",
            Box::new(UperNetSegmenter::load(&dir.join("tiny-upernet-convnext"), &cpu).unwrap()),
        ),
    ];
    // Not square and no multiple of 64, so each detector resizes there and back.
    let input = disc_png(96, 80, 0);
    let rgb = decode(&input).to_rgb8();
    let mut guides = Vec::new();
    for (kind, detector) in &detectors {
        let reply = preprocess(&server, &input, json!({"preProcessorType": kind})).await;
        let item = &reply["data"][0];
        assert_eq!(
            item["taskType"], "imageControlNetPreProcess",
            "{kind}: {reply}"
        );
        let guide = decode(&download(item["guideImageURL"].as_str().unwrap()).await).to_rgb8();
        assert_eq!(guide.dimensions(), (96, 80), "{kind}: the input's size");
        let expected = detector.detect(&rgb).unwrap();
        assert_eq!(guide, expected, "{kind}: the fixture detector's output");
        guides.push(guide);
    }
    for (i, a) in guides.iter().enumerate() {
        for b in &guides[i + 1..] {
            assert_ne!(a, b, "each type runs its own detector");
        }
    }
    server.stop().await;
}
