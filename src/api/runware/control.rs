//! Runware's ControlNet parameters: the `controlNet` array of `imageInference`
//! (`[{model, guideImage, weight, startStep | startStepPercentage, endStep | endStepPercentage,
//! controlMode}]`) and the `imageControlNetPreProcess` task, which turns an input image into a
//! guide image (Canny edges here; model-based preprocessors are refused by name).
//!
//! A registered inpaint ControlNet (`preprocessor = "inpaint"`) in `controlNet` reads its guide
//! image with the pixels the task repaints at -1, so it needs `seedImage` with `maskImage` or
//! `outpainting`.

use serde_json::{Map, Value};

use super::error::RunwareError;
use crate::api::output::JobError;
use crate::api::{params, AppState};
use crate::pipeline::{ControlCondition, ControlMode};
use crate::preprocess::{canny, PreprocessorSpec};
use crate::registry::ModelEntry;

pub const IMAGE_CONTROLNET_PREPROCESS: &str = "imageControlNetPreProcess";

/// `controlNet[].weight`: range and default.
pub const WEIGHT: (f64, f64) = (0.0, 1.0);
pub const WEIGHT_DEFAULT: f64 = 1.0;
/// `startStepPercentage` 0..99, `endStepPercentage` up to 100.
pub const START_PERCENTAGE: (i64, i64) = (0, 99);
pub const END_PERCENTAGE_MAX: i64 = 100;
/// Canny thresholds of `imageControlNetPreProcess` (0..255 on 8-bit gradients).
pub const CANNY_THRESHOLD: (i64, i64) = (0, 255);

/// One `controlNet` item, validated; the guide image is loaded when the task runs.
#[derive(Debug, Clone)]
pub struct ControlNetSpec {
    /// The registry id of the ControlNet.
    pub model: String,
    /// The guide image as the client sent it: an image UUID, data URI, base64 or URL.
    pub guide_image: String,
    pub weight: f64,
    /// Fractions of the schedule.
    pub start: f64,
    pub end: f64,
    pub mode: ControlMode,
    /// An inpaint ControlNet's condition, or the guide image as it is.
    pub condition: ControlCondition,
}

impl ControlNetSpec {
    /// Whether the unit reads the inpaint condition.
    pub fn inpaints(&self) -> bool {
        self.condition == ControlCondition::Inpaint
    }
}

fn item_error(e: JobError) -> RunwareError {
    RunwareError::from_job(e.with_parameter("controlNet"))
}

fn get<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

fn int(obj: &Map<String, Value>, name: &str) -> Result<Option<i64>, RunwareError> {
    match get(obj, name) {
        Some(v) => params::i64_value(&format!("controlNet.{name}"), v).map_err(item_error),
        None => Ok(None),
    }
}

fn invalid(message: String) -> RunwareError {
    RunwareError::invalid("controlNet", message)
}

