//! A ModelsLab generation body parsed once into typed values, with the API's documented limits
//! and the effective parameters (`meta`) the response reports.
//!
//! The clients send numbers and booleans as JSON values or as strings ("512", "7.5", "yes");
//! both are accepted. `vae` names a registry VAE (`[[vae]]`) to decode with. Fields that change
//! the image and that this server cannot apply yet (upscaling, ...) are refused by name unless
//! they carry their "off"
//! value; flags that only tune the hosted service (`tomesd`, `enhance_prompt`, `multi_lingual`,
//! `safety_checker`) are accepted and reported in `meta` as not applied ("no").
//!
//! The ControlNet endpoints take `controlnet_model` (a comma list of control types such as
//! `canny`, each served by the model family's registered ControlNet of that type, or registry
//! ids), `controlnet_conditioning_scale` (one for all, default 1), `guess_mode`, and the control
//! source: `control_image`, else `init_image`. With `auto_hint: yes` the source is preprocessed
//! (Canny; model-based preprocessors are refused by name), otherwise it is the control image as
//! sent. `init_image` becomes an img2img start only when `strength` is given, or the picture to
//! repaint when `mask_image` is given (ControlNet inpainting, as diffusers'
//! `StableDiffusionControlNetInpaintPipeline`). An inpaint ControlNet (`controlnet_model:
//! inpaint`) reads the source with the masked pixels at -1, with or without `auto_hint`, and
//! needs `mask_image`.
//!
//! Every generation endpoint takes an image prompt: `ip_adapter_id` (a registered IP-Adapter of
//! the model's family, by id or alias), `ip_adapter_image` (the reference image, required with
//! it) and `ip_adapter_scale` (0..1, default 1, diffusers' `set_ip_adapter_scale`).

use image::{GrayImage, RgbImage};
use serde_json::{json, Map, Value};

use crate::api::control::{self, Hint};
use crate::api::media::ImageInput;
use crate::api::output::{JobError, JobErrorKind};
use crate::api::{params, random_seed, AppState};
use crate::pipeline::request::VAE_SCALE_FACTOR;
use crate::pipeline::{ControlMode, ControlNetUnit, GenerationRequest, InitImage, MaskImage};
use crate::registry::ModelEntry;
use crate::schedulers::{DpmAlgorithm, SchedulerConfig, SchedulerKind, SchedulerSpec};

/// "Width of the image. Maximum: 1024." (the same for the height).
pub const MAX_SIDE: i64 = 1024;
/// "Number of images to return in the response. Maximum: 4."
pub const MAX_SAMPLES: i64 = 4;
/// The v6 text says "21 or 31"; the ControlNet and enterprise texts give "minimum: 1; maximum:
/// 50". Every value in 1..=50 is accepted (the server's own `max_steps` may lower it).
pub const MAX_STEPS: i64 = 50;
/// "Scale for classifier-free guidance (minimum: 1; maximum: 20)".
pub const MIN_GUIDANCE: f64 = 1.0;
pub const MAX_GUIDANCE: f64 = 20.0;
/// `ip_adapter_scale`: range and default (diffusers' `set_ip_adapter_scale` default).
pub const IP_ADAPTER_SCALE: (f64, f64) = (0.0, 1.0);
pub const DEFAULT_IP_ADAPTER_SCALE: f64 = 1.0;
/// "Strength values for LoRa models (comma-separated). Range: 0.1–1."
pub const LORA_STRENGTH: (f64, f64) = (0.1, 1.0);
/// "Clip skip value. Range: 1–8." Counted the way the hosted API's users count it: 1 uses the
/// last CLIP layer, 2 the penultimate one (diffusers' `clip_skip` is this value minus one).
pub const MAX_CLIP_SKIP: i64 = 8;
/// Prompt strength of img2img when the request leaves it out.
pub const DEFAULT_STRENGTH: f64 = 0.7;
/// Image side when neither the request nor the model's defaults give one.
pub const DEFAULT_SIDE: usize = 512;
/// `controlnet_conditioning_scale`: range and default (diffusers' default scale).
pub const CONTROLNET_SCALE: (f64, f64) = (0.0, 2.0);
pub const DEFAULT_CONTROLNET_SCALE: f64 = 1.0;

/// What a generation route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Text2Img,
    Img2Img,
    Inpaint,
    ControlNet,
}

