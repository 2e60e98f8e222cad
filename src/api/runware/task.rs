//! Task objects as Runware clients send them, parsed once into typed tasks.
//!
//! A payload is a JSON array of task objects (a single object is accepted too). Each object is
//! parsed on its own: one bad task gets its own error and the others still run. Limits and
//! defaults are the documented ones (`width`/`height` multiples of 64 in 128..2048,
//! `positivePrompt` 2..3000 characters, `steps` 1..100 default 20 or the model's own default,
//! `CFGScale` 0..30 default 7, `numberResults` 1..20, ...), tightened by the operator's
//! `[limits]` where those are lower.

use serde_json::{Map, Value};
use uuid::Uuid;

use super::control::{self, ControlNetSpec, PreProcessTask, IMAGE_CONTROLNET_PREPROCESS};
use super::error::RunwareError;
use crate::api::media::ImageFormat;
use crate::api::output::JobError;
use crate::api::{params, AppState};
use crate::pipeline::{inpaint, GenerationRequest, Outpaint, PromptWeighting, Refiner};
use crate::registry::ModelEntry;
use crate::schedulers::{SchedulerKind, SchedulerSpec};
use crate::weights::Family;

pub const AUTHENTICATION: &str = "authentication";
pub const PING: &str = "ping";
pub const IMAGE_INFERENCE: &str = "imageInference";
pub const IMAGE_UPLOAD: &str = "imageUpload";
pub const GET_RESPONSE: &str = "getResponse";

/// The prompt token that asks for generation without text guidance.
pub const BLANK_PROMPT: &str = "__BLANK__";

/// Documented limits.
pub const PROMPT_CHARS: (usize, usize) = (2, 3000);
pub const NEGATIVE_PROMPT_CHARS: (usize, usize) = (2, 2000);
pub const SIDE: (i64, i64) = (128, 2048);
pub const SIDE_MULTIPLE: i64 = 64;
/// `lora[].weight` and `embeddings[].weight`: range and default.
pub const LORA_WEIGHT: (f64, f64) = (-4.0, 4.0);
pub const LORA_WEIGHT_DEFAULT: f64 = 1.0;
pub const STEPS: (i64, i64) = (1, 100);
pub const DEFAULT_STEPS: usize = 20;
pub const CFG_SCALE: (f64, f64) = (0.0, 30.0);
pub const DEFAULT_CFG_SCALE: f64 = 7.0;
pub const SEED: (u64, u64) = (1, i64::MAX as u64);
/// Seeds the server picks stay exact in JavaScript numbers (2^53 - 1).
pub const RANDOM_SEED_MAX: u64 = (1 << 53) - 1;
pub const NUMBER_RESULTS: (i64, i64) = (1, 20);
pub const CLIP_SKIP: (i64, i64) = (0, 2);
pub const OUTPUT_QUALITY: (i64, i64) = (20, 99);
pub const DEFAULT_OUTPUT_QUALITY: u8 = 95;
pub const STRENGTH: (f64, f64) = (0.0, 1.0);
pub const DEFAULT_STRENGTH: f64 = 0.8;
pub const MASK_MARGIN: (i64, i64) = (
    inpaint::MIN_MASK_MARGIN as i64,
    inpaint::MAX_MASK_MARGIN as i64,
);
/// `outpainting.blur`, in pixels.
/// `refiner.startStep`: from the second step to `steps`.
pub const REFINER_START_STEP_MIN: i64 = 2;
/// `refiner.startStepPercentage`: 1..99.
pub const REFINER_START_PERCENTAGE: (i64, i64) = (1, 99);
pub const OUTPAINT_BLUR: (i64, i64) = (0, inpaint::MAX_OUTPAINT_BLUR as i64);

/// One parsed task.
#[derive(Debug)]
pub enum Task {
    Authentication(AuthTask),
    Ping(PingTask),
    ImageInference(Box<InferenceTask>),
    ImageUpload(UploadTask),
    GetResponse(GetResponseTask),
    ControlNetPreProcess(PreProcessOutput),
}

/// An `imageControlNetPreProcess` task with its output options.
#[derive(Debug, Clone)]
pub struct PreProcessOutput {
    pub task: PreProcessTask,
    pub output_types: Vec<OutputType>,
    pub output_format: ImageFormat,
}

#[derive(Debug, Clone)]
pub struct AuthTask {
    pub api_key: Option<String>,
    /// The session to resume.
    pub session: Option<String>,
}

#[derive(Debug, Clone)]
pub struct PingTask {
    /// Echoed when the client sent one.
    pub task_uuid: Option<String>,
}

#[derive(Debug, Clone)]
pub struct UploadTask {
    pub task_uuid: String,
    /// A data URI, bare base64 or a URL.
    pub image: String,
}

#[derive(Debug, Clone)]
pub struct GetResponseTask {
    pub task_uuid: String,
}

/// How an image is returned: each adds its own field to the result item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputType {
    Url,
    Base64Data,
    DataUri,
}

/// `deliveryMethod`: `sync` streams the images; `async` acknowledges at once and leaves the
/// results to `getResponse`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Sync,
    Async,
}