/// Parses `controlNet` for a task of `steps` steps on `model`.
pub fn parse_controlnets(
    value: Option<&Value>,
    state: &AppState,
    model: &ModelEntry,
    steps: usize,
) -> Result<Vec<ControlNetSpec>, RunwareError> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let Value::Array(items) = value else {
        return Err(invalid(
            "`controlNet` must be an array of {model, guideImage, weight, ...} objects".into(),
        ));
    };
    let mut specs = Vec::with_capacity(items.len());
    for item in items {
        let Value::Object(obj) = item else {
            return Err(invalid(
                "each `controlNet` item must be an object with `model` and `guideImage`".into(),
            ));
        };
        const KNOWN: &[&str] = &[
            "model",
            "guideImage",
            "weight",
            "startStep",
            "startStepPercentage",
            "endStep",
            "endStepPercentage",
            "controlMode",
        ];
        if let Some(other) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(RunwareError::unsupported(
                "controlNet",
                format!(
                    "`controlNet.{other}` is not a ControlNet parameter this server supports \
                     ({})",
                    KNOWN.join(", ")
                ),
            ));
        }
        let text = |name: &str| -> Result<Option<String>, RunwareError> {
            match get(obj, name) {
                Some(v) => Ok(params::string_value(&format!("controlNet.{name}"), v)
                    .map_err(item_error)?
                    .filter(|s| !s.trim().is_empty())),
                None => Ok(None),
            }
        };
        let name = text("model")?.ok_or_else(|| {
            RunwareError::missing(
                "controlNet",
                "each `controlNet` item needs `model`: a ControlNet AIR id or registry id",
            )
        })?;
        let entry = state
            .controlnet_entry("controlNet", model, &name)
            .map_err(RunwareError::from_job)?;
        let guide_image = text("guideImage")?.ok_or_else(|| {
            RunwareError::missing(
                "controlNet",
                "each `controlNet` item needs `guideImage`: an image UUID, a data URI, base64 \
                 data or a URL",
            )
        })?;
        let weight = match get(obj, "weight") {
            Some(v) => {
                let w = params::f64_value("controlNet.weight", v)
                    .map_err(item_error)?
                    .unwrap_or(WEIGHT_DEFAULT);
                params::check_range("controlNet.weight", w, WEIGHT.0, WEIGHT.1)
                    .map_err(item_error)?
            }
            None => WEIGHT_DEFAULT,
        };
        let (start, end) = window(obj, steps)?;
        let mode = match text("controlMode")?.as_deref() {
            None | Some("balanced") => ControlMode::Balanced,
            Some("prompt") => ControlMode::Prompt,
            Some("controlnet") => ControlMode::ControlNet,
            Some(other) => {
                return Err(invalid(format!(
                    "`controlNet.controlMode` must be prompt, controlnet or balanced. Given: \
                     {other:?}"
                )))
            }
        };
        let condition = if entry.expects("inpaint") {
            ControlCondition::Inpaint
        } else {
            ControlCondition::Image
        };
        specs.push(ControlNetSpec {
            model: entry.id,
            guide_image,
            weight,
            start,
            end,
            mode,
            condition,
        });
    }
    Ok(specs)
}

/// `startStep`/`startStepPercentage` and `endStep`/`endStepPercentage` as fractions of the
/// schedule: step `s` (1-based) starts at `(s - 1) / steps` and ends after `s / steps`.
fn window(obj: &Map<String, Value>, steps: usize) -> Result<(f64, f64), RunwareError> {
    let n = steps as i64;
    let one_of = |a: &str, b: &str| -> Result<(), RunwareError> {
        if get(obj, a).is_some() && get(obj, b).is_some() {
            return Err(invalid(format!(
                "`controlNet.{a}` and `controlNet.{b}` are alternatives: give one"
            )));
        }
        Ok(())
    };
    one_of("startStep", "startStepPercentage")?;
    one_of("endStep", "endStepPercentage")?;
    let start_step = int(obj, "startStep")?;
    let start = match (start_step, int(obj, "startStepPercentage")?) {
        (Some(s), _) => {
            if !(1..=n).contains(&s) {
                return Err(invalid(format!(
                    "`controlNet.startStep` must be between 1 and `steps` ({n}). Given: {s}"
                )));
            }
            (s - 1) as f64 / steps as f64
        }
        (None, Some(p)) => {
            let p = params::check_range(
                "controlNet.startStepPercentage",
                p,
                START_PERCENTAGE.0,
                START_PERCENTAGE.1,
            )
            .map_err(item_error)?;
            p as f64 / 100.0
        }
        (None, None) => 0.0,
    };
    let end = match (int(obj, "endStep")?, int(obj, "endStepPercentage")?) {
        (Some(e), _) => {
            let min = start_step.map_or(1, |s| s + 1);
            if e < min || e > n {
                return Err(invalid(format!(
                    "`controlNet.endStep` must be between {min} and `steps` ({n}). Given: {e}"
                )));
            }
            e as f64 / steps as f64
        }
        (None, Some(p)) => {
            let min = (start * 100.0).round() as i64 + 1;
            if p < min || p > END_PERCENTAGE_MAX {
                return Err(invalid(format!(
                    "`controlNet.endStepPercentage` must be between {min} and \
                     {END_PERCENTAGE_MAX}. Given: {p}"
                )));
            }
            p as f64 / 100.0
        }
        (None, None) => 1.0,
    };
    if start >= end {
        return Err(invalid(format!(
            "the ControlNet must end after it starts: start at {:.0}% of the steps, end at \
             {:.0}%",
            start * 100.0,
            end * 100.0
        )));
    }
    Ok((start, end))
}

