//! The token-multipart dialect (SinkIn-style): `POST /api/inference` and `POST /api/models`
//! (also without the `/api` prefix), form fields in `multipart/form-data` or
//! `application/x-www-form-urlencoded`, the key in the `access_token` field.
//!
//! Success is `{"error_code": 0, "images": [url, ...], "credit_cost": f64, "inf_id": id}`;
//! every failure is `{"error_code": 1, "message": ...}` with a status chosen in
//! [`ApiError::from`]: 400 bad input, 401 bad key, 404 unknown model or version, 413 upload too
//! large, 415 not a form, 429 queue full, 503 shutting down, 500 server failure.
//!
//! Defaults and limits are the documented ones: 512x768 (multiples of 8 in 128..=896), 30 steps
//! (1..=50), scale 7.5 or the model's guidance (1..=20), 4 images, seed -1 (random), scheduler
//! `DPMSolverMultistep` or the model's, `use_default_neg` true, `image_strength` 0.75. The
//! documentation sets no bound on `num_images`; the server's `limits.max_images` is used.
//! Fields the documentation does not name are ignored (form clients send extras) and logged.
//!
//! `lcm=true` samples as the hosted API's LCM mode: the model's family's LCM-LoRA (the registry
//! `[[lora]]` marked `lcm`) is merged beside the request's own `lora`, the LCM scheduler runs
//! [`LCM_STEPS`] steps at guidance [`LCM_GUIDANCE`] (see there for why and for the client values
//! that are kept), and the credit cost is that of the same request without `lcm`, halved by
//! `pricing.lcm_factor`.
//!
//! `controlnet=canny` turns `init_image_file` into Canny edges that guide a text-to-image run
//! through the model family's registered canny ControlNet (`image_strength` then has no
//! effect, as documented); `depth` and `openpose` need detection models and are refused by name.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use image::imageops::FilterType;
use image::RgbImage;
use serde::Serialize;

use super::media::{self, ImageInput, MediaError};
use super::output::{JobError, JobErrorKind, OutputSpec};
use super::{params, random_seed, AppState};
use crate::pipeline::{ControlNetUnit, GenerationRequest, InitImage};
use crate::preprocess::PreprocessorSpec;
use crate::registry::ModelEntry;
use crate::schedulers::{SchedulerKind, SchedulerSpec};

/// Width and height: multiples of [`SIDE_MULTIPLE`] in `MIN_SIDE..=MAX_SIDE`.
pub const MIN_SIDE: usize = 128;
pub const MAX_SIDE: usize = 896;
pub const SIDE_MULTIPLE: usize = 8;
pub const DEFAULT_WIDTH: usize = 512;
pub const DEFAULT_HEIGHT: usize = 768;
pub const MIN_STEPS: usize = 1;
pub const MAX_STEPS: usize = 50;
pub const DEFAULT_STEPS: usize = 30;
pub const MIN_SCALE: f64 = 1.0;
pub const MAX_SCALE: f64 = 20.0;
/// `scale` when neither the request nor the model sets one.
pub const DEFAULT_SCALE: f64 = 7.5;
pub const DEFAULT_NUM_IMAGES: usize = 4;
/// `scheduler` when neither the request nor the model sets one.
pub const DEFAULT_SCHEDULER: &str = "DPMSolverMultistep";
pub const DEFAULT_IMAGE_STRENGTH: f64 = 0.75;
/// `lora_scale`: the weight of the `lora`.
pub const DEFAULT_LORA_SCALE: f64 = 0.75;
/// The ControlNets the hosted API documents.
pub const CONTROLNETS: [&str; 3] = ["canny", "depth", "openpose"];
/// LCM mode's step count and guidance. LCM-LoRA's model cards (latent-consistency/lcm-lora-sdv1-5,
/// lcm-lora-sdxl) recommend 4 to 8 steps at guidance 1 to 2; the hosted API documents the mode
/// only as "half the cost with some tradeoff on quality", so it takes the better-quality end of
/// the step range, 8, and the middle of the guidance range, 1.5 (above about 2 LCM images
/// overexpose). The documented defaults, 30 steps and scale 7.5, belong to ordinary sampling and
/// would overcook an LCM-LoRA, so they give way to these; a `steps` of at most [`LCM_STEPS`] and a
/// `scale` of at most [`LCM_MAX_SCALE`] sent with `lcm` are the client's choice within the LCM
/// range and are kept.
pub const LCM_STEPS: usize = 8;
pub const LCM_GUIDANCE: f64 = 1.5;
pub const LCM_MAX_SCALE: f64 = 2.0;
/// Largest random seed drawn for `seed = -1`.
const MAX_RANDOM_SEED: u64 = u32::MAX as u64;