/// An `imageInference` task, validated, with the model's defaults applied.
#[derive(Debug)]
pub struct InferenceTask {
    pub task_uuid: String,
    pub model: ModelEntry,
    /// Everything but the seed image, which is loaded when the task runs.
    pub request: GenerationRequest,
    pub seed_image: Option<String>,
    pub strength: f64,
    /// Inpainting: the mask, as the client sent it (same forms as `seedImage`).
    pub mask_image: Option<String>,
    pub mask_margin: Option<u32>,
    pub outpainting: Option<Outpaint>,
    /// `controlNet` items; their guide images are loaded when the task runs.
    pub controlnets: Vec<ControlNetSpec>,
    /// `ipAdapters` items; their guide images are loaded when the task runs.
    pub ip_adapters: Vec<super::ip_adapter::IpAdapterSpec>,
    pub output_types: Vec<OutputType>,
    pub output_format: ImageFormat,
    pub output_quality: u8,
    pub include_cost: bool,
    pub upload_endpoint: Option<String>,
    pub delivery: Delivery,
    /// The task as recorded with its job (long image strings shortened).
    pub record: Value,
}

impl InferenceTask {
    /// Whether the sampler is LCM (priced at its own rate).
    pub fn is_lcm(&self) -> bool {
        self.request
            .scheduler
            .as_ref()
            .is_some_and(|s| s.kind == SchedulerKind::Lcm)
    }
}

/// The task objects of a payload: a JSON array of objects, or one object.
pub fn parse_payload(bytes: &[u8]) -> Result<Vec<Value>, RunwareError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        RunwareError::invalid_json(format!(
            "the payload is not valid JSON ({e}); send a JSON array of task objects"
        ))
    })?;
    match value {
        Value::Array(tasks) => Ok(tasks),
        Value::Object(_) => Ok(vec![value]),
        other => Err(RunwareError::invalid_json(format!(
            "the payload must be a JSON array of task objects. Given: {}",
            kind_of(&other)
        ))),
    }
}

/// The `taskType` and `taskUUID` of a task object as given, for scoping its errors.
pub fn task_ids(task: &Value) -> (Option<&str>, Option<&str>) {
    (
        task.get("taskType").and_then(Value::as_str),
        task.get("taskUUID").and_then(Value::as_str),
    )
}

/// Parses one task object. Errors carry the task's `taskType` and `taskUUID` as given.
pub fn parse_task(task: &Value, state: &AppState) -> Result<Task, RunwareError> {
    let (task_type, task_uuid) = task_ids(task);
    parse_task_inner(task, state).map_err(|e| e.task(task_type, task_uuid))
}

fn parse_task_inner(task: &Value, state: &AppState) -> Result<Task, RunwareError> {
    let Value::Object(obj) = task else {
        return Err(RunwareError::new(
            "invalidTaskType",
            format!(
                "each task must be a JSON object with a `taskType`. Given: {}",
                kind_of(task)
            ),
        )
        .parameter("taskType"));
    };
    let fields = Fields(obj);
    let task_type = match fields.get("taskType") {
        None => {
            return Err(RunwareError::missing(
                "taskType",
                "`taskType` is required: one of authentication, ping, imageInference, \
                 imageUpload, getResponse, imageControlNetPreProcess",
            ))
        }
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            return Err(RunwareError::new(
                "invalidTaskType",
                format!("`taskType` must be a string. Given: {}", kind_of(other)),
            )
            .parameter("taskType"))
        }
    };
    match task_type {
        AUTHENTICATION => Ok(Task::Authentication(AuthTask {
            api_key: fields.string("apiKey")?,
            session: fields.string("connectionSessionUUID")?,
        })),
        PING => Ok(Task::Ping(PingTask {
            task_uuid: fields.string("taskUUID")?,
        })),
        IMAGE_UPLOAD => {
            let task_uuid = fields.task_uuid()?;
            let image = fields
                .string("image")?
                .filter(|s| !s.trim().is_empty())
                .ok_or_else(|| {
                    RunwareError::missing(
                        "image",
                        "`image` is required: a data URI, base64 image data or an image URL",
                    )
                })?;
            Ok(Task::ImageUpload(UploadTask { task_uuid, image }))
        }
        GET_RESPONSE => Ok(Task::GetResponse(GetResponseTask {
            task_uuid: fields.task_uuid()?,
        })),
        IMAGE_CONTROLNET_PREPROCESS => {
            let task = control::parse_preprocess(fields.0, fields.task_uuid()?, state)?;
            Ok(Task::ControlNetPreProcess(PreProcessOutput {
                task,
                output_types: fields.output_types()?,
                output_format: fields.output_format(ImageFormat::Png)?,
            }))
        }
        IMAGE_INFERENCE => Ok(Task::ImageInference(Box::new(parse_inference(
            fields, state,
        )?))),
        other => Err(RunwareError::new(
            "invalidTaskType",
            format!(
                "taskType `{other}` is not supported by this server; supported: \
                 authentication, ping, imageInference, imageUpload, getResponse, \
                 imageControlNetPreProcess"
            ),
        )
        .parameter("taskType")),
    }
}

