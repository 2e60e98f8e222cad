//! ControlNet inputs every dialect shares: finding the registered ControlNet a client names (by
//! registry id or alias, or by control type such as `canny`), and running a preprocessor on an
//! image. Model-based preprocessors (depth, pose, segmentation ...) are refused by name. The
//! `inpaint` type makes no image: its ControlNet reads the seed image with the masked pixels at
//! -1, which the pipeline builds from the request's mask ([`Hint::InpaintCondition`]).

use image::RgbImage;

use super::output::JobError;
use super::AppState;
use crate::pipeline::{ControlCondition, ControlNetUnit};
use crate::preprocess::Preprocessor;
use crate::registry::{ControlNetEntry, ModelEntry};

/// Control types the dialects document. Only `canny` has a preprocessor here; the others need a
/// detection model this server does not run (their ControlNets still work with a ready control
/// image where one is registered).
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
    /// Run this preprocessor on the source (an edge map ...).
    Preprocess(Preprocessor),
    /// The inpaint condition: the source as it is, with the pixels the request's mask repaints
    /// at -1 ([`ControlCondition::Inpaint`]); the request must inpaint.
    InpaintCondition,
}

impl Hint {
    /// The unit for `model` from the dialect's `source` image (preprocessed off the async
    /// runtime when the hint says so); errors name `field`.
    pub async fn unit(
        self,
        field: &str,
        model: String,
        source: RgbImage,
    ) -> Result<ControlNetUnit, JobError> {
        Ok(match self {
            Hint::Preprocess(p) => {
                ControlNetUnit::new(model, run_preprocessor(field, p, source).await?)
            }
            Hint::InpaintCondition => ControlNetUnit {
                condition: ControlCondition::Inpaint,
                ..ControlNetUnit::new(model, source)
            },
        })
    }
}

/// What prepares a ControlNet of control type `name`: the inpaint condition for `inpaint`, else
/// the preprocessor of that name. Errors name `field`.
pub fn hint(field: &str, name: &str) -> Result<Hint, JobError> {
    if name.trim().eq_ignore_ascii_case("inpaint") {
        Ok(Hint::InpaintCondition)
    } else {
        preprocessor(field, name).map(Hint::Preprocess)
    }
}

/// The preprocessor called `name`; errors name `field`.
pub fn preprocessor(field: &str, name: &str) -> Result<Preprocessor, JobError> {
    let lower = name.trim().to_ascii_lowercase();
    match lower.as_str() {
        "canny" => Ok(Preprocessor::CANNY),
        // Not an image at all: see `hint`.
        "inpaint" => Err(JobError::invalid(
            field,
            format!(
                "`{field}`: `inpaint` makes no control image: an inpaint ControlNet reads the \
                 seed image with its masked pixels at -1, built from an inpainting request's \
                 seed image and mask"
            ),
        )),
        _ if is_control_type(&lower) || MODEL_PREPROCESSORS.contains(&lower.as_str()) => {
            Err(JobError::not_supported(
                field,
                &format!(
                    "the `{name}` preprocessor needs a detection model, which this server does \
                     not run (canny is available; or send a ready control image)"
                ),
            ))
        }
        _ => Err(JobError::invalid(
            field,
            format!("`{field}`: unknown preprocessor `{name}`; this server runs: canny"),
        )),
    }
}

/// Preprocessor names of other services (Runware's `preProcessorType` values) that need a model.
const MODEL_PREPROCESSORS: &[&str] = &[
    "depth",
    "midas",
    "zoe",
    "leres",
    "mlsd",
    "hed",
    "pidinet",
    "softedge",
    "lineart",
    "lineart_anime",
    "normalbae",
    "openpose",
    "openpose_face",
    "openpose_faceonly",
    "openpose_full",
    "openpose_hand",
    "scribble",
    "seg",
    "segmentation",
    "shuffle",
    "tile",
    "mediapipe_face",
];

/// Runs `preprocessor` on `image` off the async runtime.
pub async fn run_preprocessor(
    field: &str,
    preprocessor: Preprocessor,
    image: RgbImage,
) -> Result<RgbImage, JobError> {
    let field_owned = field.to_string();
    tokio::task::spawn_blocking(move || preprocessor.apply(&image))
        .await
        .map_err(|e| JobError::from_engine(crate::Error::Internal(e.to_string())))?
        .map_err(|e| JobError::invalid(field_owned, e.to_string()))
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
        assert!(preprocessor("auto_hint", "Canny").is_ok());
        let inpaint = preprocessor("auto_hint", "inpaint").unwrap_err();
        assert!(
            inpaint.message.contains("makes no control image"),
            "{}",
            inpaint.message
        );
        assert_eq!(
            hint("auto_hint", " Inpaint").unwrap(),
            Hint::InpaintCondition
        );
        assert_eq!(
            hint("auto_hint", "canny").unwrap(),
            Hint::Preprocess(Preprocessor::CANNY)
        );
        assert!(hint("auto_hint", "depth").is_err());
        let depth = preprocessor("auto_hint", "depth").unwrap_err();
        assert!(
            depth.message.contains("detection model"),
            "{}",
            depth.message
        );
        let unknown = preprocessor("auto_hint", "sketchy").unwrap_err();
        assert!(
            unknown.message.contains("unknown preprocessor"),
            "{}",
            unknown.message
        );
    }
}