/// The fields `/inference` documents; others are ignored.
const INFERENCE_FIELDS: &[&str] = &[
    "access_token",
    "model_id",
    "version",
    "prompt",
    "lcm",
    "width",
    "height",
    "negative_prompt",
    "use_default_neg",
    "steps",
    "scale",
    "num_images",
    "seed",
    "scheduler",
    "lora",
    "lora_scale",
    "init_image_file",
    "image_strength",
    "controlnet",
];

/// The upload field of img2img.
const INIT_IMAGE_FIELD: &str = "init_image_file";

/// The routes of this dialect.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/inference", post(inference))
        .route("/inference", post(inference))
        .route("/api/models", post(models))
        .route("/models", post(models))
}

/// A failure as this dialect reports it: `{"error_code": 1, "message": ...}` with a status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        let status = match e.kind {
            JobErrorKind::Invalid | JobErrorKind::NotSupported => StatusCode::BAD_REQUEST,
            JobErrorKind::UnknownModel => StatusCode::NOT_FOUND,
            JobErrorKind::Busy => StatusCode::TOO_MANY_REQUESTS,
            // A job is cancelled under a waiting client only when the server stops.
            JobErrorKind::ShuttingDown | JobErrorKind::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
            JobErrorKind::Failed => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({"error_code": 1, "message": self.message})),
        )
            .into_response()
    }
}

/// The success body of `/inference`.
#[derive(Debug, Serialize)]
struct InferenceReply {
    error_code: u8,
    images: Vec<String>,
    credit_cost: f64,
    inf_id: String,
}

/// One entry of `/models`.
#[derive(Debug, Serialize)]
struct ModelInfo {
    id: String,
    title: String,
    cover_img: String,
    link: String,
}

/// A request's form: text fields by name, and the img2img image if one came.
#[derive(Debug, Default)]
struct Form {
    fields: HashMap<String, String>,
    init_image: Option<ImageInput>,
}

impl Form {
    /// A text field; `None` when absent.
    fn get(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }

    /// A text field with surrounding spaces removed; `None` when absent or blank.
    fn non_empty(&self, name: &str) -> Option<&str> {
        self.get(name).map(str::trim).filter(|s| !s.is_empty())
    }

    fn insert(&mut self, name: String, value: String) -> Result<(), ApiError> {
        if self.fields.contains_key(&name) {
            return Err(ApiError::bad_request(format!(
                "`{name}` was sent more than once"
            )));
        }
        self.fields.insert(name, value);
        Ok(())
    }

    /// Logs, at debug level, fields that are not in `known`.
    fn log_unknown(&self, known: &[&str]) {
        for name in self.fields.keys() {
            if !known.contains(&name.as_str()) {
                tracing::debug!(field = %name, "ignoring an undocumented form field");
            }
        }
    }
}

/// Reads a `multipart/form-data` or `application/x-www-form-urlencoded` body.
///
/// In multipart, `init_image_file` is the raw uploaded file, capped at the media byte limit
/// while it streams in; an empty upload (a form with no file chosen) counts as absent. A
/// urlencoded body cannot carry a file, so there `init_image_file` may be a `data:` URI, a URL
/// or base64 instead.
async fn read_form(state: &AppState, request: Request) -> Result<Form, ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "multipart/form-data" => read_multipart(state, request).await,
        "application/x-www-form-urlencoded" => read_urlencoded(state, request).await,
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "the body must be multipart/form-data or application/x-www-form-urlencoded. \
                 Given Content-Type: {content_type:?}"
            ),
        )),
    }
}

