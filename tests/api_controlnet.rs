//! ControlNet through each dialect against a real server on the tiny models and ControlNets:
//! Runware `controlNet` (guide images as uploaded UUIDs and data URIs) and
//! `imageControlNetPreProcess`, the ModelsLab controlnet routes (`auto_hint`, `guess_mode`,
//! `control_image`), the bearer `/v1/images/control`, and token-multipart `controlnet=canny`.
//! Each checks that the request succeeds, that the control image changes the output (and the
//! same request repeats exactly), and that bad input is refused in the dialect's own shape.

mod common;

use base64::Engine as _;
use common::runware::{
    b64, data_uri, disc_png, encode, inference, new_uuid, runware, runware_image,
};
use common::server::{client, decode, TestServer, KEY};
use reqwest::multipart::{Form, Part};
use sd_serve::preprocess::canny;
use serde_json::{json, Value};

async fn download(url: &str) -> Vec<u8> {
    let r = client().get(url).send().await.unwrap();
    assert_eq!(r.status(), 200, "{url}");
    r.bytes().await.unwrap().to_vec()
}

// ---------------------------------------------------------------------------------------------
// Runware

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runware_control_net_guides_and_preprocesses() {
    let server = TestServer::start("cn-runware").await;

    // Upload a guide image; use it by UUID.
    let upload = json!({"taskType": "imageUpload", "taskUUID": new_uuid(),
                        "image": data_uri(&disc_png(128, 128, 0))});
    let (status, body) = runware(&server, &json!([upload])).await;
    assert_eq!(status, 200, "{body}");
    let guide_uuid = body["data"][0]["imageUUID"].as_str().unwrap().to_string();

    let plain = runware_image(&server, inference(json!({}))).await;
    let unit = |guide: &str| {
        json!({"controlNet": [{"model": "tiny-sd15-controlnet-a",
                                     "guideImage": guide, "weight": 1.0}]})
    };
    let guided = runware_image(&server, inference(unit(&guide_uuid))).await;
    assert_ne!(plain, guided, "the ControlNet changes the image");
    let again = runware_image(&server, inference(unit(&guide_uuid))).await;
    assert_eq!(guided, again, "same request, same bytes");
    // The same pixels as a data URI give the same image; another guide image another one.
    let as_uri = runware_image(&server, inference(unit(&data_uri(&disc_png(128, 128, 0))))).await;
    assert_eq!(guided, as_uri);
    let other = runware_image(&server, inference(unit(&data_uri(&disc_png(128, 128, 30))))).await;
    assert_ne!(guided, other, "the guide image matters");

    // The window and the mode: by alias, from step 2 only, ControlNet mode.
    let windowed = runware_image(
        &server,
        inference(json!({"controlNet": [{"model": "civitai:38784@44716",
            "guideImage": guide_uuid, "startStep": 2, "controlMode": "controlnet"}]})),
    )
    .await;
    assert_ne!(windowed, guided);
    assert_ne!(windowed, plain);
    // Two ControlNet units, percentages.
    let two = runware_image(
        &server,
        inference(json!({"controlNet": [
            {"model": "tiny-sd15-controlnet-a", "guideImage": guide_uuid, "weight": 0.5},
            {"model": "tiny-sd15-controlnet-a", "guideImage": data_uri(&disc_png(64, 64, 8)),
             "startStepPercentage": 0, "endStepPercentage": 50, "controlMode": "prompt"}]})),
    )
    .await;
    assert_ne!(two, guided);

    // Inpainting with a ControlNet: seed image + mask + controlNet (diffusers' ControlNet
    // inpainting pipeline); the mask and the ControlNet each change the result.
    let seed_image = data_uri(&disc_png(128, 128, 20));
    let masked = json!({"seedImage": seed_image, "maskImage": data_uri(&left_half_mask(128, 128)),
                        "strength": 1.0});
    let mut with_control = masked.clone();
    with_control["controlNet"] = unit(&guide_uuid)["controlNet"].clone();
    let inpainted = runware_image(&server, inference(with_control.clone())).await;
    assert_eq!(
        decode(&inpainted).to_rgb8().dimensions(),
        (128, 128),
        "the requested size"
    );
    let inpainted_plain = runware_image(&server, inference(masked)).await;
    assert_ne!(
        inpainted, inpainted_plain,
        "the ControlNet guides the inpainting"
    );
    // maskMargin: the crop around the mask is generated with the guide image cropped alike,
    // then pasted back; far from the mask the seed image stays.
    let small_mask = data_uri(&encode(image::DynamicImage::ImageLuma8(
        image::GrayImage::from_fn(128, 128, |x, y| {
            image::Luma([if (80..104).contains(&x) && (16..40).contains(&y) {
                255
            } else {
                0
            }])
        }),
    )));
    let mut with_margin = with_control.clone();
    with_margin["maskImage"] = json!(small_mask);
    with_margin["maskMargin"] = json!(32);
    let zoomed = runware_image(&server, inference(with_margin.clone())).await;
    assert_eq!(decode(&zoomed).to_rgb8().dimensions(), (128, 128));
    assert_eq!(
        zoomed,
        runware_image(&server, inference(with_margin.clone())).await,
        "same request, same bytes"
    );
    let seed_rgb = decode(&disc_png(128, 128, 20)).to_rgb8();
    let zoomed_rgb = decode(&zoomed).to_rgb8();
    for (x, y) in [(2, 125), (10, 100), (60, 120)] {
        assert_eq!(
            zoomed_rgb.get_pixel(x, y),
            seed_rgb.get_pixel(x, y),
            "({x}, {y})"
        );
    }
    let mut margin_plain = with_margin.clone();
    margin_plain.as_object_mut().unwrap().remove("controlNet");
    let zoomed_plain = runware_image(&server, inference(margin_plain)).await;
    assert_ne!(
        zoomed, zoomed_plain,
        "the ControlNet guides the zoomed crop"
    );
    let mut margin_other = with_margin.clone();
    margin_other["controlNet"][0]["guideImage"] = json!(data_uri(&disc_png(128, 128, 30)));
    assert_ne!(
        zoomed,
        runware_image(&server, inference(margin_other)).await,
        "the guide image matters"
    );

    // A registered inpaint ControlNet reads the guide image with the masked pixels at -1: it
    // needs a mask (or outpainting), and its condition differs from the plain guide image's.
    let inpaint_unit = json!([{"model": "tiny-sd15-controlnet-inpaint", "guideImage": seed_image}]);
    let mut with_inpaint = with_control.clone();
    with_inpaint["controlNet"] = inpaint_unit.clone();
    let by_condition = runware_image(&server, inference(with_inpaint.clone())).await;
    let mut as_plain = with_inpaint.clone();
    as_plain["controlNet"][0]["model"] = json!("tiny-sd15-controlnet-a");
    let by_image = runware_image(&server, inference(as_plain)).await;
    assert_ne!(
        by_condition, by_image,
        "the masked pixels of the condition matter"
    );
    let mut margin_inpaint = with_margin.clone();
    margin_inpaint["controlNet"] = inpaint_unit.clone();
    let zoomed_inpaint = runware_image(&server, inference(margin_inpaint)).await;
    assert_ne!(zoomed_inpaint, zoomed);
    let (_, body) = runware(
        &server,
        &json!([inference(json!({"controlNet": inpaint_unit}))]),
    )
    .await;
    let error = &body["errors"][0];
    assert_eq!(error["code"], "invalidControlNet", "{body}");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("inpaint ControlNet") && message.contains("maskImage"),
        "{body}"
    );

    // Bad items are refused in Runware's shape, naming controlNet.
    let item = |extra: Value| {
        let mut unit = json!({"model": "tiny-sd15-controlnet-a", "guideImage": guide_uuid});
        for (k, v) in extra.as_object().unwrap() {
            unit[k] = v.clone();
        }
        json!({"controlNet": [unit]})
    };
    let cases = [
        (
            item(json!({"weight": 1.5})),
            "invalidControlNet",
            "controlNet.weight",
        ),
        (
            item(json!({"startStep": 0})),
            "invalidControlNet",
            "startStep",
        ),
        (
            item(json!({"startStep": 2, "endStep": 2})),
            "invalidControlNet",
            "endStep",
        ),
        (
            item(json!({"startStep": 1, "startStepPercentage": 10})),
            "invalidControlNet",
            "alternatives",
        ),
        (
            item(json!({"endStepPercentage": 101})),
            "invalidControlNet",
            "endStepPercentage",
        ),
        (
            item(json!({"controlMode": "both"})),
            "invalidControlNet",
            "controlMode",
        ),
        (
            item(json!({"model": "no-such-controlnet"})),
            "invalidControlNet",
            "unknown ControlNet",
        ),
        (
            item(json!({"model": "tiny-sdxl-controlnet"})),
            "invalidControlNet",
            "sdxl",
        ),
        (
            item(json!({"guideImage": new_uuid()})),
            "invalidControlNet",
            "not the UUID",
        ),
        (
            item(json!({"strength": 0.5})),
            "unsupportedParameter",
            "controlNet.strength",
        ),
        (
            json!({"controlNet": [{"guideImage": "abc"}]}),
            "missingControlNet",
            "model",
        ),
        (
            json!({"controlNet": [{"model": "tiny-sd15-controlnet-a"}]}),
            "missingControlNet",
            "guideImage",
        ),
        (
            json!({"controlNet": {"model": "x"}}),
            "invalidControlNet",
            "array",
        ),
    ];
    for (extra, code, needle) in cases {
        let (_, body) = runware(&server, &json!([inference(extra.clone())])).await;
        let error = &body["errors"][0];
        assert_eq!(error["code"], code, "{extra}: {body}");
        assert_eq!(error["parameter"], "controlNet", "{extra}: {body}");
        assert_eq!(error["taskType"], "imageInference");
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(needle), "`{needle}` not in {message}");
    }

    // imageControlNetPreProcess: Canny edges of the input, stored for later use.
    let input = disc_png(96, 80, 0);
    let task_uuid = new_uuid();
    let (status, body) = runware(
        &server,
        &json!([{"taskType": "imageControlNetPreProcess", "taskUUID": task_uuid,
                 "inputImage": data_uri(&input), "preProcessorType": "canny",
                 "outputType": ["URL", "base64Data"], "outputFormat": "PNG"}]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let item = &body["data"][0];
    assert_eq!(item["taskType"], "imageControlNetPreProcess");
    assert_eq!(item["taskUUID"], task_uuid.as_str());
    let guide = decode(&download(item["guideImageURL"].as_str().unwrap()).await).to_rgb8();
    let b64_guide = base64::engine::general_purpose::STANDARD
        .decode(item["guideImageBase64Data"].as_str().unwrap())
        .unwrap();
    assert_eq!(decode(&b64_guide).to_rgb8(), guide);
    let expected = canny::canny(
        &canny::rgb_to_gray(&decode(&input).to_rgb8()),
        canny::DEFAULT_LOW,
        canny::DEFAULT_HIGH,
    )
    .unwrap();
    let edges = image::DynamicImage::ImageRgb8(guide.clone()).to_luma8();
    assert_eq!(
        edges, expected,
        "the guide image is the input's Canny edges"
    );
    assert!(
        expected.pixels().any(|p| p.0[0] == 255),
        "the disc has edges"
    );
    // The guide image's UUID works as a guideImage.
    let guide_id = item["guideImageUUID"].as_str().unwrap();
    runware_image(&server, inference(unit(guide_id))).await;

    for (task, code, parameter) in [
        (
            // A model-based type without a `[[preprocessor]]` entry in the fixture registry.
            json!({"preProcessorType": "normal"}),
            "unsupportedParameter",
            "preProcessorType",
        ),
        (
            json!({"preProcessorType": "sketchy"}),
            "invalidPreProcessorType",
            "preProcessorType",
        ),
        (
            json!({"preProcessorType": null}),
            "missingPreProcessorType",
            "preProcessorType",
        ),
        (
            json!({"inputImage": null}),
            "missingInputImage",
            "inputImage",
        ),
        (
            json!({"lowThresholdCanny": 300}),
            "invalidLowThresholdCanny",
            "lowThresholdCanny",
        ),
        (
            json!({"lowThresholdCanny": 200, "highThresholdCanny": 100}),
            "invalidLowThresholdCanny",
            "lowThresholdCanny",
        ),
    ] {
        let mut body = json!({"taskType": "imageControlNetPreProcess", "taskUUID": new_uuid(),
                              "inputImage": data_uri(&input), "preProcessorType": "canny"});
        for (k, v) in task.as_object().unwrap() {
            if v.is_null() {
                body.as_object_mut().unwrap().remove(k);
            } else {
                body[k] = v.clone();
            }
        }
        let (_, reply) = runware(&server, &json!([body])).await;
        let error = &reply["errors"][0];
        assert_eq!(error["code"], code, "{task}: {reply}");
        assert_eq!(error["parameter"], parameter, "{task}: {reply}");
        assert_eq!(error["taskType"], "imageControlNetPreProcess");
    }
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// ModelsLab

const CONTROLNET: &str = "/api/v6/images/controlnet";

async fn modelslab(server: &TestServer, path: &str, body: &Value) -> Value {
    let r = client()
        .post(server.url(path))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.unwrap()
}

async fn modelslab_image(server: &TestServer, path: &str, body: &Value) -> (Vec<u8>, Value) {
    let r = modelslab(server, path, body).await;
    assert_eq!(r["status"], "success", "{r}");
    (download(r["output"][0].as_str().unwrap()).await, r)
}

fn assert_modelslab_error(body: &Value, needle: &str) {
    assert_eq!(body["status"], "error", "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains(needle), "`{needle}` not in {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modelslab_controlnet_routes() {
    let server = TestServer::start("cn-modelslab").await;
    let photo = b64(&disc_png(64, 64, 0));
    let body = |extra: Value| {
        let mut b = json!({"key": KEY, "model_id": "tiny-sd15", "prompt": "a fox",
            "negative_prompt": "blurry", "init_image": photo, "controlnet_model": "canny",
            "auto_hint": "yes", "num_inference_steps": "2", "seed": "5"});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                b.as_object_mut().unwrap().remove(k);
            } else {
                b[k] = v.clone();
            }
        }
        b
    };

    let (hinted, r) = modelslab_image(&server, CONTROLNET, &body(json!({}))).await;
    let meta = &r["meta"];
    assert_eq!(meta["controlnet_model"], "tiny-sd15-controlnet-a", "{meta}");
    assert_eq!(meta["auto_hint"], "yes");
    assert_eq!(meta["guess_mode"], "no");
    assert_eq!(meta["controlnet_conditioning_scale"], 1.0);
    assert_eq!(
        (meta["width"].as_u64(), meta["height"].as_u64()),
        (Some(64), Some(64))
    );
    let (again, _) = modelslab_image(&server, "/api/v5/controlnet", &body(json!({}))).await;
    assert_eq!(hinted, again, "same request, same image (v5 route too)");

    let (plain, _) = modelslab_image(
        &server,
        "/api/v6/images/text2img",
        &json!({"key": KEY, "model_id": "tiny-sd15", "prompt": "a fox",
                "negative_prompt": "blurry", "width": 64, "height": 64,
                "num_inference_steps": "2", "seed": "5"}),
    )
    .await;
    assert_ne!(plain, hinted, "the ControlNet changes the image");

    // Without auto_hint the image is the control as sent; a control_image replaces the init
    // image as the source; guess mode and the scale change the result.
    let (raw, r) = modelslab_image(&server, CONTROLNET, &body(json!({"auto_hint": "no"}))).await;
    assert_eq!(r["meta"]["auto_hint"], "no");
    assert_ne!(raw, hinted);
    let other = data_uri(&disc_png(64, 64, 12));
    let (by_control, _) =
        modelslab_image(&server, CONTROLNET, &body(json!({"control_image": other}))).await;
    assert_ne!(by_control, hinted);
    let (guess, r) =
        modelslab_image(&server, CONTROLNET, &body(json!({"guess_mode": "yes"}))).await;
    assert_eq!(r["meta"]["guess_mode"], "yes");
    assert_ne!(guess, hinted);
    let (half, _) = modelslab_image(
        &server,
        CONTROLNET,
        &body(json!({"controlnet_conditioning_scale": "0.5"})),
    )
    .await;
    assert_ne!(half, hinted);
    // Multi-ControlNet by a comma list (type and registry id).
    let (multi, r) = modelslab_image(
        &server,
        CONTROLNET,
        &body(json!({"controlnet_model": "canny,tiny-sd15-controlnet-a"})),
    )
    .await;
    assert_eq!(
        r["meta"]["controlnet_model"],
        "tiny-sd15-controlnet-a,tiny-sd15-controlnet-a"
    );
    assert_ne!(multi, hinted);

    for (extra, needle) in [
        (json!({"controlnet_model": "mlsd"}), "no `mlsd` ControlNet"),
        (
            json!({"controlnet_model": "tiny-sdxl-controlnet"}),
            "is for sdxl models",
        ),
        (
            json!({"controlnet_model": "nope"}),
            "unknown ControlNet `nope`",
        ),
        (
            json!({"controlnet_model": null}),
            "`controlnet_model` is required",
        ),
        (
            json!({"controlnet_type": "sketch"}),
            "`controlnet_type` must be one of",
        ),
        (
            json!({"controlnet_conditioning_scale": "3"}),
            "controlnet_conditioning_scale",
        ),
        (
            json!({"init_image": null}),
            "`init_image` (or `control_image`) is required",
        ),
        (json!({"control_image": "not base64!"}), "`control_image`"),
        (json!({"guess_mode": "maybe"}), "guess_mode"),
    ] {
        let r = modelslab(&server, CONTROLNET, &body(extra.clone())).await;
        assert_modelslab_error(&r, needle);
    }
    // On the other routes the ControlNet fields are refused by name.
    let r = modelslab(
        &server,
        "/api/v6/images/text2img",
        &json!({"key": KEY, "model_id": "tiny-sd15", "prompt": "x", "controlnet_model": "canny"}),
    )
    .await;
    assert_modelslab_error(&r, "send the request to the controlnet endpoint");
    server.stop().await;
}

/// A grayscale PNG mask of `w` x `h`: white (repaint) in the left half.
fn left_half_mask(w: u32, h: u32) -> Vec<u8> {
    let img =
        image::GrayImage::from_fn(w, h, |x, _| image::Luma([if x < w / 2 { 255 } else { 0 }]));
    encode(image::DynamicImage::ImageLuma8(img))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modelslab_controlnet_inpaints_with_two_models() {
    let server = TestServer::start("cn-modelslab-inpaint").await;
    let photo = b64(&disc_png(64, 64, 0));
    let mask = b64(&left_half_mask(64, 64));
    // Two registered ControlNets: the folder and the single-file form of the tiny SD1.5 one.
    let body = |extra: Value| {
        let mut b = json!({"key": KEY, "model_id": "tiny-sd15", "prompt": "a fox",
            "negative_prompt": "blurry", "init_image": photo, "mask_image": mask,
            "controlnet_model": "tiny-sd15-controlnet-a,tiny-sd15-controlnet-single",
            "auto_hint": "yes", "width": 64, "height": 64, "num_inference_steps": "2",
            "seed": "7"});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                b.as_object_mut().unwrap().remove(k);
            } else {
                b[k] = v.clone();
            }
        }
        b
    };
    let (png, r) = modelslab_image(&server, CONTROLNET, &body(json!({}))).await;
    let meta = &r["meta"];
    assert_eq!(
        meta["controlnet_model"], "tiny-sd15-controlnet-a,tiny-sd15-controlnet-single",
        "{meta}"
    );
    assert_eq!(meta["mask_image"], "(base64 image)", "{meta}");
    assert!(meta["strength"].is_number(), "{meta}");
    assert_eq!(decode(&png).to_rgb8().dimensions(), (64, 64));
    let (again, _) = modelslab_image(&server, CONTROLNET, &body(json!({}))).await;
    assert_eq!(png, again, "same request, same image");

    // A requested size other than the seed's: the seed and mask are resized to it.
    let (big, _) = modelslab_image(
        &server,
        CONTROLNET,
        &body(json!({"width": 128, "height": 96})),
    )
    .await;
    assert_eq!(decode(&big).to_rgb8().dimensions(), (128, 96));

    // The mask matters (inpainting, not img2img), and so do the ControlNets.
    let (unmasked, _) = modelslab_image(
        &server,
        CONTROLNET,
        &body(json!({"mask_image": null, "strength": 0.7})),
    )
    .await;
    assert_ne!(unmasked, png);
    let (one, _) = modelslab_image(
        &server,
        CONTROLNET,
        &body(json!({"controlnet_model": "tiny-sd15-controlnet-a"})),
    )
    .await;
    assert_ne!(one, png);
    for (extra, needle) in [
        (
            json!({"mask_image": b64(&left_half_mask(32, 64))}),
            "`mask_image` must be the size of `init_image` (64x64). Given: 32x64",
        ),
        (
            json!({"controlnet_model": "tiny-sd15-controlnet-a,nope"}),
            "unknown ControlNet `nope`",
        ),
        (
            json!({"init_image": null, "control_image": photo}),
            "`init_image` is required with `mask_image`",
        ),
        (json!({"mask_image": "not base64!"}), "`mask_image`"),
    ] {
        let r = modelslab(&server, CONTROLNET, &body(extra.clone())).await;
        assert_modelslab_error(&r, needle);
    }
    server.stop().await;
}

/// `controlnet_model: inpaint`: the registered inpaint ControlNet reads the init image with the
/// masked pixels at -1. The golden case `sd15_inpaint_condition` (diffusers'
/// `StableDiffusionControlNetInpaintPipeline` fed `make_inpaint_condition`) through the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modelslab_inpaint_controlnet_matches_diffusers() {
    let manifest = common::manifest();
    let case = manifest["controlnet_inpaint_condition"]["cases"]
        .as_array()
        .expect("inpaint condition cases")
        .iter()
        .find(|c| c["name"] == "sd15_inpaint_condition")
        .expect("the sd15_inpaint_condition case")
        .clone();
    let golden = common::load_goldens(case["file"].as_str().unwrap());
    let file = |key: &str| {
        b64(&std::fs::read(common::fixtures().join(case[key].as_str().unwrap())).unwrap())
    };
    let server = TestServer::start("cn-modelslab-inpaint-condition").await;
    let body = |extra: Value| {
        let mut b = json!({"key": KEY, "model_id": case["model"], "prompt": case["prompt"],
            "negative_prompt": case["negative_prompt"], "init_image": file("init_image"),
            "mask_image": file("mask_image"), "controlnet_model": "inpaint",
            "width": case["width"], "height": case["height"],
            "num_inference_steps": case["steps"], "guidance_scale": case["guidance"],
            "strength": case["strength"], "seed": case["seed"],
            "scheduler": case["scheduler"], "use_karras_sigmas": "no"});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                b.as_object_mut().unwrap().remove(k);
            } else {
                b[k] = v.clone();
            }
        }
        b
    };
    let (png, r) = modelslab_image(&server, CONTROLNET, &body(json!({}))).await;
    assert_eq!(
        r["meta"]["controlnet_model"], "tiny-sd15-controlnet-inpaint",
        "{}",
        r["meta"]
    );
    let ours: Vec<f32> = decode(&png)
        .to_rgb8()
        .into_raw()
        .into_iter()
        .map(|v| v as f32 / 255.0)
        .collect();
    let expected = common::flat(&golden["images"]);
    assert_eq!(ours.len(), expected.len());
    let diff = ours
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("inpaint ControlNet through ModelsLab: max |diff| {diff:.2e} (0..1 pixels)");
    // The PNG holds 8-bit pixels: one quantisation level (1/255, whether the encoder rounds or
    // truncates) on top of the pipeline's own f32 difference (< 2e-5, parity_controlnet.rs).
    assert!(diff <= 1.0 / 255.0 + 2e-5, "differs by {diff}");

    // Named by registry id it is the same ControlNet and the same picture; with `auto_hint` too
    // (the condition is built either way: no image sent can hold -1).
    let (by_id, _) = modelslab_image(
        &server,
        CONTROLNET,
        &body(json!({"controlnet_model": "tiny-sd15-controlnet-inpaint", "auto_hint": "yes"})),
    )
    .await;
    assert_eq!(by_id, png);
    // The same weights named as the canny ControlNet, fed the plain init image: another picture.
    let (plain, _) = modelslab_image(
        &server,
        CONTROLNET,
        &body(json!({"controlnet_model": "tiny-sd15-controlnet-a"})),
    )
    .await;
    assert_ne!(plain, png, "the masked pixels of the condition matter");
    // Inpaint beside canny (auto_hint runs canny for the other unit).
    let (two, r) = modelslab_image(
        &server,
        CONTROLNET,
        &body(json!({"controlnet_model": "inpaint,canny", "auto_hint": "yes"})),
    )
    .await;
    assert_eq!(
        r["meta"]["controlnet_model"],
        "tiny-sd15-controlnet-inpaint,tiny-sd15-controlnet-a"
    );
    assert_ne!(two, png);

    let r = modelslab(&server, CONTROLNET, &body(json!({"mask_image": null}))).await;
    assert_modelslab_error(&r, "`mask_image` is required with the inpaint ControlNet");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Bearer

