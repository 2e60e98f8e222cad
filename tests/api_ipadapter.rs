//! IP-Adapters through Runware's `ipAdapters` and ModelsLab's `ip_adapter_*` fields against a
//! real server on the tiny models and IP-Adapters: the reference image changes the output (by
//! UUID and data URI alike), the same request repeats exactly, weights and several adapters are
//! honoured, and bad items are refused in each dialect's shape naming the field.

mod common;

use common::runware::{b64, data_uri, disc_png, inference, new_uuid, runware, runware_image};
use common::server::{client, TestServer, KEY};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Runware

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runware_ip_adapters_guide_the_image() {
    let server = TestServer::start("ip-runware").await;

    let upload = json!({"taskType": "imageUpload", "taskUUID": new_uuid(),
                        "image": data_uri(&disc_png(96, 80, 0))});
    let (status, body) = runware(&server, &json!([upload])).await;
    assert_eq!(status, 200, "{body}");
    let guide_uuid = body["data"][0]["imageUUID"].as_str().unwrap().to_string();

    let plain = runware_image(&server, inference(json!({}))).await;
    let unit = |guide: &str, weight: f64| json!({"ipAdapters": [{"model": "runware:55@5", "guideImage": guide, "weight": weight}]});
    let guided = runware_image(&server, inference(unit(&guide_uuid, 1.0))).await;
    assert_ne!(plain, guided, "the IP-Adapter changes the image");
    let again = runware_image(&server, inference(unit(&guide_uuid, 1.0))).await;
    assert_eq!(guided, again, "same request, same bytes");
    let as_uri = runware_image(
        &server,
        inference(unit(&data_uri(&disc_png(96, 80, 0)), 1.0)),
    )
    .await;
    assert_eq!(guided, as_uri, "the same pixels by data URI");
    let other = runware_image(
        &server,
        inference(unit(&data_uri(&disc_png(96, 80, 30)), 1.0)),
    )
    .await;
    assert_ne!(guided, other, "the reference image matters");
    let half = runware_image(&server, inference(unit(&guide_uuid, 0.5))).await;
    assert_ne!(half, guided, "the weight matters");
    let zero = runware_image(&server, inference(unit(&guide_uuid, 0.0))).await;
    assert_eq!(zero, plain, "weight 0 is no adapter");
    // Plain and plus together, by registry id.
    let two = runware_image(
        &server,
        inference(json!({"ipAdapters": [
            {"model": "tiny-ip-adapter_sd15", "guideImage": guide_uuid},
            {"model": "tiny-ip-adapter-plus_sd15", "guideImage": guide_uuid, "weight": 0.7}]})),
    )
    .await;
    assert_ne!(two, guided);

    let item = |extra: Value| {
        let mut unit = json!({"model": "tiny-ip-adapter_sd15", "guideImage": guide_uuid});
        for (k, v) in extra.as_object().unwrap() {
            unit[k] = v.clone();
        }
        json!({"ipAdapters": [unit]})
    };
    let cases = [
        (
            item(json!({"weight": 1.5})),
            "invalidIpAdapters",
            "ipAdapters.weight",
        ),
        (
            item(json!({"weight": -0.1})),
            "invalidIpAdapters",
            "ipAdapters.weight",
        ),
        (
            item(json!({"weight": "high"})),
            "invalidIpAdapters",
            "ipAdapters.weight",
        ),
        (
            item(json!({"model": "runware:55@1"})),
            "invalidIpAdapters",
            "unknown IP-Adapter",
        ),
        (
            item(json!({"model": "tiny-ip-adapter_sdxl"})),
            "invalidIpAdapters",
            "sdxl",
        ),
        (
            item(json!({"guideImage": new_uuid()})),
            "invalidIpAdapters",
            "UUID",
        ),
        (
            item(json!({"scale": 0.5})),
            "unsupportedParameter",
            "ipAdapters.scale",
        ),
        (
            json!({"ipAdapters": [{"guideImage": "abc"}]}),
            "missingIpAdapters",
            "model",
        ),
        (
            json!({"ipAdapters": [{"model": "tiny-ip-adapter_sd15"}]}),
            "missingIpAdapters",
            "guideImage",
        ),
        (
            json!({"ipAdapters": {"model": "x"}}),
            "invalidIpAdapters",
            "array",
        ),
        (json!({"ipAdapters": ["x"]}), "invalidIpAdapters", "object"),
    ];
    for (extra, code, needle) in cases {
        let (_, body) = runware(&server, &json!([inference(extra.clone())])).await;
        let error = &body["errors"][0];
        assert_eq!(error["code"], code, "{extra}: {body}");
        assert_eq!(error["parameter"], "ipAdapters", "{extra}: {body}");
        assert_eq!(error["taskType"], "imageInference");
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(needle), "`{needle}` not in {message}");
    }
}

// ---------------------------------------------------------------------------------------------
// ModelsLab

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