/// A generation request as typed values. The output size of img2img may depend on the init
/// image, so the canonical request is built once that is loaded ([`Parsed::into_request`]).
#[derive(Debug)]
pub struct Parsed {
    /// The registry id to submit to.
    pub model: String,
    prompt: String,
    negative_prompt: Option<String>,
    width: Option<usize>,
    height: Option<usize>,
    default_size: (usize, usize),
    steps: usize,
    guidance_scale: f64,
    scheduler: Option<SchedulerSpec>,
    seed: u64,
    samples: usize,
    /// diffusers' convention (layers skipped after the last one).
    clip_skip: Option<usize>,
    /// The server's prompt syntax for this dialect (`[prompt_weighting] modelslab`).
    prompt_weighting: crate::pipeline::PromptWeighting,
    /// The client's string: a URL, base64 or a data URI.
    pub init_image: Option<String>,
    /// Inpaint: the mask in the same forms, white = repaint.
    pub mask_image: Option<String>,
    strength: f64,
    /// `temp: "yes"`: the images expire after 24 hours.
    pub temp: bool,
    /// `instant_response: "yes"`: answer "processing" at once.
    pub instant: bool,
    pub webhook: Option<String>,
    pub track_id: Value,
    /// (registry id, weight) of each `lora_model`.
    loras: Vec<(String, f64)>,
    /// The registry id of `vae`.
    vae: Option<String>,
    /// The ControlNet endpoint's settings.
    pub control: Option<ControlSpec>,
    /// `ip_adapter_id` with its image and scale.
    pub ip_adapter: Option<IpAdapterSpec>,
    /// `strength` was sent (the ControlNet endpoint then runs img2img on `init_image`).
    pub strength_given: bool,
    /// The effective parameters, reported as `meta`.
    pub meta: Map<String, Value>,
}

/// What the ControlNet endpoint asks for; the control image is loaded by the handler.
#[derive(Debug)]
pub struct ControlSpec {
    /// Registry id of each ControlNet, with what prepares its input from the source: the
    /// preprocessor `auto_hint` runs, or the inpaint condition of an inpaint ControlNet
    /// (always built: no image sent can hold it); `None`: the source as sent.
    pub units: Vec<(String, Option<Hint>)>,
    pub scale: f64,
    pub mode: ControlMode,
    /// `control_image` as sent; `None`: the init image is the source.
    pub control_image: Option<String>,
    /// `auto_hint` as sent.
    pub auto_hint: bool,
}

impl ControlSpec {
    /// The request's ControlNet units for a loaded source image.
    pub async fn units(
        &self,
        state: &AppState,
        source: RgbImage,
    ) -> Result<Vec<ControlNetUnit>, JobError> {
        let mut units = Vec::with_capacity(self.units.len());
        for (id, hint) in &self.units {
            let unit = match hint {
                Some(hint) => {
                    hint.unit(state, "auto_hint", id.clone(), source.clone())
                        .await?
                }
                None => ControlNetUnit::new(id.clone(), source.clone()),
            };
            units.push(ControlNetUnit {
                scale: self.scale,
                mode: self.mode,
                ..unit
            });
        }
        Ok(units)
    }

    /// Whether a unit reads the inpaint condition (the request must then have a mask).
    fn inpaints(&self) -> bool {
        self.units
            .iter()
            .any(|(_, hint)| *hint == Some(Hint::InpaintCondition))
    }
}

/// `ip_adapter_id`, `ip_adapter_image`, `ip_adapter_scale`: one registered IP-Adapter of the
/// model's family; the image is loaded by the handler.
#[derive(Debug)]
pub struct IpAdapterSpec {
    /// The registry id of the IP-Adapter.
    pub model: String,
    /// `ip_adapter_image` as sent: a URL, base64 or a data URI.
    pub image: String,
    pub scale: f64,
}

