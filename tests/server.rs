//! The server's shared routes on the tiny models: health, stored images, unknown routes, and a
//! graceful stop.

mod common;

use common::server::{client, TestServer};
use sd_serve::api::media::ImageFormat;
use sd_serve::api::OutputSpec;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_images_and_unknown_routes() {
    let server = TestServer::start("shared-routes").await;
    let http = client();

    let health: serde_json::Value = http
        .get(server.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["queue"]["queued"], 0);

    // A stored image is served at its link with its content type; other names are not found.
    let img =
        image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(8, 8, image::Rgb([1, 2, 3])));
    let (id, bytes) = server
        .state
        .store_image(img, OutputSpec::default())
        .await
        .unwrap();
    let url = server.state.image_url(id, ImageFormat::Png);
    assert_eq!(url, server.url(&format!("/images/{id}.png")));
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(r.bytes().await.unwrap().as_ref(), bytes.as_slice());
    for missing in [
        format!("/images/{id}.jpg"),
        "/images/..%2Fjobs.sqlite3".to_string(),
        "/images/00000000-0000-4000-8000-000000000000.png".to_string(),
    ] {
        let r = http.get(server.url(&missing)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{missing}");
    }
    let r = http.get(server.url("/no/such/route")).send().await.unwrap();
    assert_eq!(r.status(), 404);

    server.stop().await;
}
