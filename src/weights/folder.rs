//! Diffusers pipeline folders: `model_index.json` plus one sub-folder per component.
//!
//! ```text
//! model_index.json            _class_name + the components and their classes
//! unet/ vae/ text_encoder/    config.json + diffusion_pytorch_model[.fp16].safetensors
//!                             (transformers models: model[.fp16].safetensors; large ones are
//!                             sharded behind *.safetensors.index[.fp16].json)
//! text_encoder_2/ tokenizer_2/   SDXL only (an SDXL refiner has these and no first encoder)
//! tokenizer/                  tokenizer.json or vocab.json + merges.txt, special_tokens_map.json,
//!                             tokenizer_config.json
//! scheduler/scheduler_config.json
//! ```
//!
//! A folder with `text_encoder_2` but no `text_encoder` is an SDXL refiner (family
//! `sdxl-refiner`). Otherwise the family rule (see [`family_from_configs`]): SDXL when the pipeline has a `text_encoder_2` or the
//! UNet uses `addition_embed_type = "text_time"`; otherwise SD2 when the UNet has
//! `use_linear_projection = true` (every SD 2.x UNet, no SD 1.x one), or, for a UNet config
//! without that field, when the text encoder is OpenCLIP-like (`hidden_act = "gelu"` or
//! `hidden_size = 1024`); otherwise SD1.

use std::path::Path;

use candle_core::{DType, Device};
use serde_json::Value;

use super::tokenizer::load_tokenizer_dir;
use super::{
    normalize_text_encoder_keys, read_json, refuse_pickle, Component, Family, MappedFiles,
    PipelineFiles,
};
use crate::{Error, Result};

/// Weight file base names: diffusers models, then transformers models.
const WEIGHT_BASES: &[&str] = &["diffusion_pytorch_model", "model"];

/// `model_index.json`: which pipeline, and which components it has.
#[derive(Debug, Clone)]
pub(crate) struct ModelIndex {
    pub class_name: String,
    /// The pipeline option `force_zeros_for_empty_prompt`, when the file sets it.
    pub force_zeros_for_empty_prompt: Option<bool>,
    /// Component names whose entry is not `[null, null]`.
    pub components: Vec<String>,
}

impl ModelIndex {
    pub(crate) fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("model_index.json");
        if !path.is_file() {
            return Err(Error::model(format!(
                "{} is not a diffusers folder: missing {}",
                dir.display(),
                path.display()
            )));
        }
        Self::parse(&read_json(&path)?, &path)
    }

    pub(crate) fn parse(v: &Value, path: &Path) -> Result<Self> {
        let obj = v
            .as_object()
            .ok_or_else(|| Error::model(format!("{} is not a JSON object", path.display())))?;
        let class_name = obj
            .get("_class_name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let components = obj
            .iter()
            .filter(|(k, _)| !k.starts_with('_'))
            .filter(|(_, v)| {
                // A component is `["library", "Class"]`; `[null, null]` marks an absent one.
                v.as_array()
                    .is_some_and(|a| a.len() == 2 && a.iter().all(|x| !x.is_null()))
            })
            .map(|(k, _)| k.clone())
            .collect();
        let force_zeros_for_empty_prompt = obj
            .get("force_zeros_for_empty_prompt")
            .and_then(Value::as_bool);
        Ok(Self {
            class_name,
            force_zeros_for_empty_prompt,
            components,
        })
    }

    pub(crate) fn has(&self, component: &str) -> bool {
        self.components.iter().any(|c| c == component)
    }

    /// The pipelines sd-serve can run need a UNet, a VAE and a (first) text encoder, or, for an
    /// SDXL refiner, the second one alone; transformer-based pipelines (SD3, Flux) are refused.
    pub(crate) fn check_supported(&self, dir: &Path) -> Result<()> {
        let needed: &[&str] = if self.is_refiner() {
            &["unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler"]
        } else {
            &["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
        };
        for needed in needed {
            if !self.has(needed) {
                return Err(Error::model(format!(
                    "unsupported pipeline `{}` in {}: it has no `{needed}` component; sd-serve \
                     runs Stable Diffusion 1.x, 2.x, SDXL base and SDXL refiner pipelines",
                    self.class_name,
                    dir.display()
                )));
            }
        }
        Ok(())
    }

    /// An SDXL refiner: the second (OpenCLIP bigG) text encoder without the first.
    pub(crate) fn is_refiner(&self) -> bool {
        !self.has("text_encoder") && self.has("text_encoder_2")
    }

    /// SDXL pipelines carry a second text encoder.
    pub(crate) fn needs_second_encoder(&self) -> bool {
        self.has("text_encoder_2")
    }
}

/// Which file holds a component's weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WeightChoice {
    /// One `.safetensors` file (name relative to the component folder).
    Single(String),
    /// A `*.safetensors.index[.variant].json` listing shards.
    Sharded(String),
}

