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

fn request(steps: usize, size: usize) -> sd_serve::pipeline::GenerationRequest {
    let mut r = sd_serve::pipeline::GenerationRequest::new("a lighthouse at dusk");
    r.steps = steps;
    r.width = size;
    r.height = size;
    r.seed = 7;
    r
}

/// Waits until the engine runs a job.
async fn until_running(server: &TestServer) {
    let deadline = tokio::time::Instant::now() + common::server::WAIT;
    while server.state.engine().stats().running == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_running_work_and_stores_its_images() {
    let server = TestServer::start("graceful-finish").await;
    let state = server.state.clone();
    let running = state
        .submit("tiny-sd15", request(12, 128), OutputSpec::default())
        .unwrap();
    let job = tokio::spawn(running.collect());
    until_running(&server).await;

    let data = server.stop().await;

    let images = job.await.unwrap().expect("the running job finished");
    assert_eq!(images.len(), 1);
    let stored = state.store().image_by_id(images[0].id).unwrap().unwrap();
    assert!(stored.path.starts_with(&*data));
    assert_eq!(std::fs::read(&stored.path).unwrap(), *images[0].bytes);
    // Nothing is admitted once shutdown has begun.
    let refused = state
        .submit("tiny-sd15", request(1, 64), OutputSpec::default())
        .unwrap_err();
    assert_eq!(refused.kind, sd_serve::api::JobErrorKind::ShuttingDown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_past_its_deadline_cancels_running_work() {
    let server = TestServer::start_with("graceful-deadline", |c| c.shutdown_grace_secs = 0).await;
    let state = server.state.clone();
    let running = state
        .submit("tiny-sd15", request(100, 256), OutputSpec::default())
        .unwrap();
    let job = tokio::spawn(running.collect());
    until_running(&server).await;

    let started = std::time::Instant::now();
    server.stop().await;
    let err = job
        .await
        .unwrap()
        .expect_err("a 100-step 256x256 job cannot finish at once");
    assert_eq!(err.kind, sd_serve::api::JobErrorKind::Cancelled);
    // Stopped after the step in progress, not after the whole job.
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    assert_eq!(state.engine().stats().cancelled, 1);
}

/// The binary on SIGTERM: stops listening and exits cleanly.
#[cfg(unix)]
#[test]
fn serve_binary_stops_on_sigterm() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let data = common::scratch("serve-sigterm");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sd-serve"))
        .args(["serve", "--listen", "127.0.0.1:0", "--device", "cpu"])
        .arg("--models")
        .arg(common::fixtures().join("models.toml"))
        .arg("--data-dir")
        .arg(&*data)
        .args(["--api-key", "k"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("sd-serve starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("sd-serve listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    std::net::TcpStream::connect(&addr).expect("the server accepts connections");

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no exit after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(std::net::TcpStream::connect(&addr).is_err());
}
