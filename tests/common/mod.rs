//! Shared support of the integration tests: fixture paths and files, goldens, tensor and weight
//! comparisons, scratch folders and an offline environment.
#![allow(dead_code)]

pub mod runware;
pub mod server;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Once;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sd_serve::pipeline::noise::BatchNoise;
use sd_serve::pipeline::{GenerationRequest, InitImage, StableDiffusion};
use sd_serve::registry::Registry;
use sd_serve::schedulers::dpm_sde::SdeNoise;
use sd_serve::schedulers::{SchedulerConfig, SchedulerSpec};
use sd_serve::weights::WeightStore;

// ---- Fixture files ----

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A JSON file, parsed; panics naming the file.
pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A safetensors file as a `VarBuilder` in `dtype` on `device`.
pub fn var_builder(weights: &Path, dtype: DType, device: &Device) -> VarBuilder<'static> {
    // SAFETY: the fixture files are not modified while the tests run.
    unsafe { VarBuilder::from_mmaped_safetensors(&[weights], dtype, device) }
        .unwrap_or_else(|e| panic!("{}: {e}", weights.display()))
}

/// `pad_token` and `model_max_length` of a tokenizer folder's `tokenizer_config.json`.
pub fn tokenizer_settings(folder: &Path) -> (String, usize) {
    let config = read_json(&folder.join("tokenizer_config.json"));
    let pad = config["pad_token"]
        .as_str()
        .or_else(|| config["pad_token"]["content"].as_str())
        .expect("tokenizer_config.json names a pad token");
    let max_len = config["model_max_length"]
        .as_u64()
        .expect("tokenizer_config.json has model_max_length") as usize;
    (pad.to_string(), max_len)
}

// ---- Goldens ----

pub fn manifest() -> serde_json::Value {
    read_json(&fixtures().join("goldens/manifest.json"))
}

/// A golden file's tensors, on the CPU in their stored dtypes.
pub fn load_goldens(file: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join("goldens").join(file);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---- Tensor comparisons ----

/// The values of a tensor, flattened, as f32.
pub fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The values of a tensor, flattened, as f64.
pub fn flat64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `|a - b|` elementwise in f32, flattened; the shapes must agree.
fn abs_diff(a: &Tensor, b: &Tensor) -> Tensor {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    abs_diff(a, b).max(0).unwrap().to_scalar::<f32>().unwrap()
}

pub fn mean_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    abs_diff(a, b)
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Asserts `latents` within `latent_tol` of the golden `latents_final` and, where the golden
/// file has `images`, their decode within `image_tol`; returns the report line for `name`.
pub fn check_against_golden(
    name: &str,
    sd: &StableDiffusion,
    latents: &Tensor,
    golden: &HashMap<String, Tensor>,
    (latent_tol, image_tol): (f32, f32),
) -> String {
    let diff = max_abs_diff(latents, &golden["latents_final"]);
    let mut line = format!("{name}: final latents max |diff| {diff:.2e}");
    assert!(diff < latent_tol, "{name}: final latents differ by {diff}");
    if let Some(expected) = golden.get("images") {
        let images = sd.decode(latents).unwrap();
        let diff = max_abs_diff(&images, expected);
        line += &format!(", images {diff:.2e}");
        assert!(diff < image_tol, "{name}: images differ by {diff}");
    }
    line
}

/// The largest magnitude in a tensor, in f32.
pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
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

pub fn all_finite(t: &Tensor) -> bool {
    flat(t).iter().all(|v| v.is_finite())
}

/// Largest `|a - b| / max(1, |b|)` over two lists of the same length, computed in f64.
pub fn max_rel_err<T: Copy + Into<f64>>(ours: &[T], reference: &[T]) -> f64 {
    assert_eq!(ours.len(), reference.len(), "lengths differ");
    ours.iter()
        .zip(reference)
        .map(|(&a, &b)| {
            let (a, b): (f64, f64) = (a.into(), b.into());
            (a - b).abs() / b.abs().max(1.0)
        })
        .fold(0.0, f64::max)
}

/// [`max_rel_err`] between two tensors of the same shape.
pub fn max_rel_err_tensors(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.dims(), reference.dims(), "shapes differ");
    max_rel_err(&flat64(ours), &flat64(reference))
}

// ---- Weight stores ----

pub fn names(store: &WeightStore) -> BTreeSet<String> {
    store.names().map(str::to_string).collect()
}