/// Picks a component's weight file among `names` (the files of its folder). The requested
/// variant is preferred, then the plain file, then any variant present (a folder saved with only
/// fp16 weights loads without naming the variant). `None` when there is no safetensors file.
pub(crate) fn choose_weight_file(names: &[String], variant: Option<&str>) -> Option<WeightChoice> {
    let has = |n: &str| names.iter().any(|x| x == n);
    let lookup = |v: Option<&str>| -> Option<WeightChoice> {
        for base in WEIGHT_BASES {
            let (single, index) = match v {
                Some(v) => (
                    format!("{base}.{v}.safetensors"),
                    format!("{base}.safetensors.index.{v}.json"),
                ),
                None => (
                    format!("{base}.safetensors"),
                    format!("{base}.safetensors.index.json"),
                ),
            };
            if has(&single) {
                return Some(WeightChoice::Single(single));
            }
            if has(&index) {
                return Some(WeightChoice::Sharded(index));
            }
        }
        None
    };
    if let Some(c) = variant.and_then(|v| lookup(Some(v))) {
        return Some(c);
    }
    if let Some(c) = lookup(None) {
        return Some(c);
    }
    // Any other variant: `<base>.<variant>.safetensors` with a variant that is not a shard
    // suffix (`-00001-of-00002`). fp16 first, for determinism then by name.
    let mut others: Vec<&str> = names
        .iter()
        .filter_map(|n| {
            WEIGHT_BASES.iter().find_map(|b| {
                let v = n.strip_prefix(b)?.strip_prefix('.')?;
                let v = v
                    .strip_suffix(".safetensors")
                    .or_else(|| v.strip_prefix("safetensors.index.")?.strip_suffix(".json"))?;
                (!v.is_empty() && !v.contains('-') && !v.contains('.')).then_some(v)
            })
        })
        .collect();
    others.sort_by_key(|v| (*v != "fp16", v.to_string()));
    others.first().and_then(|v| lookup(Some(v)))
}

/// The shard files named by a sharded index, in first-seen order.
pub(crate) fn shard_files(index_path: &Path) -> Result<Vec<String>> {
    let index = read_json(index_path)?;
    let map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            Error::model(format!(
                "{} has no `weight_map` object",
                index_path.display()
            ))
        })?;
    let mut files: Vec<String> = Vec::new();
    for f in map.values() {
        let f = f.as_str().ok_or_else(|| {
            Error::model(format!(
                "{}: `weight_map` values must be file names",
                index_path.display()
            ))
        })?;
        if !files.iter().any(|x| x == f) {
            files.push(f.to_string());
        }
    }
    Ok(files)
}

