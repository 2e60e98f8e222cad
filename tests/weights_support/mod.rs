//! Helpers shared by the weights and registry tests: fixture paths, scratch folders, tensor
//! comparison.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Once;

use candle_core::DType;
use sd_serve::weights::WeightStore;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A fresh scratch folder under the system temp folder, unique per process and name, removed
/// when dropped.
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir()
        .join(format!("sd-serve-test-{}", std::process::id()))
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch folder");
    Scratch(dir)
}

static ENV: Once = Once::new();

/// Points every cache at a scratch folder and forbids the network, once per test binary and
/// before any test reads the environment (every test calls this first).
pub fn setup() {
    ENV.call_once(|| {
        let root = std::env::temp_dir().join(format!("sd-serve-test-{}", std::process::id()));
        std::env::set_var("SD_SERVE_CACHE", root.join("sd-serve-cache"));
        std::env::set_var("HF_HOME", root.join("empty-hf-home"));
        std::env::remove_var("HF_HUB_CACHE");
        std::env::set_var("HF_HUB_OFFLINE", "1");
    });
}

/// Copies a folder recursively, following symlinks, skipping files for which `skip` is true.
pub fn copy_dir(from: &Path, to: &Path, skip: &dyn Fn(&Path) -> bool) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let src = entry.path();
        let dst = to.join(entry.file_name());
        if skip(&src) {
            continue;
        }
        if src.is_dir() {
            copy_dir(&src, &dst, skip);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

pub fn names(store: &WeightStore) -> BTreeSet<String> {
    store.names().map(str::to_string).collect()
}

/// Requires both stores to hold the same names and shapes, and returns the largest absolute
/// difference of their values (compared in f32).
pub fn max_abs_diff(what: &str, a: &WeightStore, b: &WeightStore) -> f32 {
    let (na, nb) = (names(a), names(b));
    assert_eq!(
        na,
        nb,
        "{what}: key sets differ; only left: {:?}; only right: {:?}",
        na.difference(&nb).take(10).collect::<Vec<_>>(),
        nb.difference(&na).take(10).collect::<Vec<_>>()
    );
    let mut worst = 0f32;
    for name in &na {
        let (x, y) = (a.get(name).unwrap(), b.get(name).unwrap());
        assert_eq!(x.dims(), y.dims(), "{what}: shape of {name}");
        let x = x.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        let y = y.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        let d = (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap_or(0.0);
        worst = worst.max(d);
    }
    worst
}