/// Read access to the body's fields; an absent field reads as `null`.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, field: &str) -> &Value {
        self.0.get(field).unwrap_or(&Value::Null)
    }

    fn int(&self, field: &str, lo: i64, hi: i64) -> Result<Option<i64>, JobError> {
        params::i64_value(field, self.get(field))?
            .map(|v| params::check_range(field, v, lo, hi))
            .transpose()
    }

    fn float(&self, field: &str) -> Result<Option<f64>, JobError> {
        params::f64_value(field, self.get(field))
    }

    fn flag(&self, field: &str) -> Result<Option<bool>, JobError> {
        params::bool_value(field, self.get(field))
    }

    /// A string field; blank is absent.
    fn text(&self, field: &str) -> Result<Option<String>, JobError> {
        Ok(params::string_value(field, self.get(field))?.filter(|s| !s.trim().is_empty()))
    }

    /// Whether an option that has an "off" value is on: anything but null, an empty string or
    /// list, `false`, or the strings "null" / "none".
    fn is_set(&self, field: &str) -> bool {
        match self.get(field) {
            Value::Null | Value::Bool(false) => false,
            Value::String(s) => {
                let s = s.trim();
                !(s.is_empty() || s.eq_ignore_ascii_case("null") || s.eq_ignore_ascii_case("none"))
            }
            Value::Array(items) => !items.is_empty(),
            Value::Object(map) => !map.is_empty(),
            Value::Number(_) | Value::Bool(true) => true,
        }
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// Options that change the image and that this server cannot apply yet, refused when set.
const NOT_SUPPORTED: &[(&str, &str)] = &[
    ("embeddings", "textual inversion embeddings"),
    ("embeddings_model", "textual inversion embeddings"),
];

/// Yes/no options that change the image, refused when "yes".
const NOT_SUPPORTED_FLAGS: &[(&str, &str)] = &[
    ("upscale", "upscaling"),
    ("panorama", "panorama generation"),
    ("self_attention", "self-attention guidance"),
    ("highres_fix", "high-resolution fix"),
];

/// Yes/no options of the hosted service that do not change what this server draws: validated,
/// then reported as not applied.
const ACCEPTED_FLAGS: &[&str] = &[
    "safety_checker",
    "tomesd",
    "enhance_prompt",
    "multi_lingual",
];

/// The ControlNet fields, used by the ControlNet endpoints only.
const CONTROLNET_FIELDS: &[&str] = &[
    "controlnet_model",
    "controlnet_type",
    "control_image",
    "controlnet_conditioning_scale",
    "auto_hint",
    "guess_mode",
];

/// The IP-Adapter fields (every generation endpoint takes them). `ip_adapter_image` and
/// `ip_adapter_scale` without `ip_adapter_id` are refused: nothing would read them.
fn ip_adapter(
    state: &AppState,
    f: &Fields<'_>,
    model: &ModelEntry,
) -> Result<Option<IpAdapterSpec>, JobError> {
    let scale = f.float("ip_adapter_scale")?;
    let Some(name) = f.text("ip_adapter_id")? else {
        for field in ["ip_adapter_image", "ip_adapter_scale"] {
            if f.is_set(field) {
                return Err(JobError::invalid(
                    field,
                    format!("`{field}` needs `ip_adapter_id`: the IP-Adapter that reads it"),
                ));
            }
        }
        return Ok(None);
    };
    let model_id = state.ip_adapter_for("ip_adapter_id", model, name.trim())?;
    let image = f.text("ip_adapter_image")?.ok_or_else(|| {
        JobError::invalid(
            "ip_adapter_image",
            "`ip_adapter_image` is required with `ip_adapter_id`: the reference image, a link, \
             base64 or a data URI",
        )
    })?;
    let scale = match scale {
        Some(s) => params::check_range(
            "ip_adapter_scale",
            s,
            IP_ADAPTER_SCALE.0,
            IP_ADAPTER_SCALE.1,
        )?,
        None => DEFAULT_IP_ADAPTER_SCALE,
    };
    Ok(Some(IpAdapterSpec {
        model: model_id,
        image,
        scale,
    }))
}

/// Refuses what `endpoint` cannot do at all on this server (every endpoint runs now).
pub fn check_endpoint(endpoint: Endpoint) -> Result<(), JobError> {
    match endpoint {
        Endpoint::ControlNet | Endpoint::Text2Img | Endpoint::Img2Img | Endpoint::Inpaint => Ok(()),
    }
}

/// The ControlNet endpoint's fields; elsewhere they must be absent (or off).
fn controlnet(
    state: &AppState,
    f: &Fields<'_>,
    model: &ModelEntry,
    endpoint: Endpoint,
) -> Result<Option<ControlSpec>, JobError> {
    if endpoint != Endpoint::ControlNet {
        for &field in CONTROLNET_FIELDS {
            let set = match field {
                "auto_hint" | "guess_mode" => f.flag(field)? == Some(true),
                "controlnet_conditioning_scale" => {
                    f.float(field)?;
                    false
                }
                _ => f.is_set(field),
            };
            if set {
                return Err(JobError::invalid(
                    field,
                    format!("`{field}` is used by ControlNet; send the request to the controlnet endpoint"),
                ));
            }
        }
        return Ok(None);
    }
    let control_type = f.text("controlnet_type")?;
    if let Some(t) = &control_type {
        if !control::is_control_type(t) {
            return Err(JobError::invalid(
                "controlnet_type",
                format!(
                    "`controlnet_type` must be one of {}. Given: {t:?}",
                    control::CONTROL_TYPES.join(", ")
                ),
            ));
        }
    }
    let names: Vec<String> = match f.text("controlnet_model")? {
        Some(list) => list
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        None => control_type.iter().cloned().collect(),
    };
    if names.is_empty() {
        return Err(JobError::invalid(
            "controlnet_model",
            "`controlnet_model` is required: a control type such as canny (comma-separated for \
             several)",
        ));
    }
    let auto_hint = f.flag("auto_hint")?.unwrap_or(false);
    let mut units = Vec::with_capacity(names.len());
    for name in &names {
        let entry = state.controlnet_by_name("controlnet_model", model, name)?;
        let kind = entry.preprocessor.clone().unwrap_or_else(|| name.clone());
        let hint = if auto_hint || kind.eq_ignore_ascii_case("inpaint") {
            Some(state.hint("auto_hint", &kind)?)
        } else {
            None
        };
        units.push((entry.id, hint));
    }
    let scale = match f.float("controlnet_conditioning_scale")? {
        Some(s) => params::check_range(
            "controlnet_conditioning_scale",
            s,
            CONTROLNET_SCALE.0,
            CONTROLNET_SCALE.1,
        )?,
        None => DEFAULT_CONTROLNET_SCALE,
    };
    let mode = if f.flag("guess_mode")?.unwrap_or(false) {
        ControlMode::ControlNet
    } else {
        ControlMode::Balanced
    };
    Ok(Some(ControlSpec {
        units,
        scale,
        mode,
        control_image: f.text("control_image")?,
        auto_hint,
    }))
}

/// Parses a generation body. `model_required`: the route has no default model (dreambooth).
pub fn parse(
    state: &AppState,
    body: &Map<String, Value>,
    endpoint: Endpoint,
    model_required: bool,
) -> Result<Parsed, JobError> {
    let f = Fields(body);
    for &(field, what) in NOT_SUPPORTED {
        if f.is_set(field) {
            return Err(JobError::not_supported(field, what));
        }
    }
    for &(field, what) in NOT_SUPPORTED_FLAGS {
        if f.flag(field)? == Some(true) {
            return Err(JobError::not_supported(field, what));
        }
    }
    for &field in ACCEPTED_FLAGS {
        f.flag(field)?;
    }

    let (model_id, model) = model(state, &f, model_required)?;
    let defaults = &model.defaults;
    let loras = loras(state, &f, &model)?;
    let vae = if f.is_set("vae") {
        let name = params::string_value("vae", f.get("vae"))?.unwrap_or_default();
        Some(state.vae_for("vae", &model, name.trim())?)
    } else {
        None
    };
    let control = controlnet(state, &f, &model, endpoint)?;
    let ip_adapter = ip_adapter(state, &f, &model)?;

    let prompt = params::string_value("prompt", f.get("prompt"))?.unwrap_or_default();
    if endpoint == Endpoint::Text2Img && prompt.trim().is_empty() {
        return Err(JobError::invalid("prompt", "`prompt` is required"));
    }
    let negative_prompt = f
        .text("negative_prompt")?
        .or_else(|| defaults.negative_prompt.clone());

    let side = |field: &str| -> Result<Option<usize>, JobError> {
        let Some(v) = f.int(field, VAE_SCALE_FACTOR as i64, MAX_SIDE)? else {
            return Ok(None);
        };
        if v % VAE_SCALE_FACTOR as i64 != 0 {
            return Err(JobError::invalid(
                field,
                format!("`{field}` must be a multiple of {VAE_SCALE_FACTOR}. Given: {v}"),
            ));
        }
        Ok(Some(v as usize))
    };
    let width = side("width")?;
    let height = side("height")?;
    let default_size = (
        defaults.width.map_or(DEFAULT_SIDE, |w| w as usize),
        defaults.height.map_or(DEFAULT_SIDE, |h| h as usize),
    );

    let limits = &state.config().limits;
    let max_samples = MAX_SAMPLES.min(limits.max_images as i64).max(1);
    let samples = f.int("samples", 1, max_samples)?.unwrap_or(1) as usize;
    let max_steps = MAX_STEPS.min(limits.max_steps as i64).max(1);
    let steps = match f.int("num_inference_steps", 1, max_steps)? {
        Some(s) => s as usize,
        None => defaults.steps.map_or(30, |s| s as usize),
    };
    let guidance_scale = match f.float("guidance_scale")? {
        Some(g) => params::check_range("guidance_scale", g, MIN_GUIDANCE, MAX_GUIDANCE)?,
        None => defaults.guidance.unwrap_or(7.5),
    };
    let seed = seed(f.get("seed"))?;

    let (scheduler, scheduler_name, karras, algorithm) =
        scheduler(&f, defaults.scheduler.as_deref())?;

    let clip_skip_sent = f.int("clip_skip", 1, MAX_CLIP_SKIP)?.map(|n| n as usize);
    let clip_skip = match clip_skip_sent {
        Some(n) => Some(n - 1).filter(|&k| k > 0),
        None => defaults.clip_skip.map(|k| k as usize).filter(|&k| k > 0),
    };
    let clip_skip_shown = clip_skip_sent.or(defaults.clip_skip.map(|k| k as usize + 1));

    let init_image = f.text("init_image")?;
    let mask_image = f.text("mask_image")?;
    match endpoint {
        Endpoint::Img2Img if init_image.is_none() => {
            return Err(JobError::invalid(
                "init_image",
                "`init_image` is required for img2img: a link, base64 or a data URI",
            ));
        }
        Endpoint::Inpaint if init_image.is_none() => {
            return Err(JobError::invalid(
                "init_image",
                "`init_image` is required for inpaint: a link, base64 or a data URI",
            ));
        }
        Endpoint::Inpaint if mask_image.is_none() => {
            return Err(JobError::invalid(
                "mask_image",
                "`mask_image` is required for inpaint: a link, base64 or a data URI of a mask \
                 the size of `init_image` (white is repainted)",
            ));
        }
        Endpoint::Text2Img | Endpoint::Img2Img if mask_image.is_some() => {
            return Err(JobError::invalid(
                "mask_image",
                "`mask_image` is used by inpainting; send the request to the inpaint endpoint",
            ));
        }
        Endpoint::Text2Img if init_image.is_some() => {
            return Err(JobError::invalid(
                "init_image",
                "`init_image` is not used by text2img; send the request to img2img",
            ));
        }
        Endpoint::ControlNet
            if mask_image.is_none() && control.as_ref().is_some_and(ControlSpec::inpaints) =>
        {
            return Err(JobError::invalid(
                "mask_image",
                "`mask_image` is required with the inpaint ControlNet: its condition is the \
                 image with the masked pixels at -1, and the mask says which pixels to repaint",
            ));
        }
        Endpoint::ControlNet if mask_image.is_some() && init_image.is_none() => {
            return Err(JobError::invalid(
                "init_image",
                "`init_image` is required with `mask_image`: the picture the mask repaints, a \
                 link, base64 or a data URI",
            ));
        }
        Endpoint::ControlNet
            if init_image.is_none()
                && control.as_ref().is_some_and(|c| c.control_image.is_none()) =>
        {
            return Err(JobError::invalid(
                "init_image",
                "`init_image` (or `control_image`) is required for controlnet: the image that \
                 guides the generation, a link, base64 or a data URI",
            ));
        }
        _ => {}
    }
    // On the ControlNet endpoint the init image is an img2img start only when `strength` says
    // how much of it to keep; otherwise it is only the control source.
    let strength_given = !f.get("strength").is_null();
    let strength = match f.float("strength")? {
        Some(s) if !(s > 0.0 && s <= 1.0) => {
            return Err(JobError::invalid(
                "strength",
                format!("`strength` must be > 0 and <= 1. Given: {s}"),
            ));
        }
        Some(s) => s,
        None => DEFAULT_STRENGTH,
    };

    let base64 = f.flag("base64")?.unwrap_or(false);
    let temp = f.flag("temp")?.unwrap_or(false);
    let instant = f.flag("instant_response")?.unwrap_or(false);
    let webhook = f.text("webhook")?.map(|w| webhook(&w)).transpose()?;
    let track_id = match f.get("track_id") {
        v @ (Value::Null | Value::String(_) | Value::Number(_)) => v.clone(),
        other => {
            return Err(JobError::invalid(
                "track_id",
                format!("`track_id` must be a string or a number. Given: {other}"),
            ))
        }
    };

    let shown = |image: &Option<String>| {
        image
            .as_ref()
            .map(|s| match ImageInput::from_client_string(s.as_str()) {
                ImageInput::Url(url) => Value::String(url),
                _ => Value::String("(base64 image)".into()),
            })
    };
    let init_shown = shown(&init_image);
    let mut meta = Map::new();
    let mut put = |k: &str, v: Value| {
        meta.insert(k.to_string(), v);
    };
    put("model_id", json!(model_id));
    put("prompt", json!(prompt));
    put("negative_prompt", json!(negative_prompt));
    put("n_samples", json!(samples));
    put("steps", json!(steps));
    put("num_inference_steps", json!(steps));
    put("guidance_scale", json!(guidance_scale));
    put("seed", json!(seed));
    put("scheduler", json!(scheduler_name));
    put("use_karras_sigmas", json!(karras.map(yes_no)));
    put("algorithm_type", json!(algorithm.map(DpmAlgorithm::name)));
    put("clip_skip", json!(clip_skip_shown));
    if matches!(endpoint, Endpoint::Img2Img | Endpoint::Inpaint) {
        put("init_image", json!(init_shown));
        put("strength", json!(strength));
    }
    if let Some(c) = &control {
        put("init_image", json!(init_shown));
        if strength_given || mask_image.is_some() {
            put("strength", json!(strength));
        }
        let ids: Vec<&str> = c.units.iter().map(|(id, _)| id.as_str()).collect();
        put("controlnet_model", json!(ids.join(",")));
        put("controlnet_type", json!(f.text("controlnet_type")?));
        put("control_image", json!(shown(&c.control_image)));
        put("controlnet_conditioning_scale", json!(c.scale));
        put(
            "guess_mode",
            json!(yes_no(c.mode == ControlMode::ControlNet)),
        );
        put("auto_hint", json!(yes_no(c.auto_hint)));
    }
    if matches!(endpoint, Endpoint::Inpaint | Endpoint::ControlNet) && mask_image.is_some() {
        put("mask_image", json!(shown(&mask_image)));
    }
    for flag in [
        "safety_checker",
        "tomesd",
        "enhance_prompt",
        "multi_lingual",
    ] {
        put(flag, json!("no"));
    }
    for flag in ["upscale", "panorama", "self_attention"] {
        put(flag, json!("no"));
    }
    if loras.is_empty() {
        put("lora_model", Value::Null);
    } else {
        let ids: Vec<&str> = loras.iter().map(|(id, _)| id.as_str()).collect();
        let strengths: Vec<String> = loras.iter().map(|(_, w)| w.to_string()).collect();
        put("lora_model", json!(ids.join(",")));
        put("lora_strength", json!(strengths.join(",")));
    }
    put("vae", json!(vae));
    match &ip_adapter {
        Some(ip) => {
            put("ip_adapter_id", json!(ip.model));
            put("ip_adapter_scale", json!(ip.scale));
            put("ip_adapter_image", json!(shown(&Some(ip.image.clone()))));
        }
        None => put("ip_adapter_id", Value::Null),
    }
    put("base64", json!(yes_no(base64)));
    put("temp", json!(yes_no(temp)));
    put("instant_response", json!(yes_no(instant)));
    put("webhook", json!(webhook));
    put("track_id", track_id.clone());

    Ok(Parsed {
        model: model.id.clone(),
        prompt,
        negative_prompt,
        width,
        height,
        default_size,
        steps,
        guidance_scale,
        scheduler,
        seed,
        samples,
        clip_skip,
        prompt_weighting: state.config().prompt_weighting.modelslab,
        init_image,
        mask_image,
        strength,
        temp,
        instant,
        webhook,
        track_id,
        loras,
        vae,
        control,
        ip_adapter,
        strength_given,
        meta,
    })
}

impl Parsed {
    /// The canonical request, sized from the request, else the init image (scaled to fit
    /// 1024 and rounded down to a multiple of 8), else the model's defaults. The init image is
    /// resized to the output size, and the mask with it; the mask must have the init image's
    /// size (a mask of another size does not line up with the picture it masks).
    pub fn into_request(
        mut self,
        init: Option<RgbImage>,
        mask: Option<GrayImage>,
    ) -> Result<(GenerationRequest, Map<String, Value>), JobError> {
        if let (Some(init), Some(mask)) = (&init, &mask) {
            let ((iw, ih), (mw, mh)) = (init.dimensions(), mask.dimensions());
            if (iw, ih) != (mw, mh) {
                return Err(JobError::invalid(
                    "mask_image",
                    format!(
                        "`mask_image` must be the size of `init_image` ({iw}x{ih}). Given: {mw}x{mh}"
                    ),
                ));
            }
        }
        let fitted = init
            .as_ref()
            .map(|img| fit(img.width(), img.height()))
            .transpose()?;
        let (dw, dh) = fitted.unwrap_or(self.default_size);
        let width = self.width.unwrap_or(dw);
        let height = self.height.unwrap_or(dh);
        self.meta.insert("width".into(), json!(width));
        self.meta.insert("height".into(), json!(height));
        self.meta.insert("W".into(), json!(width));
        self.meta.insert("H".into(), json!(height));
        // The ControlNet endpoint without `strength` or a mask uses the init image for its size
        // and as the control source only; with a mask it is the picture to repaint (diffusers'
        // ControlNet inpainting pipeline).
        let repaint = mask.is_some();
        let init = init.filter(|_| self.control.is_none() || self.strength_given || repaint);
        let init_image = init.map(|img| {
            let image = if (img.width() as usize, img.height() as usize) == (width, height) {
                img
            } else {
                image::imageops::resize(
                    &img,
                    width as u32,
                    height as u32,
                    image::imageops::FilterType::Lanczos3,
                )
            };
            InitImage {
                image,
                strength: self.strength,
            }
        });
        let mask = mask.map(|image| MaskImage {
            image: if image.dimensions() == (width as u32, height as u32) {
                image
            } else {
                image::imageops::resize(
                    &image,
                    width as u32,
                    height as u32,
                    image::imageops::FilterType::Lanczos3,
                )
            },
            margin: None,
        });
        let request = GenerationRequest {
            negative_prompt: self.negative_prompt,
            width,
            height,
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            scheduler: self.scheduler,
            seed: self.seed,
            num_images: self.samples,
            clip_skip: self.clip_skip,
            init_image,
            mask,
            latents: None,
            loras: self.loras,
            vae: self.vae,
            prompt_weighting: self.prompt_weighting,
            ..GenerationRequest::new(self.prompt)
        };
        Ok((request, self.meta))
    }
}

/// The output size for an init image of `w` x `h`: scaled down to fit 1024 on its longer
/// side, each side rounded down to a multiple of 8.
fn fit(w: u32, h: u32) -> Result<(usize, usize), JobError> {
    let scale = (MAX_SIDE as f64 / w.max(h) as f64).min(1.0);
    let round = |v: u32| ((v as f64 * scale) as usize) / VAE_SCALE_FACTOR * VAE_SCALE_FACTOR;
    let (fw, fh) = (round(w), round(h));
    if fw == 0 || fh == 0 {
        return Err(JobError::invalid(
            "init_image",
            format!(
                "`init_image` is {w}x{h}; without `width` and `height` it must be at least \
                 {VAE_SCALE_FACTOR} pixels on each side"
            ),
        ));
    }
    Ok((fw, fh))
}

/// The model to run: `model_id` (a registry id or alias), else the registry's first model.
fn model(
    state: &AppState,
    f: &Fields<'_>,
    required: bool,
) -> Result<(String, ModelEntry), JobError> {
    let id = match f.text("model_id")? {
        Some(id) => id,
        None if required => {
            return Err(JobError::invalid("model_id", "`model_id` is required"));
        }
        None => state
            .registry()
            .models()
            .next()
            .map(|m| m.id.clone())
            .ok_or_else(|| {
                JobError::new(
                    JobErrorKind::UnknownModel,
                    "no model is configured on this server",
                )
            })?,
    };
    let entry = state.model_entry(&id)?;
    Ok((id, entry))
}

/// `null`, absent, `""` or `-1`: a random seed; else any integer in 0..=2^64-1.
fn seed(v: &Value) -> Result<u64, JobError> {
    if matches!(params::i64_value("seed", v), Ok(Some(-1))) {
        return Ok(random_seed(u32::MAX as u64));
    }
    Ok(params::u64_value("seed", v)?.unwrap_or_else(|| random_seed(u32::MAX as u64)))
}

/// Families whose diffusers classes take `use_karras_sigmas`.
fn takes_karras(kind: SchedulerKind) -> bool {
    matches!(
        kind,
        SchedulerKind::Euler
            | SchedulerKind::Lms
            | SchedulerKind::Heun
            | SchedulerKind::Kdpm2
            | SchedulerKind::Kdpm2Ancestral
            | SchedulerKind::DpmSolverMultistep
            | SchedulerKind::DpmSolverSinglestep
            | SchedulerKind::DpmSolverSde
            | SchedulerKind::UniPcMultistep
            | SchedulerKind::Deis
    )
}

type SchedulerChoice = (
    Option<SchedulerSpec>,
    Option<String>,
    Option<bool>,
    Option<DpmAlgorithm>,
);

/// The scheduler: `scheduler` with `use_karras_sigmas` (default yes, applied where the family
/// takes it) and `algorithm_type` (DPMSolverMultistep only); without `scheduler`, the model's
/// default one (`model_default`) unchanged. Returns the spec, its name, and the effective Karras
/// and algorithm choices (`None` where they do not apply or are unknown).
fn scheduler(f: &Fields<'_>, model_default: Option<&str>) -> Result<SchedulerChoice, JobError> {
    let karras_sent = f.flag("use_karras_sigmas")?;
    let algorithm_sent = match f.text("algorithm_type")? {
        Some(name) if !name.trim().eq_ignore_ascii_case("none") => Some(algorithm(&name)?),
        _ => None,
    };
    let Some(name) = f.text("scheduler")? else {
        let Some(name) = model_default else {
            return Ok((None, None, None, None));
        };
        let spec = params::scheduler("scheduler", name)?;
        let karras =
            takes_karras(spec.kind).then(|| spec.overrides.use_karras_sigmas.unwrap_or(false));
        let algorithm = spec.overrides.algorithm_type;
        return Ok((Some(spec), Some(name.to_string()), karras, algorithm));
    };
    let mut spec = params::scheduler("scheduler", &name)?;
    let karras = if takes_karras(spec.kind) {
        let karras = karras_sent
            .or(spec.overrides.use_karras_sigmas)
            .unwrap_or(true);
        spec.overrides.use_karras_sigmas = Some(karras);
        Some(karras)
    } else {
        None
    };
    if spec.kind == SchedulerKind::DpmSolverMultistep {
        if let Some(algorithm) = algorithm_sent {
            spec.overrides.algorithm_type = Some(algorithm);
        }
    }
    let algorithm = (spec.kind == SchedulerKind::DpmSolverMultistep)
        .then_some(spec.overrides.algorithm_type)
        .flatten();
    Ok((Some(spec), Some(name), karras, algorithm))
}

fn algorithm(name: &str) -> Result<DpmAlgorithm, JobError> {
    SchedulerConfig::from_json(&json!({ "algorithm_type": name.trim() }))
        .ok()
        .and_then(|config| config.algorithm_type)
        .ok_or_else(|| {
            JobError::invalid(
                "algorithm_type",
                format!(
                    "`algorithm_type` must be dpmsolver++ (also spelled dpmsolver+++), \
                     sde-dpmsolver++, dpmsolver, sde-dpmsolver or none. Given: {name:?}"
                ),
            )
        })
}

/// `lora_model` (comma-separated registry ids or aliases) with `lora_strength`: none (each
/// LoRA's default weight), one strength for every model, or one per model, each in 0.1..1.
fn loras(
    state: &AppState,
    f: &Fields<'_>,
    model: &ModelEntry,
) -> Result<Vec<(String, f64)>, JobError> {
    let strengths = lora_strengths(f.get("lora_strength"))?;
    let names: Vec<String> = if f.is_set("lora_model") {
        params::string_value("lora_model", f.get("lora_model"))?
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect()
    } else {
        Vec::new()
    };
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let weights: Vec<Option<f64>> = match strengths.len() {
        0 => vec![None; names.len()],
        1 => vec![Some(strengths[0]); names.len()],
        n if n == names.len() => strengths.into_iter().map(Some).collect(),
        n => {
            return Err(JobError::invalid(
                "lora_strength",
                format!(
                    "`lora_strength` gives {n} strengths for {} `lora_model` entries: send one \
                     strength for all of them, or one per model",
                    names.len()
                ),
            ))
        }
    };
    let requested: Vec<(String, Option<f64>)> = names.into_iter().zip(weights).collect();
    state.lora_set("lora_model", model, &requested)
}

/// `lora_strength`: a number or comma-separated numbers, each in 0.1..1.
fn lora_strengths(v: &Value) -> Result<Vec<f64>, JobError> {
    let check = |w: f64| params::check_range("lora_strength", w, LORA_STRENGTH.0, LORA_STRENGTH.1);
    match v {
        Value::String(s) => s
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|part| {
                let w = params::f64_str("lora_strength", part.trim())?.ok_or_else(|| {
                    JobError::invalid("lora_strength", "`lora_strength` has an empty value")
                })?;
                check(w)
            })
            .collect(),
        other => params::f64_value("lora_strength", other)?
            .map(check)
            .into_iter()
            .collect(),
    }
}

