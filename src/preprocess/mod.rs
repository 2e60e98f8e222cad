//! Control-image preprocessors: turn a photo into the kind of image a ControlNet was trained on
//! (edges, depth, pose ...). Canny is computed directly; the model-based ones ([`Detector`]s,
//! one module each) need their public weights, named by a `[[preprocessor]]` registry entry,
//! and are loaded through [`load_detector`].

pub mod canny;
pub mod cv;
pub mod depth;
pub mod hed;
pub mod lineart;
pub mod mlsd;
pub mod normal;
pub mod openpose;
mod pth;
pub mod resample;
pub mod resize;
pub mod segmentation;

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use image::RgbImage;

/// A model-based preprocessor: a detection network (depth estimator, edge detector, pose
/// network ...) with its public weights loaded, plus the reference pre- and post-processing
/// around it. Each lives in its own module of this folder with a `load` constructor.
pub trait Detector: Send + Sync {
    /// Runs the detector on `image`. The result is an RGB control image of the same width and
    /// height (the detector resizes to its working resolution and back as its reference does).
    fn detect(&self, image: &RgbImage) -> crate::Result<RgbImage>;
}

/// The model-based preprocessors, by the `type` a `[[preprocessor]]` entry gives. Some share
/// weights: `softedge` and `scribble` are HED with other post-processing (see [`Self::weights`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DetectorKind {
    /// HED soft edges (`controlnet_aux` `HEDdetector`).
    Hed,
    /// Soft edges for softedge ControlNets: HED with `safe=False`, as `controlnet_aux` makes them.
    SoftEdge,
    /// Scribbles: HED with `controlnet_aux`'s `scribble=True` post-processing.
    Scribble,
    /// Line art (`LineartDetector`).
    Lineart,
    /// Anime line art (`LineartAnimeDetector`).
    LineartAnime,
    /// Straight lines (`MLSDdetector`).
    Mlsd,
    /// Depth: DPT as transformers' depth-estimation pipeline runs it ([`depth::DptDepth`]).
    Depth,
    /// Surface normals from DPT depth, the `sd-controlnet-normal` model card's recipe
    /// ([`normal::DepthNormal`]); not `NormalBaeDetector`, a different network.
    Normal,
    /// Body pose (`OpenposeDetector`, body only: [`openpose::OpenposeDetector`]).
    OpenPose,
    /// Semantic segmentation (ADE20K palette).
    Segmentation,
}

impl DetectorKind {
    /// Every kind, in the order messages list them.
    pub const ALL: [DetectorKind; 10] = [
        DetectorKind::Hed,
        DetectorKind::SoftEdge,
        DetectorKind::Scribble,
        DetectorKind::Lineart,
        DetectorKind::LineartAnime,
        DetectorKind::Mlsd,
        DetectorKind::Depth,
        DetectorKind::Normal,
        DetectorKind::OpenPose,
        DetectorKind::Segmentation,
    ];

    /// The `type` a `[[preprocessor]]` entry names this kind by.
    pub fn name(self) -> &'static str {
        match self {
            DetectorKind::Hed => "hed",
            DetectorKind::SoftEdge => "softedge",
            DetectorKind::Scribble => "scribble",
            DetectorKind::Lineart => "lineart",
            DetectorKind::LineartAnime => "lineart_anime",
            DetectorKind::Mlsd => "mlsd",
            DetectorKind::Depth => "depth",
            DetectorKind::Normal => "normal",
            DetectorKind::OpenPose => "openpose",
            DetectorKind::Segmentation => "segmentation",
        }
    }

    /// The kind a name stands for (case-insensitive): the entry types, plus the other names
    /// the dialects use for the same detector (`seg`, `midas`). `normalbae` is not `normal`:
    /// NormalBae is another network, which this server does not run.
    pub fn from_name(name: &str) -> Option<Self> {
        let lower = name.trim().to_ascii_lowercase();
        let kind = match lower.as_str() {
            "midas" => DetectorKind::Depth,
            "seg" => DetectorKind::Segmentation,
            _ => return Self::ALL.into_iter().find(|k| k.name() == lower),
        };
        Some(kind)
    }

    /// The kind whose weights this one runs: HED's for `softedge` and `scribble`, else its own.
    /// A `[[preprocessor]]` entry of that type serves this kind too.
    pub fn weights(self) -> Self {
        match self {
            DetectorKind::SoftEdge | DetectorKind::Scribble => DetectorKind::Hed,
            other => other,
        }
    }

    /// Whether this kind's weights are a transformers folder (`config.json`,
    /// `model.safetensors`, `preprocessor_config.json`) rather than one file.
    pub fn weights_are_folder(self) -> bool {
        matches!(
            self.weights(),
            DetectorKind::Depth | DetectorKind::Normal | DetectorKind::Segmentation
        )
    }

    /// The public weights this kind's detector reads: a file of `lllyasviel/Annotators` (as
    /// `controlnet_aux` names it) or a transformers repo.
    pub fn public_weights(self) -> &'static str {
        match self.weights() {
            DetectorKind::Hed | DetectorKind::SoftEdge | DetectorKind::Scribble => {
                "lllyasviel/Annotators ControlNetHED.pth"
            }
            DetectorKind::Lineart => "lllyasviel/Annotators sk_model.pth",
            DetectorKind::LineartAnime => "lllyasviel/Annotators netG.pth",
            DetectorKind::Mlsd => "lllyasviel/Annotators mlsd_large_512_fp32.pth",
            DetectorKind::Depth | DetectorKind::Normal => "the transformers folder Intel/dpt-large",
            DetectorKind::OpenPose => "lllyasviel/Annotators body_pose_model.pth",
            DetectorKind::Segmentation => {
                "the transformers folder openmmlab/upernet-convnext-small"
            }
        }
    }
}

