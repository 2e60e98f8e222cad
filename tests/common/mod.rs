//! Shared helpers of the integration tests: fixture paths, goldens, comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sd_serve::pipeline::StableDiffusion;
use sd_serve::registry::Registry;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn manifest() -> serde_json::Value {
    let path = fixtures().join("goldens/manifest.json");
    let text = std::fs::read_to_string(&path).expect("goldens/manifest.json");
    serde_json::from_str(&text).expect("manifest is JSON")
}

/// A golden file's tensors, as f32 on the CPU (ids stay integers).
pub fn load_goldens(file: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join("goldens").join(file);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn registry() -> Registry {
    Registry::from_file(&fixtures().join("models.toml")).expect("tests/fixtures/models.toml")
}

/// A tiny fixture model by registry id, in f32 on the CPU.
pub fn pipeline(model: &str) -> StableDiffusion {
    let files = registry()
        .resolve(model)
        .and_then(|entry| entry.load(&Device::Cpu, DType::F32))
        .unwrap_or_else(|e| panic!("{model}: {e}"));
    StableDiffusion::load(&files, &Device::Cpu, DType::F32)
        .unwrap_or_else(|e| panic!("{model}: {e}"))
}