/// The first output's bytes and the answer.
async fn modelslab_image(server: &TestServer, path: &str, body: &Value) -> (Vec<u8>, Value) {
    let r = modelslab(server, path, body).await;
    assert_eq!(r["status"], "success", "{r}");
    let url = r["output"][0].as_str().unwrap();
    let got = client().get(url).send().await.unwrap();
    assert_eq!(got.status(), 200, "{url}");
    (got.bytes().await.unwrap().to_vec(), r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modelslab_ip_adapter_fields_guide_the_image() {
    let server = TestServer::start("ip-modelslab").await;
    const TEXT2IMG: &str = "/api/v6/images/text2img";
    let reference = b64(&disc_png(96, 80, 0));
    let body = |extra: Value| {
        let mut b = json!({"key": KEY, "model_id": "tiny-sd15", "prompt": "a fox",
            "negative_prompt": "blurry", "width": 64, "height": 64,
            "num_inference_steps": "2", "seed": "11",
            "ip_adapter_id": "tiny-ip-adapter_sd15", "ip_adapter_image": reference});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                b.as_object_mut().unwrap().remove(k);
            } else {
                b[k] = v.clone();
            }
        }
        b
    };
    let none = json!({"ip_adapter_id": null, "ip_adapter_image": null});
    let (plain, r) = modelslab_image(&server, TEXT2IMG, &body(none.clone())).await;
    assert!(r["meta"]["ip_adapter_id"].is_null(), "{}", r["meta"]);
    let (guided, r) = modelslab_image(&server, TEXT2IMG, &body(json!({}))).await;
    let meta = &r["meta"];
    assert_eq!(meta["ip_adapter_id"], "tiny-ip-adapter_sd15", "{meta}");
    assert_eq!(meta["ip_adapter_scale"], 1.0, "{meta}");
    assert_eq!(meta["ip_adapter_image"], "(base64 image)", "{meta}");
    assert_ne!(plain, guided, "the IP-Adapter changes the image");
    let (again, _) = modelslab_image(&server, TEXT2IMG, &body(json!({}))).await;
    assert_eq!(guided, again, "same request, same bytes");

    let (other, _) = modelslab_image(
        &server,
        TEXT2IMG,
        &body(json!({"ip_adapter_image": data_uri(&disc_png(96, 80, 30))})),
    )
    .await;
    assert_ne!(other, guided, "the reference image matters");
    let (half, r) =
        modelslab_image(&server, TEXT2IMG, &body(json!({"ip_adapter_scale": "0.5"}))).await;
    assert_eq!(r["meta"]["ip_adapter_scale"], 0.5);
    assert_ne!(half, guided, "the scale matters");
    let (zero, _) = modelslab_image(&server, TEXT2IMG, &body(json!({"ip_adapter_scale": 0}))).await;
    assert_eq!(zero, plain, "scale 0 is no adapter");
    // By alias, and on img2img too.
    let (by_alias, _) = modelslab_image(
        &server,
        TEXT2IMG,
        &body(json!({"ip_adapter_id": "runware:55@5"})),
    )
    .await;
    assert_eq!(by_alias, guided);
    let img2img = body(json!({"init_image": b64(&disc_png(64, 64, 5)), "strength": 0.6}));
    let (guided_i2i, _) = modelslab_image(&server, "/api/v6/images/img2img", &img2img).await;
    let mut plain_i2i = img2img.clone();
    plain_i2i.as_object_mut().unwrap().remove("ip_adapter_id");
    plain_i2i
        .as_object_mut()
        .unwrap()
        .remove("ip_adapter_image");
    let (unguided_i2i, _) = modelslab_image(&server, "/api/v6/images/img2img", &plain_i2i).await;
    assert_ne!(guided_i2i, unguided_i2i);

    for (extra, needle) in [
        (
            json!({"ip_adapter_id": "nope"}),
            "`ip_adapter_id`: unknown IP-Adapter",
        ),
        (
            json!({"ip_adapter_id": "tiny-ip-adapter_sdxl"}),
            "is for sdxl models",
        ),
        (json!({"ip_adapter_scale": "1.5"}), "ip_adapter_scale"),
        (json!({"ip_adapter_scale": "-0.1"}), "ip_adapter_scale"),
        (json!({"ip_adapter_scale": "high"}), "ip_adapter_scale"),
        (
            json!({"ip_adapter_image": null}),
            "`ip_adapter_image` is required with `ip_adapter_id`",
        ),
        (
            json!({"ip_adapter_image": "not base64!"}),
            "`ip_adapter_image`",
        ),
        (
            json!({"ip_adapter_id": null}),
            "`ip_adapter_image` needs `ip_adapter_id`",
        ),
        (
            json!({"ip_adapter_id": null, "ip_adapter_image": null, "ip_adapter_scale": 0.5}),
            "`ip_adapter_scale` needs `ip_adapter_id`",
        ),
    ] {
        let r = modelslab(&server, TEXT2IMG, &body(extra.clone())).await;
        assert_eq!(r["status"], "error", "{extra}: {r}");
        let message = r["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "`{needle}` not in {r}");
    }
    server.stop().await;
}
