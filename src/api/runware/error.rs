//! Runware's error shape: `{"errors": [{code, message, parameter, type, taskType, taskUUID}]}`.
//!
//! Codes are camelCase as Runware spells them: `invalid` or `missing` followed by the parameter
//! (`invalidWidth`, `missingPositivePrompt`, `invalidCFGScale`), and a few fixed ones
//! (`invalidApiKey`, `conflictTaskUUID`, `serverBusy`, ...). Over HTTP each error also carries a
//! status class; the WebSocket ignores it.

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::output::{JobError, JobErrorKind};

/// The HTTP status family an error belongs to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ErrorClass {
    /// Something the client sent (400).
    #[default]
    Request,
    /// No key or a wrong key (401).
    Auth,
    /// A `taskUUID` no task has (404).
    NotFound,
    /// A `taskUUID` already used (409).
    Conflict,
    /// The queue is full (429).
    Busy,
    /// The server is stopping (503).
    Unavailable,
    /// The server failed (500).
    Server,
}

impl ErrorClass {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorClass::Request => StatusCode::BAD_REQUEST,
            ErrorClass::Auth => StatusCode::UNAUTHORIZED,
            ErrorClass::NotFound => StatusCode::NOT_FOUND,
            ErrorClass::Conflict => StatusCode::CONFLICT,
            ErrorClass::Busy => StatusCode::TOO_MANY_REQUESTS,
            ErrorClass::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorClass::Server => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// One entry of an `errors` array (boxed: results carrying it stay small).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RunwareError(Box<ErrorBody>);

/// The fields of a [`RunwareError`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameter: Option<String>,
    /// The JSON type the parameter must have.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub value_type: Option<String>,
    #[serde(rename = "taskType", default, skip_serializing_if = "Option::is_none")]
    pub task_type: Option<String>,
    #[serde(rename = "taskUUID", default, skip_serializing_if = "Option::is_none")]
    pub task_uuid: Option<String>,
    #[serde(skip)]
    pub class: ErrorClass,
}

impl RunwareError {
    /// An error with `code` and `message`, about `parameter` when given.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self(Box::new(ErrorBody {
            code: code.into(),
            message: message.into(),
            parameter: None,
            value_type: None,
            task_type: None,
            task_uuid: None,
            class: ErrorClass::Request,
        }))
    }

    /// The same error with another message.
    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.0.message = message.into();
        self
    }

    /// Names the parameter to blame and the type it must have.
    pub fn parameter(mut self, parameter: &str) -> Self {
        self.value_type = parameter_type(parameter).map(str::to_string);
        self.parameter = Some(parameter.to_string());
        self
    }

    pub fn class(mut self, class: ErrorClass) -> Self {
        self.class = class;
        self
    }

    /// Scopes the error to a task.
    pub fn task(mut self, task_type: Option<&str>, task_uuid: Option<&str>) -> Self {
        if self.task_type.is_none() {
            self.task_type = task_type.map(str::to_string);
        }
        if self.task_uuid.is_none() {
            self.task_uuid = task_uuid.map(str::to_string);
        }
        self
    }

    /// `invalid<Parameter>`: a value outside the documented limits or of the wrong type.
    pub fn invalid(parameter: &str, message: impl Into<String>) -> Self {
        Self::new(code_for("invalid", parameter), message).parameter(parameter)
    }

    /// `missing<Parameter>`: a required parameter left out.
    pub fn missing(parameter: &str, message: impl Into<String>) -> Self {
        Self::new(code_for("missing", parameter), message).parameter(parameter)
    }

    /// `unsupportedParameter`: a documented parameter this server cannot honour yet.
    pub fn unsupported(parameter: &str, message: impl Into<String>) -> Self {
        Self::new("unsupportedParameter", message).parameter(parameter)
    }

    /// The payload is not JSON, or not an array of task objects.
    pub fn invalid_json(message: impl Into<String>) -> Self {
        Self::new("invalidJSON", message)
    }

    pub fn missing_api_key() -> Self {
        Self::new(
            "missingApiKey",
            "No API key given. Send an authentication task with `apiKey` first (over HTTP, \
             the first task of the array or an `Authorization: Bearer` header); keys are set in \
             the sd-serve configuration (`api_keys`).",
        )
        .parameter("apiKey")
        .class(ErrorClass::Auth)
        .task(Some("authentication"), None)
    }

    pub fn invalid_api_key() -> Self {
        Self::new(
            "invalidApiKey",
            "Invalid API key: this sd-serve server does not accept it. Use a key from its \
             configuration (`api_keys`).",
        )
        .parameter("apiKey")
        .class(ErrorClass::Auth)
        .task(Some("authentication"), None)
    }

    /// A task with this `taskUUID` was sent before.
    pub fn conflict(task_uuid: &str) -> Self {
        Self::new(
            "conflictTaskUUID",
            format!(
                "a task with taskUUID {task_uuid} was already sent; each task needs a new UUID \
                 (use getResponse to fetch the results of the earlier one)"
            ),
        )
        .parameter("taskUUID")
        .class(ErrorClass::Conflict)
    }

    /// A [`JobError`] from admission, the engine or the media module in Runware's terms.
    pub fn from_job(e: JobError) -> Self {
        let JobError {
            kind,
            message,
            parameter,
        } = e;
        let (code, class) = match kind {
            JobErrorKind::Busy => ("serverBusy".to_string(), ErrorClass::Busy),
            JobErrorKind::ShuttingDown => {
                ("serverShuttingDown".to_string(), ErrorClass::Unavailable)
            }
            JobErrorKind::Invalid => match &parameter {
                Some(p) => (code_for("invalid", p), ErrorClass::Request),
                None => ("invalidRequest".to_string(), ErrorClass::Request),
            },
            JobErrorKind::UnknownModel => ("invalidModel".to_string(), ErrorClass::Request),
            JobErrorKind::NotSupported => ("unsupportedParameter".to_string(), ErrorClass::Request),
            JobErrorKind::Cancelled => ("taskCancelled".to_string(), ErrorClass::Server),
            JobErrorKind::Failed => ("internalError".to_string(), ErrorClass::Server),
        };
        let parameter = match kind {
            JobErrorKind::UnknownModel => Some("model".to_string()),
            _ => parameter,
        };
        let mut error = Self::new(code, message).class(class);
        if let Some(p) = parameter {
            error = error.parameter(&p);
        }
        error
    }

    /// `{"errors": [self]}`
    pub fn to_body(&self) -> Value {
        serde_json::json!({ "errors": [self] })
    }
}

