//! The Runware dialect against a real server on the tiny models: task arrays over HTTP
//! (`POST /v1`) and over a WebSocket (`GET /v1`), as the Runware SDKs send them.

mod common;

use std::collections::HashMap;
use std::future::IntoFuture as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use common::server::{client, decode, TestServer, KEY, WAIT};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The AIR id the fixture registry maps to tiny-sd15 (default steps 4).
const MODEL: &str = "civitai:102438@133677";

fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// An imageInference task of 128x128 (the smallest size) in one step, with `extra` merged in
/// (a `null` removes a field).
fn inference(extra: Value) -> Value {
    let mut task = json!({
        "taskType": "imageInference",
        "taskUUID": new_uuid(),
        "positivePrompt": "a red fox in the snow",
        "model": MODEL,
        "width": 128,
        "height": 128,
        "steps": 1,
    });
    for (k, v) in extra.as_object().expect("an object").clone() {
        if v.is_null() {
            task.as_object_mut().unwrap().remove(&k);
        } else {
            task[k] = v;
        }
    }
    task
}

fn uuid_of(task: &Value) -> String {
    task["taskUUID"].as_str().unwrap().to_string()
}

/// POSTs `body` to `/v1` with the test key as a bearer token.
async fn post(server: &TestServer, body: &Value) -> (u16, Value) {
    let r = client()
        .post(server.url("/v1"))
        .bearer_auth(KEY)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// POSTs without a header; the body decides how to authenticate.
async fn post_raw(server: &TestServer, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let r = client()
        .post(server.url("/v1"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn data(body: &Value) -> &Vec<Value> {
    body["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no data: {body}"))
}

fn errors(body: &Value) -> &Vec<Value> {
    body["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no errors: {body}"))
}

fn b64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64")
}

async fn fetch(url: &str) -> (String, Vec<u8>) {
    let r = client().get(url).send().await.unwrap();
    assert_eq!(r.status(), 200, "{url}");
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    (ct, r.bytes().await.unwrap().to_vec())
}

/// A gradient test image, as PNG bytes.
fn test_png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 2) as u8, (y * 2) as u8, 90]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn data_uri(png: &[u8]) -> String {
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    )
}

/// Waits until the engine holds `n` jobs (waiting or running).
async fn admitted(server: &TestServer, n: usize) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let stats = server.state.engine().stats();
        if stats.queued + stats.running >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no job admitted: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

// ---- WebSocket helpers ----

async fn ws_connect(server: &TestServer) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(server.ws_url("/v1"))
        .await
        .expect("websocket connects");
    ws
}

async fn ws_send(ws: &mut Ws, v: &Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// The next JSON message (text or binary); protocol frames are skipped, a close panics.
async fn ws_recv(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message in time")
            .expect("the socket is open")
            .expect("a frame");
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Binary(b) => return serde_json::from_slice(&b).unwrap(),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            Message::Close(c) => panic!("closed: {c:?}"),
        }
    }
}

/// Reads until the server closes; returns the close code and the JSON messages before it.
async fn ws_until_close(ws: &mut Ws, within: Duration) -> (u16, Vec<Value>) {
    let mut seen = Vec::new();
    loop {
        let msg = tokio::time::timeout(within, ws.next())
            .await
            .expect("the server closes in time");
        match msg {
            Some(Ok(Message::Text(t))) => seen.push(serde_json::from_str(t.as_str()).unwrap()),
            Some(Ok(Message::Close(frame))) => {
                return (frame.map_or(1005, |f| u16::from(f.code)), seen);
            }
            Some(Ok(_)) => continue,
            None | Some(Err(_)) => return (1006, seen),
        }
    }
}

/// Connects and authenticates; returns the socket and the connectionSessionUUID.
async fn ws_auth(server: &TestServer, resume: Option<&str>) -> (Ws, String) {
    let mut ws = ws_connect(server).await;
    let mut auth = json!({"taskType": "authentication", "apiKey": KEY});
    if let Some(id) = resume {
        auth["connectionSessionUUID"] = json!(id);
    }
    ws_send(&mut ws, &json!([auth])).await;
    let reply = ws_recv(&mut ws).await;
    let item = &data(&reply)[0];
    assert_eq!(item["taskType"], "authentication", "{reply}");
    assert!(item.get("taskUUID").is_none(), "{reply}");
    let session = item["connectionSessionUUID"].as_str().unwrap().to_string();
    assert!(uuid::Uuid::parse_str(&session).is_ok());
    (ws, session)
}

/// Collects result messages until `images` data items and `errors` errors have arrived; each
/// message must hold exactly one item.
async fn ws_collect(ws: &mut Ws, images: usize, errors: usize) -> (Vec<Value>, Vec<Value>) {
    let (mut got, mut failed) = (Vec::new(), Vec::new());
    while got.len() < images || failed.len() < errors {
        let msg = ws_recv(ws).await;
        if let Some(items) = msg["data"].as_array() {
            assert_eq!(items.len(), 1, "one item per message: {msg}");
            if items[0]["taskType"] != "ping" {
                got.push(items[0].clone());
            }
        } else {
            let errs = msg["errors"].as_array().unwrap();
            assert_eq!(errs.len(), 1, "one error per message: {msg}");
            failed.push(errs[0].clone());
        }
    }
    (got, failed)
}