/// Requires both stores to hold the same names and shapes, and returns the largest absolute
/// difference of their values (compared in f32).
pub fn max_abs_store_diff(what: &str, a: &WeightStore, b: &WeightStore) -> f32 {
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

// ---- Scratch folders and environment ----

fn scratch_root() -> PathBuf {
    std::env::temp_dir().join(format!("sd-serve-test-{}", std::process::id()))
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
    let dir = scratch_root().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch folder");
    Scratch(dir)
}

static ENV: Once = Once::new();

/// Points every cache at a scratch folder and forbids the network, once per test binary and
/// before any test reads the environment (every test that loads through the registry or the
/// weights module calls this first).
pub fn setup() {
    ENV.call_once(|| {
        let root = scratch_root();
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

// ---- Models ----

pub fn registry() -> Registry {
    Registry::from_file(&fixtures().join("models.toml")).expect("tests/fixtures/models.toml")
}

/// A tiny fixture model by registry id, in f32 on the CPU.
/// The request of a golden pipeline case (manifest `pipelines` or `inpaint`): prompts, size,
/// steps, guidance, seed, images, clip skip, scheduler with its overrides, and the init image
/// with its strength where the case has one.
pub fn golden_request(case: &serde_json::Value) -> GenerationRequest {
    let s = |k: &str| case[k].as_str().map(str::to_string);
    let u = |k: &str| case[k].as_u64().unwrap_or_else(|| panic!("case field {k}")) as usize;
    let mut req = GenerationRequest::new(s("prompt").expect("prompt"));
    req.negative_prompt = s("negative_prompt");
    req.width = u("width");
    req.height = u("height");
    req.steps = u("steps");
    req.guidance_scale = case["guidance"].as_f64().expect("guidance");
    req.seed = case["seed"].as_u64().expect("seed");
    req.num_images = u("num_images");
    req.clip_skip = case["clip_skip"].as_u64().map(|v| v as usize);
    let mut spec = SchedulerSpec::parse(case["scheduler"].as_str().expect("scheduler"))
        .expect("golden scheduler name parses");
    spec.overrides = SchedulerConfig::from_json(&case["scheduler_overrides"])
        .expect("golden scheduler overrides parse");
    req.scheduler = Some(spec);
    if let Some(strength) = case["strength"].as_f64() {
        let path = fixtures().join(case["init_image"].as_str().expect("init image path"));
        let image = image::open(&path).expect("init image").to_rgb8();
        req.init_image = Some(InitImage { image, strength });
    }
    req
}

pub fn pipeline(model: &str) -> StableDiffusion {
    let files = registry()
        .resolve(model)
        .and_then(|entry| entry.load(&Device::Cpu, DType::F32))
        .unwrap_or_else(|e| panic!("{model}: {e}"));
    StableDiffusion::load(&files, &Device::Cpu, DType::F32)
        .unwrap_or_else(|e| panic!("{model}: {e}"))
}

/// The fixture's replacement for DPM++ SDE's Brownian tree: call j returns
/// `sqrt(2) * sin(PHASE * k + 3 * sigma + 5 * sigma_next)` over the flat index k, computed in f64
/// from the levels diffusers passed in its call j (`sde_noise_calls`, which ours must match), then
/// rounded to f32.
pub struct StandInSdeNoise {
    calls: Vec<(f64, f64)>,
    next: usize,
    name: String,
}

const SDE_NOISE_PHASE: f64 = 2.399963229728653;

impl StandInSdeNoise {
    /// `calls`: the golden's `sde_noise_calls`, flattened (sigma, sigma_next) pairs.
    pub fn new(calls: &[f64], name: &str) -> Self {
        Self {
            calls: calls.chunks(2).map(|c| (c[0], c[1])).collect(),
            next: 0,
            name: name.to_string(),
        }
    }
}

impl SdeNoise for StandInSdeNoise {
    fn increment(
        &mut self,
        sigma: f64,
        sigma_next: f64,
        like: &Tensor,
        _noise: &mut BatchNoise,
    ) -> sd_serve::Result<Tensor> {
        let (ref_sigma, ref_next) = *self
            .calls
            .get(self.next)
            .unwrap_or_else(|| panic!("{}: more noise calls than diffusers made", self.name));
        // The levels are f32 values computed the same way; they may differ by an ulp (1e-6
        // relative, the scheduler tests' schedule tolerance).
        let err = max_rel_err(&[sigma, sigma_next], &[ref_sigma, ref_next]);
        assert!(
            err <= 1e-6,
            "{}: noise call {} at ({sigma}, {sigma_next}), diffusers ({ref_sigma}, {ref_next})",
            self.name,
            self.next
        );
        self.next += 1;
        let values: Vec<f32> = (0..like.elem_count())
            .map(|k| {
                let phase = SDE_NOISE_PHASE * k as f64 + 3.0 * ref_sigma + 5.0 * ref_next;
                (2f64.sqrt() * phase.sin()) as f32
            })
            .collect();
        Ok(Tensor::from_vec(values, like.dims(), like.device())?)
    }
}

/// Runs each golden case of `cases` on the pipeline of its `model` (loaded once per model):
/// `request_for` builds its request, `denoise` its final latents, which [`check_against_golden`]
/// compares with the case's `file` within `tols`; prints one report line per case.
pub fn check_golden_cases<E: std::fmt::Display>(
    cases: &[serde_json::Value],
    tols: (f32, f32),
    request_for: impl Fn(&serde_json::Value) -> GenerationRequest,
    mut denoise: impl FnMut(&StableDiffusion, &GenerationRequest) -> Result<Tensor, E>,
) {
    let mut pipelines = Pipelines::default();
    let mut report = Vec::new();
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let sd = pipelines.get(case["model"].as_str().expect("model"));
        let golden = load_goldens(case["file"].as_str().expect("file"));
        let req = request_for(case);
        let latents = denoise(sd, &req).unwrap_or_else(|e| panic!("{name}: {e}"));
        report.push(check_against_golden(name, sd, &latents, &golden, tols));
    }
    eprintln!("{}", report.join("\n"));
}

/// Pipelines of the fixture registry loaded once per model id, for tests that run many golden
/// cases over a few models.
#[derive(Default)]
pub struct Pipelines(Vec<(String, StableDiffusion)>);

impl Pipelines {
    pub fn get(&mut self, model: &str) -> &StableDiffusion {
        if !self.0.iter().any(|(m, _)| m == model) {
            self.0.push((model.to_string(), pipeline(model)));
        }
        &self.0.iter().find(|(m, _)| m == model).unwrap().1
    }
}
