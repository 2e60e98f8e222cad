//! The ModelsLab (stablediffusionapi.com) dialect: JSON bodies with the API key in `key`,
//! answered `{status: "success", generationTime, id, output, proxy_links, meta}`, or
//! `{status: "processing", id, eta, fetch_result, ...}` when the images take longer than
//! `modelslab.wait_secs` (the job goes on and `fetch` returns it later, also after a restart),
//! or `{status: "error", message, messege}` (their ControlNet docs spell it both ways).
//!
//! Every answer is HTTP 200 with the status in the body, as the hosted API does: its Python
//! client (`modelslab-py`) raises on any other HTTP status without reading the body.
//!
//! Routes: the v6 paths the current clients use (`/api/v6/images/{text2img, img2img, inpaint,
//! controlnet}`, `/api/v6/images/fetch[/{id}]`), the enterprise ones (`/api/v1/enterprise/...`,
//! with and without `images/`), and the older `/api/v3/{text2img, img2img}`,
//! `/api/v3/dreambooth`, `/api/v4/dreambooth[/img2img]`, `/api/v5/controlnet` with their
//! fetch paths. Each also answers with a trailing slash.

mod jobs;
mod request;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::media::{load_image, load_rgb, ImageInput};
use super::output::{JobError, OutputSpec};
use super::{params, AppState};
use crate::pipeline::IpAdapterUnit;
use crate::store::TEMP_LINK_TTL;
use request::Endpoint;

/// Which generation of the API a route belongs to: decides where `fetch_result` points and
/// whether `model_id` may be left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V6,
    Enterprise,
    V3,
    V3Dreambooth,
    V4Dreambooth,
    V5,
}

impl Family {
    fn fetch_path(self) -> &'static str {
        match self {
            Family::V6 => "/api/v6/images/fetch",
            Family::Enterprise => "/api/v1/enterprise/images/fetch",
            Family::V3 => "/api/v3/fetch",
            Family::V3Dreambooth => "/api/v3/dreambooth/fetch",
            Family::V4Dreambooth => "/api/v4/dreambooth/fetch",
            Family::V5 => "/api/v5/fetch",
        }
    }

    /// The link that returns request `id`.
    pub fn fetch_url(self, state: &AppState, id: u64) -> String {
        format!("{}{}/{id}", state.base_url(), self.fetch_path())
    }

    /// Dreambooth routes run the model the client trained or picked: no default.
    fn model_required(self) -> bool {
        matches!(self, Family::V3Dreambooth | Family::V4Dreambooth)
    }
}

const GENERATE: &[(&str, Endpoint, Family)] = {
    use Endpoint::*;
    use Family::*;
    &[
        ("/api/v6/images/text2img", Text2Img, V6),
        ("/api/v6/images/img2img", Img2Img, V6),
        ("/api/v6/images/inpaint", Inpaint, V6),
        ("/api/v6/images/controlnet", ControlNet, V6),
        ("/api/v1/enterprise/images/text2img", Text2Img, Enterprise),
        ("/api/v1/enterprise/images/img2img", Img2Img, Enterprise),
        ("/api/v1/enterprise/images/inpaint", Inpaint, Enterprise),
        (
            "/api/v1/enterprise/images/controlnet",
            ControlNet,
            Enterprise,
        ),
        ("/api/v1/enterprise/text2img", Text2Img, Enterprise),
        ("/api/v1/enterprise/img2img", Img2Img, Enterprise),
        ("/api/v1/enterprise/inpaint", Inpaint, Enterprise),
        ("/api/v1/enterprise/controlnet", ControlNet, Enterprise),
        ("/api/v3/text2img", Text2Img, V3),
        ("/api/v3/img2img", Img2Img, V3),
        ("/api/v3/inpaint", Inpaint, V3),
        ("/api/v3/dreambooth", Text2Img, V3Dreambooth),
        ("/api/v3/dreambooth/img2img", Img2Img, V3Dreambooth),
        ("/api/v3/dreambooth/inpaint", Inpaint, V3Dreambooth),
        ("/api/v4/dreambooth", Text2Img, V4Dreambooth),
        ("/api/v4/dreambooth/img2img", Img2Img, V4Dreambooth),
        ("/api/v4/dreambooth/inpaint", Inpaint, V4Dreambooth),
        ("/api/v5/controlnet", ControlNet, V5),
    ]
};