/// Parameters of `imageInference` this server handles.
const HANDLED: &[&str] = &[
    "taskType",
    "lora",
    "vae",
    "embeddings",
    "controlNet",
    "ipAdapters",
    "taskUUID",
    "positivePrompt",
    "negativePrompt",
    "width",
    "height",
    "model",
    "steps",
    "CFGScale",
    "seed",
    "numberResults",
    "scheduler",
    "clipSkip",
    "outputType",
    "outputFormat",
    "outputQuality",
    "includeCost",
    "checkNSFW",
    "uploadEndpoint",
    "seedImage",
    "strength",
    "maskImage",
    "maskMargin",
    "outpainting",
    "deliveryMethod",
    "promptWeighting",
    "refiner",
];

/// Documented parameters this server cannot honour yet, with what they ask for. Their "off"
/// values (null, false, empty string, list or object) are accepted.
const NOT_SUPPORTED: &[(&str, &str)] = &[
    ("lycoris", "LyCORIS adapters"),
    ("usePromptWeighting", "prompt weighting syntax"),
    ("referenceImages", "reference images"),
    ("safety", "content safety checks"),
    ("webhookURL", "webhook delivery"),
    ("instantID", "InstantID"),
    ("acePlusPlus", "ACE++"),
    ("puLID", "PuLID"),
    ("photoMaker", "PhotoMaker"),
    ("providerSettings", "provider settings"),
    ("acceleratorOptions", "accelerator options"),
    ("advancedFeatures", "advanced features"),
    ("acceleration", "acceleration presets"),
    ("upscaleFactor", "upscaling"),
    ("ttl", "image time-to-live"),
];