async fn read_multipart(state: &AppState, request: Request) -> Result<Form, ApiError> {
    let mut multipart = Multipart::from_request(request, state)
        .await
        .map_err(|e| body_error(state, e.status(), e.body_text()))?;
    let multipart_error =
        |e: axum::extract::multipart::MultipartError| body_error(state, e.status(), e.body_text());
    let mut form = Form::default();
    let max_bytes = state.media().max_bytes;
    while let Some(mut field) = multipart.next_field().await.map_err(multipart_error)? {
        let Some(name) = field.name().map(str::to_string) else {
            tracing::debug!("ignoring a multipart part without a name");
            continue;
        };
        if name == INIT_IMAGE_FIELD {
            let mut bytes = Vec::new();
            while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                if bytes.len() + chunk.len() > max_bytes {
                    return Err(media_error(MediaError::TooLarge {
                        limit: max_bytes,
                        given: bytes.len() + chunk.len(),
                    }));
                }
                bytes.extend_from_slice(&chunk);
            }
            if form.init_image.is_some() {
                return Err(ApiError::bad_request(format!(
                    "`{INIT_IMAGE_FIELD}` was sent more than once"
                )));
            }
            if !bytes.is_empty() {
                form.init_image = Some(ImageInput::Bytes(bytes));
            }
            continue;
        }
        let data: Bytes = field.bytes().await.map_err(multipart_error)?;
        let value = String::from_utf8(data.to_vec())
            .map_err(|_| ApiError::bad_request(format!("`{name}` is not UTF-8 text")))?;
        form.insert(name, value)?;
    }
    Ok(form)
}

async fn read_urlencoded(state: &AppState, request: Request) -> Result<Form, ApiError> {
    let body = Bytes::from_request(request, state)
        .await
        .map_err(|e| body_error(state, e.status(), e.body_text()))?;
    let mut form = Form::default();
    for (name, value) in url::form_urlencoded::parse(&body) {
        let (name, value) = (name.into_owned(), value.into_owned());
        if name == INIT_IMAGE_FIELD {
            if form.init_image.is_some() {
                return Err(ApiError::bad_request(format!(
                    "`{INIT_IMAGE_FIELD}` was sent more than once"
                )));
            }
            if !value.trim().is_empty() {
                form.init_image = Some(ImageInput::from_client_string(value));
            }
            continue;
        }
        form.insert(name, value)?;
    }
    Ok(form)
}

/// A body that could not be read: over the body limit (413, the limit stated), malformed (400).
fn body_error(state: &AppState, status: StatusCode, text: String) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        let limit = state.config().limits.max_body_bytes;
        return ApiError::new(
            status,
            format!("the request body is larger than this server's limit of {limit} bytes"),
        );
    }
    let status = if status.is_client_error() {
        status
    } else {
        StatusCode::BAD_REQUEST
    };
    ApiError::new(status, format!("the form could not be read: {text}"))
}

/// Checks `access_token`: 401 when it is missing or not a configured key (a server with no
/// keys configured accepts every request, with or without a token).
fn authenticate(state: &AppState, form: &Form) -> Result<(), ApiError> {
    let token = form.get("access_token").filter(|t| !t.is_empty());
    if state.keys().check_opt(token) {
        return Ok(());
    }
    let message = match token {
        None => "`access_token` is required",
        Some(_) => "invalid `access_token`",
    };
    Err(ApiError::new(StatusCode::UNAUTHORIZED, message))
}

fn media_error(e: MediaError) -> ApiError {
    let status = match e {
        MediaError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        MediaError::Encode(_) => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    };
    ApiError::new(status, format!("`{INIT_IMAGE_FIELD}`: {e}"))
}