impl std::ops::Deref for RunwareError {
    type Target = ErrorBody;
    fn deref(&self) -> &ErrorBody {
        &self.0
    }
}

impl std::ops::DerefMut for RunwareError {
    fn deref_mut(&mut self) -> &mut ErrorBody {
        &mut self.0
    }
}

impl std::fmt::Display for RunwareError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for RunwareError {}

/// `prefix` + the parameter with its first letter raised: `invalid` + `width` => `invalidWidth`.
fn code_for(prefix: &str, parameter: &str) -> String {
    let mut chars = parameter.chars();
    match chars.next() {
        Some(first) if parameter.chars().all(|c| c.is_ascii_alphanumeric()) => {
            format!("{prefix}{}{}", first.to_ascii_uppercase(), chars.as_str())
        }
        _ => format!("{prefix}Parameter"),
    }
}

/// The JSON type of each parameter, for the `type` field.
fn parameter_type(parameter: &str) -> Option<&'static str> {
    Some(match parameter {
        "taskType"
        | "taskUUID"
        | "apiKey"
        | "connectionSessionUUID"
        | "positivePrompt"
        | "negativePrompt"
        | "model"
        | "scheduler"
        | "outputType"
        | "outputFormat"
        | "uploadEndpoint"
        | "seedImage"
        | "maskImage"
        | "vae"
        | "promptWeighting"
        | "image"
        | "deliveryMethod"
        | "webhookURL" => "string",
        "width" | "height" | "steps" | "seed" | "numberResults" | "clipSkip" | "outputQuality"
        | "maskMargin" => "integer",
        "CFGScale" | "strength" => "float",
        "includeCost" | "checkNSFW" | "usePromptWeighting" => "boolean",
        "controlNet" | "lora" | "lycoris" | "embeddings" | "ipAdapters" | "referenceImages" => {
            "array"
        }
        "outpainting" | "outpaint" | "refiner" | "safety" => "object",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_parameter() {
        assert_eq!(RunwareError::invalid("width", "x").code, "invalidWidth");
        assert_eq!(
            RunwareError::invalid("CFGScale", "x").code,
            "invalidCFGScale"
        );
        assert_eq!(
            RunwareError::missing("positivePrompt", "x").code,
            "missingPositivePrompt"
        );
        assert_eq!(RunwareError::invalid("a.b", "x").code, "invalidParameter");
    }

    #[test]
    fn serialised_as_runware_does() {
        let e = RunwareError::invalid("width", "too small").task(Some("imageInference"), Some("u"));
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "code": "invalidWidth", "message": "too small", "parameter": "width",
                "type": "integer", "taskType": "imageInference", "taskUUID": "u"
            })
        );
        let auth = serde_json::to_value(RunwareError::invalid_api_key()).unwrap();
        assert_eq!(auth["taskType"], "authentication");
        assert!(auth.get("taskUUID").is_none());
    }

    #[test]
    fn job_errors_map_to_codes_and_classes() {
        let busy = RunwareError::from_job(JobError::new(JobErrorKind::Busy, "full"));
        assert_eq!(
            (busy.code.as_str(), busy.class),
            ("serverBusy", ErrorClass::Busy)
        );
        let model = RunwareError::from_job(JobError::new(JobErrorKind::UnknownModel, "no"));
        assert_eq!(model.code, "invalidModel");
        assert_eq!(model.parameter.as_deref(), Some("model"));
        let unsupported = RunwareError::from_job(JobError::not_supported("lora", "LoRA"));
        assert_eq!(unsupported.code, "unsupportedParameter");
        assert_eq!(unsupported.value_type.as_deref(), Some("array"));
    }
}
