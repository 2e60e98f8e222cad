//! The bearer raw-bytes dialect against a real server on the tiny models: `POST
//! /v1/images/generate` (JSON) and `POST /v1/images/control` (multipart), PNG bodies, the
//! documented limits, the JSON error shape, refusal when busy and cancellation on disconnect.

mod common;

use std::time::{Duration, Instant};

use common::server::{client, decode, TestServer, KEY, WAIT};
use reqwest::multipart::{Form, Part};
use serde_json::{json, Value};

const GENERATE: &str = "/v1/images/generate";
const CONTROL: &str = "/v1/images/control";

/// A small, fast generation on the tiny SD1.5 model.
fn small(prompt: &str) -> Value {
    json!({"model": "tiny-sd15", "prompt": prompt, "steps": 10, "width": 128, "height": 128})
}

/// Sends `body` as JSON with the test key.
async fn post_json(server: &TestServer, body: &Value) -> reqwest::Response {
    client()
        .post(server.url(GENERATE))
        .bearer_auth(KEY)
        .json(body)
        .send()
        .await
        .expect("request sent")
}

/// A successful answer's PNG bytes and seed; panics with the error body otherwise.
async fn png(response: reqwest::Response) -> (Vec<u8>, u64) {
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("body").to_vec();
    assert_eq!(
        status,
        200,
        "error body: {}",
        String::from_utf8_lossy(&bytes)
    );
    assert_eq!(headers["content-type"], "image/png");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    let seed = headers["x-seed"]
        .to_str()
        .unwrap()
        .parse::<u64>()
        .expect("X-Seed is a number");
    (bytes, seed)
}

/// Asserts the documented error shape and returns `error`.
async fn error(response: reqwest::Response, status: u16, code: &str) -> Value {
    let got = response.status().as_u16();
    let body: Value = response.json().await.expect("a JSON error body");
    assert_eq!(got, status, "{body}");
    let error = &body["error"];
    assert_eq!(error["code"], code, "{body}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(
        error.get("param").is_some(),
        "`param` is always present: {body}"
    );
    error.clone()
}

/// A test image with some structure, encoded as PNG.
fn test_png(width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x * 255 / width) as u8, (y * 255 / height) as u8, 128])
    });
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// Random pixels: a PNG that does not compress.
fn noisy_png(width: u32, height: u32) -> Vec<u8> {
    let mut state = 0x2545_f491_u32;
    let img = image::RgbImage::from_fn(width, height, |_, _| {
        let mut channel = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        };
        image::Rgb([channel(), channel(), channel()])
    });
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

fn control_form(image: Vec<u8>, fields: &[(&str, &str)]) -> Form {
    let mut form = Form::new().part(
        "image",
        Part::bytes(image)
            .file_name("input.png")
            .mime_str("application/octet-stream")
            .unwrap(),
    );
    for (name, value) in fields {
        form = form.text(name.to_string(), value.to_string());
    }
    form
}

async fn post_control(server: &TestServer, form: Form) -> reqwest::Response {
    client()
        .post(server.url(CONTROL))
        .bearer_auth(KEY)
        .multipart(form)
        .send()
        .await
        .expect("request sent")
}