fn control_form(image: Vec<u8>, fields: &[(&str, &str)]) -> Form {
    let mut form = Form::new().part(
        "image",
        Part::bytes(image)
            .file_name("input.png")
            .mime_str("image/png")
            .unwrap(),
    );
    for (name, value) in fields {
        form = form.text(name.to_string(), value.to_string());
    }
    form
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_control_uses_the_canny_controlnet() {
    let server = TestServer::start("cn-bearer").await;
    let send = |model: &'static str, image: Vec<u8>, strength: &'static str| {
        let form = control_form(
            image,
            &[
                ("model", model),
                ("prompt", "a fox"),
                ("steps", "10"),
                ("seed", "3"),
                ("control_strength", strength),
            ],
        );
        let server = &server;
        async move {
            client()
                .post(server.url("/v1/images/control"))
                .bearer_auth(KEY)
                .multipart(form)
                .send()
                .await
                .unwrap()
        }
    };
    let r = send("tiny-sd15", disc_png(128, 128, 0), "0.5").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-controlnet"], "tiny-sd15-controlnet-a");
    let a = r.bytes().await.unwrap();
    let b = send("tiny-sd15", disc_png(128, 128, 0), "0.5")
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(a, b, "same request, same bytes");
    // Another outline, same colours elsewhere: the edges change the image.
    let c = send("tiny-sd15", disc_png(128, 128, 20), "0.5")
        .await
        .bytes()
        .await
        .unwrap();
    assert_ne!(a, c);
    // A family without a canny ControlNet runs img2img alone.
    let r = send("tiny-sd2", disc_png(128, 128, 0), "0.5").await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-controlnet").is_none());
    // Bad input keeps the dialect's JSON error.
    let r = send("tiny-sd15", disc_png(128, 128, 0), "1.5").await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["param"], "control_strength", "{body}");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Token-multipart

async fn sinkin(
    server: &TestServer,
    fields: &[(&str, &str)],
    image: Option<Vec<u8>>,
) -> (u16, Value) {
    let mut form = Form::new().text("access_token", KEY);
    for (k, v) in fields {
        form = form.text(k.to_string(), v.to_string());
    }
    if let Some(image) = image {
        form = form.part(
            "init_image_file",
            Part::bytes(image)
                .file_name("init.png")
                .mime_str("image/png")
                .unwrap(),
        );
    }
    let r = client()
        .post(server.url("/api/inference"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sinkin_controlnet_canny_guides_from_the_init_image() {
    let server = TestServer::start("cn-sinkin").await;
    let fields = |controlnet: &'static str| {
        vec![
            ("model_id", "tiny-sd15"),
            ("prompt", "a fox"),
            ("width", "128"),
            ("height", "128"),
            ("steps", "2"),
            ("num_images", "1"),
            ("seed", "8"),
            ("use_default_neg", "false"),
            ("controlnet", controlnet),
        ]
    };
    let image_of = |body: &Value| body["images"][0].as_str().unwrap().to_string();
    let (status, body) = sinkin(&server, &fields("canny"), Some(disc_png(128, 128, 0))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["error_code"], 0);
    let a = download(&image_of(&body)).await;
    let (_, body) = sinkin(&server, &fields("canny"), Some(disc_png(128, 128, 0))).await;
    assert_eq!(
        a,
        download(&image_of(&body)).await,
        "same request, same image"
    );
    let (_, body) = sinkin(&server, &fields("canny"), Some(disc_png(128, 128, 25))).await;
    assert_ne!(
        a,
        download(&image_of(&body)).await,
        "the edges change the image"
    );
    // image_strength has no effect with a ControlNet.
    let mut with_strength = fields("canny");
    with_strength.push(("image_strength", "0.3"));
    let (_, body) = sinkin(&server, &with_strength, Some(disc_png(128, 128, 0))).await;
    assert_eq!(a, download(&image_of(&body)).await);

    // The fixture registry's DPT entry and depth ControlNet: the upload's depth map guides.
    let (status, body) = sinkin(&server, &fields("depth"), Some(disc_png(128, 128, 0))).await;
    assert_eq!(status, 200, "{body}");
    assert_ne!(a, download(&image_of(&body)).await, "depth is not canny");
    for (controlnet, image, status, needle) in [
        // A known detector without a `[[preprocessor]]` entry: the message names the entry.
        ("openpose", true, 400, "body_pose_model.pth"),
        (
            "sketch",
            true,
            400,
            "`controlnet` must be one of canny, depth, openpose",
        ),
        ("canny", false, 400, "needs `init_image_file`"),
    ] {
        let image = image.then(|| disc_png(128, 128, 0));
        let (code, body) = sinkin(&server, &fields(controlnet), image).await;
        assert_eq!(code, status, "{body}");
        assert_eq!(body["error_code"], 1);
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(needle), "`{needle}` not in {message}");
    }
    // A family without a canny ControlNet is refused by name.
    let mut sd2 = fields("canny");
    sd2[0] = ("model_id", "tiny-sd2");
    let (code, body) = sinkin(&server, &sd2, Some(disc_png(128, 128, 0))).await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("no `canny` ControlNet"),
        "{body}"
    );
    server.stop().await;
}