/// `POST /api/inference`: txt2img, or img2img with `init_image_file`.
async fn inference(State(state): State<AppState>, request: Request) -> Response {
    match run_inference(&state, request).await {
        Ok(reply) => Json(reply).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn run_inference(state: &AppState, request: Request) -> Result<InferenceReply, ApiError> {
    let form = read_form(state, request).await?;
    authenticate(state, &form)?;
    form.log_unknown(INFERENCE_FIELDS);
    let entry = model(state, &form)?;
    let parsed = parse_inference(state, &form, &entry)?;
    let mut request = parsed.request;
    if let Some(input) = form.init_image {
        let strength = parsed.image_strength;
        let image = media::load_rgb(input, state.media())
            .await
            .map_err(media_error)?;
        let image = fit_init_image(image, request.width, request.height).await?;
        match &parsed.controlnet {
            // With a ControlNet the upload is the control: its edges, no img2img start.
            Some((id, preprocessor)) => {
                let edges = state
                    .run_preprocessor("controlnet", *preprocessor, image)
                    .await?;
                request
                    .controlnets
                    .push(ControlNetUnit::new(id.clone(), edges));
            }
            None => request.init_image = Some(InitImage { image, strength }),
        }
    }
    let (num_images, width, height, steps) = (
        request.num_images,
        request.width,
        request.height,
        parsed.priced_steps,
    );
    // Dropping this future (the client went away) drops `running`, which cancels the job.
    let running = state.submit(&entry.id, request, OutputSpec::default())?;
    let images = running.collect().await?;
    Ok(InferenceReply {
        error_code: 0,
        images: images.into_iter().map(|p| p.url).collect(),
        credit_cost: state
            .config()
            .pricing
            .cost(&entry.id, num_images, width, height, steps, parsed.lcm),
        inf_id: uuid::Uuid::new_v4().simple().to_string(),
    })
}

/// The pipeline needs the init image at the output size: a differently sized upload is resized
/// to `width` x `height` with a Lanczos3 filter (the aspect ratio follows the request).
async fn fit_init_image(
    image: RgbImage,
    width: usize,
    height: usize,
) -> Result<RgbImage, ApiError> {
    let (w, h) = (width as u32, height as u32);
    if image.dimensions() == (w, h) {
        return Ok(image);
    }
    tokio::task::spawn_blocking(move || image::imageops::resize(&image, w, h, FilterType::Lanczos3))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("resizing `{INIT_IMAGE_FIELD}` failed: {e}"),
            )
        })
}

/// `model_id`, with `version`: empty or `latest` is the model itself; another version is the
/// registry alias `{model_id}@{version}` (so `model_id=civitai:102438&version=133677` names the
/// model registered as `civitai:102438@133677`).
fn model(state: &AppState, form: &Form) -> Result<ModelEntry, ApiError> {
    let id = form
        .non_empty("model_id")
        .ok_or_else(|| ApiError::bad_request("`model_id` is required"))?;
    let version = form
        .non_empty("version")
        .filter(|v| !v.eq_ignore_ascii_case("latest"));
    let Some(version) = version else {
        return Ok(state.model_entry(id)?);
    };
    if let Ok(entry) = state.model_entry(&format!("{id}@{version}")) {
        return Ok(entry);
    }
    // An unknown model is reported as such, with the available ids; a known one without
    // this version names the version.
    state.model_entry(id)?;
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "version `{version}` of model `{id}` is not available on this server; leave \
             `version` empty or send \"latest\" for the served version"
        ),
    ))
}

/// A validated inference request, before the init image is loaded.
#[derive(Debug)]
struct Parsed {
    request: GenerationRequest,
    lcm: bool,
    /// The steps the request is priced at: those it would run without `lcm`.
    priced_steps: usize,
    image_strength: f64,
    /// `controlnet`: the registry id of the ControlNet the init image guides, and the
    /// preprocessor that makes its control image from the init image.
    controlnet: Option<(String, PreprocessorSpec)>,
}

