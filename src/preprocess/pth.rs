//! Reading the published PyTorch checkpoints of the preprocessors (pickled `state_dict`s in
//! `.pth` files, or the same tensors as `.safetensors`) by their original key names, with shape
//! look-ups for inferring widths.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// All tensors of a pickled `state_dict` (or of a `.safetensors` file), by name, on the CPU;
/// floating-point ones as f32. The pickle reader rebuilds tensors only and runs no code.
pub(crate) fn read_pth(path: &Path) -> Result<HashMap<String, Tensor>> {
    let is_safetensors = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    let tensors: Vec<(String, Tensor)> = if is_safetensors {
        candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| Error::model(format!("{}: {e}", path.display())))?
            .into_iter()
            .collect()
    } else {
        candle_core::pickle::read_all(path)
            .map_err(|e| Error::model(format!("{}: {e}", path.display())))?
    };
    if tensors.is_empty() {
        return Err(Error::model(format!(
            "{}: no tensors (not a PyTorch state_dict)",
            path.display()
        )));
    }
    tensors
        .into_iter()
        .map(|(name, t)| {
            let t = if t.dtype().is_float() {
                t.to_dtype(DType::F32)?
            } else {
                t
            };
            Ok((name, t))
        })
        .collect()
}

/// The shape of a named tensor, or a model error naming it.
pub(crate) fn shape_of(tensors: &HashMap<String, Tensor>, name: &str) -> Result<Vec<usize>> {
    tensors
        .get(name)
        .map(|t| t.dims().to_vec())
        .ok_or_else(|| Error::model(format!("missing tensor {name}")))
}

/// A 4-D weight's `[out, in, kernel, kernel]`, checked square.
pub(crate) fn conv_shape(tensors: &HashMap<String, Tensor>, name: &str) -> Result<[usize; 4]> {
    match shape_of(tensors, name)?[..] {
        [o, i, kh, kw] if kh == kw => Ok([o, i, kh, kw]),
        ref other => Err(Error::model(format!(
            "{name}: expected a square 4-D kernel, found {other:?}"
        ))),
    }
}

/// A detector's `detect_resolution` (controlnet_aux's name: the short side of the working image
/// before rounding to 64), checked to be at least 64.
pub(crate) fn detect_resolution(resolution: u32) -> Result<u32> {
    if resolution < 64 {
        return Err(Error::invalid(format!(
            "detect_resolution must be >= 64. Given: {resolution}"
        )));
    }
    Ok(resolution)
}
