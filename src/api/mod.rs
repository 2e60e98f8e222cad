//! The HTTP and WebSocket server: four dialects over one engine.
//!
//! Each dialect module parses its wire format into a [`GenerationRequest`], submits it through
//! [`AppState::submit`] and renders the stored images (or its own error shape) back; none of them
//! touches a tensor. What they share lives here: the state, API keys, image links, the route
//! serving stored images, and the server's life (bind, serve, graceful shutdown).
//!
//! [`GenerationRequest`]: crate::pipeline::GenerationRequest

pub mod auth;
pub mod bearer;
pub mod control;
pub mod media;
pub mod modelslab;
pub mod output;
pub mod params;
pub mod runware;
pub mod sinkin;

use std::future::{Future, IntoFuture as _};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ServerConfig;
use crate::engine::{Engine, EngineConfig, JobLimits};
use crate::registry::Registry;
use crate::store::{ImageId, Store};
use crate::{Error, Result};

pub use auth::ApiKeys;
pub use media::MediaLimits;
pub use output::{JobError, JobErrorKind, OutputSpec, Produced, Running};

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

struct Inner {
    config: ServerConfig,
    registry: Arc<Registry>,
    engine: Arc<Engine>,
    store: Arc<Store>,
    keys: ApiKeys,
    media: MediaLimits,
    base_url: String,
    /// Work that outlives its request (ModelsLab jobs answered "processing", webhooks, Runware
    /// WebSocket tasks); shutdown waits for it so that no finished image is lost.
    tasks: TaskTracker,
    /// Cancelled when the server starts shutting down.
    shutdown: CancellationToken,
    /// Dialect state that lives as long as the server (Runware WebSocket sessions).
    runware: runware::Sessions,
    /// The model-based preprocessors loaded so far, and the device they run on (the engine's
    /// first).
    detectors: control::Detectors,
    detector_device: candle_core::Device,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("base_url", &self.0.base_url)
            .finish_non_exhaustive()
    }
}

impl AppState {
    pub fn config(&self) -> &ServerConfig {
        &self.0.config
    }
    pub fn registry(&self) -> &Arc<Registry> {
        &self.0.registry
    }
    pub(crate) fn detectors(&self) -> &control::Detectors {
        &self.0.detectors
    }
    pub(crate) fn detector_device(&self) -> &candle_core::Device {
        &self.0.detector_device
    }
    pub fn engine(&self) -> &Arc<Engine> {
        &self.0.engine
    }
    pub fn store(&self) -> &Arc<Store> {
        &self.0.store
    }
    pub fn keys(&self) -> &ApiKeys {
        &self.0.keys
    }
    pub fn media(&self) -> &MediaLimits {
        &self.0.media
    }
    /// Base of image links, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.0.base_url
    }
    pub fn tasks(&self) -> &TaskTracker {
        &self.0.tasks
    }
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.0.shutdown
    }
    pub fn runware_sessions(&self) -> &runware::Sessions {
        &self.0.runware
    }

    /// Runs `future` beside the request that started it; shutdown waits for it.
    pub fn spawn_task<F>(&self, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.0.tasks.spawn(future);
    }
}

/// A random seed in `1..=max`, for requests that leave the seed to the server.
pub fn random_seed(max: u64) -> u64 {
    use rand::Rng;
    rand::rng().random_range(1..=max.max(1))
}

/// Every route of every dialect, plus stored images at `/images/{id}.{ext}` and `/health`.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config().limits.max_body_bytes;
    Router::new()
        .route("/images/{file}", get(serve_image))
        .route("/health", get(health))
        .merge(sinkin::routes())
        .merge(modelslab::routes())
        .merge(bearer::routes())
        .merge(runware::routes())
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

async fn health(State(state): State<AppState>) -> impl IntoResponse {
    let stats = state.engine().stats();
    Json(serde_json::json!({
        "status": if state.shutdown_token().is_cancelled() { "shutting_down" } else { "ok" },
        "queue": serde_json::to_value(stats).unwrap_or_default(),
    }))
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({"error": "no such route"})),
    )
        .into_response()
}

/// `GET /images/{uuid}.{ext}`: a stored image. The file name is parsed into an id and format;
/// the path is rebuilt from those, never from what the client sent.
async fn serve_image(State(state): State<AppState>, Path(file): Path<String>) -> Response {
    let missing = || (StatusCode::NOT_FOUND, "image not found").into_response();
    let Some((id, format)) = ImageId::parse_file_name(&file) else {
        return missing();
    };
    let store = state.store().clone();
    let found = tokio::task::spawn_blocking(move || store.image_by_id(id)).await;
    let stored = match found {
        Ok(Ok(Some(stored))) if stored.format == format => stored,
        Ok(Ok(_)) => return missing(),
        Ok(Err(e)) => {
            tracing::error!("image lookup failed: {e}");
            return (StatusCode::INTERNAL_SERVER_ERROR, "image lookup failed").into_response();
        }
        Err(e) => {
            tracing::error!("image lookup task failed: {e}");
            return (StatusCode::INTERNAL_SERVER_ERROR, "image lookup failed").into_response();
        }
    };
    match tokio::fs::read(&stored.path).await {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, stored.content_type),
                (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
            ],
            bytes,
        )
            .into_response(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing(),
        Err(e) => {
            tracing::error!("reading {} failed: {e}", stored.path.display());
            (StatusCode::INTERNAL_SERVER_ERROR, "image read failed").into_response()
        }
    }
}