fn parse_inference(state: &AppState, form: &Form, entry: &ModelEntry) -> Result<Parsed, ApiError> {
    let prompt = form
        .non_empty("prompt")
        .ok_or_else(|| ApiError::bad_request("`prompt` is required and may not be empty"))?;
    let lcm = flag(form, "lcm")?.unwrap_or(false);
    let width = side(form, "width", DEFAULT_WIDTH)?;
    let height = side(form, "height", DEFAULT_HEIGHT)?;
    let sent_steps = integer(form, "steps")?
        .map(|s| params::check_range("steps", s, MIN_STEPS as i64, MAX_STEPS as i64))
        .transpose()?
        .map(|s| s as usize);
    let sent_scale = number(form, "scale")?
        .map(|s| params::check_range("scale", s, MIN_SCALE, MAX_SCALE))
        .transpose()?;
    let priced_steps = sent_steps.unwrap_or(DEFAULT_STEPS);
    let (steps, scale) = if lcm {
        check_lcm_lora(state, entry)?;
        (
            sent_steps.filter(|&s| s <= LCM_STEPS).unwrap_or(LCM_STEPS),
            sent_scale
                .filter(|&s| s <= LCM_MAX_SCALE)
                .unwrap_or(LCM_GUIDANCE),
        )
    } else {
        let scale = sent_scale
            .or(entry.defaults.guidance)
            .unwrap_or(DEFAULT_SCALE);
        (
            priced_steps,
            params::check_range("scale", scale, MIN_SCALE, MAX_SCALE)?,
        )
    };
    let max_images = state.config().limits.max_images;
    let num_images = integer(form, "num_images")?.unwrap_or(DEFAULT_NUM_IMAGES as i64);
    let num_images = params::check_range("num_images", num_images, 1, max_images as i64)? as usize;
    let seed = seed(form)?;
    let negative_prompt = negative_prompt(form, entry)?;
    let scheduler = scheduler(form, entry, lcm)?;

    let lora_scale = number(form, "lora_scale")?.unwrap_or(DEFAULT_LORA_SCALE);
    if !lora_scale.is_finite() {
        return Err(ApiError::bad_request(format!(
            "`lora_scale` must be a finite number. Given: {lora_scale}"
        )));
    }
    let loras = match form.non_empty("lora") {
        Some(lora) => state.lora_set("lora", entry, &[(lora.to_string(), Some(lora_scale))])?,
        None => Vec::new(),
    };
    let controlnet = match form.non_empty("controlnet") {
        Some(name) => {
            let lower = name.to_ascii_lowercase();
            if !CONTROLNETS.contains(&lower.as_str()) {
                return Err(ApiError::bad_request(format!(
                    "`controlnet` must be one of {}. Given: {name:?}",
                    CONTROLNETS.join(", ")
                )));
            }
            // The control image is the init image's preprocessed form: refused before any work
            // when the preprocessor or the ControlNet is not available.
            let preprocessor = state.preprocessor("controlnet", &lower)?;
            if form.init_image.is_none() {
                return Err(ApiError::bad_request(format!(
                    "`controlnet` = {lower} needs `{INIT_IMAGE_FIELD}`: the image whose edges \
                     guide the generation"
                )));
            }
            Some((
                state.controlnet_of_type("controlnet", entry, &lower)?.id,
                preprocessor,
            ))
        }
        None => None,
    };

    let image_strength = number(form, "image_strength")?.unwrap_or(DEFAULT_IMAGE_STRENGTH);
    if !(image_strength > 0.0 && image_strength <= 1.0) {
        return Err(ApiError::bad_request(format!(
            "`image_strength` must be > 0 and <= 1. Given: {image_strength}"
        )));
    }
    if form.init_image.is_some() && controlnet.is_none() && (steps as f64 * image_strength) < 1.0 {
        return Err(ApiError::bad_request(format!(
            "`image_strength` {image_strength} with {steps} `steps` runs no denoising step: \
             `steps` x `image_strength` must be at least 1"
        )));
    }

    let mut request = GenerationRequest::new(prompt);
    request.negative_prompt = negative_prompt;
    request.width = width;
    request.height = height;
    request.steps = steps;
    request.guidance_scale = scale;
    request.scheduler = Some(scheduler);
    request.seed = seed;
    request.num_images = num_images;
    request.clip_skip = entry.defaults.clip_skip.map(|c| c as usize);
    request.loras = loras;
    request.lcm_lora = lcm;
    request.prompt_weighting = state.config().prompt_weighting.sinkin;
    Ok(Parsed {
        request,
        lcm,
        priced_steps,
        image_strength,
        controlnet,
    })
}

/// `lcm=true` needs an LCM-LoRA for the model's family; without one the mode is refused, never
/// run as plain LCM sampling of a model not distilled for it. (A model whose family is detected
/// from its files is checked by the engine once loaded.)
fn check_lcm_lora(state: &AppState, entry: &ModelEntry) -> Result<(), ApiError> {
    match entry.family {
        Some(family) if state.registry().lcm_lora(family).is_none() => {
            Err(ApiError::bad_request(format!(
                "`lcm`: LCM sampling is not available for model `{}`: no LCM-LoRA is configured \
                 for {family} models on this server. Send `lcm=false`",
                entry.id
            )))
        }
        _ => Ok(()),
    }
}

