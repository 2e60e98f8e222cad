//! Runware's `ipAdapters` array of `imageInference`: `[{model, guideImage, weight}]`, each a
//! registered IP-Adapter (by id or AIR alias) of the task model's family, a reference image
//! (image UUID, data URI, base64 or URL, loaded when the task runs) and a weight in 0..1.

use serde_json::{Map, Value};

use super::error::RunwareError;
use crate::api::output::JobError;
use crate::api::{params, AppState};
use crate::pipeline::ip_adapter::MAX_IP_ADAPTERS;
use crate::registry::ModelEntry;

const PARAMETER: &str = "ipAdapters";
/// `ipAdapters[].weight`: range and default.
pub const WEIGHT: (f64, f64) = (0.0, 1.0);
pub const WEIGHT_DEFAULT: f64 = 1.0;

/// One `ipAdapters` item, validated; the guide image is loaded when the task runs.
#[derive(Debug, Clone)]
pub struct IpAdapterSpec {
    /// The registry id of the IP-Adapter.
    pub model: String,
    /// The reference image as the client sent it: an image UUID, data URI, base64 or URL.
    pub guide_image: String,
    pub weight: f64,
}

fn item_error(e: JobError) -> RunwareError {
    RunwareError::from_job(e.with_parameter(PARAMETER))
}

fn invalid(message: impl Into<String>) -> RunwareError {
    RunwareError::invalid(PARAMETER, message)
}

fn get<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

/// Parses `ipAdapters` for a task on `model`.
pub fn parse(
    value: Option<&Value>,
    state: &AppState,
    model: &ModelEntry,
) -> Result<Vec<IpAdapterSpec>, RunwareError> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let Value::Array(items) = value else {
        return Err(invalid(
            "`ipAdapters` must be an array of {model, guideImage, weight} objects",
        ));
    };
    if items.len() > MAX_IP_ADAPTERS {
        return Err(invalid(format!(
            "`ipAdapters` takes at most {MAX_IP_ADAPTERS} items. Given: {}",
            items.len()
        )));
    }
    let mut specs = Vec::with_capacity(items.len());
    for item in items {
        let Value::Object(obj) = item else {
            return Err(invalid(
                "each `ipAdapters` item must be an object with `model` and `guideImage`",
            ));
        };
        const KNOWN: &[&str] = &["model", "guideImage", "weight"];
        if let Some(other) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(RunwareError::unsupported(
                PARAMETER,
                format!(
                    "`ipAdapters.{other}` is not an IP-Adapter parameter this server supports \
                     ({})",
                    KNOWN.join(", ")
                ),
            ));
        }
        let text = |name: &str| -> Result<Option<String>, RunwareError> {
            match get(obj, name) {
                Some(v) => Ok(params::string_value(&format!("ipAdapters.{name}"), v)
                    .map_err(item_error)?
                    .filter(|s| !s.trim().is_empty())),
                None => Ok(None),
            }
        };
        let name = text("model")?.ok_or_else(|| {
            RunwareError::missing(
                PARAMETER,
                "each `ipAdapters` item needs `model`: an IP-Adapter AIR id or registry id",
            )
        })?;
        let model_id = state
            .ip_adapter_for("ipAdapters.model", model, &name)
            .map_err(item_error)?;
        let guide_image = text("guideImage")?.ok_or_else(|| {
            RunwareError::missing(
                PARAMETER,
                "each `ipAdapters` item needs `guideImage`: an image UUID, a data URI, base64 \
                 data or a URL",
            )
        })?;
        let weight = match get(obj, "weight") {
            Some(v) => {
                let w = params::f64_value("ipAdapters.weight", v)
                    .map_err(item_error)?
                    .unwrap_or(WEIGHT_DEFAULT);
                params::check_range("ipAdapters.weight", w, WEIGHT.0, WEIGHT.1)
                    .map_err(item_error)?
            }
            None => WEIGHT_DEFAULT,
        };
        specs.push(IpAdapterSpec {
            model: model_id,
            guide_image,
            weight,
        });
    }
    Ok(specs)
}