impl fmt::Display for DetectorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Loads the detector of `kind` from its weights at `path` (a file, or a folder for the kinds
/// whose weights are a transformers folder) onto `device`. One arm per detector module.
pub fn load_detector(
    kind: DetectorKind,
    path: &Path,
    device: &Device,
) -> crate::Result<Arc<dyn Detector>> {
    use hed::{Hed, HedMode};
    Ok(match kind {
        DetectorKind::Hed | DetectorKind::SoftEdge => Arc::new(Hed::load(path, device)?),
        DetectorKind::Scribble => Arc::new(Hed::load(path, device)?.with_mode(HedMode::Scribble)),
        DetectorKind::Depth => Arc::new(depth::DptDepth::load(path, device)?),
        DetectorKind::Normal => Arc::new(normal::DepthNormal::load(path, device)?),
        DetectorKind::Segmentation => Arc::new(segmentation::UperNetSegmenter::load(path, device)?),
        DetectorKind::Lineart => Arc::new(lineart::LineartDetector::load(path, device)?),
        DetectorKind::Mlsd => Arc::new(mlsd::MlsdDetector::load(path, device)?),
        DetectorKind::OpenPose => Arc::new(openpose::OpenposeDetector::load(path, device)?),
        // LineartAnime is another network (netG.pth), not built here.
        other => {
            return Err(crate::Error::model(format!(
                "the `{other}` preprocessor is not built into this server"
            )))
        }
    })
}

/// A preprocessor as a request names it, before any weights are loaded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PreprocessorSpec {
    /// Canny edges with the given low and high hysteresis thresholds.
    Canny { low: f64, high: f64 },
    /// A model-based detector, loaded on first use.
    Detector(DetectorKind),
}

impl PreprocessorSpec {
    /// Canny with OpenCV's usual ControlNet thresholds (100, 200).
    pub const CANNY: PreprocessorSpec = PreprocessorSpec::Canny {
        low: canny::DEFAULT_LOW,
        high: canny::DEFAULT_HIGH,
    };
}

/// A preprocessor ready to run.
#[derive(Clone)]
pub enum Preprocessor {
    /// Canny edges with the given low and high hysteresis thresholds.
    Canny { low: f64, high: f64 },
    /// A loaded detection network.
    Model {
        kind: DetectorKind,
        detector: Arc<dyn Detector>,
    },
}

impl fmt::Debug for Preprocessor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Preprocessor::Canny { low, high } => f
                .debug_struct("Canny")
                .field("low", low)
                .field("high", high)
                .finish(),
            Preprocessor::Model { kind, .. } => {
                f.debug_struct("Model").field("kind", kind).finish()
            }
        }
    }
}

impl Preprocessor {
    /// Canny with OpenCV's usual ControlNet thresholds (100, 200).
    pub const CANNY: Preprocessor = Preprocessor::Canny {
        low: canny::DEFAULT_LOW,
        high: canny::DEFAULT_HIGH,
    };

    /// Runs the preprocessor; the result is an RGB image of the same size.
    pub fn apply(&self, image: &image::RgbImage) -> crate::Result<image::RgbImage> {
        match self {
            Preprocessor::Canny { low, high } => {
                let edges = canny::canny(&canny::rgb_to_gray(image), *low, *high)?;
                Ok(image::DynamicImage::ImageLuma8(edges).to_rgb8())
            }
            Preprocessor::Model { detector, .. } => detector.detect(image),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_by_name() {
        for kind in DetectorKind::ALL {
            assert_eq!(DetectorKind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(DetectorKind::from_name("NormalBae"), None);
        assert_eq!(
            DetectorKind::from_name("seg"),
            Some(DetectorKind::Segmentation)
        );
        assert_eq!(DetectorKind::from_name("canny"), None);
        assert_eq!(DetectorKind::Scribble.weights(), DetectorKind::Hed);
    }

    #[test]
    fn kinds_without_a_module_are_refused_by_name() {
        // Anime line art is another network (netG.pth) than `lineart`'s.
        let kind = DetectorKind::LineartAnime;
        let err = load_detector(kind, Path::new("x.pth"), &Device::Cpu)
            .err()
            .expect("no module");
        assert!(err.to_string().contains("`lineart_anime`"), "{err}");
        assert!(err.to_string().contains("not built in"), "{err}");
    }

    #[test]
    fn folder_kinds() {
        let folders: Vec<_> = DetectorKind::ALL
            .into_iter()
            .filter(|k| k.weights_are_folder())
            .collect();
        assert_eq!(
            folders,
            [
                DetectorKind::Depth,
                DetectorKind::Normal,
                DetectorKind::Segmentation
            ]
        );
    }
}