fn parse_inference(fields: Fields<'_>, state: &AppState) -> Result<InferenceTask, RunwareError> {
    let task_uuid = fields.task_uuid()?;

    for (name, value) in fields.0 {
        if HANDLED.contains(&name.as_str()) || is_off(value) {
            continue;
        }
        let message = match NOT_SUPPORTED.iter().find(|(n, _)| n == name) {
            Some((_, what)) => JobError::not_supported(name.as_str(), what).message,
            None => format!("`{name}` is not an imageInference parameter this server supports"),
        };
        return Err(RunwareError::unsupported(name, message));
    }
    if fields.bool("checkNSFW")? == Some(true) {
        let what = "the NSFW check (send `checkNSFW: false` or leave it out)";
        return Err(RunwareError::unsupported(
            "checkNSFW",
            JobError::not_supported("checkNSFW", what).message,
        ));
    }

    let limits = &state.config().limits;

    let prompt = match fields.string("positivePrompt")? {
        None => {
            return Err(RunwareError::missing(
                "positivePrompt",
                format!(
                    "`positivePrompt` is required ({} to {} characters; `{BLANK_PROMPT}` for \
                     no prompt)",
                    PROMPT_CHARS.0, PROMPT_CHARS.1
                ),
            ))
        }
        Some(p) if p.trim() == BLANK_PROMPT => String::new(),
        Some(p) => check_chars("positivePrompt", p, PROMPT_CHARS)?,
    };
    let negative_prompt = fields
        .string("negativePrompt")?
        .map(|p| check_chars("negativePrompt", p, NEGATIVE_PROMPT_CHARS))
        .transpose()?;

    let width = fields.side("width")?;
    let height = fields.side("height")?;
    if width * height > limits.max_pixels {
        return Err(RunwareError::invalid(
            "width",
            format!(
                "`width` x `height` must be at most {} pixels on this server. Given: {width}x{height}",
                limits.max_pixels
            ),
        ));
    }

    let model_name = fields.string("model")?.ok_or_else(|| {
        RunwareError::missing(
            "model",
            "`model` is required: an AIR id such as civitai:102438@133677",
        )
    })?;
    let model = state
        .model_entry(&model_name)
        .map_err(RunwareError::from_job)?;
    if model.family == Some(Family::SdxlRefiner) {
        return Err(RunwareError::invalid(
            "model",
            format!(
                "model `{model_name}` is an SDXL refiner: name it in `refiner` of an SDXL model's \
                 task; it does not generate alone"
            ),
        ));
    }
    let defaults = &model.defaults;

    let steps_hi = STEPS.1.min(limits.max_steps as i64);
    let steps = match fields.int("steps")? {
        Some(s) => range("steps", s, STEPS.0, steps_hi)? as usize,
        None => defaults
            .steps
            .map_or(DEFAULT_STEPS, |s| s as usize)
            .min(steps_hi as usize),
    };
    let cfg_scale = match fields.float("CFGScale")? {
        Some(g) => range("CFGScale", g, CFG_SCALE.0, CFG_SCALE.1)?,
        None => DEFAULT_CFG_SCALE,
    };
    let seed = match fields.u64("seed")? {
        Some(s) => range("seed", s, SEED.0, SEED.1)?,
        None => crate::api::random_seed(RANDOM_SEED_MAX),
    };
    let images_hi = NUMBER_RESULTS.1.min(limits.max_images as i64);
    let number_results = match fields.int("numberResults")? {
        Some(n) => range("numberResults", n, NUMBER_RESULTS.0, images_hi)? as usize,
        None => 1,
    };
    let scheduler = match fields.string("scheduler")? {
        Some(name) if !name.trim().eq_ignore_ascii_case("default") => {
            Some(params::scheduler("scheduler", &name).map_err(|e| {
                RunwareError::invalid(
                    "scheduler",
                    format!("`scheduler` {name:?} cannot be used: {}", e.message),
                )
            })?)
        }
        _ => match &defaults.scheduler {
            Some(name) => Some(SchedulerSpec::parse(name).map_err(|e| {
                RunwareError::from_job(JobError::new(
                    crate::api::JobErrorKind::Failed,
                    format!(
                        "model `{}` has an unusable default scheduler: {e}",
                        model.id
                    ),
                ))
            })?),
            None => None,
        },
    };
    // Runware's clipSkip adds to the layers the model already skips.
    let extra_skip = match fields.int("clipSkip")? {
        Some(c) => range("clipSkip", c, CLIP_SKIP.0, CLIP_SKIP.1)? as usize,
        None => 0,
    };
    let clip_skip = Some(defaults.clip_skip.unwrap_or(0) as usize + extra_skip).filter(|&c| c > 0);

    let prompt_weighting = match fields.string("promptWeighting")? {
        None => state.config().prompt_weighting.runware,
        Some(w) => prompt_weighting(&w)?,
    };
    for (name, text) in [
        ("positivePrompt", Some(&prompt)),
        ("negativePrompt", negative_prompt.as_ref()),
    ] {
        if let Some(text) = text {
            prompt_weighting.check_prompt(text).map_err(|e| {
                RunwareError::invalid(name, format!("`{name}` cannot be read: {e}"))
            })?;
        }
    }

    let output_types = fields.output_types()?;
    let output_format = fields.output_format(ImageFormat::Jpeg)?;
    let output_quality = match fields.int("outputQuality")? {
        Some(q) => range("outputQuality", q, OUTPUT_QUALITY.0, OUTPUT_QUALITY.1)? as u8,
        None => DEFAULT_OUTPUT_QUALITY,
    };
    let include_cost = fields.bool("includeCost")?.unwrap_or(false);
    let upload_endpoint = fields.string("uploadEndpoint")?.filter(|s| !s.is_empty());
    let delivery = match fields.string("deliveryMethod")? {
        None => Delivery::Sync,
        Some(d) => match d.trim().to_ascii_lowercase().as_str() {
            "sync" => Delivery::Sync,
            "async" => Delivery::Async,
            _ => {
                return Err(RunwareError::invalid(
                    "deliveryMethod",
                    format!("`deliveryMethod` must be sync or async. Given: {d:?}"),
                ))
            }
        },
    };

    let seed_image = fields.string("seedImage")?.filter(|s| !s.trim().is_empty());
    let strength = match fields.float("strength")? {
        Some(s) => range("strength", s, STRENGTH.0, STRENGTH.1)?,
        None => DEFAULT_STRENGTH,
    };
    if seed_image.is_some() && (strength <= 0.0 || strength * (steps as f64) < 1.0) {
        return Err(RunwareError::invalid(
            "strength",
            format!(
                "`strength` {strength} with {steps} steps runs no denoising step: \
                 `strength` x `steps` must be at least 1"
            ),
        ));
    }

    let mask_image = fields.string("maskImage")?.filter(|s| !s.trim().is_empty());
    let mask_margin = fields
        .int("maskMargin")?
        .map(|m| range("maskMargin", m, MASK_MARGIN.0, MASK_MARGIN.1))
        .transpose()?
        .map(|m| m as u32);
    let outpainting = fields.outpainting()?;
    if seed_image.is_none() {
        for (name, given, what) in [
            ("maskImage", mask_image.is_some(), "inpainting"),
            ("outpainting", outpainting.is_some(), "outpainting"),
        ] {
            if given {
                return Err(RunwareError::missing(
                    "seedImage",
                    format!("`seedImage` is required with `{name}`: the image {what} works on"),
                ));
            }
        }
    }
    if mask_margin.is_some() && mask_image.is_none() {
        return Err(RunwareError::missing(
            "maskImage",
            "`maskImage` is required with `maskMargin`: the margin is taken around the mask",
        ));
    }
    if mask_margin.is_some() && outpainting.is_some() {
        return Err(RunwareError::invalid(
            "maskMargin",
            "`maskMargin` applies to inpainting only; it cannot be combined with `outpainting`",
        ));
    }

    let mut request = GenerationRequest::new(prompt);
    request.negative_prompt = negative_prompt.or_else(|| defaults.negative_prompt.clone());
    request.width = width;
    request.height = height;
    request.steps = steps;
    request.guidance_scale = cfg_scale;
    request.scheduler = scheduler;
    request.seed = seed;
    request.num_images = number_results;
    request.clip_skip = clip_skip;
    request.loras = fields.loras(state, &model)?;
    request.vae = fields.vae(state, &model)?;
    request.prompt_weighting = prompt_weighting;
    request.embeddings = fields.embeddings(state, &model)?;
    let controlnets = control::parse_controlnets(fields.get("controlNet"), state, &model, steps)?;
    let repaints = seed_image.is_some() && (mask_image.is_some() || outpainting.is_some());
    if let Some(spec) = controlnets
        .iter()
        .find(|c| c.inpaints())
        .filter(|_| !repaints)
    {
        return Err(RunwareError::invalid(
            "controlNet",
            format!(
                "ControlNet `{}` is an inpaint ControlNet: it reads the guide image with the \
                 repainted pixels at -1, so the task needs `seedImage` with `maskImage` or \
                 `outpainting`",
                spec.model
            ),
        ));
    }
    let ip_adapters = super::ip_adapter::parse(fields.get("ipAdapters"), state, &model)?;
    request.refiner = fields.refiner(state, &model, steps)?;
    if request.refiner.is_some() && (mask_image.is_some() || outpainting.is_some()) {
        return Err(RunwareError::invalid(
            "refiner",
            "`refiner` cannot be combined with `maskImage` or `outpainting`",
        ));
    }

    Ok(InferenceTask {
        task_uuid,
        model,
        request,
        seed_image,
        strength,
        mask_image,
        mask_margin,
        outpainting,
        controlnets,
        ip_adapters,
        output_types,
        output_format,
        output_quality,
        include_cost,
        upload_endpoint,
        delivery,
        record: recorded(fields.0),
    })
}