/// A webhook must be an http(s) URL; where it points is checked when it is called.
fn webhook(url: &str) -> Result<String, JobError> {
    match url::Url::parse(url.trim()) {
        Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => Ok(url.trim().to_string()),
        _ => Err(JobError::invalid(
            "webhook",
            format!("`webhook` must be an http or https URL. Given: {url:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_images_fit_1024_in_multiples_of_8() {
        assert_eq!(fit(75, 66).unwrap(), (72, 64));
        assert_eq!(fit(512, 512).unwrap(), (512, 512));
        assert_eq!(fit(2048, 1000).unwrap(), (1024, 496));
        assert_eq!(fit(1000, 4000).unwrap(), (256, 1024));
        let e = fit(7, 64).unwrap_err();
        assert_eq!(e.parameter.as_deref(), Some("init_image"));
    }

    fn choice(
        body: Value,
        model_default: Option<&str>,
    ) -> (Option<SchedulerKind>, Option<bool>, Option<DpmAlgorithm>) {
        let map = body.as_object().unwrap().clone();
        let (spec, _, karras, algorithm) = scheduler(&Fields(&map), model_default).unwrap();
        if let Some(spec) = &spec {
            // What is reported is what the engine gets.
            assert_eq!(
                spec.overrides.use_karras_sigmas.is_some_and(|k| k),
                karras == Some(true)
            );
        }
        (spec.map(|s| s.kind), karras, algorithm)
    }

    #[test]
    fn karras_sigmas_default_to_yes_where_the_scheduler_takes_them() {
        use SchedulerKind::*;
        let euler = json!({"scheduler": "EulerDiscreteScheduler"});
        assert_eq!(choice(euler, None), (Some(Euler), Some(true), None));
        let euler_no = json!({"scheduler": "EulerDiscreteScheduler", "use_karras_sigmas": "no"});
        assert_eq!(choice(euler_no, None), (Some(Euler), Some(false), None));
        // Classes without the option: not applied, reported as not applicable.
        let ddim = json!({"scheduler": "DDIMScheduler", "use_karras_sigmas": "yes"});
        assert_eq!(choice(ddim, None), (Some(Ddim), None, None));
        let ancestral = json!({"scheduler": "EulerAncestralDiscreteScheduler"});
        assert_eq!(choice(ancestral, None), (Some(EulerAncestral), None, None));
        // A name that fixes the choice keeps it unless the field overrides it.
        let named = json!({"scheduler": "DPM++ 2M"});
        assert_eq!(
            choice(named, None),
            (
                Some(DpmSolverMultistep),
                Some(false),
                Some(DpmAlgorithm::DpmSolverPlusPlus)
            )
        );
        // The model's own default scheduler is used as it is.
        assert_eq!(
            choice(json!({}), Some("Euler a")),
            (Some(EulerAncestral), None, None)
        );
        assert_eq!(
            choice(json!({"use_karras_sigmas": "yes"}), None),
            (None, None, None)
        );
    }

    #[test]
    fn algorithm_type_applies_to_dpm_solver_multistep_only() {
        use SchedulerKind::*;
        let sde = json!({"scheduler": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"});
        assert_eq!(
            choice(sde, None),
            (
                Some(DpmSolverMultistep),
                Some(true),
                Some(DpmAlgorithm::SdeDpmSolverPlusPlus)
            )
        );
        let none = json!({"scheduler": "DPMSolverMultistepScheduler", "algorithm_type": "none"});
        assert_eq!(
            choice(none, None),
            (Some(DpmSolverMultistep), Some(true), None)
        );
        let unipc =
            json!({"scheduler": "UniPCMultistepScheduler", "algorithm_type": "dpmsolver+++"});
        assert_eq!(
            choice(unipc, None),
            (Some(UniPcMultistep), Some(true), None)
        );
        let bad = json!({"scheduler": "DDIMScheduler", "algorithm_type": "fast"});
        let map = bad.as_object().unwrap().clone();
        let e = scheduler(&Fields(&map), None).unwrap_err();
        assert_eq!(e.parameter.as_deref(), Some("algorithm_type"));
    }
}
