//! The bearer raw-bytes dialect: `POST /v1/images/generate` (a JSON body) and
//! `POST /v1/images/control` (multipart with an `image` file), authenticated with
//! `Authorization: Bearer <key>`, answered with the PNG itself.
//!
//! # Requests
//!
//! | field | generate | control | limits (from the API's documentation) |
//! |---|---|---|---|
//! | `model` | yes | yes | default `stable-diffusion-xl-base-1.0`; a registry id or alias |
//! | `prompt` | yes | yes | required, not blank |
//! | `negative_prompt` | yes | yes | optional; absent: the model's default; `""`: none |
//! | `steps` | yes | yes | 10..=50, default 30 |
//! | `width`, `height` | yes | yes | multiple of 64, >= 128, default 512 (see below) |
//! | `cfg_scale` | yes | yes | 0..=35, default 7 |
//! | `seed` | yes | yes | 0..=4294967295, default 0 = random (drawn from 1..=4294967295) |
//! | `control_strength` | - | yes | 0..=1, default 0.35 |
//! | `image` | - | yes | required file: PNG, JPEG or WebP under the server's media limits |
//!
//! Numbers may be JSON numbers or numeric strings (multipart fields are always text); any other
//! type, and any field not listed, is refused with the field named. The documentation gives no
//! upper bound for `width` and `height`: this server allows 2048 per side and at most the
//! operator's `limits.max_pixels` in all. On `/control` the output takes the uploaded image's
//! size rounded down to a multiple of 64 (at least 128) unless `width`/`height` are given; the
//! image is resized to the output size (Lanczos3). The documentation lists `negative_prompt`
//! for `/control` only; `/generate` accepts it too.
//!
//! `/control` starts from the uploaded image (img2img, see [`img2img_strength`]); when the
//! registry has a canny ControlNet for the model's family, the image's Canny edges also guide
//! every step through it at conditioning scale `control_strength` (diffusers'
//! ControlNet img2img pipeline), so the outlines of the upload hold while the prompt repaints
//! it. The `X-ControlNet` header names the ControlNet that ran.
//!
//! # Responses
//!
//! Success: `200`, `Content-Type: image/png`, the PNG bytes of one image. Headers a client may
//! ignore: `X-Seed` (the seed used, also when it was drawn at random), `Content-Location` (the
//! stored copy, kept for a day), and on `/control` `X-Denoising-Steps` (how many steps ran on the
//! image, see [`img2img_strength`]).
//!
//! Failure: a JSON body with a 4xx/5xx status:
//!
//! ```json
//! {"error": {"code": "invalid_parameter", "message": "`steps` must be between 10 and 50. Given: 9", "param": "steps"}}
//! ```
//!
//! `param` is `null` when no single field is to blame. Codes and statuses:
//!
//! | status | code | when |
//! |---|---|---|
//! | 400 | `invalid_json`, `invalid_multipart` | the body does not parse |
//! | 400 | `missing_parameter`, `invalid_parameter`, `unknown_parameter`, `invalid_image`, `not_supported` | a field is missing, out of range, not known, or not an image |
//! | 401 | `missing_api_key`, `invalid_api_key` | with `WWW-Authenticate: Bearer` |
//! | 404 | `model_not_found` | the message lists the available models |
//! | 413 | `payload_too_large`, `image_too_large` | body over `limits.max_body_bytes`; image over the media limits |
//! | 415 | `unsupported_media_type` | `/generate` wants `application/json`, `/control` `multipart/form-data` |
//! | 429 | `server_busy` | the queue is full; with `Retry-After` |
//! | 503 | `shutting_down`, `cancelled` | the server is stopping |
//! | 500 | `generation_failed` | a fault on the server's side |
//!
//! A client that disconnects while its image is generated cancels the job.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{Map, Value};

use super::media::{self, ImageInput, MediaError};
use super::output::{JobError, JobErrorKind, OutputSpec};
use super::{auth, params, random_seed, AppState};
use crate::pipeline::{ControlNetUnit, GenerationRequest, InitImage};
use crate::registry::ModelEntry;
use crate::store::TEMP_LINK_TTL;