// ---- HTTP ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_authentication_ping_and_malformed_payloads() {
    let server = TestServer::start("rw-http-auth").await;
    let ping = json!({"taskType": "ping", "ping": true});

    // The key in a leading authentication task, or as a bearer token.
    let (status, body) = post_raw(
        &server,
        json!([{"taskType": "authentication", "apiKey": KEY}, ping]).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"data": [{"taskType": "ping", "pong": true}]}));
    let (status, body) = post(&server, &json!([ping])).await;
    assert_eq!((status, data(&body).len()), (200, 1), "{body}");

    // A wrong key, and no key.
    let (status, body) = post_raw(
        &server,
        json!([{"taskType": "authentication", "apiKey": "wrong"}, ping]).to_string(),
    )
    .await;
    assert_eq!(status, 401);
    let e = &errors(&body)[0];
    assert_eq!(e["code"], "invalidApiKey");
    assert_eq!(e["parameter"], "apiKey");
    assert_eq!(e["type"], "string");
    assert_eq!(e["taskType"], "authentication");
    assert!(e.get("taskUUID").is_none());
    assert!(e["message"].as_str().unwrap().contains("sd-serve"), "{e}");
    assert!(body.get("data").is_none());
    let r = client()
        .post(server.url("/v1"))
        .bearer_auth("wrong")
        .json(&json!([ping]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let (status, body) = post_raw(&server, json!([ping]).to_string()).await;
    assert_eq!(status, 401);
    assert_eq!(errors(&body)[0]["code"], "missingApiKey");

    // Malformed JSON, a payload that is not a task array, an unknown task type.
    let r = client()
        .post(server.url("/v1"))
        .bearer_auth(KEY)
        .body("[{\"taskType\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(errors(&body)[0]["code"], "invalidJSON");
    let (status, body) = post(&server, &json!("ping")).await;
    assert_eq!(
        (status, errors(&body)[0]["code"].as_str()),
        (400, Some("invalidJSON"))
    );
    let id = new_uuid();
    let (status, body) = post(
        &server,
        &json!([{"taskType": "videoInference", "taskUUID": id}]),
    )
    .await;
    assert_eq!(status, 400);
    let e = &errors(&body)[0];
    assert_eq!(
        (e["code"].as_str(), e["taskUUID"].as_str()),
        (Some("invalidTaskType"), Some(id.as_str()))
    );

    // GET without an upgrade is not the HTTP API.
    let r = client().get(server.url("/v1")).send().await.unwrap();
    assert!(r.status().is_client_error());
    let body: Value = r.json().await.unwrap();
    assert!(!errors(&body).is_empty());

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_image_inference_output_types_formats_and_defaults() {
    let server = TestServer::start("rw-http-outputs").await;

    // Defaults: a JPG at an image URL, a seed, no cost, no NSFW field.
    let task = inference(json!({"seed": 1234}));
    let (status, body) = post(&server, &json!([task])).await;
    assert_eq!(status, 200, "{body}");
    let items = data(&body);
    assert_eq!(items.len(), 1);
    let item = &items[0];
    assert_eq!(item["taskType"], "imageInference");
    assert_eq!(item["taskUUID"], task["taskUUID"]);
    assert_eq!(item["seed"], 1234);
    assert!(uuid::Uuid::parse_str(item["imageUUID"].as_str().unwrap()).is_ok());
    for absent in [
        "cost",
        "NSFWContent",
        "imageBase64Data",
        "imageDataURI",
        "status",
    ] {
        assert!(item.get(absent).is_none(), "{absent}: {item}");
    }
    let url = item["imageURL"].as_str().unwrap();
    assert!(
        url.starts_with(&server.url("/images/")) && url.ends_with(".jpg"),
        "{url}"
    );
    let (ct, bytes) = fetch(url).await;
    assert_eq!(ct, "image/jpeg");
    let img = decode(&bytes);
    assert_eq!((img.width(), img.height()), (128, 128));

    // Each output type alone, each format.
    let cases = [
        ("base64Data", "PNG", image::ImageFormat::Png),
        ("dataURI", "WEBP", image::ImageFormat::WebP),
        ("URL", "PNG", image::ImageFormat::Png),
        ("base64Data", "JPG", image::ImageFormat::Jpeg),
    ];
    let tasks: Vec<Value> = cases
        .iter()
        .map(|(t, f, _)| {
            inference(json!({"outputType": t, "outputFormat": f, "outputQuality": 80}))
        })
        .collect();
    let (status, body) = post(&server, &Value::Array(tasks.clone())).await;
    assert_eq!(status, 200, "{body}");
    let items = data(&body);
    assert_eq!(items.len(), cases.len());
    for ((kind, _, format), task) in cases.iter().zip(&tasks) {
        let item = items
            .iter()
            .find(|i| i["taskUUID"] == task["taskUUID"])
            .unwrap();
        let fields: Vec<&str> = ["imageURL", "imageBase64Data", "imageDataURI"]
            .into_iter()
            .filter(|f| item.get(*f).is_some())
            .collect();
        let bytes = match *kind {
            "URL" => {
                assert_eq!(fields, ["imageURL"]);
                fetch(item["imageURL"].as_str().unwrap()).await.1
            }
            "base64Data" => {
                assert_eq!(fields, ["imageBase64Data"]);
                b64(item["imageBase64Data"].as_str().unwrap())
            }
            _ => {
                assert_eq!(fields, ["imageDataURI"]);
                let uri = item["imageDataURI"].as_str().unwrap();
                let rest = uri.strip_prefix("data:image/webp;base64,").expect(uri);
                b64(rest)
            }
        };
        assert_eq!(image::guess_format(&bytes).unwrap(), *format, "{kind}");
        let img = decode(&bytes);
        assert_eq!((img.width(), img.height()), (128, 128));
    }

    // A list of output types returns all three, of the same image.
    let task =
        inference(json!({"outputType": ["URL", "base64Data", "dataURI"], "outputFormat": "PNG"}));
    let (_, body) = post(&server, &json!([task])).await;
    let item = &data(&body)[0];
    let from_url = fetch(item["imageURL"].as_str().unwrap()).await.1;
    let from_b64 = b64(item["imageBase64Data"].as_str().unwrap());
    let uri = item["imageDataURI"].as_str().unwrap();
    assert_eq!(from_url, from_b64);
    assert_eq!(
        uri,
        format!(
            "data:image/png;base64,{}",
            item["imageBase64Data"].as_str().unwrap()
        )
    );

    // Left out, steps are the model's default (4 for tiny-sd15) and CFGScale is 7.
    let defaults = inference(
        json!({"seed": 99, "steps": null, "outputFormat": "PNG", "outputType": "base64Data"}),
    );
    let explicit = inference(
        json!({"seed": 99, "steps": 4, "CFGScale": 7, "outputFormat": "PNG", "outputType": "base64Data"}),
    );
    let other = inference(
        json!({"seed": 99, "steps": 4, "CFGScale": 3, "outputFormat": "PNG", "outputType": "base64Data"}),
    );
    let (_, body) = post(&server, &json!([defaults, explicit, other])).await;
    let image_of = |t: &Value| {
        let item = data(&body)
            .iter()
            .find(|i| i["taskUUID"] == t["taskUUID"])
            .unwrap();
        decode(&b64(item["imageBase64Data"].as_str().unwrap())).to_rgb8()
    };
    assert_eq!(image_of(&defaults), image_of(&explicit));
    assert_ne!(image_of(&explicit), image_of(&other));

    // `__BLANK__` is an empty prompt; a random seed fits a JavaScript number.
    let task = inference(json!({"positivePrompt": "__BLANK__"}));
    let (status, body) = post(&server, &json!([task])).await;
    assert_eq!(status, 200, "{body}");
    let seed = data(&body)[0]["seed"].as_u64().unwrap();
    assert!((1..=(1u64 << 53) - 1).contains(&seed));

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_number_results_are_single_requests_with_following_seeds() {
    let server = TestServer::start("rw-http-seeds").await;
    let png = json!({"outputFormat": "PNG", "outputType": "base64Data"});
    let batch = inference(
        json!({"seed": 500, "numberResults": 3, "outputFormat": "PNG", "outputType": "base64Data"}),
    );
    let singles: Vec<Value> = (0..3)
        .map(|i| {
            let mut t = inference(png.clone());
            t["seed"] = json!(500 + i);
            t
        })
        .collect();
    let mut all = vec![batch.clone()];
    all.extend(singles.iter().cloned());
    let (status, body) = post(&server, &Value::Array(all)).await;
    assert_eq!(status, 200, "{body}");
    let pixels = |item: &Value| decode(&b64(item["imageBase64Data"].as_str().unwrap())).to_rgb8();
    let mut batch_items: Vec<&Value> = data(&body)
        .iter()
        .filter(|i| i["taskUUID"] == batch["taskUUID"])
        .collect();
    assert_eq!(batch_items.len(), 3, "one item per image");
    batch_items.sort_by_key(|i| i["seed"].as_u64());
    let seeds: Vec<u64> = batch_items
        .iter()
        .map(|i| i["seed"].as_u64().unwrap())
        .collect();
    assert_eq!(seeds, [500, 501, 502]);
    let ids: std::collections::HashSet<&str> = batch_items
        .iter()
        .map(|i| i["imageUUID"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3);
    for (item, single) in batch_items.iter().zip(&singles) {
        let single_item = data(&body)
            .iter()
            .find(|i| i["taskUUID"] == single["taskUUID"])
            .unwrap();
        assert_eq!(single_item["seed"], item["seed"]);
        assert_eq!(pixels(item), pixels(single_item), "seed {}", item["seed"]);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_lora_changes_the_image_and_repeats_exactly() {
    let server = TestServer::start("rw-http-lora").await;
    let base = json!({"seed": 4242, "steps": 2, "outputFormat": "PNG", "outputType": "base64Data"});
    let with = |lora: Value| {
        let mut extra = base.clone();
        extra["lora"] = lora;
        inference(extra)
    };
    let tasks = [
        inference(base.clone()),
        with(json!([{"model": "civitai:132942@146296", "weight": 1.5}])),
        with(json!([{"model": "civitai:132942@146296", "weight": 1.5}])),
        with(json!([{"model": "tiny-sd15-lora-peft"}])),
        with(json!([{"model": "tiny-sd15-lora-peft", "weight": 1}])),
        with(json!([{"model": "civitai:132942@146296", "weight": -4}])),
    ];
    let mut images = Vec::new();
    // One task per payload, so their order on the worker is the order here.
    for task in &tasks {
        let (status, body) = post(&server, &json!([task])).await;
        assert_eq!(status, 200, "{body}");
        let item = &data(&body)[0];
        assert_eq!(item["seed"], 4242);
        images.push(decode(&b64(item["imageBase64Data"].as_str().unwrap())).to_rgb8());
    }
    assert_ne!(images[0], images[1], "the LoRA changes the image");
    assert_eq!(
        images[1], images[2],
        "the same LoRA request gives the same image"
    );
    assert_ne!(images[1], images[3]);
    assert_eq!(images[3], images[4], "`weight` defaults to 1");
    assert_ne!(images[1], images[5]);
    // Back to no LoRA: the plain model's image again.
    let (_, body) = post(&server, &json!([inference(base.clone())])).await;
    let plain = decode(&b64(data(&body)[0]["imageBase64Data"].as_str().unwrap())).to_rgb8();
    assert_eq!(plain, images[0]);
    // A LoRA of another family names it and both families.
    let (_, body) = post(
        &server,
        &json!([with(json!([{"model": "tiny-sdxl-lora-kohya"}]))]),
    )
    .await;
    let error = &errors(&body)[0];
    assert_eq!(error["parameter"], "lora", "{body}");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("tiny-sdxl-lora-kohya") && message.contains("sd1"),
        "{message}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_prompt_weighting_changes_the_image_and_repeats_exactly() {
    let server = TestServer::start("rw-http-weighting").await;
    let base = json!({"seed": 77, "steps": 2, "outputFormat": "PNG", "outputType": "base64Data",
                      "negativePrompt": "blurry, (low quality:1.3)"});
    let task = |prompt: &str, weighting: Option<&str>| {
        let mut extra = base.clone();
        extra["positivePrompt"] = json!(prompt);
        if let Some(w) = weighting {
            extra["promptWeighting"] = json!(w);
        }
        inference(extra)
    };
    let a1111 = "a red fox in the (snow:1.4), [forest]";
    let compel = "a red fox++ in the (snow)0.6, forest";
    let long = format!(
        "{a1111}, {}",
        "(tall pine trees:1.1), frozen lake, ".repeat(12)
    );
    let tasks = [
        task(a1111, None),
        task(a1111, Some("sdEmbeds")),
        task(a1111, Some("sdEmbeds")),
        task(compel, None),
        task(compel, Some("compel")),
        task(compel, Some("compel")),
        task(&long, Some("sdEmbeds")),
        task(&long, None),
    ];
    let mut images = Vec::new();
    for task in &tasks {
        let (status, body) = post(&server, &json!([task])).await;
        assert_eq!(status, 200, "{body}");
        images.push(decode(&b64(data(&body)[0]["imageBase64Data"].as_str().unwrap())).to_rgb8());
    }
    assert_ne!(images[0], images[1], "sdEmbeds reads the A1111 syntax");
    assert_eq!(
        images[1], images[2],
        "the same weighted request repeats exactly"
    );
    assert_ne!(images[3], images[4], "compel reads its syntax");
    assert_eq!(
        images[4], images[5],
        "the same weighted request repeats exactly"
    );
    // A prompt past 77 tokens: sdEmbeds encodes all of it, plain text is cut at 75 tokens.
    assert_ne!(images[6], images[7]);

    let (status, body) = post(&server, &json!([task(a1111, Some("sdembeds2"))])).await;
    assert_eq!(status, 400, "{body}");
    let error = &errors(&body)[0];
    assert_eq!(error["parameter"], "promptWeighting", "{body}");
    assert_eq!(error["code"], "invalidPromptWeighting", "{body}");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("compel") && message.contains("sdEmbeds"),
        "{message}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_limits_and_unsupported_parameters_are_refused_per_task() {
    let server = TestServer::start("rw-http-limits").await;
    let cases: Vec<(Value, &str, &str)> = vec![
        (json!({"width": 100}), "invalidWidth", "width"),
        (json!({"width": 2100}), "invalidWidth", "width"),
        (json!({"width": 130}), "invalidWidth", "width"),
        (json!({"height": "tall"}), "invalidHeight", "height"),
        (json!({"height": null}), "missingHeight", "height"),
        (
            json!({"positivePrompt": "a"}),
            "invalidPositivePrompt",
            "positivePrompt",
        ),
        (
            json!({"positivePrompt": "x".repeat(3001)}),
            "invalidPositivePrompt",
            "positivePrompt",
        ),
        (
            json!({"positivePrompt": null}),
            "missingPositivePrompt",
            "positivePrompt",
        ),
        (
            json!({"negativePrompt": "a"}),
            "invalidNegativePrompt",
            "negativePrompt",
        ),
        (json!({"steps": 0}), "invalidSteps", "steps"),
        (json!({"steps": 101}), "invalidSteps", "steps"),
        (json!({"CFGScale": 31}), "invalidCFGScale", "CFGScale"),
        (json!({"CFGScale": -1}), "invalidCFGScale", "CFGScale"),
        (
            json!({"numberResults": 21}),
            "invalidNumberResults",
            "numberResults",
        ),
        (
            json!({"numberResults": 0}),
            "invalidNumberResults",
            "numberResults",
        ),
        (
            json!({"outputQuality": 10}),
            "invalidOutputQuality",
            "outputQuality",
        ),
        (
            json!({"outputQuality": 100}),
            "invalidOutputQuality",
            "outputQuality",
        ),
        (json!({"seed": 0}), "invalidSeed", "seed"),
        (json!({"clipSkip": 3}), "invalidClipSkip", "clipSkip"),
        (json!({"strength": 1.5}), "invalidStrength", "strength"),
        (
            json!({"outputType": "GIF"}),
            "invalidOutputType",
            "outputType",
        ),
        (
            json!({"outputFormat": "BMP"}),
            "invalidOutputFormat",
            "outputFormat",
        ),
        (
            json!({"deliveryMethod": "stream"}),
            "invalidDeliveryMethod",
            "deliveryMethod",
        ),
        (
            json!({"scheduler": "FlowMatchEulerDiscreteScheduler"}),
            "invalidScheduler",
            "scheduler",
        ),
        (json!({"model": "civitai:1@1"}), "invalidModel", "model"),
        (json!({"model": null}), "missingModel", "model"),
        (
            json!({"lora": [{"model": "civitai:1@1", "weight": 1}]}),
            "invalidLora",
            "lora",
        ),
        (
            json!({"lora": [{"model": "tiny-sdxl-lora-kohya"}]}),
            "invalidLora",
            "lora",
        ),
        (
            json!({"lora": [{"model": "civitai:132942@146296", "weight": 4.5}]}),
            "invalidLora",
            "lora",
        ),
        (json!({"lora": [{"weight": 1}]}), "missingLora", "lora"),
        (json!({"lora": {"model": "x"}}), "invalidLora", "lora"),
        (
            json!({"controlNet": [{"model": "x", "guideImage": "y"}]}),
            "invalidControlNet",
            "controlNet",
        ),
        (json!({"maskImage": "abc"}), "missingSeedImage", "seedImage"),
        (json!({"maskMargin": 64}), "missingMaskImage", "maskImage"),
        (
            json!({"outpainting": {"top": 64}}),
            "missingSeedImage",
            "seedImage",
        ),
        (
            json!({"maskMargin": 20, "maskImage": "abc", "seedImage": "abc", "steps": 2}),
            "invalidMaskMargin",
            "maskMargin",
        ),
        (
            json!({"outpainting": {"top": 30}, "seedImage": "abc", "steps": 2}),
            "invalidOutpainting",
            "outpainting",
        ),
        (
            json!({"outpainting": {"left": 64, "blur": 33}, "seedImage": "abc", "steps": 2}),
            "invalidOutpainting",
            "outpainting",
        ),
        (
            json!({"outpainting": {"left": 64, "middle": 64}, "seedImage": "abc", "steps": 2}),
            "invalidOutpainting",
            "outpainting",
        ),
        (
            json!({"outpainting": 64, "seedImage": "abc", "steps": 2}),
            "invalidOutpainting",
            "outpainting",
        ),
        (
            json!({"embeddings": [{"model": "x"}]}),
            "invalidEmbeddings",
            "embeddings",
        ),
        (
            json!({"ipAdapters": [{"model": "runware:55@1"}]}),
            "invalidIpAdapters",
            "ipAdapters",
        ),
        (json!({"vae": "civitai:1@2"}), "invalidVae", "vae"),
        (
            json!({"promptWeighting": "a1111"}),
            "invalidPromptWeighting",
            "promptWeighting",
        ),
        (
            json!({"promptWeighting": "compel", "positivePrompt": "(\"a\", \"b\").blend(1)"}),
            "invalidPositivePrompt",
            "positivePrompt",
        ),
        (
            json!({"promptWeighting": "sdEmbeds", "negativePrompt": "ugly (blurry:1.2.3)"}),
            "invalidNegativePrompt",
            "negativePrompt",
        ),
        (
            json!({"checkNSFW": true}),
            "unsupportedParameter",
            "checkNSFW",
        ),
        (
            json!({"safety": {"checkContent": true}}),
            "unsupportedParameter",
            "safety",
        ),
        (
            json!({"someFutureField": 1}),
            "unsupportedParameter",
            "someFutureField",
        ),
    ];
    let tasks: Vec<Value> = cases
        .iter()
        .map(|(patch, _, _)| inference(patch.clone()))
        .collect();
    let mut payload = tasks.clone();
    let bad_uuid = json!({"taskType": "imageInference", "taskUUID": "1234", "positivePrompt": "a cat", "model": MODEL, "width": 128, "height": 128});
    payload.push(bad_uuid);
    let (status, body) = post(&server, &Value::Array(payload)).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.get("data").is_none());
    let errs = errors(&body);
    assert_eq!(errs.len(), cases.len() + 1);
    for ((patch, code, parameter), task) in cases.iter().zip(&tasks) {
        let e = errs
            .iter()
            .find(|e| e["taskUUID"] == task["taskUUID"])
            .unwrap_or_else(|| panic!("no error for {patch}"));
        assert_eq!(e["code"], *code, "{patch}: {e}");
        assert_eq!(e["parameter"], *parameter, "{patch}: {e}");
        assert_eq!(e["taskType"], "imageInference");
        assert!(!e["message"].as_str().unwrap().is_empty());
    }
    let width = errs
        .iter()
        .find(|e| e["taskUUID"] == tasks[0]["taskUUID"])
        .unwrap();
    let message = width["message"].as_str().unwrap();
    assert!(
        message.contains("64") && message.contains("128") && message.contains("2048"),
        "{message}"
    );
    assert_eq!(width["type"], "integer");
    let uuid_error = errs.iter().find(|e| e["taskUUID"] == "1234").unwrap();
    assert_eq!(uuid_error["code"], "invalidTaskUUID");

    // "Off" values of unsupported features are accepted; checkNSFW false adds no NSFWContent.
    let off = inference(json!({
        "lora": [], "controlNet": [], "embeddings": [], "ipAdapters": [], "checkNSFW": false,
        "safety": {"checkContent": false}, "maskImage": null, "scheduler": "Default",
    }));
    let bad = inference(json!({"width": 100}));
    let (status, body) = post(&server, &json!([off, bad])).await;
    assert_eq!(status, 200, "partial success is a 200: {body}");
    assert_eq!(data(&body).len(), 1);
    assert!(data(&body)[0].get("NSFWContent").is_none());
    assert_eq!(errors(&body)[0]["taskUUID"], bad["taskUUID"]);

    // Runware scheduler names.
    let tasks: Vec<Value> = ["DPM++ 2M Karras", "Euler a", "DDIMScheduler", "LCM"]
        .iter()
        .map(|s| inference(json!({"scheduler": s})))
        .collect();
    let (status, body) = post(&server, &Value::Array(tasks)).await;
    assert_eq!((status, data(&body).len()), (200, 4), "{body}");

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_image_upload_and_seed_images_in_every_form() {
    let server = TestServer::start("rw-http-img2img").await;
    let png = test_png(128, 128);

    let upload_id = new_uuid();
    let upload = json!({"taskType": "imageUpload", "taskUUID": upload_id, "image": data_uri(&png)});
    let (status, body) = post(&server, &json!([upload])).await;
    assert_eq!(status, 200, "{body}");
    let item = &data(&body)[0];
    assert_eq!(item["taskType"], "imageUpload");
    assert_eq!(item["taskUUID"], upload_id.as_str());
    let image_uuid = item["imageUUID"].as_str().unwrap().to_string();
    let image_url = item["imageURL"].as_str().unwrap().to_string();
    let (ct, stored) = fetch(&image_url).await;
    assert_eq!(ct, "image/png");
    assert_eq!(decode(&stored).to_rgb8(), decode(&png).to_rgb8());

    // The same seed image by UUID, data URI, bare base64 and URL gives the same image.
    let common = json!({"seed": 42, "steps": 2, "strength": 0.5, "outputFormat": "PNG", "outputType": "base64Data"});
    let forms = [
        image_uuid.clone(),
        data_uri(&png),
        base64::engine::general_purpose::STANDARD.encode(&png),
        image_url.clone(),
    ];
    let tasks: Vec<Value> = forms
        .iter()
        .map(|f| {
            let mut t = inference(common.clone());
            t["seedImage"] = json!(f);
            t
        })
        .collect();
    let txt2img = inference(common.clone());
    // A smaller seed image is resized to the requested size.
    let mut small = inference(common.clone());
    small["seedImage"] = json!(data_uri(&test_png(64, 64)));
    let mut all = tasks.clone();
    all.push(txt2img.clone());
    all.push(small.clone());
    let (status, body) = post(&server, &Value::Array(all)).await;
    assert_eq!(status, 200, "{body}");
    let pixels = |t: &Value| {
        let item = data(&body)
            .iter()
            .find(|i| i["taskUUID"] == t["taskUUID"])
            .unwrap();
        decode(&b64(item["imageBase64Data"].as_str().unwrap())).to_rgb8()
    };
    let first = pixels(&tasks[0]);
    assert_eq!(first.dimensions(), (128, 128));
    for (task, form) in tasks.iter().zip(["UUID", "data URI", "base64", "URL"]) {
        assert_eq!(pixels(task), first, "{form}");
    }
    assert_ne!(pixels(&txt2img), first, "the seed image shapes the result");
    assert_eq!(pixels(&small).dimensions(), (128, 128));

    // Unknown UUIDs and unreadable data are refused, naming seedImage.
    let unknown = inference(json!({"seedImage": new_uuid(), "steps": 2}));
    let garbage = inference(json!({"seedImage": "!!!not an image!!!", "steps": 2}));
    let bad_upload =
        json!({"taskType": "imageUpload", "taskUUID": new_uuid(), "image": "bm90IGFuIGltYWdl"});
    let (status, body) = post(&server, &json!([unknown, garbage, bad_upload])).await;
    assert_eq!(status, 400, "{body}");
    let codes: Vec<(&str, &str)> = errors(&body)
        .iter()
        .map(|e| {
            (
                e["code"].as_str().unwrap(),
                e["parameter"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        codes,
        [
            ("invalidSeedImage", "seedImage"),
            ("invalidSeedImage", "seedImage"),
            ("invalidImage", "image")
        ]
    );

    server.stop().await;
}

/// A mask of `w` x `h` with the box at (x, y) of `bw` x `bh` white (repainted), as PNG bytes.
fn mask_png(w: u32, h: u32, (x, y, bw, bh): (u32, u32, u32, u32)) -> Vec<u8> {
    let img = image::GrayImage::from_fn(w, h, |px, py| {
        let inside = px >= x && px < x + bw && py >= y && py < y + bh;
        image::Luma([if inside { 255 } else { 0 }])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_inpaint_mask_margin_and_outpaint() {
    let server = TestServer::start("rw-http-inpaint").await;
    let seed = test_png(128, 128);
    let mask = data_uri(&mask_png(128, 128, (40, 40, 32, 24)));
    let common = json!({
        "seed": 7, "steps": 2, "strength": 1.0, "outputFormat": "PNG",
        "outputType": "base64Data", "seedImage": data_uri(&seed),
    });
    let with = |extra: Value| {
        let mut t = inference(common.clone());
        for (k, v) in extra.as_object().unwrap() {
            t[k] = v.clone();
        }
        t
    };
    let inpaint = with(json!({"maskImage": mask}));
    let margin = with(json!({"maskImage": mask, "maskMargin": 32}));
    // The 9-channel inpainting model, by its registry id.
    let nine = with(json!({"maskImage": mask, "model": "tiny-sd15-inpaint"}));
    let outpaint = with(json!({
        "outpainting": {"right": 64, "bottom": 64, "blur": 8}, "width": 192, "height": 192,
    }));
    let tasks = [&inpaint, &margin, &nine, &outpaint];
    let (status, body) = post(&server, &json!(tasks)).await;
    assert_eq!(status, 200, "{body}");
    let pixels = |t: &Value| {
        let item = data(&body)
            .iter()
            .find(|i| i["taskUUID"] == t["taskUUID"])
            .unwrap_or_else(|| panic!("no result for {}", t["taskUUID"]));
        decode(&b64(item["imageBase64Data"].as_str().unwrap())).to_rgb8()
    };
    for t in [&inpaint, &margin, &nine] {
        assert_eq!(pixels(t).dimensions(), (128, 128));
    }
    let seed_rgb = decode(&seed).to_rgb8();
    let extended = pixels(&outpaint);
    assert_eq!(extended.dimensions(), (192, 192));
    // Away from the seams the seed image is kept pixel for pixel.
    for (x, y) in [(0, 0), (60, 100), (110, 5)] {
        assert_eq!(extended.get_pixel(x, y), seed_rgb.get_pixel(x, y));
    }
    // maskMargin pastes the generated crop back: far from the mask the seed stays.
    assert_eq!(
        pixels(&margin).get_pixel(2, 125),
        seed_rgb.get_pixel(2, 125)
    );

    // Bad inputs, each named.
    let small_mask = with(json!({"maskImage": data_uri(&mask_png(64, 64, (0, 0, 8, 8)))}));
    let wrong_size = with(json!({"outpainting": {"right": 64}}));
    let not_64 = with(json!({"outpainting": {"top": 32}}));
    let bad_mask = with(json!({"maskImage": "!!!not an image!!!"}));
    let (status, body) = post(&server, &json!([small_mask, wrong_size, not_64, bad_mask])).await;
    assert_eq!(status, 400, "{body}");
    let found = |t: &Value| {
        errors(&body)
            .iter()
            .find(|e| e["taskUUID"] == t["taskUUID"])
            .unwrap_or_else(|| panic!("no error for {}", t["taskUUID"]))
            .clone()
    };
    let e = found(&small_mask);
    assert_eq!(
        (e["code"].as_str(), e["parameter"].as_str()),
        (Some("invalidMaskImage"), Some("maskImage"))
    );
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("128x128") && message.contains("64x64"),
        "{message}"
    );
    let e = found(&wrong_size);
    assert_eq!(e["code"], "invalidOutpainting", "{e}");
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("192x128") && message.contains("Given: 128x128"),
        "{message}"
    );
    let e = found(&not_64);
    assert_eq!(e["code"], "invalidOutpainting", "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("multiple of 64"),
        "{e}"
    );
    assert_eq!(found(&bad_mask)["code"], "invalidMaskImage");

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_get_response_conflicts_async_delivery_and_restart() {
    let server = TestServer::start("rw-http-getresponse").await;
    let task =
        inference(json!({"numberResults": 2, "outputType": ["URL", "base64Data"], "seed": 7}));
    let id = uuid_of(&task);
    let (status, body) = post(&server, &json!([task])).await;
    assert_eq!(status, 200, "{body}");
    let mut first: Vec<Value> = data(&body).clone();
    first.sort_by_key(|i| i["seed"].as_u64());

    let get = json!([{"taskType": "getResponse", "taskUUID": id}]);
    let (status, body) = post(&server, &get).await;
    assert_eq!(status, 200, "{body}");
    let mut again: Vec<Value> = data(&body).clone();
    again.sort_by_key(|i| i["seed"].as_u64());
    assert_eq!(again.len(), 2);
    for (a, b) in again.iter().zip(&first) {
        assert_eq!(a["status"], "success");
        assert_eq!(a["taskType"], "imageInference");
        for field in [
            "taskUUID",
            "imageUUID",
            "imageURL",
            "imageBase64Data",
            "seed",
        ] {
            assert_eq!(a[field], b[field], "{field}");
        }
    }

    // A reused taskUUID is a conflict, over HTTP a 409.
    let (status, body) = post(&server, &json!([task])).await;
    assert_eq!(status, 409, "{body}");
    let e = &errors(&body)[0];
    assert_eq!(
        (e["code"].as_str(), e["taskUUID"].as_str()),
        (Some("conflictTaskUUID"), Some(id.as_str()))
    );

    // An unknown task.
    let (status, body) = post(
        &server,
        &json!([{"taskType": "getResponse", "taskUUID": new_uuid()}]),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(errors(&body)[0]["code"], "taskNotFound");

    // deliveryMethod async: acknowledged at once, fetched with getResponse.
    let later = inference(json!({"deliveryMethod": "async", "steps": 2}));
    let later_id = uuid_of(&later);
    let (status, body) = post(&server, &json!([later])).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        data(&body)[0],
        json!({"taskType": "imageInference", "taskUUID": later_id, "status": "processing"})
    );
    let (_, body) = post(
        &server,
        &json!([{"taskType": "getResponse", "taskUUID": later_id}]),
    )
    .await;
    let items = data(&body);
    assert_eq!(items.len(), 1, "{body}");
    assert_eq!(items[0]["status"], "success");
    assert!(items[0]["imageURL"].is_string());

    // Uploads are answered too.
    let upload_id = new_uuid();
    let upload = json!({"taskType": "imageUpload", "taskUUID": upload_id, "image": data_uri(&test_png(32, 32))});
    let (_, body) = post(&server, &json!([upload])).await;
    let uploaded = data(&body)[0].clone();

    // After a restart (a new port here), results and conflicts come from the job records.
    let server = server.restart().await;
    let (status, body) = post(&server, &get).await;
    assert_eq!(status, 200, "{body}");
    let mut after: Vec<Value> = data(&body).clone();
    after.sort_by_key(|i| i["seed"].as_u64());
    for (a, b) in after.iter().zip(&first) {
        assert_eq!(a["imageUUID"], b["imageUUID"]);
        assert_eq!(a["imageBase64Data"], b["imageBase64Data"]);
        let url = a["imageURL"].as_str().unwrap();
        assert!(
            url.starts_with(&server.url("/images/")),
            "links follow the server: {url}"
        );
        let (_, bytes) = fetch(url).await;
        assert_eq!(bytes, b64(a["imageBase64Data"].as_str().unwrap()));
    }
    let (_, body) = post(
        &server,
        &json!([{"taskType": "getResponse", "taskUUID": upload_id}]),
    )
    .await;
    assert_eq!(data(&body)[0]["imageUUID"], uploaded["imageUUID"]);
    assert_eq!(data(&body)[0]["taskType"], "imageUpload");
    let (status, _) = post(&server, &json!([task])).await;
    assert_eq!(status, 409);

    server.stop().await;
}

/// Bodies received by the test upload endpoint, by path.
type Received = Arc<Mutex<HashMap<String, (String, Vec<u8>)>>>;

/// A local server taking PUTs at `/ok/{name}` and failing them at `/fail/{name}`.
async fn upload_receiver() -> (String, Received) {
    async fn ok(
        State(got): State<Received>,
        Path(name): Path<String>,
        headers: HeaderMap,
        body: Bytes,
    ) -> StatusCode {
        let ct = headers["content-type"].to_str().unwrap_or("").to_string();
        got.lock().unwrap().insert(name, (ct, body.to_vec()));
        StatusCode::OK
    }
    let got: Received = Arc::default();
    let app = axum::Router::new()
        .route("/ok/{name}", axum::routing::put(ok))
        .route(
            "/fail/{name}",
            axum::routing::put(|| async { StatusCode::INTERNAL_SERVER_ERROR }),
        )
        .with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(axum::serve(listener, app).into_future());
    (base, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_include_cost_and_upload_endpoint() {
    let server = TestServer::start_with("rw-http-cost", |c| {
        c.pricing.per_image = 0.01;
        c.pricing.per_step = 0.001;
    })
    .await;
    let (receiver, received) = upload_receiver().await;

    let priced = inference(json!({"includeCost": true, "steps": 2}));
    let unpriced = inference(json!({}));
    let uploaded = inference(
        json!({"uploadEndpoint": format!("{receiver}/ok/one.png"), "outputFormat": "PNG"}),
    );
    let failing = inference(json!({"uploadEndpoint": format!("{receiver}/fail/two.png")}));
    let (status, body) = post(&server, &json!([priced, unpriced, uploaded, failing])).await;
    assert_eq!(status, 200, "{body}");
    let item = |t: &Value| {
        data(&body)
            .iter()
            .find(|i| i["taskUUID"] == t["taskUUID"])
            .cloned()
    };

    let expected = server
        .state
        .config()
        .pricing
        .cost("tiny-sd15", 1, 128, 128, 2, false);
    assert!(expected > 0.0);
    assert_eq!(item(&priced).unwrap()["cost"].as_f64(), Some(expected));
    assert!(item(&unpriced).unwrap().get("cost").is_none());

    let sent = item(&uploaded).unwrap();
    let (_, stored) = fetch(sent["imageURL"].as_str().unwrap()).await;
    let got = received
        .lock()
        .unwrap()
        .get("one.png")
        .cloned()
        .expect("the PUT arrived");
    assert_eq!(got.0, "image/png");
    assert_eq!(got.1, stored);

    assert!(item(&failing).is_none());
    let e = &errors(&body)[0];
    assert_eq!(e["taskUUID"], failing["taskUUID"]);
    assert_eq!(
        (e["code"].as_str(), e["parameter"].as_str()),
        (Some("uploadFailed"), Some("uploadEndpoint"))
    );

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_over_http_and_websocket() {
    let server = TestServer::start_with("rw-queue-full", |c| c.queue_capacity = 1).await;
    let long = json!({"steps": 3});

    // Two tasks of one request: one runs, the other is refused at once.
    let (a, b) = (inference(long.clone()), inference(long.clone()));
    let (status, body) = post(&server, &json!([a, b])).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(data(&body).len(), 1, "{body}");
    let errs = errors(&body);
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0]["code"], "serverBusy");
    let ran = &data(&body)[0]["taskUUID"];
    assert_ne!(&errs[0]["taskUUID"], ran);

    // Refused alone, over HTTP the status is 429. The queue is empty again, so fill it first.
    let blocker = inference(long.clone());
    let http = client();
    let blocking = {
        let url = server.url("/v1");
        let blocker = blocker.clone();
        let http = http.clone();
        tokio::spawn(async move {
            http.post(url)
                .bearer_auth(KEY)
                .json(&json!([blocker]))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    admitted(&server, 1).await;
    let (status, refused) = post(&server, &json!([inference(json!({}))])).await;
    assert_eq!(status, 429, "{refused}");
    assert_eq!(errors(&refused)[0]["code"], "serverBusy");
    assert_eq!(blocking.await.unwrap(), 200);

    // Over a WebSocket: each task gets its own answer.
    let (mut ws, _) = ws_auth(&server, None).await;
    let (a, b) = (inference(long.clone()), inference(long));
    ws_send(&mut ws, &json!([a, b])).await;
    let (images, errs) = ws_collect(&mut ws, 1, 1).await;
    assert_eq!(errs[0]["code"], "serverBusy");
    assert!(images.iter().all(|i| i["taskUUID"] != errs[0]["taskUUID"]));

    server.stop().await;
}

// ---- WebSocket ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_authentication_is_first_or_the_socket_closes() {
    let server = TestServer::start("rw-ws-auth").await;

    let refusals = [
        (
            json!([{"taskType": "ping", "ping": true}]).to_string(),
            "missingApiKey",
        ),
        (
            json!([{"taskType": "authentication", "apiKey": "wrong"}]).to_string(),
            "invalidApiKey",
        ),
        (
            json!([{"taskType": "authentication"}]).to_string(),
            "missingApiKey",
        ),
        ("{not json".to_string(), "invalidJSON"),
    ];
    for (first, code) in refusals {
        let mut ws = ws_connect(&server).await;
        ws.send(Message::text(first)).await.unwrap();
        let reply = ws_recv(&mut ws).await;
        let e = &errors(&reply)[0];
        assert_eq!(e["code"], code, "{reply}");
        assert_eq!(e["taskType"], "authentication");
        assert!(e.get("taskUUID").is_none());
        let (close, _) = ws_until_close(&mut ws, WAIT).await;
        assert_eq!(close, 1000);
    }

    // The SDKs' query string is ignored; the reply has exactly these two fields.
    let url = format!("{}?sdk=js&version=1.3.2", server.ws_url("/v1"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws_send(
        &mut ws,
        &json!([{"apiKey": KEY, "taskType": "authentication"}]),
    )
    .await;
    let reply = ws_recv(&mut ws).await;
    let item = data(&reply)[0].as_object().unwrap().clone();
    let mut keys: Vec<&str> = item.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["connectionSessionUUID", "taskType"]);

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_ping_and_many_tasks_in_flight_streamed_per_image() {
    let server = TestServer::start("rw-ws-stream").await;
    let (mut ws, _) = ws_auth(&server, None).await;
    let pong = json!({"data": [{"taskType": "ping", "pong": true}]});

    ws_send(&mut ws, &json!([{"taskType": "ping", "ping": true}])).await;
    assert_eq!(ws_recv(&mut ws).await, pong);
    // JSON in a binary frame; a protocol ping.
    let ping = json!([{"taskType": "ping", "ping": true}]).to_string();
    ws.send(Message::binary(ping.into_bytes())).await.unwrap();
    assert_eq!(ws_recv(&mut ws).await, pong);
    ws.send(Message::Ping(Bytes::from_static(b"hi")))
        .await
        .unwrap();
    let frame = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(frame, Message::Pong(Bytes::from_static(b"hi")));

    // Three tasks in two messages, one of them bad; a ping answered while they run.
    let a = inference(json!({"numberResults": 2, "steps": 2}));
    let b = inference(json!({"outputType": "base64Data"}));
    let c = inference(json!({}));
    let bad = inference(json!({"height": 100}));
    ws_send(&mut ws, &json!([a, b])).await;
    ws_send(
        &mut ws,
        &json!([c, bad, {"taskType": "ping", "ping": true}]),
    )
    .await;
    let (images, errs) = ws_collect(&mut ws, 4, 1).await;
    assert_eq!(errs[0]["taskUUID"], bad["taskUUID"]);
    assert_eq!(errs[0]["code"], "invalidHeight");
    let count = |t: &Value| {
        images
            .iter()
            .filter(|i| i["taskUUID"] == t["taskUUID"])
            .count()
    };
    assert_eq!((count(&a), count(&b), count(&c)), (2, 1, 1));
    let b_item = images
        .iter()
        .find(|i| i["taskUUID"] == b["taskUUID"])
        .unwrap();
    assert!(b_item["imageBase64Data"].is_string() && b_item.get("imageURL").is_none());

    // getResponse over the socket: all items in one message.
    ws_send(
        &mut ws,
        &json!([{"taskType": "getResponse", "taskUUID": a["taskUUID"]}]),
    )
    .await;
    let reply = ws_recv(&mut ws).await;
    assert_eq!(data(&reply).len(), 2, "{reply}");
    assert!(data(&reply).iter().all(|i| i["status"] == "success"));

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_idle_connections_are_closed() {
    let server = TestServer::start_with("rw-ws-idle", |c| c.runware.idle_timeout_secs = 1).await;
    let (mut ws, _) = ws_auth(&server, None).await;
    let started = std::time::Instant::now();
    let (code, seen) = ws_until_close(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(code, 1000);
    assert!(seen.is_empty());
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(5),
        "{waited:?}"
    );

    // Messages keep it open.
    let (mut ws, _) = ws_auth(&server, None).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        ws_send(&mut ws, &json!([{"taskType": "ping", "ping": true}])).await;
        assert_eq!(data(&ws_recv(&mut ws).await)[0]["pong"], true);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_results_survive_a_dropped_connection() {
    let server = TestServer::start("rw-ws-resume").await;
    let (mut ws, session) = ws_auth(&server, None).await;
    let task = inference(json!({"numberResults": 2, "steps": 3}));
    ws_send(&mut ws, &json!([task])).await;
    // Gone before the images are made.
    drop(ws);

    let (mut ws, resumed) = ws_auth(&server, Some(&session)).await;
    assert_eq!(resumed, session);
    let (images, _) = ws_collect(&mut ws, 2, 0).await;
    assert!(images.iter().all(|i| i["taskUUID"] == task["taskUUID"]));
    let seeds: std::collections::HashSet<u64> =
        images.iter().map(|i| i["seed"].as_u64().unwrap()).collect();
    assert_eq!(seeds.len(), 2);

    // An unknown session starts a new one.
    let (_, other) = ws_auth(&server, Some(&new_uuid())).await;
    assert_ne!(other, session);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_shutdown_refuses_new_tasks_and_delivers_running_ones() {
    let server = TestServer::start("rw-ws-shutdown").await;
    let state = server.state.clone();
    let (mut ws, _) = ws_auth(&server, None).await;
    let running = inference(json!({"numberResults": 2, "steps": 3}));
    ws_send(&mut ws, &json!([running])).await;
    admitted(&server, 1).await;

    let stopping = tokio::spawn(server.stop());
    while !state.shutdown_token().is_cancelled() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let late = inference(json!({}));
    ws_send(&mut ws, &json!([late])).await;
    let (code, seen) = ws_until_close(&mut ws, WAIT).await;
    assert_eq!(code, 1001);
    let images = seen
        .iter()
        .filter_map(|m| m["data"].as_array())
        .flatten()
        .filter(|i| i["taskUUID"] == running["taskUUID"])
        .count();
    assert_eq!(images, 2, "{seen:?}");
    let refused: Vec<&Value> = seen
        .iter()
        .filter_map(|m| m["errors"].as_array())
        .flatten()
        .collect();
    assert_eq!(refused.len(), 1, "{seen:?}");
    assert_eq!(refused[0]["code"], "serverShuttingDown");
    assert_eq!(refused[0]["taskUUID"], late["taskUUID"]);
    stopping.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_client_that_leaves_cancels_its_task() {
    let server = TestServer::start("rw-http-cancel").await;
    let task = inference(json!({"steps": 40, "numberResults": 4}));
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let sent = impatient
        .post(server.url("/v1"))
        .bearer_auth(KEY)
        .json(&json!([task]))
        .send()
        .await;
    assert!(sent.is_err(), "the request times out on the client");
    let deadline = std::time::Instant::now() + WAIT;
    while server.state.engine().stats().cancelled == 0 {
        assert!(std::time::Instant::now() < deadline, "the job is cancelled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, body) = post(
        &server,
        &json!([{"taskType": "getResponse", "taskUUID": task["taskUUID"]}]),
    )
    .await;
    let e = &errors(&body)[0];
    assert_eq!(e["code"], "taskCancelled", "{body}");
    assert_eq!(e["taskUUID"], task["taskUUID"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_results_are_kept_only_for_the_resume_window() {
    let server = TestServer::start_with("rw-ws-expiry", |c| c.runware.resume_buffer_secs = 1).await;
    let (mut ws, session) = ws_auth(&server, None).await;
    ws_send(&mut ws, &json!([inference(json!({"steps": 2}))])).await;
    drop(ws);
    let deadline = std::time::Instant::now() + WAIT;
    while server.state.engine().stats().completed == 0 {
        assert!(std::time::Instant::now() < deadline, "the job completes");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (mut ws, resumed) = ws_auth(&server, Some(&session)).await;
    assert_ne!(resumed, session, "the session expired with its results");
    ws_send(&mut ws, &json!([{"taskType": "ping", "ping": true}])).await;
    assert_eq!(
        data(&ws_recv(&mut ws).await)[0]["taskType"],
        "ping",
        "nothing else was kept"
    );
    server.stop().await;
}

/// The 8-bit golden image `images` [1, H, W, 3] of a manifest case, and how far `image` is from
/// it in levels. The server's PNG holds the pipeline's f32 image rounded as diffusers rounds its
/// PIL output; the two f32 images differ by ~1e-5, which moves a value sitting at a rounding
/// boundary by one level.
fn levels_from_golden(image: &image::RgbImage, file: &str) -> u8 {
    let golden = common::load_goldens(file);
    let golden = golden["images"]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    assert_eq!(golden.len(), image.as_raw().len(), "{file}: size");
    golden
        .iter()
        .zip(image.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_vae_override_gives_the_diffusers_image() {
    let server = TestServer::start("rw-http-vae").await;
    let m = common::manifest();
    let case = m["vae_override"]["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "txt2img_128")
        .expect("the 128x128 VAE override case");
    let task = |vae: Value| {
        inference(json!({
            "positivePrompt": case["prompt"], "negativePrompt": case["negative_prompt"],
            "width": case["width"], "height": case["height"], "steps": case["steps"],
            "CFGScale": case["guidance"], "seed": case["seed"],
            "scheduler": "EulerDiscreteScheduler", "vae": vae,
            "outputFormat": "PNG", "outputType": "base64Data",
        }))
    };
    let image =
        |body: &Value| decode(&b64(data(body)[0]["imageBase64Data"].as_str().unwrap())).to_rgb8();
    // By AIR id (an alias), and without one.
    let (status, body) = post(&server, &json!([task(json!("civitai:88156@199239"))])).await;
    assert_eq!(status, 200, "{body}");
    let with_vae = image(&body);
    let levels = levels_from_golden(&with_vae, case["file"].as_str().unwrap());
    assert!(levels <= 1, "{levels} levels from the diffusers image");
    let (_, body) = post(&server, &json!([task(Value::Null)])).await;
    let own = image(&body);
    assert_ne!(own, with_vae, "the VAE changes the image");
    // The same VAE from its single file: the same image.
    let (_, body) = post(&server, &json!([task(json!("tiny-sd15-vae-alt-single"))])).await;
    assert_eq!(image(&body), with_vae);

    // Unknown VAEs and VAEs of another latent space are refused in Runware's shape.
    let mut wrong_family = task(json!("tiny-sd15-vae-alt"));
    wrong_family["model"] = json!("tiny-sdxl");
    let (_, body) = post(&server, &json!([task(json!("civitai:1@2")), wrong_family])).await;
    let errs = errors(&body);
    assert_eq!(errs.len(), 2, "{body}");
    for (e, says) in errs.iter().zip([
        "unknown VAE `civitai:1@2`",
        "VAE `tiny-sd15-vae-alt` is for sd1 models, but model `tiny-sdxl` is sdxl",
    ]) {
        assert_eq!(e["code"], "invalidVae", "{e}");
        assert_eq!(e["parameter"], "vae", "{e}");
        assert_eq!(e["type"], "string", "{e}");
        assert!(e["message"].as_str().unwrap().contains(says), "{e}");
    }
    server.stop().await;
}

/// The tiny SDXL base and its refiner (fixture registry ids).
const SDXL: &str = "tiny-sdxl";
const REFINER: &str = "tiny-sdxl-refiner";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_refiner_takes_over_and_bad_refiners_are_refused() {
    let server = TestServer::start("rw-http-refiner").await;
    let refined = |refiner: Value| {
        inference(json!({
            "model": SDXL, "steps": 4, "seed": 99, "outputFormat": "PNG",
            "outputType": "base64Data", "refiner": refiner,
        }))
    };
    let image_of = |body: &Value| {
        let item = &data(body)[0];
        decode(&b64(item["imageBase64Data"].as_str().unwrap())).to_rgb8()
    };
    let mut images = Vec::new();
    for task in [
        refined(json!({"model": REFINER, "startStep": 2})),
        refined(json!({"model": REFINER, "startStepPercentage": 50})),
        refined(json!({"model": REFINER, "startStep": 3})),
        refined(Value::Null),
        refined(json!({})),
    ] {
        let (status, body) = post(&server, &json!([task])).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(data(&body)[0]["seed"], 99);
        images.push(image_of(&body));
    }
    assert_eq!(
        images[0], images[1],
        "startStep 2 of 4 is startStepPercentage 50"
    );
    assert_ne!(images[0], images[2], "a later start changes the image");
    assert_ne!(images[0], images[3], "the refiner changes the image");
    assert_eq!(
        images[3], images[4],
        "an empty `refiner` object is no refiner"
    );

    // The same request in process: base then refiner, decoded by the refiner's VAE.
    let base = common::pipeline(SDXL);
    let refiner = common::pipeline(REFINER);
    let mut req = sd_serve::pipeline::GenerationRequest::new("a red fox in the snow");
    (req.width, req.height, req.steps, req.seed) = (128, 128, 4, 99);
    req.guidance_scale = 7.0; // Runware's default CFGScale
    req.refiner = Some(sd_serve::pipeline::Refiner {
        model: REFINER.into(),
        start: 0.5,
    });
    let out = base
        .generate_refined(&refiner, &req, &mut |_, _| true)
        .unwrap();
    assert_eq!(
        out.to_rgb().unwrap()[0],
        images[0],
        "the server runs the library's path"
    );

    let cases: Vec<(Value, &str, &[&str])> = vec![
        (
            json!({"model": "no-such-refiner", "startStep": 2}),
            "invalidRefiner",
            &["no-such-refiner", REFINER],
        ),
        (
            json!({"model": "tiny-sd15", "startStep": 2}),
            "invalidRefiner",
            &["tiny-sd15", "sd1", "not an SDXL refiner"],
        ),
        (
            json!({"model": REFINER, "startStep": 1}),
            "invalidRefiner",
            &["startStep", "2", "4"],
        ),
        (
            json!({"model": REFINER, "startStep": 5}),
            "invalidRefiner",
            &["startStep", "Given: 5"],
        ),
        (
            json!({"model": REFINER, "startStepPercentage": 0}),
            "invalidRefiner",
            &["startStepPercentage", "1", "99"],
        ),
        (
            json!({"model": REFINER, "startStepPercentage": 100}),
            "invalidRefiner",
            &["startStepPercentage", "99"],
        ),
        (
            json!({"model": REFINER, "startStep": 2, "startStepPercentage": 50}),
            "invalidRefiner",
            &["alternatives"],
        ),
        (
            json!({"model": REFINER}),
            "missingRefiner",
            &["startStep", "startStepPercentage"],
        ),
        (
            json!({"startStep": 2}),
            "missingRefiner",
            &["refiner.model"],
        ),
        (
            json!({"model": REFINER, "startStep": 2, "aestheticScore": 7}),
            "invalidRefiner",
            &["aestheticScore"],
        ),
        (json!("tiny-sdxl-refiner"), "invalidRefiner", &["object"]),
    ];
    let mut tasks: Vec<Value> = cases.iter().map(|(r, _, _)| refined(r.clone())).collect();
    // An SD1 model takes no refiner.
    tasks.push(inference(
        json!({"refiner": {"model": REFINER, "startStep": 2}, "steps": 4}),
    ));
    let (status, body) = post(&server, &Value::Array(tasks.clone())).await;
    assert_eq!(status, 400, "{body}");
    let errs = errors(&body);
    assert_eq!(errs.len(), tasks.len(), "{body}");
    let expected = cases
        .iter()
        .map(|(_, code, words)| (*code, *words))
        .chain([("invalidRefiner", &["only with SDXL", "sd1"][..])]);
    for ((code, words), task) in expected.zip(&tasks) {
        let e = errs
            .iter()
            .find(|e| e["taskUUID"] == task["taskUUID"])
            .unwrap_or_else(|| panic!("no error for {}", task["refiner"]));
        assert_eq!(e["code"], code, "{}: {e}", task["refiner"]);
        assert_eq!(e["parameter"], "refiner", "{e}");
        assert_eq!(e["type"], "object", "{e}");
        let message = e["message"].as_str().unwrap();
        for word in words {
            assert!(message.contains(word), "{}: {message}", task["refiner"]);
        }
    }
    // A refiner does not generate alone.
    let alone = inference(json!({"model": REFINER, "steps": 4}));
    let (status, body) = post(&server, &json!([alone])).await;
    assert_eq!(status, 400, "{body}");
    let e = &errors(&body)[0];
    assert_eq!(e["code"], "invalidModel", "{e}");
    assert_eq!(e["parameter"], "model", "{e}");
    assert!(e["message"].as_str().unwrap().contains("refiner"), "{e}");
    server.stop().await;
}