/// An `imageControlNetPreProcess` task, validated.
#[derive(Debug, Clone)]
pub struct PreProcessTask {
    pub task_uuid: String,
    /// The input image as the client sent it.
    pub input_image: String,
    pub preprocessor: PreprocessorSpec,
    /// The guide image's size when given (both or neither); else the input's.
    pub size: Option<(u32, u32)>,
}

/// The preprocessing parameters of an `imageControlNetPreProcess` task object (the task UUID
/// and the output options are read by the caller).
pub fn parse_preprocess(
    obj: &Map<String, Value>,
    task_uuid: String,
    state: &AppState,
) -> Result<PreProcessTask, RunwareError> {
    let text = |name: &str| -> Result<Option<String>, RunwareError> {
        match get(obj, name) {
            Some(v) => Ok(params::string_value(name, v)
                .map_err(RunwareError::from_job)?
                .filter(|s| !s.trim().is_empty())),
            None => Ok(None),
        }
    };
    let input_image = text("inputImage")?.ok_or_else(|| {
        RunwareError::missing(
            "inputImage",
            "`inputImage` is required: an image UUID, a data URI, base64 data or a URL",
        )
    })?;
    let kind = text("preProcessorType")?.ok_or_else(|| {
        RunwareError::missing(
            "preProcessorType",
            format!(
                "`preProcessorType` is required; this server runs: {}",
                state.available_preprocessors()
            ),
        )
    })?;
    let preprocessor = state
        .preprocessor("preProcessorType", &kind)
        .map_err(RunwareError::from_job)?;
    let threshold = |name: &str, default: f64| -> Result<f64, RunwareError> {
        match get(obj, name) {
            Some(v) => {
                let t = params::i64_value(name, v)
                    .map_err(RunwareError::from_job)?
                    .unwrap_or(default as i64);
                let t = params::check_range(name, t, CANNY_THRESHOLD.0, CANNY_THRESHOLD.1)
                    .map_err(RunwareError::from_job)?;
                Ok(t as f64)
            }
            None => Ok(default),
        }
    };
    let low = threshold("lowThresholdCanny", canny::DEFAULT_LOW)?;
    let high = threshold("highThresholdCanny", canny::DEFAULT_HIGH)?;
    if low > high {
        return Err(RunwareError::invalid(
            "lowThresholdCanny",
            format!("`lowThresholdCanny` ({low}) must not exceed `highThresholdCanny` ({high})"),
        ));
    }
    let preprocessor = match preprocessor {
        PreprocessorSpec::Canny { .. } => PreprocessorSpec::Canny { low, high },
        detector @ PreprocessorSpec::Detector(_) => {
            // The Canny thresholds only apply to Canny: refused by name with another type.
            for name in ["lowThresholdCanny", "highThresholdCanny"] {
                if get(obj, name).is_some() {
                    return Err(RunwareError::invalid(
                        name,
                        format!("`{name}` applies to `preProcessorType` canny, not `{kind}`"),
                    ));
                }
            }
            detector
        }
    };
    if get(obj, "includeHandsAndFaceOpenPose").is_some_and(|v| v != &Value::Bool(false)) {
        return Err(RunwareError::unsupported(
            "includeHandsAndFaceOpenPose",
            JobError::not_supported("includeHandsAndFaceOpenPose", "OpenPose preprocessing")
                .message,
        ));
    }
    let side = |name: &str| -> Result<Option<u32>, RunwareError> {
        match get(obj, name) {
            Some(v) => {
                let s = params::i64_value(name, v)
                    .map_err(RunwareError::from_job)?
                    .unwrap_or(0);
                let s = params::check_range(name, s, 1, super::task::SIDE.1)
                    .map_err(RunwareError::from_job)?;
                Ok(Some(s as u32))
            }
            None => Ok(None),
        }
    };
    let size = match (side("width")?, side("height")?) {
        (Some(w), Some(h)) => Some((w, h)),
        (None, None) => None,
        (w, _) => {
            let missing = if w.is_some() { "height" } else { "width" };
            return Err(RunwareError::missing(
                missing,
                "`width` and `height` go together: give both, or neither to keep the input's size",
            ));
        }
    };
    Ok(PreProcessTask {
        task_uuid,
        input_image,
        preprocessor,
        size,
    })
}