/// The model a request gets when it names none.
pub const DEFAULT_MODEL: &str = "stable-diffusion-xl-base-1.0";
pub const STEPS_MIN: i64 = 10;
pub const STEPS_MAX: i64 = 50;
pub const DEFAULT_STEPS: i64 = 30;
/// `width` and `height`: a multiple of this, at least [`SIDE_MIN`].
pub const SIDE_MULTIPLE: i64 = 64;
pub const SIDE_MIN: i64 = 128;
/// Not documented by the API; this server's own bound per side.
pub const SIDE_MAX: i64 = 2048;
pub const DEFAULT_SIDE: i64 = 512;
pub const CFG_SCALE_MIN: f64 = 0.0;
pub const CFG_SCALE_MAX: f64 = 35.0;
pub const DEFAULT_CFG_SCALE: f64 = 7.0;
/// Largest seed; 0 asks for a random one.
pub const SEED_MAX: u64 = 4_294_967_295;
pub const DEFAULT_CONTROL_STRENGTH: f64 = 0.35;
/// Seconds a client refused as busy is asked to wait.
const RETRY_AFTER_SECS: u64 = 1;
/// Largest text field of a multipart body (a prompt is far shorter).
const MAX_TEXT_FIELD_BYTES: usize = 64 * 1024;

const GENERATE_FIELDS: &[&str] = &[
    "model",
    "prompt",
    "negative_prompt",
    "steps",
    "width",
    "height",
    "cfg_scale",
    "seed",
];
const CONTROL_FIELDS: &[&str] = &[
    "model",
    "prompt",
    "negative_prompt",
    "steps",
    "width",
    "height",
    "cfg_scale",
    "seed",
    "control_strength",
    "image",
];

/// The routes of this dialect.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/images/generate", post(generate))
        .route("/v1/images/control", post(control))
}

/// Everything that can go wrong, with its status and code decided in one place.
#[derive(Debug, thiserror::Error)]
enum BearerError {
    #[error("missing API key: send `Authorization: Bearer <key>`")]
    MissingKey,
    #[error("the API key is not valid")]
    BadKey,
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("malformed JSON body: {0}")]
    InvalidJson(String),
    #[error("malformed multipart body: {0}")]
    InvalidMultipart(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("`{0}` is required")]
    Missing(&'static str),
    #[error("unknown parameter `{name}`; accepted: {}", accepted.join(", "))]
    UnknownParameter {
        name: String,
        accepted: &'static [&'static str],
    },
    #[error("{0}")]
    Image(MediaError),
    #[error("{0}")]
    Job(JobError),
}

impl From<JobError> for BearerError {
    fn from(e: JobError) -> Self {
        BearerError::Job(e)
    }
}