fn flag(form: &Form, field: &str) -> Result<Option<bool>, ApiError> {
    match form.get(field) {
        None => Ok(None),
        Some(s) => Ok(params::bool_str(field, s)?),
    }
}

fn integer(form: &Form, field: &str) -> Result<Option<i64>, ApiError> {
    match form.get(field) {
        None => Ok(None),
        Some(s) => Ok(params::i64_str(field, s)?),
    }
}

fn number(form: &Form, field: &str) -> Result<Option<f64>, ApiError> {
    match form.get(field) {
        None => Ok(None),
        Some(s) => Ok(params::f64_str(field, s)?),
    }
}

/// `width` or `height`: a multiple of 8 in 128..=896.
fn side(form: &Form, field: &str, default: usize) -> Result<usize, ApiError> {
    let v = integer(form, field)?.unwrap_or(default as i64);
    if v < MIN_SIDE as i64 || v > MAX_SIDE as i64 || v % SIDE_MULTIPLE as i64 != 0 {
        return Err(ApiError::bad_request(format!(
            "`{field}` must be a multiple of {SIDE_MULTIPLE} between {MIN_SIDE} and {MAX_SIDE}. \
             Given: {v}"
        )));
    }
    Ok(v as usize)
}

/// `seed`: -1 (the default) draws a random seed; otherwise a non-negative integer, used as is.
fn seed(form: &Form) -> Result<u64, ApiError> {
    let Some(text) = form.non_empty("seed") else {
        return Ok(random_seed(MAX_RANDOM_SEED));
    };
    if let Ok(seed) = text.parse::<u64>() {
        return Ok(seed);
    }
    match params::i64_str("seed", text)? {
        Some(-1) | None => Ok(random_seed(MAX_RANDOM_SEED)),
        Some(v) if v >= 0 => Ok(v as u64),
        Some(v) => Err(ApiError::bad_request(format!(
            "`seed` must be >= 0, or -1 for a random seed. Given: {v}"
        ))),
    }
}

/// `negative_prompt`, with the model's default negative prompt appended (comma-joined) unless
/// `use_default_neg` is false.
fn negative_prompt(form: &Form, entry: &ModelEntry) -> Result<Option<String>, ApiError> {
    let given = form.non_empty("negative_prompt");
    let use_default = flag(form, "use_default_neg")?.unwrap_or(true);
    let default = entry
        .defaults
        .negative_prompt
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty() && use_default);
    Ok(match (given, default) {
        (Some(given), Some(default)) => Some(format!("{given}, {default}")),
        (Some(one), None) | (None, Some(one)) => Some(one.to_string()),
        (None, None) => None,
    })
}

/// `scheduler`, else the model's default, else `DPMSolverMultistep`. With `lcm` true the LCM
/// scheduler samples, whatever was named (a named scheduler is still checked).
fn scheduler(form: &Form, entry: &ModelEntry, lcm: bool) -> Result<SchedulerSpec, ApiError> {
    let named = match form.non_empty("scheduler") {
        Some(name) => params::scheduler("scheduler", name)?,
        None => {
            let name = entry
                .defaults
                .scheduler
                .as_deref()
                .unwrap_or(DEFAULT_SCHEDULER);
            params::scheduler("scheduler", name).map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!(
                        "model `{}` has an unusable default scheduler: {e}",
                        entry.id
                    ),
                )
            })?
        }
    };
    Ok(if lcm {
        SchedulerSpec::new(SchedulerKind::Lcm)
    } else {
        named
    })
}