/// A bound server, ready to run.
pub struct Server {
    listener: TcpListener,
    state: AppState,
    grace: Duration,
}

impl Server {
    /// Reads the registry, opens the store, starts the engine and binds the listener. Models
    /// load on first use.
    pub async fn bind(config: ServerConfig) -> Result<Server> {
        config.validate()?;
        let registry = match &config.models {
            Some(path) => Registry::from_file(path)?,
            None => Registry::builtin(),
        };
        let store = Store::open(&config.data_dir)
            .map_err(|e| Error::invalid(format!("opening {}: {e}", config.data_dir.display())))?;
        let engine_config = engine_config(&config)?;
        let detector_device = engine_config
            .devices
            .first()
            .cloned()
            .unwrap_or(candle_core::Device::Cpu);
        let engine = Arc::new(Engine::start(engine_config, Arc::new(registry.clone()))?);
        let listener = TcpListener::bind(config.listen).await?;
        let bound = listener.local_addr()?;
        let keys = ApiKeys::new(config.api_keys.iter().cloned());
        if keys.is_open() {
            tracing::warn!("no API key configured: every request is accepted");
        }
        let state = AppState(Arc::new(Inner {
            base_url: config.base_url(bound),
            media: config.media.limits(),
            runware: runware::Sessions::new(config.runware.resume_buffer()),
            registry: Arc::new(registry),
            engine,
            store: Arc::new(store),
            keys,
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            detectors: control::Detectors::default(),
            detector_device,
            config,
        }));
        let grace = Duration::from_secs(state.config().shutdown_grace_secs);
        Ok(Server {
            listener,
            state,
            grace,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` completes, then shuts down gracefully: stops admitting, lets
    /// running and waiting jobs finish within the grace period (cancelling the rest), waits for
    /// their images to be stored and their responses sent, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let Server {
            listener,
            state,
            grace,
        } = self;
        let purge = tokio::spawn(purge_expired_periodically(state.clone()));
        let token = state.shutdown_token().clone();
        let app = router(state.clone());
        let serving = tokio::spawn(
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(token.clone().cancelled_owned())
            .into_future(),
        );

        shutdown.await;
        tracing::info!("shutting down: no new jobs; running ones get {grace:?}");
        token.cancel();
        let engine = state.engine().clone();
        let finished = tokio::task::spawn_blocking(move || engine.shutdown(grace))
            .await
            .unwrap_or(false);
        if !finished {
            tracing::warn!("jobs still running after {grace:?} were cancelled");
        }
        // Images of finished jobs are being stored and their answers sent: give that a bounded
        // time (the engine is idle now, so this is disk and network only).
        state.tasks().close();
        let settle = Duration::from_secs(10);
        if tokio::time::timeout(settle, state.tasks().wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks still running after {settle:?}");
        }
        match tokio::time::timeout(settle, serving).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::error!("server error: {e}"),
            Ok(Err(e)) => tracing::error!("server task failed: {e}"),
            Err(_) => tracing::warn!("connections still open after {settle:?}; closing"),
        }
        purge.abort();
        Ok(())
    }
}

fn engine_config(config: &ServerConfig) -> Result<EngineConfig> {
    let mut devices = Vec::new();
    let mut dtype = None;
    let names: Vec<Option<&str>> = if config.devices.is_empty() {
        vec![None]
    } else {
        config.devices.iter().map(|d| Some(d.as_str())).collect()
    };
    for name in names {
        let (device, d) = crate::bench::select_device(name, config.dtype.as_deref())?;
        devices.push(device);
        dtype.get_or_insert(d);
    }
    let mut engine = EngineConfig::new(devices);
    if let Some(dtype) = dtype {
        engine.dtype = dtype;
    }
    engine.queue_capacity = config.queue_capacity;
    if let Some(bytes) = config.model_cache_bytes {
        engine.model_cache_bytes = bytes;
    }
    engine.limits = JobLimits {
        max_images: config.limits.max_images,
        max_steps: config.limits.max_steps,
        max_pixels: config.limits.max_pixels,
    };
    Ok(engine)
}

/// Removes expired images and job records every ten minutes.
async fn purge_expired_periodically(state: AppState) {
    let mut tick = tokio::time::interval(Duration::from_secs(600));
    loop {
        tick.tick().await;
        let store = state.store().clone();
        let now = std::time::SystemTime::now();
        match tokio::task::spawn_blocking(move || store.purge_expired(now)).await {
            Ok(Ok(report)) if report.images + report.jobs > 0 => {
                tracing::info!(
                    images = report.images,
                    jobs = report.jobs,
                    "expired results removed"
                )
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!("purging expired results failed: {e}"),
            Err(e) => tracing::error!("purge task failed: {e}"),
        }
    }
}

/// A future that completes on SIGINT (Ctrl-C) or SIGTERM. The handlers are installed when this
/// is called (inside the runtime), not when the future is first polled, so a signal arriving
/// right after start-up is not lost to the default action.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => tracing::info!("SIGINT received"),
                _ = terminate.recv() => tracing::info!("SIGTERM received"),
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::error!("listening for Ctrl-C failed: {e}");
                std::future::pending::<()>().await;
            }
        })
    }
}