impl BearerError {
    fn status(&self) -> StatusCode {
        use BearerError::*;
        match self {
            MissingKey | BadKey => StatusCode::UNAUTHORIZED,
            UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            InvalidJson(_) | InvalidMultipart(_) | Missing(_) | UnknownParameter { .. } => {
                StatusCode::BAD_REQUEST
            }
            PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Image(MediaError::TooLarge { .. } | MediaError::TooManyPixels { .. }) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Image(_) => StatusCode::BAD_REQUEST,
            Job(e) => match e.kind {
                JobErrorKind::Invalid | JobErrorKind::NotSupported => StatusCode::BAD_REQUEST,
                JobErrorKind::UnknownModel => StatusCode::NOT_FOUND,
                JobErrorKind::Busy => StatusCode::TOO_MANY_REQUESTS,
                JobErrorKind::ShuttingDown | JobErrorKind::Cancelled => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                JobErrorKind::Failed => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    fn code(&self) -> &'static str {
        use BearerError::*;
        match self {
            MissingKey => "missing_api_key",
            BadKey => "invalid_api_key",
            UnsupportedMediaType(_) => "unsupported_media_type",
            InvalidJson(_) => "invalid_json",
            InvalidMultipart(_) => "invalid_multipart",
            PayloadTooLarge(_) => "payload_too_large",
            Missing(_) => "missing_parameter",
            UnknownParameter { .. } => "unknown_parameter",
            Image(MediaError::TooLarge { .. } | MediaError::TooManyPixels { .. }) => {
                "image_too_large"
            }
            Image(_) => "invalid_image",
            Job(e) => match e.kind {
                JobErrorKind::Invalid => "invalid_parameter",
                JobErrorKind::NotSupported => "not_supported",
                JobErrorKind::UnknownModel => "model_not_found",
                JobErrorKind::Busy => "server_busy",
                JobErrorKind::ShuttingDown => "shutting_down",
                JobErrorKind::Cancelled => "cancelled",
                JobErrorKind::Failed => "generation_failed",
            },
        }
    }

    fn param(&self) -> Option<&str> {
        use BearerError::*;
        match self {
            Missing(name) => Some(name),
            UnknownParameter { name, .. } => Some(name),
            Image(_) => Some("image"),
            Job(e) if e.kind == JobErrorKind::UnknownModel => Some("model"),
            Job(e) => e.parameter.as_deref(),
            _ => None,
        }
    }
}

impl IntoResponse for BearerError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = serde_json::json!({
            "error": {
                "code": self.code(),
                "message": self.to_string(),
                "param": self.param(),
            }
        });
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        match self {
            BearerError::MissingKey => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            BearerError::BadKey => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            BearerError::Job(ref e) if e.kind == JobErrorKind::Busy => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            }
            _ => {}
        }
        response
    }
}

fn invalid(param: &str, message: String) -> BearerError {
    BearerError::Job(JobError::invalid(param, message))
}

/// `POST /v1/images/generate`
async fn generate(State(state): State<AppState>, request: Request) -> Response {
    generate_image(state, request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// `POST /v1/images/control`
async fn control(State(state): State<AppState>, request: Request) -> Response {
    control_image(state, request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn generate_image(state: AppState, request: Request) -> Result<Response, BearerError> {
    authorize(&state, request.headers())?;
    if !is_json(request.headers()) {
        return Err(BearerError::UnsupportedMediaType(
            "send the request as `Content-Type: application/json`".into(),
        ));
    }
    let body = Bytes::from_request(request, &state)
        .await
        .map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                body_too_large(&state)
            } else {
                BearerError::InvalidJson(rejection.body_text())
            }
        })?;
    let fields = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(fields)) => fields,
        Ok(_) => {
            return Err(BearerError::InvalidJson(
                "the body must be a JSON object".into(),
            ))
        }
        Err(e) => return Err(BearerError::InvalidJson(e.to_string())),
    };
    reject_unknown(&fields, GENERATE_FIELDS)?;
    let common = Common::parse(&fields)?;
    let entry = state.model_entry(&common.model)?;
    let width = side(&fields, "width")?.unwrap_or(DEFAULT_SIDE as usize);
    let height = side(&fields, "height")?.unwrap_or(DEFAULT_SIDE as usize);
    check_pixels(&state, width, height)?;
    let request = common.request(
        &entry,
        width,
        height,
        state.config().prompt_weighting.bearer,
    )?;
    run(&state, &common.model, request, HeaderMap::new()).await
}

