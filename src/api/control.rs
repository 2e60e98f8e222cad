//! ControlNet inputs every dialect shares: finding the registered ControlNet a client names (by
//! registry id or alias, or by control type such as `canny`), and running a preprocessor on an
//! image. Model-based preprocessors (HED, depth, pose ...) run when a `[[preprocessor]]` entry
//! names their weights; they load on first use and stay loaded. The `inpaint` type makes no
//! image: its ControlNet reads the seed image with the masked pixels at -1, which the pipeline
//! builds from the request's mask ([`Hint::InpaintCondition`]).

use std::collections::HashMap;
use std::sync::Arc;

use image::RgbImage;

use super::output::{JobError, JobErrorKind};
use super::AppState;
use crate::pipeline::{ControlCondition, ControlNetUnit};
use crate::preprocess::{load_detector, Detector, DetectorKind, Preprocessor, PreprocessorSpec};
use crate::registry::{ControlNetEntry, ModelEntry};

/// Control types the dialects document. `canny` is computed directly; the model-based ones run
/// when configured (see [`AppState::preprocessor`]); their ControlNets also work with a ready
/// control image.
pub const CONTROL_TYPES: &[&str] = &[
    "canny",
    "depth",
    "hed",
    "mlsd",
    "normal",
    "openpose",
    "scribble",
    "segmentation",
    "inpaint",
    "softedge",
    "lineart",
    "shuffle",
    "tile",
    "face_detector",
    "qrcode",
];

/// Whether `name` is one of the documented control types (case-insensitive).
pub fn is_control_type(name: &str) -> bool {
    CONTROL_TYPES.iter().any(|t| t.eq_ignore_ascii_case(name))
}

/// How a dialect turns its source image into a ControlNet's input when asked to prepare it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Hint {
    /// Run this preprocessor on the source (an edge map, a depth map ...).
    Preprocess(PreprocessorSpec),
    /// The inpaint condition: the source as it is, with the pixels the request's mask repaints
    /// at -1 ([`ControlCondition::Inpaint`]); the request must inpaint.
    InpaintCondition,
}

impl Hint {
    /// The unit for `model` from the dialect's `source` image (preprocessed off the async
    /// runtime when the hint says so); errors name `field`.
    pub async fn unit(
        self,
        state: &AppState,
        field: &str,
        model: String,
        source: RgbImage,
    ) -> Result<ControlNetUnit, JobError> {
        Ok(match self {
            Hint::Preprocess(spec) => {
                ControlNetUnit::new(model, state.run_preprocessor(field, spec, source).await?)
            }
            Hint::InpaintCondition => ControlNetUnit {
                condition: ControlCondition::Inpaint,
                ..ControlNetUnit::new(model, source)
            },
        })
    }
}

/// How a dialect's preprocessor name is served: what it computes, or why it cannot.
enum Served {
    Spec(PreprocessorSpec),
    /// The inpaint condition, which is no image a preprocessor makes (see [`AppState::hint`]).
    Inpaint,
    /// A known preprocessor with no implementation here.
    Unsupported,
}

/// What `name` (a dialect's preprocessor or control type, case-insensitive) asks for.
fn served(name: &str) -> Option<Served> {
    let lower = name.trim().to_ascii_lowercase();
    if lower == "canny" {
        return Some(Served::Spec(PreprocessorSpec::CANNY));
    }
    if lower == "inpaint" {
        return Some(Served::Inpaint);
    }
    if let Some(kind) = DetectorKind::from_name(&lower) {
        return Some(Served::Spec(PreprocessorSpec::Detector(kind)));
    }
    (is_control_type(&lower) || UNSUPPORTED_PREPROCESSORS.contains(&lower.as_str()))
        .then_some(Served::Unsupported)
}

/// Preprocessor names of the dialects (control types and Runware's `preProcessorType` values)
/// that this server has no implementation of.
const UNSUPPORTED_PREPROCESSORS: &[&str] = &[
    "zoe",
    "leres",
    "pidinet",
    // NormalBae (`NormalBaeDetector`) is another network than the `normal` detector.
    "normalbae",
    "openpose_face",
    "openpose_faceonly",
    "openpose_full",
    "openpose_hand",
    "shuffle",
    "tile",
    "mediapipe_face",
];

