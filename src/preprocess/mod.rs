//! Control-image preprocessors: turn a photo into the kind of image a ControlNet was trained on
//! (edges, depth, pose ...). Only the algorithmic ones are here; model-based preprocessors
//! (depth estimators, pose detectors) are refused by name where a dialect names them.

pub mod canny;

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
