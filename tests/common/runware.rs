//! Helpers of the Runware image tests (ControlNet, IP-Adapter): guide images and one-task
//! `imageInference` payloads against a [`TestServer`].

use base64::Engine as _;
use serde_json::{json, Value};

use super::server::{client, TestServer, KEY};

/// A PNG of `w` x `h`: a bright disc on a dark ground (strong edges), shifted by `offset`.
pub fn disc_png(w: u32, h: u32, offset: i64) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let dx = x as i64 - (w as i64 / 2 + offset);
        let dy = y as i64 - h as i64 / 2;
        if dx * dx + dy * dy < (w as i64 / 4).pow(2) {
            image::Rgb([230, 200, 40])
        } else {
            image::Rgb([20, 30, 60])
        }
    });
    encode(image::DynamicImage::ImageRgb8(img))
}

/// `img` as PNG bytes.
pub fn encode(img: image::DynamicImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn data_uri(png: &[u8]) -> String {
    format!("data:image/png;base64,{}", b64(png))
}

pub async fn runware(server: &TestServer, body: &Value) -> (u16, Value) {
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

pub fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A 128x128, 2-step imageInference on tiny-sd15 with base64 output, `extra` merged in.
pub fn inference(extra: Value) -> Value {
    let mut task = json!({
        "taskType": "imageInference",
        "taskUUID": new_uuid(),
        "positivePrompt": "a red fox in the snow",
        "negativePrompt": "blurry",
        "model": "tiny-sd15",
        "width": 128,
        "height": 128,
        "steps": 2,
        "seed": 11,
        "outputType": "base64Data",
        "outputFormat": "PNG",
    });
    for (k, v) in extra.as_object().unwrap() {
        task[k] = v.clone();
    }
    task
}

/// The image of a one-task Runware payload that must succeed.
pub async fn runware_image(server: &TestServer, task: Value) -> Vec<u8> {
    let (status, body) = runware(server, &json!([task])).await;
    assert_eq!(status, 200, "{body}");
    let item = &body["data"][0];
    base64::engine::general_purpose::STANDARD
        .decode(
            item["imageBase64Data"]
                .as_str()
                .unwrap_or_else(|| panic!("{body}")),
        )
        .unwrap()
}