impl AppState {
    /// What prepares a ControlNet of control type `name`: the inpaint condition for `inpaint`,
    /// else the preprocessor of that name (see [`Self::preprocessor`]). Errors name `field`.
    pub fn hint(&self, field: &str, name: &str) -> Result<Hint, JobError> {
        if name.trim().eq_ignore_ascii_case("inpaint") {
            Ok(Hint::InpaintCondition)
        } else {
            self.preprocessor(field, name).map(Hint::Preprocess)
        }
    }

    /// The preprocessor called `name`, checked against what this server runs: Canny always, a
    /// model-based one when a `[[preprocessor]]` entry provides its weights. Errors name `field`.
    pub fn preprocessor(&self, field: &str, name: &str) -> Result<PreprocessorSpec, JobError> {
        match served(name) {
            Some(Served::Spec(PreprocessorSpec::Detector(kind))) => {
                if self.registry().preprocessor_for(kind).is_none() {
                    return Err(JobError {
                        kind: JobErrorKind::NotSupported,
                        message: format!(
                            "`{field}`: the `{kind}` preprocessor needs its detection model, which \
                             this server has not configured: add a `[[preprocessor]]` entry with \
                             type = \"{weights}\" and its weights ({public}) to the models \
                             registry, or send a ready control image",
                            weights = kind.weights(),
                            public = kind.public_weights(),
                        ),
                        parameter: Some(field.to_string()),
                    });
                }
                Ok(PreprocessorSpec::Detector(kind))
            }
            Some(Served::Spec(spec)) => Ok(spec),
            // Not an image at all: see `hint`.
            Some(Served::Inpaint) => Err(JobError::invalid(
                field,
                format!(
                    "`{field}`: `inpaint` makes no control image: an inpaint ControlNet reads the \
                     seed image with its masked pixels at -1, built from an inpainting request's \
                     seed image and mask"
                ),
            )),
            Some(Served::Unsupported) => Err(JobError::not_supported(
                field,
                &format!(
                    "the `{name}` preprocessor is not implemented (send a ready control image \
                     instead); this server runs: {}",
                    self.available_preprocessors()
                ),
            )),
            None => Err(JobError::invalid(
                field,
                format!(
                    "`{field}`: unknown preprocessor `{name}`; this server runs: {}",
                    self.available_preprocessors()
                ),
            )),
        }
    }

    /// The preprocessors a request can use here: canny and the configured detector kinds.
    pub fn available_preprocessors(&self) -> String {
        let mut names = vec!["canny"];
        names.extend(
            DetectorKind::ALL
                .into_iter()
                .filter(|k| self.registry().preprocessor_for(*k).is_some())
                .map(DetectorKind::name),
        );
        names.join(", ")
    }

    /// Runs `spec` on `image` off the async runtime, loading its detector on first use.
    pub async fn run_preprocessor(
        &self,
        field: &str,
        spec: PreprocessorSpec,
        image: RgbImage,
    ) -> Result<RgbImage, JobError> {
        let preprocessor = match spec {
            PreprocessorSpec::Canny { low, high } => Preprocessor::Canny { low, high },
            PreprocessorSpec::Detector(kind) => Preprocessor::Model {
                kind,
                detector: self.detector(field, kind).await?,
            },
        };
        let field_owned = field.to_string();
        tokio::task::spawn_blocking(move || preprocessor.apply(&image))
            .await
            .map_err(|e| JobError::from_engine(crate::Error::Internal(e.to_string())))?
            .map_err(|e| JobError::invalid(field_owned, e.to_string()))
    }

    /// The loaded detector of `kind`: loaded once (off the async runtime) from its
    /// `[[preprocessor]]` entry and shared; a failed load is reported and tried again by the
    /// next request.
    async fn detector(
        &self,
        field: &str,
        kind: DetectorKind,
    ) -> Result<Arc<dyn Detector>, JobError> {
        // Refuses a kind with no entry, as parsing the request did.
        self.preprocessor(field, kind.name())?;
        let entry = self
            .registry()
            .preprocessor_for(kind)
            .cloned()
            .ok_or_else(|| {
                JobError::from_engine(crate::Error::Internal(format!(
                    "no `{kind}` preprocessor entry"
                )))
            })?;
        let device = self.detector_device().clone();
        let cell = self.detectors().cell(kind);
        let loaded = cell
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || {
                    let path = entry.local_path()?;
                    tracing::info!(kind = %kind, path = %path.display(), "loading preprocessor");
                    load_detector(kind, &path, &device)
                })
                .await
                .map_err(|e| crate::Error::Internal(e.to_string()))?
            })
            .await
            .map_err(|e| {
                tracing::error!(kind = %kind, "loading the preprocessor failed: {e}");
                JobError {
                    kind: JobErrorKind::Failed,
                    message: format!("`{field}`: loading the `{kind}` preprocessor failed: {e}"),
                    parameter: Some(field.to_string()),
                }
            })?;
        Ok(loaded.clone())
    }
}

