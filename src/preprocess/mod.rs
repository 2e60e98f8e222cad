//! Control-image preprocessors: turn a photo into the kind of image a ControlNet was trained on
//! (edges, depth, pose ...). Only the algorithmic ones are here; model-based preprocessors
//! (depth estimators, pose detectors) are refused by name where a dialect names them.

pub mod canny;
pub mod openpose;

use image::RgbImage;

/// A model-based preprocessor: a detection network (depth estimator, edge detector, pose
/// network ...) with its public weights loaded, plus the reference pre- and post-processing
/// around it. Each lives in its own module of this folder with a `load` constructor.
pub trait Detector: Send + Sync {
    /// Runs the detector on `image`. The result is an RGB control image of the same width and
    /// height (the detector resizes to its working resolution and back as its reference does).
    fn detect(&self, image: &RgbImage) -> crate::Result<RgbImage>;
}

/// The preprocessors sd-serve runs, by the names the dialects use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Preprocessor {
    /// Canny edges with the given low and high hysteresis thresholds.
    Canny { low: f64, high: f64 },
}

impl Preprocessor {
    /// Canny with OpenCV's usual ControlNet thresholds (100, 200).
    pub const CANNY: Preprocessor = Preprocessor::Canny {
        low: canny::DEFAULT_LOW,
        high: canny::DEFAULT_HIGH,
    };

    /// Runs the preprocessor; the result is an RGB image of the same size.
    pub fn apply(&self, image: &image::RgbImage) -> crate::Result<image::RgbImage> {
        match *self {
            Preprocessor::Canny { low, high } => {
                let edges = canny::canny(&canny::rgb_to_gray(image), low, high)?;
                Ok(image::DynamicImage::ImageLuma8(edges).to_rgb8())
            }
        }
    }
}