fn list_files(dir: &Path) -> Result<Vec<String>> {
    let rd = std::fs::read_dir(dir)
        .map_err(|e| Error::model(format!("cannot read folder {}: {e}", dir.display())))?;
    let mut names = Vec::new();
    for entry in rd {
        let entry = entry?;
        if let Some(n) = entry.file_name().to_str() {
            names.push(n.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Loads one model component folder (`config.json` + weights).
pub(crate) fn load_component(
    dir: &Path,
    variant: Option<&str>,
    device: &Device,
    dtype: DType,
) -> Result<Component> {
    if !dir.is_dir() {
        return Err(Error::model(format!(
            "missing component folder {}",
            dir.display()
        )));
    }
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(Error::model(format!(
            "missing config file {}",
            config_path.display()
        )));
    }
    let config = read_json(&config_path)?;
    let names = list_files(dir)?;
    let paths = match choose_weight_file(&names, variant) {
        Some(WeightChoice::Single(f)) => vec![dir.join(f)],
        Some(WeightChoice::Sharded(index)) => shard_files(&dir.join(index))?
            .into_iter()
            .map(|f| dir.join(f))
            .collect(),
        None => {
            // Name the pickle file if that is all there is, else the file we looked for.
            if let Some(bin) = names.iter().find(|n| n.ends_with(".bin")) {
                refuse_pickle(&dir.join(bin))?;
            }
            let expected = match variant {
                Some(v) => format!("diffusion_pytorch_model.{v}.safetensors"),
                None => "diffusion_pytorch_model.safetensors".to_string(),
            };
            return Err(Error::model(format!(
                "missing weight file {} (or model.safetensors, or a sharded \
                 *.safetensors.index.json)",
                dir.join(expected).display()
            )));
        }
    };
    let weights = MappedFiles::open(&paths)?.load_all(device, dtype)?;
    tracing::debug!("loaded {} tensors from {}", weights.len(), dir.display());
    Ok(Component { config, weights })
}

/// A text encoder component, with its keys in the `text_model.*` layout.
fn load_text_encoder(
    dir: &Path,
    variant: Option<&str>,
    device: &Device,
    dtype: DType,
) -> Result<Component> {
    let c = load_component(dir, variant, device, dtype)?;
    Ok(Component {
        config: c.config,
        weights: normalize_text_encoder_keys(c.weights),
    })
}

/// The family of a diffusers pipeline from its configs (rule in the module docs).
pub fn family_from_configs(
    has_text_encoder_2: bool,
    unet_config: &Value,
    text_encoder_config: &Value,
) -> Family {
    if has_text_encoder_2
        || unet_config
            .get("addition_embed_type")
            .and_then(Value::as_str)
            == Some("text_time")
    {
        return Family::Sdxl;
    }
    if let Some(linear) = unet_config
        .get("use_linear_projection")
        .and_then(Value::as_bool)
    {
        return if linear { Family::Sd2 } else { Family::Sd1 };
    }
    let gelu = text_encoder_config
        .get("hidden_act")
        .and_then(Value::as_str)
        == Some("gelu");
    let wide = text_encoder_config
        .get("hidden_size")
        .and_then(Value::as_u64)
        == Some(1024);
    if gelu || wide {
        Family::Sd2
    } else {
        Family::Sd1
    }
}

/// The `max_position_embeddings` of a text encoder config (caps the tokenizer length).
pub(crate) fn max_positions(text_encoder_config: &Value) -> Option<usize> {
    text_encoder_config
        .get("max_position_embeddings")
        .and_then(Value::as_u64)
        .map(|n| n as usize)
}

pub(crate) fn read_scheduler_config(dir: &Path) -> Result<Value> {
    let path = dir.join("scheduler").join("scheduler_config.json");
    if !path.is_file() {
        return Err(Error::model(format!(
            "missing scheduler config {}",
            path.display()
        )));
    }
    read_json(&path)
}

/// Loads a diffusers folder with its default (non-variant) weights, falling back to a variant
/// when that is all the folder has.
pub fn load_diffusers_folder(
    dir: &Path,
    device: &Device,
    dtype: DType,
) -> Result<crate::weights::PipelineFiles> {
    load_diffusers_folder_variant(dir, None, device, dtype)
}

/// Loads a diffusers folder, preferring the weight files of `variant` (e.g. `fp16`).
pub fn load_diffusers_folder_variant(
    dir: &Path,
    variant: Option<&str>,
    device: &Device,
    dtype: DType,
) -> Result<PipelineFiles> {
    let index = ModelIndex::read(dir)?;
    index.check_supported(dir)?;
    if index.is_refiner() {
        return load_refiner_folder(dir, &index, variant, device, dtype);
    }
    let unet = load_component(&dir.join("unet"), variant, device, dtype)?;
    let vae = load_component(&dir.join("vae"), variant, device, dtype)?;
    let text_encoder = load_text_encoder(&dir.join("text_encoder"), variant, device, dtype)?;
    let tokenizer =
        load_tokenizer_dir(&dir.join("tokenizer"), max_positions(&text_encoder.config))?;
    let (text_encoder_2, tokenizer_2) = if index.needs_second_encoder() {
        let te2 = load_text_encoder(&dir.join("text_encoder_2"), variant, device, dtype)?;
        // SDXL pipelines may share the first tokenizer (no `tokenizer_2` entry).
        let tok_dir = if index.has("tokenizer_2") {
            dir.join("tokenizer_2")
        } else {
            dir.join("tokenizer")
        };
        let tok2 = load_tokenizer_dir(&tok_dir, max_positions(&te2.config))?;
        (Some(te2), Some(tok2))
    } else {
        (None, None)
    };
    let scheduler_config = read_scheduler_config(dir)?;
    let family = family_from_configs(text_encoder_2.is_some(), &unet.config, &text_encoder.config);
    tracing::info!(
        "loaded {family} pipeline `{}` from {}",
        index.class_name,
        dir.display()
    );
    Ok(PipelineFiles {
        family,
        unet,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        scheduler_config,
        force_zeros_for_empty_prompt: index
            .force_zeros_for_empty_prompt
            .unwrap_or(family == Family::Sdxl),
    })
}

/// An SDXL refiner folder: its only text encoder (`text_encoder_2`, with `tokenizer_2`) goes in
/// the first encoder's place. diffusers' refiner pipelines encode the empty negative prompt
/// unless `force_zeros_for_empty_prompt` says otherwise (the published refiner says false).
fn load_refiner_folder(
    dir: &Path,
    index: &ModelIndex,
    variant: Option<&str>,
    device: &Device,
    dtype: DType,
) -> Result<PipelineFiles> {
    let unet = load_component(&dir.join("unet"), variant, device, dtype)?;
    if unet
        .config
        .get("addition_embed_type")
        .and_then(Value::as_str)
        != Some("text_time")
    {
        return Err(Error::model(format!(
            "{}: a pipeline with only `text_encoder_2` is an SDXL refiner, but its UNet has no \
             `addition_embed_type: \"text_time\"` conditioning",
            dir.display()
        )));
    }
    let vae = load_component(&dir.join("vae"), variant, device, dtype)?;
    let text_encoder = load_text_encoder(&dir.join("text_encoder_2"), variant, device, dtype)?;
    let tokenizer = load_tokenizer_dir(
        &dir.join("tokenizer_2"),
        max_positions(&text_encoder.config),
    )?;
    let scheduler_config = read_scheduler_config(dir)?;
    tracing::info!(
        "loaded sdxl-refiner pipeline `{}` from {}",
        index.class_name,
        dir.display()
    );
    Ok(PipelineFiles {
        family: Family::SdxlRefiner,
        unet,
        vae,
        text_encoder,
        text_encoder_2: None,
        tokenizer,
        tokenizer_2: None,
        scheduler_config,
        force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt.unwrap_or(true),
    })
}

/// A folder's files, used to decide which ones to fetch from a hub repo (see the registry).
pub(crate) fn component_paths(dir_files: &[String], component: &str) -> Vec<String> {
    let prefix = format!("{component}/");
    dir_files
        .iter()
        .filter_map(|f| f.strip_prefix(&prefix))
        .filter(|f| !f.contains('/'))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn weight_file_preference() {
        let all = names(&[
            "config.json",
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin",
        ]);
        assert_eq!(
            choose_weight_file(&all, None),
            Some(WeightChoice::Single(
                "diffusion_pytorch_model.safetensors".into()
            ))
        );
        assert_eq!(
            choose_weight_file(&all, Some("fp16")),
            Some(WeightChoice::Single(
                "diffusion_pytorch_model.fp16.safetensors".into()
            ))
        );
        let only_fp16 = names(&["config.json", "model.fp16.safetensors"]);
        assert_eq!(
            choose_weight_file(&only_fp16, None),
            Some(WeightChoice::Single("model.fp16.safetensors".into()))
        );
        let sharded = names(&[
            "diffusion_pytorch_model.safetensors.index.fp16.json",
            "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
            "diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        ]);
        assert_eq!(
            choose_weight_file(&sharded, Some("fp16")),
            Some(WeightChoice::Sharded(
                "diffusion_pytorch_model.safetensors.index.fp16.json".into()
            ))
        );
        assert_eq!(
            choose_weight_file(&sharded, None),
            Some(WeightChoice::Sharded(
                "diffusion_pytorch_model.safetensors.index.fp16.json".into()
            ))
        );
        assert_eq!(
            choose_weight_file(&names(&["diffusion_pytorch_model.bin"]), None),
            None
        );
    }

    #[test]
    fn model_index_components() {
        let v = json!({
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "safety_checker": [null, null],
            "text_encoder": ["transformers", "CLIPTextModel"]
        });
        let idx = ModelIndex::parse(&v, Path::new("model_index.json")).unwrap();
        assert_eq!(idx.class_name, "StableDiffusionPipeline");
        assert!(idx.has("unet") && idx.has("text_encoder"));
        assert!(!idx.has("safety_checker"));
    }

    #[test]
    fn family_rule() {
        let te_sd1 = json!({"hidden_act": "quick_gelu", "hidden_size": 768});
        let te_sd2 = json!({"hidden_act": "gelu", "hidden_size": 1024});
        assert_eq!(family_from_configs(true, &json!({}), &te_sd1), Family::Sdxl);
        assert_eq!(
            family_from_configs(false, &json!({"addition_embed_type": "text_time"}), &te_sd1),
            Family::Sdxl
        );
        assert_eq!(
            family_from_configs(false, &json!({"use_linear_projection": true}), &te_sd1),
            Family::Sd2
        );
        // A UNet that states `use_linear_projection: false` is SD1 whatever its encoder.
        assert_eq!(
            family_from_configs(false, &json!({"use_linear_projection": false}), &te_sd2),
            Family::Sd1
        );
        assert_eq!(family_from_configs(false, &json!({}), &te_sd2), Family::Sd2);
        assert_eq!(family_from_configs(false, &json!({}), &te_sd1), Family::Sd1);
    }
}