/// The detectors loaded so far, one slot per kind, shared by every request.
#[derive(Default)]
pub struct Detectors(std::sync::Mutex<HashMap<DetectorKind, DetectorSlot>>);

type DetectorSlot = Arc<tokio::sync::OnceCell<Arc<dyn Detector>>>;

impl Detectors {
    /// The slot of `kind`, empty until its detector loads.
    fn cell(&self, kind: DetectorKind) -> DetectorSlot {
        let mut slots = self.0.lock().unwrap_or_else(|e| e.into_inner());
        slots.entry(kind).or_default().clone()
    }
}

impl AppState {
    /// The registered ControlNet `name` (id or alias, never a path) for `model`: it must be of
    /// the model's family. Errors name `field`.
    pub fn controlnet_entry(
        &self,
        field: &str,
        model: &ModelEntry,
        name: &str,
    ) -> Result<ControlNetEntry, JobError> {
        let entry = self
            .registry()
            .resolve_controlnet(name)
            .map_err(|e| JobError::invalid(field, format!("`{field}`: {e}")))?;
        if let Some(family) = model.family.filter(|f| *f != entry.family) {
            return Err(JobError::invalid(
                field,
                format!(
                    "`{field}`: ControlNet `{name}` is for {} models, but model `{}` is {family}",
                    entry.family, model.id
                ),
            ));
        }
        Ok(entry)
    }

    /// The ControlNet for `model` that reads `control_type` images (`canny`, ...): the first
    /// registered one of the model's family. A documented type with none registered is refused
    /// by name.
    pub fn controlnet_of_type(
        &self,
        field: &str,
        model: &ModelEntry,
        control_type: &str,
    ) -> Result<ControlNetEntry, JobError> {
        let kind = control_type.trim().to_ascii_lowercase();
        let found = match model.family {
            Some(family) => self.registry().controlnet_for(family, &kind),
            None => self.registry().controlnets().find(|e| e.expects(&kind)),
        };
        found.cloned().ok_or_else(|| {
            let family = model
                .family
                .map_or_else(|| "this model".to_string(), |f| format!("{f} models"));
            JobError::not_supported(
                field,
                &format!("no `{kind}` ControlNet for {family} is installed on this server"),
            )
        })
    }

    /// A ControlNet named either way: a documented control type (`canny`) picks the model
    /// family's ControlNet of that type, anything else is a registry id or alias.
    pub fn controlnet_by_name(
        &self,
        field: &str,
        model: &ModelEntry,
        name: &str,
    ) -> Result<ControlNetEntry, JobError> {
        if is_control_type(name) {
            self.controlnet_of_type(field, model, name)
        } else {
            self.controlnet_entry(field, model, name)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocessors_by_name() {
        assert!(matches!(
            served("Canny"),
            Some(Served::Spec(PreprocessorSpec::Canny { .. }))
        ));
        assert!(matches!(served("inpaint"), Some(Served::Inpaint)));
        let detector = |name| match served(name) {
            Some(Served::Spec(PreprocessorSpec::Detector(kind))) => Some(kind),
            _ => None,
        };
        assert_eq!(detector("softedge"), Some(DetectorKind::SoftEdge));
        assert_eq!(detector("HED"), Some(DetectorKind::Hed));
        assert_eq!(detector("seg"), Some(DetectorKind::Segmentation));
        assert_eq!(detector("lineart_anime"), Some(DetectorKind::LineartAnime));
        assert!(matches!(served("tile"), Some(Served::Unsupported)));
        assert!(matches!(served("face_detector"), Some(Served::Unsupported)));
        assert!(matches!(served("openpose_full"), Some(Served::Unsupported)));
        assert!(matches!(served("NormalBae"), Some(Served::Unsupported)));
        assert_eq!(detector("normal"), Some(DetectorKind::Normal));
        assert!(served("sketchy").is_none());
    }
}