/// Fetch routes: `{path}/{id}`, or `{path}` with `request_id` in the body.
const FETCH: &[(&str, Family)] = &[
    ("/api/v6/images/fetch", Family::V6),
    ("/api/v1/enterprise/images/fetch", Family::Enterprise),
    ("/api/v1/enterprise/fetch", Family::Enterprise),
    ("/api/v3/fetch", Family::V3),
    ("/api/v3/dreambooth/fetch", Family::V3Dreambooth),
    ("/api/v4/dreambooth/fetch", Family::V4Dreambooth),
    ("/api/v5/fetch", Family::V5),
];

/// The routes of this dialect.
pub fn routes() -> Router<AppState> {
    let mut router = Router::new();
    for &(path, endpoint, family) in GENERATE {
        let handler = move |State(state): State<AppState>, body: Result<Bytes, BytesRejection>| {
            generate(state, endpoint, family, body)
        };
        router = router
            .route(path, post(handler))
            .route(&format!("{path}/"), post(handler));
    }
    for &(path, family) in FETCH {
        let by_body = move |State(state): State<AppState>, body: Result<Bytes, BytesRejection>| {
            fetch(state, family, None, body)
        };
        let by_path = move |State(state): State<AppState>,
                            Path(id): Path<String>,
                            body: Result<Bytes, BytesRejection>| {
            fetch(state, family, Some(id), body)
        };
        router = router
            .route(path, post(by_body))
            .route(&format!("{path}/"), post(by_body))
            .route(&format!("{path}/{{id}}"), post(by_path))
            .route(&format!("{path}/{{id}}/"), post(by_path));
    }
    router
}

/// `{"status": "error", "message": ..., "messege": ...}`
pub(crate) fn error_body(message: &str) -> Value {
    json!({ "status": "error", "message": message, "messege": message })
}

fn reply(body: Value) -> Response {
    Json(body).into_response()
}

async fn generate(
    state: AppState,
    endpoint: Endpoint,
    family: Family,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match start(state, endpoint, family, body).await {
        Ok(body) => reply(body),
        Err(e) => reply(error_body(&e.message)),
    }
}

