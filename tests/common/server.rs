//! A real sd-serve server on an ephemeral loopback port, serving the tiny fixture models, for the
//! dialect tests: clients talk to it over TCP exactly as they would to a deployment.

use std::net::SocketAddr;
use std::time::Duration;

use sd_serve::api::{AppState, Server};
use sd_serve::config::ServerConfig;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{fixtures, scratch, setup, Scratch};

/// The API key every test server accepts.
pub const KEY: &str = "test-key-0123456789";

/// Generous: the machine running the tests may be shared; a tiny job takes well under a second.
pub const WAIT: Duration = Duration::from_secs(120);

/// A running server; dropping it stops it without waiting (use [`TestServer::stop`] to wait).
pub struct TestServer {
    pub addr: SocketAddr,
    pub state: AppState,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    /// The data folder (images, job records); removed when the server is dropped, unless
    /// [`TestServer::stop`] hands it back or [`TestServer::restart`] reuses it.
    data: Option<Scratch>,
}

/// The configuration tests start from: tiny models, CPU, one key, private URLs allowed (the
/// tests' own webhook and image servers are on loopback), a fresh data folder.
pub fn test_config(data_dir: &std::path::Path) -> ServerConfig {
    let mut config = ServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        models: Some(fixtures().join("models.toml")),
        api_keys: vec![KEY.to_string()],
        data_dir: data_dir.to_path_buf(),
        devices: vec!["cpu".to_string()],
        ..ServerConfig::default()
    };
    config.media.allow_private_urls = true;
    config.shutdown_grace_secs = 60;
    config
}

impl TestServer {
    /// Starts a server with the test configuration.
    pub async fn start(name: &str) -> TestServer {
        Self::start_with(name, |_| {}).await
    }

    /// Starts a server with the test configuration changed by `tweak`.
    pub async fn start_with(name: &str, tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
        setup();
        let data = scratch(&format!("server-{name}"));
        let mut config = test_config(&data);
        tweak(&mut config);
        Self::start_config(config, data).await
    }

    /// Starts a server on `config` whose data folder is `data`.
    pub async fn start_config(config: ServerConfig, data: Scratch) -> TestServer {
        let server = Server::bind(config.clone()).await.expect("server binds");
        let addr = server.local_addr();
        let state = server.state().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .run(async move {
                    let _ = stopped.await;
                })
                .await
                .expect("server runs");
        });
        TestServer {
            addr,
            base: format!("http://{addr}"),
            state,
            stop: Some(stop),
            task: Some(task),
            data: Some(data),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `ws://127.0.0.1:PORT{path}`
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// The data folder.
    pub fn data_dir(&self) -> &std::path::Path {
        self.data
            .as_ref()
            .expect("data folder present while running")
    }

    /// Shuts down gracefully, waits until the server has finished, and hands back its data
    /// folder (a new server can be started on it to test a restart).
    pub async fn stop(mut self) -> Scratch {
        self.shut_down().await;
        self.data.take().expect("data folder present until stopped")
    }

    /// Stops gracefully, then starts a new server with the same configuration on the same data
    /// folder (on a new port), as an operator restarting it would.
    pub async fn restart(mut self) -> TestServer {
        self.shut_down().await;
        let config = self.state.config().clone();
        let data = self
            .data
            .take()
            .expect("the data folder is kept until the server drops");
        Self::start_config(config, data).await
    }

    async fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("server stops in time")
                .expect("server task");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// An HTTP client for tests: no proxy, generous timeout.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(WAIT)
        .build()
        .expect("http client")
}

/// Decodes a PNG/JPEG/WebP body, panicking with the body's start when it is not an image.
pub fn decode(bytes: &[u8]) -> image::DynamicImage {
    image::load_from_memory(bytes).unwrap_or_else(|e| {
        panic!(
            "not an image ({e}): {:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        )
    })
}