/// `promptWeighting`: `compel` (compel's syntax) or `sdEmbeds` (AUTOMATIC1111's), as Runware
/// documents them.
pub fn prompt_weighting(value: &str) -> Result<PromptWeighting, RunwareError> {
    match value.trim() {
        v if v.eq_ignore_ascii_case("compel") => Ok(PromptWeighting::Compel),
        v if v.eq_ignore_ascii_case("sdEmbeds") => Ok(PromptWeighting::A1111),
        _ => Err(RunwareError::invalid(
            "promptWeighting",
            format!("`promptWeighting` must be `compel` or `sdEmbeds`. Given: {value:?}"),
        )),
    }
}

/// Checks a UUID v4 as Runware requires for `taskUUID`.
pub fn check_task_uuid(s: &str) -> Result<String, RunwareError> {
    match Uuid::parse_str(s.trim()) {
        Ok(u) if u.get_version_num() == 4 => Ok(s.trim().to_string()),
        _ => Err(RunwareError::invalid(
            "taskUUID",
            format!("`taskUUID` must be a UUID v4 string. Given: {s:?}"),
        )),
    }
}

/// Null, false, empty strings, empty lists and objects whose every value is off: what a client
/// sends for a feature it does not use.
fn is_off(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(is_off),
        Value::Bool(true) | Value::Number(_) => false,
    }
}

/// The task as it is recorded: image strings longer than a URL are shortened.
fn recorded(obj: &Map<String, Value>) -> Value {
    let mut copy = obj.clone();
    for (_, v) in copy.iter_mut() {
        if let Value::String(s) = v {
            if s.len() > 512 {
                *v = Value::String(format!("<{} characters>", s.len()));
            }
        }
    }
    Value::Object(copy)
}

fn check_chars(
    field: &str,
    text: String,
    (lo, hi): (usize, usize),
) -> Result<String, RunwareError> {
    let n = text.chars().count();
    if n < lo || n > hi {
        return Err(RunwareError::invalid(
            field,
            format!("`{field}` must be between {lo} and {hi} characters long. Given: {n}"),
        ));
    }
    Ok(text)
}