/// `POST /api/models`: the served models and LoRAs (`id` = registry id, `title` = description
/// or id; no cover images or pages, so `cover_img` and `link` are empty).
async fn models(State(state): State<AppState>, request: Request) -> Response {
    let result = async {
        let form = read_form(&state, request).await?;
        authenticate(&state, &form)?;
        form.log_unknown(&["access_token"]);
        let models: Vec<ModelInfo> = state
            .registry()
            .models()
            .map(|m| ModelInfo {
                id: m.id.clone(),
                title: m.description.clone().unwrap_or_else(|| m.id.clone()),
                cover_img: String::new(),
                link: String::new(),
            })
            .collect();
        let loras: Vec<ModelInfo> = state
            .registry()
            .loras()
            .map(|l| ModelInfo {
                id: l.id.clone(),
                title: l.description.clone().unwrap_or_else(|| l.id.clone()),
                cover_img: String::new(),
                link: String::new(),
            })
            .collect();
        Ok::<_, ApiError>(serde_json::json!({
            "error_code": 0,
            "models": models,
            "loras": loras,
        }))
    }
    .await;
    match result {
        Ok(body) => Json(body).into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> Form {
        let mut form = Form::default();
        for (k, v) in pairs {
            form.insert(k.to_string(), v.to_string()).unwrap();
        }
        form
    }

    fn entry(negative: Option<&str>) -> ModelEntry {
        ModelEntry {
            id: "m".into(),
            aliases: Vec::new(),
            family: None,
            source: crate::registry::ModelSource::Folder("m".into()),
            prediction_type: None,
            description: None,
            defaults: crate::registry::ModelDefaults {
                negative_prompt: negative.map(str::to_string),
                ..Default::default()
            },
        }
    }

    #[test]
    fn sides_are_multiples_of_8_within_limits() {
        assert_eq!(side(&form(&[]), "width", 512).unwrap(), 512);
        assert_eq!(side(&form(&[("width", "896")]), "width", 512).unwrap(), 896);
        for bad in ["120", "900", "130", "-8"] {
            let e = side(&form(&[("width", bad)]), "width", 512).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.contains("between 128 and 896"), "{}", e.message);
        }
        assert!(side(&form(&[("width", "abc")]), "width", 512)
            .unwrap_err()
            .message
            .contains("`width` must be an integer"));
    }

    #[test]
    fn seeds() {
        assert_eq!(seed(&form(&[("seed", "42")])).unwrap(), 42);
        assert_eq!(
            seed(&form(&[("seed", "18446744073709551615")])).unwrap(),
            u64::MAX
        );
        let random = seed(&form(&[("seed", "-1")])).unwrap();
        assert!((1..=MAX_RANDOM_SEED).contains(&random));
        assert!(seed(&form(&[("seed", "-2")])).is_err());
        assert!(seed(&form(&[("seed", "x")])).is_err());
    }

    #[test]
    fn default_negative_prompt_is_appended() {
        let curated = entry(Some("blurry, lowres"));
        let plain = entry(None);
        let neg = |f: &Form, e: &ModelEntry| negative_prompt(f, e).unwrap();
        assert_eq!(
            neg(&form(&[("negative_prompt", "ugly")]), &curated).as_deref(),
            Some("ugly, blurry, lowres")
        );
        assert_eq!(neg(&form(&[]), &curated).as_deref(), Some("blurry, lowres"));
        assert_eq!(neg(&form(&[("use_default_neg", "false")]), &curated), None);
        assert_eq!(
            neg(
                &form(&[("negative_prompt", "ugly"), ("use_default_neg", "false")]),
                &curated
            )
            .as_deref(),
            Some("ugly")
        );
        assert_eq!(neg(&form(&[]), &plain), None);
        assert!(negative_prompt(&form(&[("use_default_neg", "maybe")]), &plain).is_err());
    }

    #[test]
    fn schedulers_by_client_names() {
        let e = entry(None);
        for name in [
            "DPMSolverMultistep",
            "EulerAncestralDiscrete",
            "DDIM",
            "K_EULER",
            "K_EULER_ANCESTRAL",
            "PNDM",
            "KLMS",
        ] {
            scheduler(&form(&[("scheduler", name)]), &e, false)
                .unwrap_or_else(|err| panic!("{name}: {}", err.message));
        }
        let default = scheduler(&form(&[]), &e, false).unwrap();
        assert_eq!(default.kind, SchedulerKind::DpmSolverMultistep);
        let lcm = scheduler(&form(&[("scheduler", "DDIM")]), &e, true).unwrap();
        assert_eq!(lcm.kind, SchedulerKind::Lcm);
        let err = scheduler(&form(&[("scheduler", "nope")]), &e, false).unwrap_err();
        assert!(err.message.contains("accepted"), "{}", err.message);
    }

    #[test]
    fn duplicate_fields_are_refused() {
        let mut f = form(&[("prompt", "a")]);
        assert!(f.insert("prompt".into(), "b".into()).is_err());
    }
}
