//! Model files to named tensors.
//!
//! Everything downstream (the CLIP, UNet and VAE modules) reads weights by their diffusers names
//! through a [`WeightStore`] per component. This module produces those stores from the two layouts
//! found in the wild:
//!
//! * a diffusers folder (`model_index.json` + one sub-folder per component), see [`folder`];
//! * a single-file checkpoint in the original LDM / SGM key layout (civitai distribution), see
//!   [`single_file`], whose keys are renamed to diffusers names on load.
//!
//! [`lora`] merges LoRA files into loaded stores and takes them out again; [`embeddings`] reads
//! textual inversion embeddings.
//!
//! Files are memory-mapped; each tensor is materialised once on the requested device, in the
//! requested dtype (floating-point tensors only; integer buffers keep their type).

pub mod embeddings;
pub mod folder;
pub mod lora;
pub mod single_file;
mod tokenizer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub use folder::{load_diffusers_folder, load_diffusers_folder_variant};
pub use single_file::{
    detect_family, load_controlnet_file, load_single_file, load_single_file_with_tokenizers,
};
pub(crate) use tokenizer::TOKENIZER_FILE_NAMES;

/// The model families sd-serve runs. They differ in text encoders, UNet conditioning and VAE
/// scaling, and so in how a pipeline drives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Stable Diffusion 1.x: CLIP ViT-L/14 text encoder, 768-wide cross-attention.
    Sd1,
    /// Stable Diffusion 2.x: OpenCLIP ViT-H/14 text encoder (penultimate layer), 1024-wide.
    Sd2,
    /// Stable Diffusion XL: two text encoders, pooled + size conditioning.
    Sdxl,
    /// The SDXL refiner: SDXL's second text encoder only (OpenCLIP bigG, pooled), a UNet
    /// conditioned on size, crop and an aesthetic score, the SDXL VAE. It finishes the last
    /// steps of an SDXL base model's denoising.
    #[serde(rename = "sdxl-refiner")]
    SdxlRefiner,
}

impl Family {
    pub fn as_str(&self) -> &'static str {
        match self {
            Family::Sd1 => "sd1",
            Family::Sd2 => "sd2",
            Family::Sdxl => "sdxl",
            Family::SdxlRefiner => "sdxl-refiner",
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Family {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "sd1" | "sd15" | "sd1.5" => Ok(Family::Sd1),
            "sd2" | "sd21" | "sd2.1" => Ok(Family::Sd2),
            "sdxl" => Ok(Family::Sdxl),
            "sdxl-refiner" | "sdxl_refiner" => Ok(Family::SdxlRefiner),
            other => Err(Error::model(format!(
                "unknown model family `{other}`: expected one of sd1, sd2, sdxl, sdxl-refiner"
            ))),
        }
    }
}

/// Named tensors of one component, with diffusers key names, on one device/dtype.
#[derive(Debug, Clone, Default)]
pub struct WeightStore {
    tensors: HashMap<String, Tensor>,
}