fn range<T>(field: &str, v: T, lo: T, hi: T) -> Result<T, RunwareError>
where
    T: PartialOrd + std::fmt::Display + Copy,
{
    params::check_range(field, v, lo, hi).map_err(RunwareError::from_job)
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Typed access to a task object's fields; `null` counts as absent.
#[derive(Clone, Copy)]
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn string(&self, name: &str) -> Result<Option<String>, RunwareError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => params::string_value(name, v).map_err(RunwareError::from_job),
        }
    }

    fn int(&self, name: &str) -> Result<Option<i64>, RunwareError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => params::i64_value(name, v).map_err(RunwareError::from_job),
        }
    }

    fn u64(&self, name: &str) -> Result<Option<u64>, RunwareError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => params::u64_value(name, v).map_err(RunwareError::from_job),
        }
    }

    fn float(&self, name: &str) -> Result<Option<f64>, RunwareError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => params::f64_value(name, v).map_err(RunwareError::from_job),
        }
    }

    fn bool(&self, name: &str) -> Result<Option<bool>, RunwareError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => params::bool_value(name, v).map_err(RunwareError::from_job),
        }
    }

    /// `lora`: `[{model, weight}]`, each `model` a registered LoRA (AIR id or alias) of the task
    /// model's family, `weight` -4..4 (default 1).
    fn loras(
        &self,
        state: &AppState,
        model: &ModelEntry,
    ) -> Result<Vec<(String, f64)>, RunwareError> {
        let requested =
            self.weighted_models("lora", "a LoRA AIR id such as civitai:132942@146296")?;
        state
            .lora_set("lora", model, &requested)
            .map_err(RunwareError::from_job)
    }

    /// `embeddings`: `[{model, weight}]`, each `model` a registered textual inversion embedding
    /// (AIR id or alias) of the task model's family, `weight` -4..4 (default 1).
    fn embeddings(
        &self,
        state: &AppState,
        model: &ModelEntry,
    ) -> Result<Vec<(String, f64)>, RunwareError> {
        let requested = self.weighted_models(
            "embeddings",
            "an embedding AIR id such as civitai:7808@9208",
        )?;
        state
            .embedding_set("embeddings", model, &requested)
            .map_err(RunwareError::from_job)
    }

    /// A `[{model, weight}]` list (`lora`, `embeddings`): each `model` a string, each `weight`
    /// in -4..4 (default 1); errors name `field`.
    fn weighted_models(
        &self,
        field: &str,
        example: &str,
    ) -> Result<Vec<(String, Option<f64>)>, RunwareError> {
        let Some(value) = self.get(field) else {
            return Ok(Vec::new());
        };
        let shape = || {
            RunwareError::invalid(
                field,
                format!(
                    "`{field}` must be an array of {{model, weight}} objects. Given: {}",
                    kind_of(value)
                ),
            )
        };
        let Value::Array(items) = value else {
            return Err(shape());
        };
        let as_field = |e: JobError| RunwareError::from_job(e.with_parameter(field));
        let (model_field, weight_field) = (format!("{field}.model"), format!("{field}.weight"));
        let mut requested = Vec::with_capacity(items.len());
        for item in items {
            let Value::Object(obj) = item else {
                return Err(shape());
            };
            let item = Fields(obj);
            let name = match item.get("model") {
                Some(v) => params::string_value(&model_field, v).map_err(as_field)?,
                None => None,
            }
            .ok_or_else(|| {
                RunwareError::missing(
                    field,
                    format!("each `{field}` item needs `model`: {example}"),
                )
            })?;
            let weight = match item.get("weight") {
                Some(v) => params::f64_value(&weight_field, v).map_err(as_field)?,
                None => None,
            };
            let weight = match weight {
                Some(w) => params::check_range(&weight_field, w, LORA_WEIGHT.0, LORA_WEIGHT.1)
                    .map_err(as_field)?,
                None => LORA_WEIGHT_DEFAULT,
            };
            requested.push((name, Some(weight)));
        }
        Ok(requested)
    }

    /// `vae`: a registered VAE (AIR id or alias) for the task model's latent space.
    fn vae(&self, state: &AppState, model: &ModelEntry) -> Result<Option<String>, RunwareError> {
        let Some(value) = self.get("vae") else {
            return Ok(None);
        };
        let name = params::string_value("vae", value)
            .map_err(RunwareError::from_job)?
            .filter(|s| !s.trim().is_empty());
        name.map(|name| state.vae_for("vae", model, name.trim()))
            .transpose()
            .map_err(RunwareError::from_job)
    }

    /// `refiner`: `{model, startStep | startStepPercentage}`. `model` a registered SDXL refiner
    /// (AIR id or alias) and the task model an SDXL one; exactly one start: `startStep`
    /// 2..=`steps` (the base runs the steps before it) or `startStepPercentage` 1..99.
    fn refiner(
        &self,
        state: &AppState,
        model: &ModelEntry,
        steps: usize,
    ) -> Result<Option<Refiner>, RunwareError> {
        // An "off" refiner (`{}`, `{"model": null}`, `false`) is no refiner.
        let Some(value) = self.get("refiner").filter(|v| !is_off(v)) else {
            return Ok(None);
        };
        let Value::Object(obj) = value else {
            return Err(RunwareError::invalid(
                "refiner",
                format!(
                    "`refiner` must be an object {{model, startStep | startStepPercentage}}. \
                     Given: {}",
                    kind_of(value)
                ),
            ));
        };
        let item = Fields(obj);
        let as_refiner = |e: JobError| RunwareError::from_job(e.with_parameter("refiner"));
        for name in obj.keys() {
            if !["model", "startStep", "startStepPercentage"].contains(&name.as_str()) {
                return Err(RunwareError::invalid(
                    "refiner",
                    format!(
                        "`refiner.{name}` is not a refiner parameter: use model, startStep or \
                         startStepPercentage"
                    ),
                ));
            }
        }
        let name = match item.get("model") {
            Some(v) => params::string_value("refiner.model", v).map_err(as_refiner)?,
            None => None,
        }
        .filter(|m| !m.trim().is_empty())
        .ok_or_else(|| {
            RunwareError::missing(
                "refiner",
                "`refiner.model` is required: the AIR id of an SDXL refiner model",
            )
        })?;
        let registry = state.registry();
        let refiners = || {
            let ids: Vec<&str> = registry
                .models()
                .filter(|m| m.family == Some(Family::SdxlRefiner))
                .map(|m| m.id.as_str())
                .collect();
            if ids.is_empty() {
                "none".to_string()
            } else {
                ids.join(", ")
            }
        };
        let entry = registry.get(&name).ok_or_else(|| {
            RunwareError::invalid(
                "refiner",
                format!(
                    "`refiner.model`: model `{name}` is not available on this server. \
                     Available refiners: {}",
                    refiners()
                ),
            )
        })?;
        if let Some(family) = entry.family {
            if !matches!(family, Family::SdxlRefiner | Family::Sdxl) {
                return Err(RunwareError::invalid(
                    "refiner",
                    format!(
                        "`refiner.model`: model `{name}` is {family}, not an SDXL refiner. \
                         Available refiners: {}",
                        refiners()
                    ),
                ));
            }
        }
        if let Some(family) = model.family.filter(|f| *f != Family::Sdxl) {
            return Err(RunwareError::invalid(
                "refiner",
                format!(
                    "`refiner` works only with SDXL models: model `{}` is {family}",
                    model.id
                ),
            ));
        }
        let step = item
            .get("startStep")
            .map(|v| params::i64_value("refiner.startStep", v).map_err(as_refiner))
            .transpose()?
            .flatten();
        let percentage = item
            .get("startStepPercentage")
            .map(|v| params::i64_value("refiner.startStepPercentage", v).map_err(as_refiner))
            .transpose()?
            .flatten();
        let start = match (step, percentage) {
            (Some(_), Some(_)) => {
                return Err(RunwareError::invalid(
                    "refiner",
                    "`refiner.startStep` and `refiner.startStepPercentage` are alternatives: \
                     give one of them",
                ))
            }
            (None, None) => {
                return Err(RunwareError::missing(
                    "refiner",
                    format!(
                        "`refiner` needs `startStep` ({REFINER_START_STEP_MIN} to `steps`) or \
                         `startStepPercentage` ({} to {}): where the refiner takes over",
                        REFINER_START_PERCENTAGE.0, REFINER_START_PERCENTAGE.1
                    ),
                ))
            }
            (Some(step), None) => {
                if step < REFINER_START_STEP_MIN || step > steps as i64 {
                    return Err(RunwareError::invalid(
                        "refiner",
                        format!(
                            "`refiner.startStep` must be between {REFINER_START_STEP_MIN} and \
                             `steps` ({steps}). Given: {step}"
                        ),
                    ));
                }
                step as f64 / steps as f64
            }
            (None, Some(p)) => {
                let (lo, hi) = REFINER_START_PERCENTAGE;
                if p < lo || p > hi {
                    return Err(RunwareError::invalid(
                        "refiner",
                        format!(
                            "`refiner.startStepPercentage` must be between {lo} and {hi}. \
                             Given: {p}"
                        ),
                    ));
                }
                p as f64 / 100.0
            }
        };
        Ok(Some(Refiner {
            model: entry.id.clone(),
            start,
        }))
    }

    fn task_uuid(&self) -> Result<String, RunwareError> {
        match self.get("taskUUID") {
            None => Err(RunwareError::missing(
                "taskUUID",
                "`taskUUID` is required: a UUID v4 string, unique for each task",
            )),
            Some(Value::String(s)) => check_task_uuid(s),
            Some(other) => Err(RunwareError::invalid(
                "taskUUID",
                format!(
                    "`taskUUID` must be a UUID v4 string. Given: {}",
                    kind_of(other)
                ),
            )),
        }
    }

    /// A required `width` or `height`: a multiple of 64 in 128..2048.
    fn side(&self, name: &str) -> Result<usize, RunwareError> {
        let limit = format!(
            "a multiple of {SIDE_MULTIPLE} between {} and {}",
            SIDE.0, SIDE.1
        );
        let v = self
            .int(name)?
            .ok_or_else(|| RunwareError::missing(name, format!("`{name}` is required: {limit}")))?;
        if v < SIDE.0 || v > SIDE.1 || v % SIDE_MULTIPLE != 0 {
            return Err(RunwareError::invalid(
                name,
                format!("`{name}` must be {limit}. Given: {v}"),
            ));
        }
        Ok(v as usize)
    }

    /// `outpainting`: `top`, `right`, `bottom`, `left` (pixels, multiples of 64, >= 0) and
    /// `blur` (0..32, default 0); absent when the object is absent or all zero.
    fn outpainting(&self) -> Result<Option<Outpaint>, RunwareError> {
        let field = "outpainting";
        let object = match self.get(field) {
            None => return Ok(None),
            Some(Value::Object(o)) => o,
            Some(other) => {
                return Err(RunwareError::invalid(
                    field,
                    format!(
                        "`outpainting` must be an object with `top`, `right`, `bottom`, `left` \
                         and `blur`. Given: {}",
                        kind_of(other)
                    ),
                ))
            }
        };
        if let Some(unknown) = object
            .keys()
            .find(|k| !["top", "right", "bottom", "left", "blur"].contains(&k.as_str()))
        {
            return Err(RunwareError::invalid(
                field,
                format!(
                    "`outpainting.{unknown}` is not an outpainting field: use `top`, `right`, \
                     `bottom`, `left` and `blur`"
                ),
            ));
        }
        let inner = Fields(object);
        let invalid = |e: RunwareError| RunwareError::invalid(field, e.message.clone());
        let side = |name: &str| -> Result<u32, RunwareError> {
            let v = inner.int(name).map_err(invalid)?.unwrap_or(0);
            let multiple = inpaint::OUTPAINT_MULTIPLE as i64;
            if v < 0 || v % multiple != 0 || v > SIDE.1 {
                return Err(RunwareError::invalid(
                    field,
                    format!(
                        "`outpainting.{name}` must be a multiple of {multiple} between 0 and {}. \
                         Given: {v}",
                        SIDE.1
                    ),
                ));
            }
            Ok(v as u32)
        };
        let outpaint = Outpaint {
            top: side("top")?,
            right: side("right")?,
            bottom: side("bottom")?,
            left: side("left")?,
            blur: 0,
        };
        let blur = match inner.int("blur").map_err(invalid)? {
            None => 0,
            Some(b) if (OUTPAINT_BLUR.0..=OUTPAINT_BLUR.1).contains(&b) => b as u32,
            Some(b) => {
                return Err(RunwareError::invalid(
                    field,
                    format!(
                        "`outpainting.blur` must be between {} and {}. Given: {b}",
                        OUTPAINT_BLUR.0, OUTPAINT_BLUR.1
                    ),
                ))
            }
        };
        if outpaint.sides().iter().all(|&(_, v)| v == 0) {
            return Ok(None);
        }
        Ok(Some(Outpaint { blur, ..outpaint }))
    }

    /// `outputFormat`: JPG, PNG or WEBP; `default` when absent.
    fn output_format(&self, default: ImageFormat) -> Result<ImageFormat, RunwareError> {
        match self.string("outputFormat")? {
            None => Ok(default),
            Some(f) => match f.trim().to_ascii_uppercase().as_str() {
                "JPG" | "JPEG" => Ok(ImageFormat::Jpeg),
                "PNG" => Ok(ImageFormat::Png),
                "WEBP" => Ok(ImageFormat::Webp),
                _ => Err(RunwareError::invalid(
                    "outputFormat",
                    format!("`outputFormat` must be one of JPG, PNG, WEBP. Given: {f:?}"),
                )),
            },
        }
    }

    /// `outputType`: one name or a list of names; `URL` when absent.
    fn output_types(&self) -> Result<Vec<OutputType>, RunwareError> {
        let names: Vec<&Value> = match self.get("outputType") {
            None => return Ok(vec![OutputType::Url]),
            Some(Value::Array(list)) if !list.is_empty() => list.iter().collect(),
            Some(v) => vec![v],
        };
        let mut types = Vec::new();
        for v in names {
            let t = match v.as_str().map(|s| s.trim().to_ascii_lowercase()).as_deref() {
                Some("url") => OutputType::Url,
                Some("base64data") => OutputType::Base64Data,
                Some("datauri") => OutputType::DataUri,
                _ => {
                    return Err(RunwareError::invalid(
                        "outputType",
                        format!("`outputType` must be one of URL, base64Data, dataURI. Given: {v}"),
                    ))
                }
            };
            if !types.contains(&t) {
                types.push(t);
            }
        }
        Ok(types)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn payloads_are_arrays_or_one_object() {
        assert_eq!(parse_payload(b"[{\"a\":1},{}]").unwrap().len(), 2);
        assert_eq!(parse_payload(b"{\"taskType\":\"ping\"}").unwrap().len(), 1);
        assert_eq!(parse_payload(b"[1,").unwrap_err().code, "invalidJSON");
        assert_eq!(parse_payload(b"\"x\"").unwrap_err().code, "invalidJSON");
    }

    #[test]
    fn task_uuids_must_be_v4() {
        assert!(check_task_uuid("39d7207a-87ef-4c93-8082-1431f9c1dc97").is_ok());
        // A version 1 UUID.
        let e = check_task_uuid("c232ab00-9414-11ec-b3c8-9f6bdeced846").unwrap_err();
        assert_eq!(e.code, "invalidTaskUUID");
        assert!(check_task_uuid("not-a-uuid").is_err());
    }

    #[test]
    fn off_values_are_what_unused_features_look_like() {
        for v in [json!(null), json!(false), json!(""), json!([]), json!({})] {
            assert!(is_off(&v), "{v}");
        }
        assert!(is_off(&json!({"checkContent": false})));
        for v in [
            json!(true),
            json!(0),
            json!("x"),
            json!([{}]),
            json!({"a": 1}),
        ] {
            assert!(!is_off(&v), "{v}");
        }
    }

    #[test]
    fn long_image_strings_are_shortened_in_records() {
        let obj = json!({"seedImage": "A".repeat(2000), "positivePrompt": "a cat"});
        let rec = recorded(obj.as_object().unwrap());
        assert_eq!(rec["seedImage"], "<2000 characters>");
        assert_eq!(rec["positivePrompt"], "a cat");
    }
}
