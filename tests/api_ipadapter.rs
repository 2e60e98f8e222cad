//! IP-Adapters through Runware's `ipAdapters` against a real server on the tiny models and
//! IP-Adapters: the reference image changes the output (by UUID and data URI alike), the same
//! request repeats exactly, weights and several adapters are honoured, and bad items are
//! refused in Runware's shape naming `ipAdapters`.

mod common;

use common::runware::{data_uri, disc_png, inference, new_uuid, runware, runware_image};
use common::server::TestServer;
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