/// Waits until the engine reports one running job.
async fn wait_running(server: &TestServer) {
    let start = Instant::now();
    while server.state.engine().stats().running == 0 {
        assert!(start.elapsed() < WAIT, "the slow job never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A job that takes seconds on the tiny model (it is cancelled long before it ends).
fn slow() -> Value {
    json!({"model": "tiny-sd15", "prompt": "slow", "steps": 50, "width": 1024, "height": 1024, "seed": 3})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_returns_a_png_of_the_requested_size() {
    let server = TestServer::start("bearer-generate").await;
    let body = json!({
        "model": "tiny-sd15", "prompt": "a cat", "negative_prompt": "blurry",
        "steps": 10, "width": 192, "height": 128, "cfg_scale": 10, "seed": 1234
    });
    let response = post_json(&server, &body).await;
    let location = response.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    let (bytes, seed) = png(response).await;
    assert_eq!(seed, 1234);
    let img = decode(&bytes);
    assert_eq!((img.width(), img.height()), (192, 128));
    // The stored copy is the same file.
    let stored = client().get(&location).send().await.unwrap();
    assert_eq!(stored.bytes().await.unwrap().as_ref(), bytes.as_slice());

    // Numbers as strings are accepted.
    let body = json!({"model": "tiny-sd15", "prompt": "a cat", "steps": "10", "width": "128",
                      "height": 128, "cfg_scale": "7.5", "seed": "5"});
    let (bytes, seed) = png(post_json(&server, &body).await).await;
    assert_eq!(seed, 5);
    assert_eq!(decode(&bytes).width(), 128);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defaults_are_the_documented_ones() {
    let server = TestServer::start("bearer-defaults").await;
    // No model: stable-diffusion-xl-base-1.0 (the tiny SDXL here); no size: 512x512. Steps at
    // the documented minimum keep it quick.
    let (bytes, seed) =
        png(post_json(&server, &json!({"prompt": "a house", "steps": 10})).await).await;
    let img = decode(&bytes);
    assert_eq!((img.width(), img.height()), (512, 512));
    assert!((1..=4_294_967_295).contains(&seed));
    let stats = server.state.engine().stats();
    assert_eq!(stats.completed, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_enforced_with_the_field_named() {
    let server = TestServer::start("bearer-limits").await;
    let cases: &[(&str, Value, &str)] = &[
        ("steps", json!(9), "between 10 and 50"),
        ("steps", json!(51), "between 10 and 50"),
        ("steps", json!(10.5), "integer"),
        ("steps", json!(true), "integer"),
        ("width", json!(100), "multiple of 64 and >= 128"),
        ("width", json!(130), "multiple of 64 and >= 128"),
        ("height", json!(64), "multiple of 64 and >= 128"),
        ("width", json!(4096), "<= 2048"),
        ("cfg_scale", json!(-1), "between 0 and 35"),
        ("cfg_scale", json!(36), "between 0 and 35"),
        ("cfg_scale", json!("lots"), "number"),
        ("seed", json!(4_294_967_296u64), "between 0 and 4294967295"),
        ("seed", json!(-1), "between 0 and 4294967295"),
        ("prompt", json!(""), "empty"),
        ("prompt", json!(["a"]), "string"),
    ];
    for (field, value, says) in cases {
        let mut body = small("limits");
        body[field] = value.clone();
        let e = error(post_json(&server, &body).await, 400, "invalid_parameter").await;
        assert_eq!(e["param"], *field, "{e}");
        let message = e["message"].as_str().unwrap();
        assert!(message.contains(says), "{field}={value}: {message}");
    }
    // Missing prompt, unknown fields (control_strength belongs to /control).
    let e = error(
        post_json(&server, &json!({"model": "tiny-sd15"})).await,
        400,
        "missing_parameter",
    )
    .await;
    assert_eq!(e["param"], "prompt");
    for extra in ["control_strength", "samples"] {
        let mut body = small("extra");
        body[extra] = json!(1);
        let e = error(post_json(&server, &body).await, 400, "unknown_parameter").await;
        assert_eq!(e["param"], extra);
    }
    // The edges themselves are accepted.
    let body = json!({"model": "tiny-sd15", "prompt": "edges", "steps": 10, "width": 128,
                      "height": 128, "cfg_scale": 0, "seed": 4_294_967_295u64});
    let (_, seed) = png(post_json(&server, &body).await).await;
    assert_eq!(seed, 4_294_967_295);
    assert_eq!(
        server.state.engine().stats().completed,
        1,
        "no invalid job ran"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_repeat_and_zero_is_random() {
    let server = TestServer::start("bearer-seeds").await;
    let mut body = small("seeded");
    body["seed"] = json!(77);
    let (a, _) = png(post_json(&server, &body).await).await;
    let (b, _) = png(post_json(&server, &body).await).await;
    assert_eq!(a, b, "same seed, same bytes");

    body["seed"] = json!(0);
    let (c, seed_c) = png(post_json(&server, &body).await).await;
    body.as_object_mut().unwrap().remove("seed");
    let (d, seed_d) = png(post_json(&server, &body).await).await;
    assert_ne!(seed_c, 0);
    assert_ne!(seed_d, 0);
    assert_ne!(seed_c, seed_d, "two random seeds");
    assert_ne!(c, d);
    // The reported seed reproduces the image.
    body["seed"] = json!(seed_c);
    let (e, _) = png(post_json(&server, &body).await).await;
    assert_eq!(c, e);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_error_shape() {
    let server = TestServer::start("bearer-errors").await;
    let http = client();
    let url = server.url(GENERATE);

    // No key, a wrong key, another scheme.
    let r = http.post(&url).json(&small("k")).send().await.unwrap();
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    error(r, 401, "missing_api_key").await;
    let r = http
        .post(&url)
        .bearer_auth("wrong")
        .json(&small("k"))
        .send()
        .await
        .unwrap();
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));
    error(r, 401, "invalid_api_key").await;
    let r = http
        .post(&url)
        .basic_auth("user", Some(KEY))
        .json(&small("k"))
        .send()
        .await
        .unwrap();
    error(r, 401, "missing_api_key").await;

    // Malformed JSON and a body that is not an object.
    for body in ["{\"prompt\": ", "[1, 2]", ""] {
        let r = http
            .post(&url)
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        error(r, 400, "invalid_json").await;
    }

    // Not JSON.
    let r = http
        .post(&url)
        .bearer_auth(KEY)
        .header("content-type", "text/plain")
        .body("prompt=a cat")
        .send()
        .await
        .unwrap();
    error(r, 415, "unsupported_media_type").await;
    let r = http
        .post(&url)
        .bearer_auth(KEY)
        .form(&[("prompt", "a cat")])
        .send()
        .await
        .unwrap();
    error(r, 415, "unsupported_media_type").await;

    // An unknown model, named in the message with the available ones.
    let mut body = small("m");
    body["model"] = json!("no-such-model");
    let e = error(post_json(&server, &body).await, 404, "model_not_found").await;
    assert_eq!(e["param"], "model");
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("no-such-model") && message.contains("tiny-sd15"),
        "{message}"
    );
    // A path is not a model name.
    body["model"] = json!("../tiny-sd15");
    error(post_json(&server, &body).await, 404, "model_not_found").await;

    // /control wants multipart.
    let r = http
        .post(server.url(CONTROL))
        .bearer_auth(KEY)
        .json(&small("c"))
        .send()
        .await
        .unwrap();
    error(r, 415, "unsupported_media_type").await;
    assert_eq!(server.state.engine().stats().completed, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_starts_from_the_uploaded_image() {
    let server = TestServer::start("bearer-control").await;
    let fields = |cs: &'static str| {
        vec![
            ("model", "tiny-sd15"),
            ("prompt", "add an apple"),
            ("negative_prompt", ""),
            ("steps", "10"),
            ("cfg_scale", "7"),
            ("seed", "42"),
            ("control_strength", cs),
        ]
    };
    // 200x150 becomes 192x128 (rounded down to multiples of 64).
    let upload = test_png(200, 150);
    let r = post_control(&server, control_form(upload.clone(), &fields("0"))).await;
    assert_eq!(r.headers()["x-denoising-steps"], "10");
    let (weak, seed) = png(r).await;
    assert_eq!(seed, 42);
    let img = decode(&weak);
    assert_eq!((img.width(), img.height()), (192, 128));

    let r = post_control(&server, control_form(upload.clone(), &fields("0.9"))).await;
    assert_eq!(r.headers()["x-denoising-steps"], "1");
    let (strong, _) = png(r).await;
    assert_ne!(weak, strong, "control_strength changes the image");
    let (again, _) =
        png(post_control(&server, control_form(upload.clone(), &fields("0.9"))).await).await;
    assert_eq!(strong, again, "same seed, same bytes");

    // control_strength 1 leaves no step to run: clamped to one denoising step, not refused.
    let r = post_control(&server, control_form(upload.clone(), &fields("1"))).await;
    assert_eq!(r.headers()["x-denoising-steps"], "1");
    png(r).await;

    // width/height override the image's size; `model` sent twice with one value is accepted
    // (Python requests following the API's example does that); defaults otherwise.
    let form = control_form(
        test_png(100, 100),
        &[
            ("prompt", "p"),
            ("steps", "10"),
            ("width", "256"),
            ("height", "128"),
        ],
    )
    .part("model", Part::text("tiny-sd15").file_name("model"))
    .text("model", "tiny-sd15");
    let r = post_control(&server, form).await;
    assert_eq!(
        r.headers()["x-denoising-steps"],
        "6",
        "default control_strength 0.35"
    );
    let (bytes, _) = png(r).await;
    let img = decode(&bytes);
    assert_eq!((img.width(), img.height()), (256, 128));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_refuses_bad_uploads() {
    let server = TestServer::start_with("bearer-control-errors", |config| {
        config.media.max_image_bytes = 4_000;
        config.limits.max_body_bytes = 64 * 1024;
    })
    .await;
    let base = [("model", "tiny-sd15"), ("prompt", "p"), ("steps", "10")];

    // No image.
    let mut form = Form::new();
    for (k, v) in base {
        form = form.text(k, v);
    }
    let e = error(post_control(&server, form).await, 400, "missing_parameter").await;
    assert_eq!(e["param"], "image");

    // Not an image.
    let e = error(
        post_control(&server, control_form(b"not a png".to_vec(), &base)).await,
        400,
        "invalid_image",
    )
    .await;
    assert_eq!(e["param"], "image");

    // Over the media byte limit, and a body over the server's body limit.
    let big = noisy_png(64, 64);
    assert!(big.len() > 4_000, "{}", big.len());
    let e = error(
        post_control(&server, control_form(big, &base)).await,
        413,
        "image_too_large",
    )
    .await;
    assert_eq!(e["param"], "image");
    assert!(e["message"].as_str().unwrap().contains("4000"), "{e}");
    let huge = Form::new()
        .text("prompt", "x".repeat(60 * 1024))
        .text("negative_prompt", "y".repeat(60 * 1024));
    error(post_control(&server, huge).await, 413, "payload_too_large").await;
    // The same for a JSON body.
    let mut body = small("big");
    body["prompt"] = json!("z".repeat(70 * 1024));
    error(post_json(&server, &body).await, 413, "payload_too_large").await;

    // Out of range and unknown fields.
    let mut fields = base.to_vec();
    fields.push(("control_strength", "1.5"));
    let e = error(
        post_control(&server, control_form(test_png(128, 128), &fields)).await,
        400,
        "invalid_parameter",
    )
    .await;
    assert_eq!(e["param"], "control_strength");
    assert!(
        e["message"].as_str().unwrap().contains("between 0 and 1"),
        "{e}"
    );
    let mut fields = base.to_vec();
    fields.push(("mask_image", "x"));
    let e = error(
        post_control(&server, control_form(test_png(128, 128), &fields)).await,
        400,
        "unknown_parameter",
    )
    .await;
    assert_eq!(e["param"], "mask_image");
    let mut fields = base.to_vec();
    fields.push(("model", "tiny-sd2"));
    let e = error(
        post_control(&server, control_form(test_png(128, 128), &fields)).await,
        400,
        "invalid_parameter",
    )
    .await;
    assert_eq!(e["param"], "model");

    // Without a key nothing is read.
    let r = client()
        .post(server.url(CONTROL))
        .multipart(control_form(test_png(128, 128), &base))
        .send()
        .await
        .unwrap();
    error(r, 401, "missing_api_key").await;
    assert_eq!(server.state.engine().stats().completed, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once() {
    let server = TestServer::start_with("bearer-busy", |config| config.queue_capacity = 1).await;
    let url = server.url(GENERATE);
    let held = tokio::spawn(async move {
        client()
            .post(url)
            .bearer_auth(KEY)
            .json(&slow())
            .send()
            .await
    });
    wait_running(&server).await;

    let start = Instant::now();
    let r = post_json(&server, &small("second")).await;
    assert_eq!(r.headers()["retry-after"], "1");
    let e = error(r, 429, "server_busy").await;
    assert!(e["param"].is_null());
    assert!(start.elapsed() < Duration::from_secs(5), "refused at once");
    assert_eq!(server.state.engine().stats().refused, 1);

    held.abort();
    let _ = held.await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_its_job() {
    let server = TestServer::start("bearer-cancel").await;
    let url = server.url(GENERATE);
    let request = tokio::spawn(async move {
        client()
            .post(url)
            .bearer_auth(KEY)
            .json(&slow())
            .send()
            .await
    });
    wait_running(&server).await;
    request.abort();
    let _ = request.await;

    let start = Instant::now();
    loop {
        let stats = server.state.engine().stats();
        if stats.cancelled == 1 {
            assert_eq!(stats.completed, 0);
            assert_eq!(stats.running, 0);
            break;
        }
        assert!(start.elapsed() < WAIT, "not cancelled: {stats:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}