async fn control_image(state: AppState, request: Request) -> Result<Response, BearerError> {
    authorize(&state, request.headers())?;
    if !is_multipart(request.headers()) {
        return Err(BearerError::UnsupportedMediaType(
            "send the request as `multipart/form-data` with an `image` file".into(),
        ));
    }
    let multipart = Multipart::from_request(request, &state)
        .await
        .map_err(|rejection| BearerError::InvalidMultipart(rejection.body_text()))?;
    let (fields, image) = read_multipart(&state, multipart).await?;
    let common = Common::parse(&fields)?;
    let control_strength =
        match params::f64_value("control_strength", field(&fields, "control_strength"))? {
            Some(v) => params::check_range("control_strength", v, 0.0, 1.0)?,
            None => DEFAULT_CONTROL_STRENGTH,
        };
    let entry = state.model_entry(&common.model)?;
    let width = side(&fields, "width")?;
    let height = side(&fields, "height")?;
    let image = image.ok_or(BearerError::Missing("image"))?;
    let image = media::load_rgb(ImageInput::Bytes(image), state.media())
        .await
        .map_err(BearerError::Image)?;
    let (width, height) = match (width, height) {
        (Some(w), Some(h)) => (w, h),
        (w, h) => {
            let w = w.unwrap_or_else(|| side_from_image(image.width()));
            let h = h.unwrap_or_else(|| side_from_image(image.height()));
            if w as i64 > SIDE_MAX || h as i64 > SIDE_MAX {
                return Err(invalid(
                    "image",
                    format!(
                        "the image is {}x{}; the output takes its size rounded down to a multiple \
                         of {SIDE_MULTIPLE} ({w}x{h}), over the limit of {SIDE_MAX} per side. Send \
                         a smaller image or give `width` and `height`",
                        image.width(),
                        image.height()
                    ),
                ));
            }
            (w, h)
        }
    };
    check_pixels(&state, width, height)?;
    let image = if (image.width() as usize, image.height() as usize) == (width, height) {
        image
    } else {
        tokio::task::spawn_blocking(move || {
            image::imageops::resize(
                &image,
                width as u32,
                height as u32,
                image::imageops::FilterType::Lanczos3,
            )
        })
        .await
        .map_err(|e| JobError::new(JobErrorKind::Failed, format!("resizing the image: {e}")))?
    };
    let mut request = common.request(
        &entry,
        width,
        height,
        state.config().prompt_weighting.bearer,
    )?;
    let strength = img2img_strength(control_strength, request.steps);
    let denoising_steps = ((request.steps as f64 * strength) as usize).min(request.steps);
    let mut headers = HeaderMap::new();
    // The family's canny ControlNet, where one is registered, keeps the upload's outlines.
    if let Ok(net) = state.controlnet_of_type("image", &entry, "canny") {
        let edges = state
            .run_preprocessor(
                "image",
                crate::preprocess::PreprocessorSpec::CANNY,
                image.clone(),
            )
            .await?;
        request.controlnets.push(ControlNetUnit {
            scale: control_strength,
            ..ControlNetUnit::new(net.id.clone(), edges)
        });
        if let Ok(value) = HeaderValue::from_str(&net.id) {
            headers.insert(HeaderName::from_static("x-controlnet"), value);
        }
    }
    request.init_image = Some(InitImage { image, strength });
    headers.insert(
        HeaderName::from_static("x-denoising-steps"),
        HeaderValue::from(denoising_steps),
    );
    run(&state, &common.model, request, headers).await
}

/// The img2img strength (the fraction of the schedule run on the uploaded image) for a
/// `control_strength`, "how much influence the init_image has on the diffusion process":
/// `strength = 1 - control_strength`, so the default 0.35 re-runs the last 65% of the schedule.
///
/// `control_strength` 1 (and values so close to it that `steps * (1 - control_strength)` is
/// below one step) would leave no denoising step at all. The documented range includes 1, so
/// such values are not refused: they are clamped to one denoising step, the least change the
/// sampler can make to the image (the response's `X-Denoising-Steps` says how many ran).
/// The step count is `floor(steps * (1 - control_strength))` as diffusers computes it, with the
/// rounding error of `1 - control_strength` forgiven (0.9 at 10 steps is one step, not zero).
pub fn img2img_strength(control_strength: f64, steps: usize) -> f64 {
    let wanted = (1.0 - control_strength).clamp(0.0, 1.0);
    let run = (steps as f64 * wanted + 1e-9)
        .floor()
        .clamp(1.0, steps as f64);
    if run >= steps as f64 {
        1.0
    } else {
        // Half a step above `run`, so that `floor(steps * strength)` is `run` however it rounds.
        (run + 0.5) / steps as f64
    }
}