async fn start(
    state: AppState,
    endpoint: Endpoint,
    family: Family,
    body: Result<Bytes, BytesRejection>,
) -> Result<Value, JobError> {
    let body = json_object(&state, body)?;
    authorize(&state, &body)?;
    request::check_endpoint(endpoint)?;
    let mut parsed = request::parse(&state, &body, endpoint, family.model_required())?;
    let init = match parsed.init_image.take() {
        Some(image) => Some(
            load_rgb(ImageInput::from_client_string(image), state.media())
                .await
                .map_err(|e| JobError::invalid("init_image", format!("`init_image`: {e}")))?,
        ),
        None => None,
    };
    let control = match &parsed.control {
        Some(spec) => {
            let source = match &spec.control_image {
                Some(image) => {
                    load_rgb(ImageInput::from_client_string(image.clone()), state.media())
                        .await
                        .map_err(|e| {
                            JobError::invalid("control_image", format!("`control_image`: {e}"))
                        })?
                }
                None => init.clone().ok_or_else(|| {
                    JobError::invalid("init_image", "`init_image` is required for controlnet")
                })?,
            };
            spec.units(&state, source).await?
        }
        None => Vec::new(),
    };
    let mask = match parsed.mask_image.take() {
        Some(image) => Some(
            load_image(ImageInput::from_client_string(image), state.media())
                .await
                .map_err(|e| JobError::invalid("mask_image", format!("`mask_image`: {e}")))?
                .to_luma8(),
        ),
        None => None,
    };
    let ip_adapter = match parsed.ip_adapter.take() {
        Some(spec) => {
            let image = load_rgb(ImageInput::from_client_string(spec.image), state.media())
                .await
                .map_err(|e| {
                    JobError::invalid("ip_adapter_image", format!("`ip_adapter_image`: {e}"))
                })?;
            Some(IpAdapterUnit {
                weight: spec.scale,
                ..IpAdapterUnit::new(spec.model, image)
            })
        }
        None => None,
    };
    let model = parsed.model.clone();
    let (temp, instant) = (parsed.temp, parsed.instant);
    let webhook = parsed.webhook.take();
    let track_id = parsed.track_id.take();
    let (mut generation, meta) = parsed.into_request(init, mask)?;
    generation.controlnets = control;
    generation.ip_adapters.extend(ip_adapter);
    let output = OutputSpec {
        ttl: temp.then_some(TEMP_LINK_TTL),
        ..OutputSpec::default()
    };
    let started = Instant::now();
    let running = state.submit(&model, generation, output)?;
    let meta = Value::Object(meta);
    let wait = if instant {
        std::time::Duration::ZERO
    } else {
        state.config().modelslab.wait()
    };
    let detached = webhook.is_some();
    let tracked = state.clone();
    let work = async move {
        let id = jobs::create(&state, &meta, temp).await?;
        let job = Arc::new(jobs::Job {
            state,
            id,
            family,
            meta,
            webhook,
            track_id,
            started,
        });
        Ok(jobs::respond(job, running, wait).await)
    };
    if detached {
        // A job with a webhook belongs to the webhook from admission on: run it as a tracked
        // task so that a client leaving at any point (even before the job is recorded) does
        // not cancel it.
        tracked.tasks().spawn(work).await.map_err(|e| {
            JobError::new(
                super::JobErrorKind::Failed,
                format!("the job's task failed: {e}"),
            )
        })?
    } else {
        work.await
    }
}

async fn fetch(
    state: AppState,
    family: Family,
    id: Option<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match fetch_id(&state, id, body) {
        Ok(id) => reply(jobs::fetch(&state, family, &id).await),
        Err(e) => reply(error_body(&e.message)),
    }
}

/// The id to fetch, from the path or the body's `request_id`, once the key is checked.
fn fetch_id(
    state: &AppState,
    id: Option<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<String, JobError> {
    let body = json_object(state, body)?;
    authorize(state, &body)?;
    if let Some(id) = id {
        return Ok(id);
    }
    let request_id = body.get("request_id").unwrap_or(&Value::Null);
    params::string_value("request_id", request_id)?
        .filter(|id| !id.trim().is_empty())
        .ok_or_else(|| JobError::invalid("request_id", "`request_id` is required"))
}

/// The body as a JSON object; anything else is the dialect's error, never axum's text reply.
fn json_object(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Map<String, Value>, JobError> {
    let bytes = body.map_err(|e| {
        let message = if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            format!(
                "the request body is larger than the limit of {} bytes",
                state.config().limits.max_body_bytes
            )
        } else {
            format!("the request body could not be read: {}", e.body_text())
        };
        JobError::invalid("body", message)
    })?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(JobError::invalid(
            "body",
            "the request body must be a JSON object",
        )),
        Err(e) => Err(JobError::invalid(
            "body",
            format!("the request body is not valid JSON: {e}"),
        )),
    }
}

/// The API key in `key`.
fn authorize(state: &AppState, body: &Map<String, Value>) -> Result<(), JobError> {
    let key = match body.get("key") {
        None | Some(Value::Null) => None,
        Some(Value::String(key)) => Some(key.as_str()),
        Some(_) => return Err(JobError::invalid("key", "`key` must be a string")),
    };
    if state.keys().check_opt(key) {
        return Ok(());
    }
    Err(match key {
        None => JobError::invalid("key", "`key` is required: your API key"),
        Some(_) => JobError::invalid("key", "Invalid API key"),
    })
}