impl WeightStore {
    pub fn from_tensors(map: HashMap<String, Tensor>) -> Self {
        Self { tensors: map }
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// Adds or replaces a tensor (LoRA merge and unmerge rewrite weights in place this way).
    pub fn insert(&mut self, name: String, t: Tensor) {
        self.tensors.insert(name, t);
    }

    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.remove(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Bytes held by the tensors (for the model cache's memory budget).
    pub fn size_in_bytes(&self) -> usize {
        self.tensors
            .values()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// A `VarBuilder` over these tensors. Cloning the map is cheap: tensors share their storage.
    /// A tensor whose device or dtype differs from the requested one is converted when read.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> candle_nn::VarBuilder<'static> {
        candle_nn::VarBuilder::from_tensors(self.tensors.clone(), dtype, device)
    }

    pub fn into_tensors(self) -> HashMap<String, Tensor> {
        self.tensors
    }
}

/// One model component: its diffusers `config.json` and its weights.
#[derive(Debug, Clone)]
pub struct Component {
    pub config: serde_json::Value,
    pub weights: WeightStore,
}

/// Where a CLIP tokenizer is, and the two settings the prompt encoder needs from its configs.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizerFiles {
    /// A `tokenizers` JSON file. Hub repos of Stable Diffusion ship only `vocab.json` +
    /// `merges.txt`; for those an equivalent `tokenizer.json` is written once into a cache folder.
    pub tokenizer_json: PathBuf,
    /// The padding token: `<|endoftext|>` for OpenAI CLIP, `!` for the OpenCLIP encoders.
    pub pad_token: String,
    pub model_max_length: usize,
}

/// Everything a pipeline needs to build its models, with weights already on the device.
#[derive(Debug, Clone)]
pub struct PipelineFiles {
    pub family: Family,
    pub unet: Component,
    pub vae: Component,
    /// The first text encoder; for an SDXL refiner its only one, the OpenCLIP bigG encoder
    /// diffusers calls `text_encoder_2` (with `tokenizer` then its `tokenizer_2`).
    pub text_encoder: Component,
    /// SDXL's second text encoder (OpenCLIP ViT-bigG with projection).
    pub text_encoder_2: Option<Component>,
    pub tokenizer: TokenizerFiles,
    pub tokenizer_2: Option<TokenizerFiles>,
    /// The folder's `scheduler/scheduler_config.json` (training noise schedule, prediction type).
    pub scheduler_config: serde_json::Value,
    /// `model_index.json`'s `force_zeros_for_empty_prompt` (SDXL: true unless the model says
    /// otherwise): without a negative prompt the unconditional embeddings are zeros.
    pub force_zeros_for_empty_prompt: bool,
}

/// Gives text-encoder keys the `text_model.` root of transformers' `CLIPTextModel` layout.
///
/// transformers >= 5.6 saves `CLIPTextModel` without that root (`embeddings.*`, `encoder.*`,
/// `final_layer_norm.*`); hub checkpoints and `CLIPTextModelWithProjection` have it. Downstream
/// code reads one layout. The `position_ids` buffer, saved by older versions, is not a weight.
pub(crate) fn normalize_text_encoder_keys(store: WeightStore) -> WeightStore {
    let tensors = store
        .into_tensors()
        .into_iter()
        .filter(|(k, _)| !k.ends_with("position_ids"))
        .map(|(k, t)| {
            let flat = ["embeddings.", "encoder.", "final_layer_norm."]
                .iter()
                .any(|p| k.starts_with(p));
            if flat {
                (format!("text_model.{k}"), t)
            } else {
                (k, t)
            }
        })
        .collect();
    WeightStore::from_tensors(tensors)
}

/// Safetensors files mapped into memory, read tensor by tensor.
pub(crate) struct MappedFiles {
    inner: candle_core::safetensors::MmapedSafetensors,
    paths: Vec<PathBuf>,
}

impl MappedFiles {
    /// Maps `paths` (one file or the shards of one component) and parses their headers.
    pub(crate) fn open(paths: &[PathBuf]) -> Result<Self> {
        for p in paths {
            refuse_pickle(p)?;
            if !p.is_file() {
                return Err(Error::model(format!("missing weight file {}", p.display())));
            }
        }
        // SAFETY: the mapping is read-only; like every mmap-based loader we rely on the file not
        // being truncated while it is mapped (model files are not rewritten in place).
        let inner = unsafe {
            if paths.len() == 1 {
                candle_core::safetensors::MmapedSafetensors::new(&paths[0])
            } else {
                candle_core::safetensors::MmapedSafetensors::multi(paths)
            }
        }
        .map_err(|e| Error::model(format!("cannot read safetensors {}: {e}", show(paths))))?;
        Ok(Self {
            inner,
            paths: paths.to_vec(),
        })
    }

    /// Tensor names with their shapes, without reading any data.
    pub(crate) fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.inner
            .tensors()
            .into_iter()
            .map(|(name, view)| (name, view.shape().to_vec()))
            .collect()
    }

    /// Reads one tensor onto `device`, converting floating-point data to `dtype`.
    pub(crate) fn load(&self, name: &str, device: &Device, dtype: DType) -> Result<Tensor> {
        let t = self.inner.load(name, device).map_err(|e| {
            Error::model(format!(
                "cannot read tensor `{name}` from {}: {e}",
                show(&self.paths)
            ))
        })?;
        if t.dtype().is_float() && t.dtype() != dtype {
            Ok(t.to_dtype(dtype)?)
        } else {
            Ok(t)
        }
    }

    /// Reads every tensor into a store.
    pub(crate) fn load_all(&self, device: &Device, dtype: DType) -> Result<WeightStore> {
        let mut map = HashMap::new();
        for (name, _) in self.inner.tensors() {
            let t = self.load(&name, device, dtype)?;
            map.insert(name, t);
        }
        Ok(WeightStore::from_tensors(map))
    }
}

fn show(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Pickle-based checkpoints can run arbitrary code when read; only safetensors are loaded.
pub(crate) fn refuse_pickle(path: &Path) -> Result<()> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    if matches!(
        ext.as_str(),
        "ckpt" | "pt" | "pth" | "bin" | "pkl" | "pickle"
    ) {
        return Err(Error::model(format!(
            "{} is a pickle checkpoint (.{ext}); only .safetensors files are loaded, because \
             unpickling can run arbitrary code. Convert it to safetensors first.",
            path.display()
        )));
    }
    Ok(())
}

/// Reads and parses a JSON file, naming the file in every error.
pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::model(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::model(format!("invalid JSON in {}: {e}", path.display())))
}