/// Admits the request and answers with its PNG; dropping this future (the client went away)
/// cancels the job.
async fn run(
    state: &AppState,
    model: &str,
    request: GenerationRequest,
    mut headers: HeaderMap,
) -> Result<Response, BearerError> {
    let output = OutputSpec {
        ttl: Some(TEMP_LINK_TTL),
        ..OutputSpec::default()
    };
    let running = state.submit(model, request, output)?;
    let image =
        running.collect().await?.into_iter().next().ok_or_else(|| {
            JobError::new(JobErrorKind::Failed, "the job finished without an image")
        })?;
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
    headers.insert(
        HeaderName::from_static("x-seed"),
        HeaderValue::from(image.seed),
    );
    if let Ok(url) = HeaderValue::from_str(&image.url) {
        headers.insert(header::CONTENT_LOCATION, url);
    }
    let bytes = std::sync::Arc::unwrap_or_clone(image.bytes);
    Ok((StatusCode::OK, headers, bytes).into_response())
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), BearerError> {
    let token = auth::bearer_token(headers);
    if state.keys().check_opt(token) {
        Ok(())
    } else if token.is_none() {
        Err(BearerError::MissingKey)
    } else {
        Err(BearerError::BadKey)
    }
}

/// The media type of a request, lowercased, without parameters.
fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let essence = value.split(';').next().unwrap_or_default().trim();
    Some(essence.to_ascii_lowercase())
}

/// `application/json` or any `+json` type.
fn is_json(headers: &HeaderMap) -> bool {
    media_type(headers).is_some_and(|t| t == "application/json" || t.ends_with("+json"))
}

fn is_multipart(headers: &HeaderMap) -> bool {
    media_type(headers).is_some_and(|t| t == "multipart/form-data")
}

fn body_too_large(state: &AppState) -> BearerError {
    BearerError::PayloadTooLarge(format!(
        "the request body is over the limit of {} bytes",
        state.config().limits.max_body_bytes
    ))
}

fn multipart_error(state: &AppState, e: axum::extract::multipart::MultipartError) -> BearerError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        body_too_large(state)
    } else {
        BearerError::InvalidMultipart(e.body_text())
    }
}

/// Reads every part: text fields into a map of strings (as JSON values, so one parser serves
/// both routes), the `image` file into bytes, capped at the media limit while it streams.
///
/// A field sent twice with the same value is accepted (Python `requests` clients following the
/// API's example send `model` both as a form field and as a file part); different values are
/// refused.
async fn read_multipart(
    state: &AppState,
    mut multipart: Multipart,
) -> Result<(Map<String, Value>, Option<Vec<u8>>), BearerError> {
    let mut texts: BTreeMap<String, String> = BTreeMap::new();
    let mut image: Option<Vec<u8>> = None;
    let max_image = state.media().max_bytes;
    while let Some(mut part) = multipart
        .next_field()
        .await
        .map_err(|e| multipart_error(state, e))?
    {
        let name = part.name().unwrap_or_default().to_string();
        if name.is_empty() {
            return Err(BearerError::InvalidMultipart(
                "a part has no field name".into(),
            ));
        }
        if !CONTROL_FIELDS.contains(&name.as_str()) {
            return Err(BearerError::UnknownParameter {
                name,
                accepted: CONTROL_FIELDS,
            });
        }
        let limit = if name == "image" {
            max_image
        } else {
            MAX_TEXT_FIELD_BYTES
        };
        let mut data = Vec::new();
        while let Some(chunk) = part.chunk().await.map_err(|e| multipart_error(state, e))? {
            if data.len() + chunk.len() > limit {
                return Err(if name == "image" {
                    BearerError::Image(MediaError::TooLarge {
                        limit,
                        given: data.len() + chunk.len(),
                    })
                } else {
                    invalid(
                        &name,
                        format!("`{name}` is over the limit of {limit} bytes"),
                    )
                });
            }
            data.extend_from_slice(&chunk);
        }
        if name == "image" {
            if image.is_some() {
                return Err(invalid("image", "send one `image` file".into()));
            }
            image = Some(data);
            continue;
        }
        let text = String::from_utf8(data)
            .map_err(|_| invalid(&name, format!("`{name}` must be UTF-8 text")))?;
        if let Some(previous) = texts.get(&name) {
            if *previous != text {
                return Err(invalid(
                    &name,
                    format!("`{name}` is given twice with different values"),
                ));
            }
        }
        texts.insert(name, text);
    }
    let fields = texts
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    Ok((fields, image))
}

fn reject_unknown(
    fields: &Map<String, Value>,
    accepted: &'static [&'static str],
) -> Result<(), BearerError> {
    match fields.keys().find(|k| !accepted.contains(&k.as_str())) {
        Some(name) => Err(BearerError::UnknownParameter {
            name: name.clone(),
            accepted,
        }),
        None => Ok(()),
    }
}

fn field<'a>(fields: &'a Map<String, Value>, name: &str) -> &'a Value {
    fields.get(name).unwrap_or(&Value::Null)
}

/// The fields both routes share, checked against the documented limits.
#[derive(Debug)]
struct Common {
    model: String,
    prompt: String,
    negative_prompt: Option<String>,
    steps: usize,
    cfg_scale: f64,
    /// As sent: 0 asks for a random seed.
    seed: u64,
}

impl Common {
    fn parse(fields: &Map<String, Value>) -> Result<Common, BearerError> {
        let model = match params::string_value("model", field(fields, "model"))? {
            None => DEFAULT_MODEL.to_string(),
            Some(m) if m.trim().is_empty() => {
                return Err(invalid(
                    "model",
                    format!("`model` must not be empty (leave it out for `{DEFAULT_MODEL}`)"),
                ))
            }
            Some(m) => m.trim().to_string(),
        };
        let prompt = match params::string_value("prompt", field(fields, "prompt"))? {
            None => return Err(BearerError::Missing("prompt")),
            Some(p) if p.trim().is_empty() => {
                return Err(invalid("prompt", "`prompt` must not be empty".into()))
            }
            Some(p) => p,
        };
        let negative_prompt =
            params::string_value("negative_prompt", field(fields, "negative_prompt"))?;
        let steps = match params::i64_value("steps", field(fields, "steps"))? {
            Some(v) => params::check_range("steps", v, STEPS_MIN, STEPS_MAX)?,
            None => DEFAULT_STEPS,
        };
        let cfg_scale = match params::f64_value("cfg_scale", field(fields, "cfg_scale"))? {
            Some(v) => params::check_range("cfg_scale", v, CFG_SCALE_MIN, CFG_SCALE_MAX)?,
            None => DEFAULT_CFG_SCALE,
        };
        let seed = seed(field(fields, "seed"))?.unwrap_or(0);
        Ok(Common {
            model,
            prompt,
            negative_prompt,
            steps: steps as usize,
            cfg_scale,
            seed,
        })
    }

    /// The canonical request: the documented defaults, then the model's own for what the API
    /// leaves open (scheduler, negative prompt when absent, CLIP skip).
    fn request(
        &self,
        entry: &ModelEntry,
        width: usize,
        height: usize,

        prompt_weighting: crate::pipeline::PromptWeighting,
    ) -> Result<GenerationRequest, BearerError> {
        let defaults = &entry.defaults;
        let mut request = GenerationRequest::new(self.prompt.clone());
        request.negative_prompt = match &self.negative_prompt {
            Some(n) if n.is_empty() => None,
            Some(n) => Some(n.clone()),
            None => defaults.negative_prompt.clone(),
        };
        request.width = width;
        request.height = height;
        request.steps = self.steps;
        request.guidance_scale = self.cfg_scale;
        request.scheduler = match &defaults.scheduler {
            Some(name) => Some(params::scheduler("scheduler", name).map_err(|e| {
                JobError::new(
                    JobErrorKind::Failed,
                    format!(
                        "model `{}` has an unusable default scheduler: {e}",
                        entry.id
                    ),
                )
            })?),
            None => None,
        };
        request.seed = if self.seed == 0 {
            random_seed(SEED_MAX)
        } else {
            self.seed
        };
        request.num_images = 1;
        request.clip_skip = defaults.clip_skip.map(|c| c as usize);
        request.prompt_weighting = prompt_weighting;
        Ok(request)
    }
}

/// `seed` in `0..=4294967295`; the range is stated for negative and too large values alike.
fn seed(v: &Value) -> Result<Option<u64>, BearerError> {
    match params::u64_value("seed", v) {
        Ok(Some(s)) => Ok(Some(params::check_range("seed", s, 0, SEED_MAX)?)),
        Ok(None) => Ok(None),
        Err(e) => match params::i64_value("seed", v) {
            Ok(Some(i)) if i < 0 => Err(params::check_range("seed", i, 0, SEED_MAX as i64)
                .expect_err("a negative seed is out of range")
                .into()),
            _ => Err(e.into()),
        },
    }
}

/// `width` or `height`: a multiple of 64, at least 128, at most [`SIDE_MAX`].
fn side(fields: &Map<String, Value>, name: &str) -> Result<Option<usize>, BearerError> {
    let Some(v) = params::i64_value(name, field(fields, name))? else {
        return Ok(None);
    };
    if v < SIDE_MIN || v % SIDE_MULTIPLE != 0 {
        return Err(invalid(
            name,
            format!("`{name}` must be a multiple of {SIDE_MULTIPLE} and >= {SIDE_MIN}. Given: {v}"),
        ));
    }
    if v > SIDE_MAX {
        return Err(invalid(
            name,
            format!("`{name}` must be <= {SIDE_MAX} on this server. Given: {v}"),
        ));
    }
    Ok(Some(v as usize))
}

/// An uploaded image's side as the output's: rounded down to a multiple of 64, at least 128.
fn side_from_image(pixels: u32) -> usize {
    let multiple = SIDE_MULTIPLE as usize;
    ((pixels as usize / multiple) * multiple).max(SIDE_MIN as usize)
}

fn check_pixels(state: &AppState, width: usize, height: usize) -> Result<(), BearerError> {
    let max = state.config().limits.max_pixels;
    if width * height > max {
        return Err(invalid(
            "width",
            format!(
                "`width` x `height` must be at most {max} pixels on this server. Given: {width}x{height}"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_strength_maps_to_denoising_steps() {
        let steps_run = |cs: f64, steps: usize| {
            let s = img2img_strength(cs, steps);
            assert!(s > 0.0 && s <= 1.0, "{cs} at {steps}: {s}");
            ((steps as f64 * s) as usize).min(steps)
        };
        assert_eq!(steps_run(0.35, 30), 19);
        assert_eq!(steps_run(0.0, 30), 30);
        assert_eq!(steps_run(0.5, 10), 5);
        assert_eq!(steps_run(0.9, 10), 1);
        // No denoising step left: clamped to one.
        assert_eq!(steps_run(1.0, 10), 1);
        assert_eq!(steps_run(0.99, 50), 1);
        for steps in 10..=50 {
            for k in 0..=100 {
                let cs = k as f64 / 100.0;
                let run = steps_run(cs, steps);
                assert!((1..=steps).contains(&run), "{cs} at {steps}: {run}");
            }
        }
    }

    #[test]
    fn image_sides_round_down_to_64() {
        assert_eq!(side_from_image(200), 192);
        assert_eq!(side_from_image(100), 128);
        assert_eq!(side_from_image(512), 512);
        assert_eq!(side_from_image(3000), 2944);
    }

    #[test]
    fn seeds_state_the_range() {
        let e = seed(&serde_json::json!(-1)).unwrap_err();
        assert!(e.to_string().contains("between 0 and 4294967295"), "{e}");
        let e = seed(&serde_json::json!(4294967296u64)).unwrap_err();
        assert!(e.to_string().contains("between 0 and 4294967295"), "{e}");
        assert_eq!(seed(&serde_json::json!("42")).unwrap(), Some(42));
        assert!(seed(&serde_json::json!(true)).is_err());
    }
}
