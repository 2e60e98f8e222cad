//! Model ids and aliases -> where the model's files are (`models.toml`).
//!
//! A `[[model]]` entry names one source: a diffusers repo on the Hugging Face Hub (`hf`, fetched
//! with `hf-hub` into the standard hub cache), a local diffusers folder (`path`), or a single-file
//! checkpoint (`file`, local or inside an `hf` repo, with an optional `config` folder / repo).
//! A `[[lora]]` entry names a LoRA file (`file`, local or inside an `hf` repo) with the family
//! of models it adapts; `lcm = true` marks the LCM-LoRA of its family, which the LCM sampling mode
//! merges. An `[[embedding]]` entry is a textual inversion embedding, named the same way, with
//! the token that calls it up in prompts. A `[[vae]]` entry names a VAE a request may use instead
//! of the model's own: a diffusers `AutoencoderKL` folder (`path`) or hub repo (`hf`), or a single
//! `.safetensors` file (`file`, local or inside an `hf` repo). A `[[controlnet]]` entry names a
//! diffusers ControlNet folder (`path`, or an `hf` repo holding `config.json` +
//! `diffusion_pytorch_model.safetensors`), or a single file in the original ControlNet layout
//! (`file`, with an optional `config`), with its family and the preprocessor its control images
//! come from. An `[[ip_adapter]]` entry names an IP-Adapter file in h94's layout (`file`, local
//! or inside an `hf` repo) and the transformers CLIP vision encoder folder it was trained with
//! (`image_encoder`, local or a folder of the same repo). The format is documented in the
//! shipped `models.toml`.
//!
//! Hub access honours `HF_HOME` / `HF_HUB_CACHE` for the cache location, `HF_ENDPOINT`,
//! `HF_TOKEN`, and `HF_HUB_OFFLINE=1`, which limits loading to files already in the cache.
//!
//! Ids are case-sensitive (`yBG2r9O` and `ybg2r9o` are different models). [`Registry::resolve`]
//! also takes a local folder or `.safetensors` path, for the command line; request handlers use
//! [`Registry::resolve_id`], so that nothing a client sends becomes a file path.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::preprocess::DetectorKind;
use crate::weights::folder::{
    choose_weight_file, component_paths, load_component, shard_files, ModelIndex, WeightChoice,
};
use crate::weights::single_file::{builtin_config, load_vae_file, single_file_family};
use crate::weights::{
    load_diffusers_folder_variant, load_single_file_with_tokenizers, read_json, refuse_pickle,
    Component, Family, PipelineFiles,
};
use crate::{Error, Result};

/// Hub repos whose tokenizers serve single files of each family that come without a `config`.
fn reference_repo(family: Family) -> &'static str {
    match family {
        Family::Sd1 => "stable-diffusion-v1-5/stable-diffusion-v1-5",
        Family::Sd2 => "stabilityai/stable-diffusion-2-1",
        Family::Sdxl => "stabilityai/stable-diffusion-xl-base-1.0",
        Family::SdxlRefiner => "stabilityai/stable-diffusion-xl-refiner-1.0",
    }
}

const DEFAULT_REVISION: &str = "main";

/// What a request gets for the fields it leaves out.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDefaults {
    /// A scheduler name as `SchedulerSpec::parse` accepts it ("DDIM", "Euler a", ...).
    pub scheduler: Option<String>,
    pub steps: Option<u32>,
    pub guidance: Option<f64>,
    pub negative_prompt: Option<String>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub clip_skip: Option<u32>,
}

/// A diffusers folder or a hub repo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Local(PathBuf),
    Hub { repo: String, revision: String },
}

/// Where a model's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A diffusers repo on the hub; `variant` picks e.g. the `*.fp16.safetensors` weight files.
    Hub {
        repo: String,
        revision: String,
        variant: Option<String>,
    },
    /// A local diffusers folder.
    Folder(PathBuf),
    /// A single-file checkpoint (`Location::Hub` here means a file of that repo, `file` being
    /// its path in the repo), with the diffusers folder or repo describing it.
    SingleFile {
        location: Location,
        file: PathBuf,
        config: Option<Location>,
    },
}

/// One model the registry knows.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelEntry {
    pub id: String,
    pub aliases: Vec<String>,
    /// Declared family; detected from the files when `None`.
    pub family: Option<Family>,
    pub source: ModelSource,
    /// Overrides the scheduler config's `prediction_type` ("epsilon" | "v_prediction").
    pub prediction_type: Option<String>,
    pub description: Option<String>,
    pub defaults: ModelDefaults,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryToml {
    #[serde(default, rename = "model")]
    models: Vec<EntryToml>,
    #[serde(default, rename = "lora")]
    loras: Vec<LoraToml>,
    #[serde(default, rename = "vae")]
    vaes: Vec<VaeToml>,
    #[serde(default, rename = "embedding")]
    embeddings: Vec<EmbeddingToml>,
    #[serde(default, rename = "controlnet")]
    controlnets: Vec<ControlNetToml>,
    #[serde(default, rename = "ip_adapter")]
    ip_adapters: Vec<IpAdapterToml>,
    #[serde(default, rename = "preprocessor")]
    preprocessors: Vec<PreprocessorToml>,
}

/// One model-based ControlNet preprocessor the registry knows: the detector kind and where its
/// public weights are (`controlnet_aux`'s files, read in their published format).
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessorEntry {
    /// `name` when given, else the type (`hed`).
    pub id: String,
    pub aliases: Vec<String>,
    pub kind: DetectorKind,
    /// The weights: a file (`.pth`, `.pt`, `.safetensors`), or a folder for detectors whose
    /// weights are a transformers folder; with `hf`, a file in the repo, or a folder: the repo
    /// itself when `file` is empty (no `file` given), a folder in it when `file` ends in `/`.
    pub source: LoraSource,
    pub description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PreprocessorToml {
    #[serde(rename = "type")]
    kind: String,
    name: Option<String>,
    path: Option<String>,
    hf: Option<String>,
    revision: Option<String>,
    file: Option<String>,
    description: Option<String>,
}

impl PreprocessorToml {
    fn into_entry(self, base: &Path) -> Result<PreprocessorEntry> {
        let label = self.name.clone().unwrap_or_else(|| self.kind.clone());
        let bad = |msg: String| Error::model(format!("models.toml, preprocessor `{label}`: {msg}"));
        let kind = DetectorKind::from_name(&self.kind).ok_or_else(|| {
            let known: Vec<&str> = DetectorKind::ALL.iter().map(|k| k.name()).collect();
            bad(format!(
                "unknown type `{}`; known types: {}",
                self.kind,
                known.join(", ")
            ))
        })?;
        let id = self.name.unwrap_or_else(|| kind.name().to_string());
        if id.trim().is_empty() || id.trim() != id {
            return Err(bad(
                "`name` must be non-empty, without surrounding spaces".into()
            ));
        }
        // Detector weights are published as torch pickles; they are read with candle's pickle
        // reader, which rebuilds tensors only and runs no code from the file.
        let source = match (self.hf, self.path, self.file) {
            (Some(repo), None, file) => {
                check_repo_id(&repo).map_err(bad)?;
                let file = file.unwrap_or_default();
                if file.is_empty() != kind.weights_are_folder() && !file.ends_with('/') {
                    return Err(bad(if file.is_empty() {
                        format!(
                            "`{kind}` weights are one file: give `file` ({})",
                            kind.public_weights()
                        )
                    } else {
                        format!(
                            "`{kind}` weights are a transformers folder ({}): leave out `file` \
                             for the repo itself, or give a folder ending in `/`",
                            kind.public_weights()
                        )
                    }));
                }
                LoraSource::Hub {
                    repo,
                    revision: self.revision.unwrap_or_else(|| DEFAULT_REVISION.into()),
                    file,
                }
            }
            (None, Some(path), None) if self.revision.is_none() => {
                LoraSource::File(base.join(path))
            }
            (None, Some(_), None) => return Err(bad("`revision` needs `hf`".into())),
            _ => {
                return Err(bad(
                    "give the weights as `path` (a local file or folder), or `hf` (a hub \
                     repo) with `file` (without it for a transformers folder)"
                        .into(),
                ))
            }
        };
        Ok(PreprocessorEntry {
            id,
            aliases: Vec::new(),
            kind,
            source,
            description: self.description,
        })
    }
}

impl PreprocessorEntry {
    /// The local weights file or folder, fetched from the hub when needed.
    pub fn local_path(&self) -> Result<PathBuf> {
        match &self.source {
            LoraSource::File(path) if path.exists() => Ok(path.clone()),
            LoraSource::File(path) => Err(Error::model(format!(
                "preprocessor `{}`: {} does not exist",
                self.id,
                path.display()
            ))),
            LoraSource::Hub {
                repo,
                revision,
                file,
            } if file.is_empty() || file.ends_with('/') => {
                let hub = HubOptions::from_env()?;
                let repo = HubRepo::new(&hub, repo, revision)?;
                let prefix = file.as_str();
                let listed = repo.list_files().unwrap_or_default();
                // The image processor's settings are optional (DPT has defaults); fetched when
                // the repo has them, so that the snapshot folder holds them beside the weights.
                let processor = format!("{prefix}preprocessor_config.json");
                if listed.contains(&processor) {
                    repo.get(&processor)?;
                }
                repo.get(&format!("{prefix}model.safetensors"))?;
                let config = repo.get(&format!("{prefix}config.json"))?;
                config
                    .parent()
                    .map(Path::to_path_buf)
                    .ok_or_else(|| Error::model("hub file without a folder"))
            }
            LoraSource::Hub { .. } => source_path(&self.source, "preprocessor", &self.id),
        }
    }
}

/// One IP-Adapter the registry knows. Whether it is a plain or a plus adapter is read from the
/// file when it loads.
#[derive(Debug, Clone, PartialEq)]
pub struct IpAdapterEntry {
    pub id: String,
    pub aliases: Vec<String>,
    /// The family of models the adapter was trained with; other families refuse it.
    pub family: Family,
    /// The adapter file (`image_proj.*`, `ip_adapter.*`).
    pub source: LoraSource,
    /// The CLIP vision encoder: a local folder, or with `hf` a folder inside the repo.
    pub image_encoder: LoraSource,
    pub description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IpAdapterToml {
    id: String,
    #[serde(default)]
    aliases: Vec<String>,
    family: Family,
    hf: Option<String>,
    revision: Option<String>,
    file: String,
    image_encoder: String,
    description: Option<String>,
}

impl IpAdapterToml {
    fn into_entry(self, base: &Path) -> Result<IpAdapterEntry> {
        let id = self.id.clone();
        let bad = |msg: String| Error::model(format!("models.toml, ip_adapter `{id}`: {msg}"));
        if id.trim().is_empty() || id.trim() != id {
            return Err(bad(
                "`id` must be non-empty, without surrounding spaces".into()
            ));
        }
        refuse_pickle(&PathBuf::from(&self.file)).map_err(|e| bad(e.to_string()))?;
        let (source, image_encoder) = match self.hf {
            Some(repo) => {
                check_repo_id(&repo).map_err(bad)?;
                let revision = self.revision.unwrap_or_else(|| DEFAULT_REVISION.into());
                let at = |file: String| LoraSource::Hub {
                    repo: repo.clone(),
                    revision: revision.clone(),
                    file,
                };
                (at(self.file), at(self.image_encoder))
            }
            None => {
                if self.revision.is_some() {
                    return Err(bad("`revision` needs `hf`".into()));
                }
                (
                    LoraSource::File(base.join(self.file)),
                    LoraSource::File(base.join(self.image_encoder)),
                )
            }
        };
        Ok(IpAdapterEntry {
            id: self.id,
            aliases: self.aliases,
            family: self.family,
            source,
            image_encoder,
            description: self.description,
        })
    }
}

impl IpAdapterEntry {
    /// The local adapter file and image encoder folder, fetched from the hub when needed (the
    /// encoder's `config.json` and `model.safetensors`).
    pub fn local_paths(&self) -> Result<(PathBuf, PathBuf)> {
        let file = source_path(&self.source, "ip_adapter", &self.id)?;
        let encoder = match &self.image_encoder {
            LoraSource::File(path) => path.clone(),
            LoraSource::Hub {
                repo,
                revision,
                file,
            } => {
                let hub = HubOptions::from_env()?;
                let repo = HubRepo::new(&hub, repo, revision)?;
                let folder = file.trim_end_matches('/');
                repo.get(&format!("{folder}/model.safetensors"))?;
                let config = repo.get(&format!("{folder}/config.json"))?;
                config
                    .parent()
                    .map(Path::to_path_buf)
                    .ok_or_else(|| Error::model("hub file without a folder"))?
            }
        };
        if !encoder.join("config.json").is_file() {
            return Err(Error::model(format!(
                "ip_adapter `{}`: image encoder {} has no config.json",
                self.id,
                encoder.display()
            )));
        }
        Ok((file, encoder))
    }
}

/// Where a ControlNet's diffusers folder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlNetSource {
    /// A local folder with `config.json` and the weights.
    Folder(PathBuf),
    /// A hub repo whose root is such a folder.
    Hub { repo: String, revision: String },
    /// A local single file in the original ControlNet layout (`control_*.safetensors`), with
    /// the diffusers config describing it (a `config.json` or a folder holding one); `None`:
    /// the family's reference ControlNet config.
    File {
        path: PathBuf,
        config: Option<PathBuf>,
    },
}

/// One ControlNet the registry knows.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlNetEntry {
    pub id: String,
    pub aliases: Vec<String>,
    /// The family of models the ControlNet was trained with; other families refuse it.
    pub family: Family,
    pub source: ControlNetSource,
    /// The kind of control image it reads ("canny", "depth", "openpose", ...): what a dialect's
    /// preprocessor name selects and what `auto_hint` runs.
    pub preprocessor: Option<String>,
    pub description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlNetToml {
    id: String,
    #[serde(default)]
    aliases: Vec<String>,
    family: Family,
    path: Option<String>,
    hf: Option<String>,
    revision: Option<String>,
    /// A single-file ControlNet (original layout), instead of `path` / `hf`.
    file: Option<String>,
    /// The single file's diffusers config (`config.json` or its folder).
    config: Option<String>,
    preprocessor: Option<String>,
    description: Option<String>,
}

impl ControlNetToml {
    fn into_entry(self, base: &Path) -> Result<ControlNetEntry> {
        let id = self.id.clone();
        let bad = |msg: String| Error::model(format!("models.toml, controlnet `{id}`: {msg}"));
        if id.trim().is_empty() || id.trim() != id {
            return Err(bad(
                "`id` must be non-empty, without surrounding spaces".into()
            ));
        }
        if self.config.is_some() && self.file.is_none() {
            return Err(bad(
                "`config` describes a single `file`; a folder has its own".into(),
            ));
        }
        let source = match (self.path, self.hf, self.file) {
            (None, None, Some(file)) => {
                if self.revision.is_some() {
                    return Err(bad("`revision` needs `hf`".into()));
                }
                refuse_pickle(Path::new(&file)).map_err(|e| bad(e.to_string()))?;
                ControlNetSource::File {
                    path: base.join(file),
                    config: self.config.map(|c| base.join(c)),
                }
            }
            (Some(path), None, None) => {
                if self.revision.is_some() {
                    return Err(bad("`revision` needs `hf`".into()));
                }
                ControlNetSource::Folder(base.join(path))
            }
            (None, Some(repo), None) => {
                check_repo_id(&repo).map_err(bad)?;
                ControlNetSource::Hub {
                    repo,
                    revision: self.revision.unwrap_or_else(|| DEFAULT_REVISION.into()),
                }
            }
            _ => return Err(bad("give exactly one of `path`, `hf` and `file`".into())),
        };
        Ok(ControlNetEntry {
            id: self.id,
            aliases: self.aliases,
            family: self.family,
            source,
            preprocessor: self.preprocessor.map(|p| p.to_ascii_lowercase()),
            description: self.description,
        })
    }
}

impl ControlNetEntry {
    /// The local folder of the ControlNet, its two files fetched from the hub when needed (hub
    /// settings from the environment, see [`HubOptions::from_env`]).
    pub fn local_dir(&self) -> Result<PathBuf> {
        let dir = match &self.source {
            ControlNetSource::Folder(path) => path.clone(),
            ControlNetSource::Hub { repo, revision } => {
                let hub = HubOptions::from_env()?;
                let repo = HubRepo::new(&hub, repo, revision)?;
                let config = repo.get("config.json")?;
                repo.get("diffusion_pytorch_model.safetensors")?;
                config
                    .parent()
                    .map(Path::to_path_buf)
                    .ok_or_else(|| Error::model("hub file without a folder"))?
            }
            ControlNetSource::File { path, .. } => {
                return Err(Error::model(format!(
                    "controlnet `{}` is the single file {}, not a folder",
                    self.id,
                    path.display()
                )))
            }
        };
        if !dir.join("config.json").is_file() {
            return Err(Error::model(format!(
                "controlnet `{}`: {} has no config.json",
                self.id,
                dir.display()
            )));
        }
        Ok(dir)
    }

    /// Whether this ControlNet reads images made by the named preprocessor.
    pub fn expects(&self, preprocessor: &str) -> bool {
        self.preprocessor
            .as_deref()
            .is_some_and(|p| p.eq_ignore_ascii_case(preprocessor))
    }
}

/// Where a LoRA file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoraSource {
    /// A local `.safetensors` file.
    File(PathBuf),
    /// `file` inside a hub repo.
    Hub {
        repo: String,
        revision: String,
        file: String,
    },
}

/// One LoRA the registry knows.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraEntry {
    pub id: String,
    pub aliases: Vec<String>,
    /// The family of models the LoRA was trained for; other families refuse it.
    pub family: Family,
    pub source: LoraSource,
    /// The weight a request that names the LoRA without one gets.
    pub default_weight: f64,
    /// Words that call up what the LoRA was trained on (reported, never added to prompts).
    pub trigger_words: Vec<String>,
    pub description: Option<String>,
    /// The LCM-LoRA of its family (Luo et al. 2023, "LCM-LoRA"): merged, with the LCM
    /// scheduler, by the LCM sampling mode. At most one per family.
    pub lcm: bool,
}

fn default_lora_weight() -> f64 {
    1.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoraToml {
    id: String,
    #[serde(default)]
    aliases: Vec<String>,
    family: Family,
    hf: Option<String>,
    revision: Option<String>,
    file: String,
    #[serde(default = "default_lora_weight")]
    default_weight: f64,
    #[serde(default)]
    trigger_words: Vec<String>,
    description: Option<String>,
    #[serde(default)]
    lcm: bool,
}

impl LoraToml {
    fn into_entry(self, base: &Path) -> Result<LoraEntry> {
        let id = self.id.clone();
        let bad = |msg: String| Error::model(format!("models.toml, lora `{id}`: {msg}"));
        if id.trim().is_empty() || id.trim() != id {
            return Err(bad(
                "`id` must be non-empty, without surrounding spaces".into()
            ));
        }
        if !self.default_weight.is_finite() {
            return Err(bad(format!(
                "`default_weight` must be a finite number, not {}",
                self.default_weight
            )));
        }
        let file = PathBuf::from(&self.file);
        refuse_pickle(&file).map_err(|e| bad(e.to_string()))?;
        let source = match self.hf {
            Some(repo) => {
                check_repo_id(&repo).map_err(bad)?;
                LoraSource::Hub {
                    repo,
                    revision: self.revision.unwrap_or_else(|| DEFAULT_REVISION.into()),
                    file: self.file,
                }
            }
            None => {
                if self.revision.is_some() {
                    return Err(bad("`revision` needs `hf`".into()));
                }
                LoraSource::File(base.join(file))
            }
        };
        Ok(LoraEntry {
            id: self.id,
            aliases: self.aliases,
            family: self.family,
            source,
            default_weight: self.default_weight,
            trigger_words: self.trigger_words,
            description: self.description,
            lcm: self.lcm,
        })
    }
}

impl LoraEntry {
    /// The local path of the LoRA file, fetched from the hub when needed (hub settings from the
    /// environment, see [`HubOptions::from_env`]).
    pub fn local_path(&self) -> Result<PathBuf> {
        source_path(&self.source, "lora", &self.id)
    }
}

/// One textual inversion embedding the registry knows.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingEntry {
    pub id: String,
    pub aliases: Vec<String>,
    /// The family of models the embedding was trained for; other families refuse it.
    pub family: Family,
    /// Where the file is (`.safetensors`, or an A1111 `.pt`: see [`crate::weights::embeddings`]).
    pub source: LoraSource,
    /// The text that calls the embedding up in prompts (default: the id).
    pub token: String,
    /// Trained for the negative prompt: a request that names it without writing its token gets
    /// the token appended to the negative prompt rather than to the prompt.
    pub negative: bool,
    /// The weight a request that names the embedding without one gets.
    pub default_weight: f64,
    pub description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbeddingToml {
    id: String,
    #[serde(default)]
    aliases: Vec<String>,
    family: Family,
    hf: Option<String>,
    revision: Option<String>,
    file: String,
    token: Option<String>,
    #[serde(default)]
    negative: bool,
    #[serde(default = "default_lora_weight")]
    default_weight: f64,
    description: Option<String>,
}

impl EmbeddingToml {
    fn into_entry(self, base: &Path) -> Result<EmbeddingEntry> {
        let id = self.id.clone();
        let bad = |msg: String| Error::model(format!("models.toml, embedding `{id}`: {msg}"));
        if id.trim().is_empty() || id.trim() != id {
            return Err(bad(
                "`id` must be non-empty, without surrounding spaces".into()
            ));
        }
        if !self.default_weight.is_finite() {
            return Err(bad(format!(
                "`default_weight` must be a finite number, not {}",
                self.default_weight
            )));
        }
        let token = self.token.unwrap_or_else(|| self.id.clone());
        if token.trim().is_empty() || token.trim() != token {
            return Err(bad(
                "`token` must be non-empty, without surrounding spaces".into()
            ));
        }
        // Pickled embeddings are read by a reader that builds plain data and runs nothing, so
        // A1111 `.pt` files are accepted here, unlike pickled models and LoRAs.
        let source = match self.hf {
            Some(repo) => {
                check_repo_id(&repo).map_err(bad)?;
                LoraSource::Hub {
                    repo,
                    revision: self.revision.unwrap_or_else(|| DEFAULT_REVISION.into()),
                    file: self.file,
                }
            }
            None => {
                if self.revision.is_some() {
                    return Err(bad("`revision` needs `hf`".into()));
                }
                LoraSource::File(base.join(&self.file))
            }
        };
        Ok(EmbeddingEntry {
            id: self.id,
            aliases: self.aliases,
            family: self.family,
            source,
            token,
            negative: self.negative,
            default_weight: self.default_weight,
            description: self.description,
        })
    }
}

/// Where a VAE's weights are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaeSource {
    /// A local diffusers `AutoencoderKL` folder (`config.json` + weights).
    Folder(PathBuf),
    /// A hub repo holding a diffusers `AutoencoderKL` at its root (e.g. `stabilityai/sd-vae-ft-mse`).
    Hub { repo: String, revision: String },
    /// One `.safetensors` file in the original LDM key layout (`encoder.down.0.block.0...`,
    /// maybe under `first_stage_model.`) or in diffusers names; `Location::Hub` means a file of
    /// that repo, `file` its path there. `config` is an `AutoencoderKL` folder or repo whose
    /// `config.json` describes it; without one the family's reference VAE config is used.
    SingleFile {
        location: Location,
        file: PathBuf,
        config: Option<Location>,
    },
}

/// One VAE the registry knows, which a request may name to encode and decode with instead of
/// the model's own.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeEntry {
    pub id: String,
    pub aliases: Vec<String>,
    /// The family whose latent space the VAE was trained for (SD 1.x and 2.x share one).
    pub family: Family,
    pub source: VaeSource,
    /// Overrides the config's `scaling_factor`.
    pub scaling_factor: Option<f64>,
    /// Overrides the config's `force_upcast` (false for the fp16-fix SDXL VAE).
    pub force_upcast: Option<bool>,
    pub description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VaeToml {
    id: String,
    #[serde(default)]
    aliases: Vec<String>,
    family: Family,
    hf: Option<String>,
    revision: Option<String>,
    path: Option<String>,
    file: Option<String>,
    config: Option<String>,
    scaling_factor: Option<f64>,
    force_upcast: Option<bool>,
    description: Option<String>,
}

impl VaeToml {
    fn into_entry(self, base: &Path) -> Result<VaeEntry> {
        let id = self.id.clone();
        let bad = |msg: String| Error::model(format!("models.toml, vae `{id}`: {msg}"));
        if id.trim().is_empty() || id.trim() != id {
            return Err(bad(
                "`id` must be non-empty, without surrounding spaces".into()
            ));
        }
        if let Some(f) = self.scaling_factor {
            if !(f.is_finite() && f > 0.0) {
                return Err(bad(format!(
                    "`scaling_factor` must be a positive number, not {f}"
                )));
            }
        }
        if self.config.is_some() && self.file.is_none() {
            return Err(bad("`config` applies to `file` entries only".into()));
        }
        let revision =
            |revision: Option<String>| revision.unwrap_or_else(|| DEFAULT_REVISION.into());
        let source =
            match (self.hf, self.path, self.file) {
                (Some(repo), None, None) => {
                    check_repo_id(&repo).map_err(bad)?;
                    VaeSource::Hub {
                        repo,
                        revision: revision(self.revision),
                    }
                }
                (None, Some(path), None) => {
                    if self.revision.is_some() {
                        return Err(bad("`revision` needs `hf`".into()));
                    }
                    VaeSource::Folder(base.join(path))
                }
                (hf, None, Some(file)) => {
                    let location = match hf {
                        Some(repo) => {
                            check_repo_id(&repo).map_err(bad)?;
                            Location::Hub {
                                repo,
                                revision: revision(self.revision),
                            }
                        }
                        None if self.revision.is_some() => {
                            return Err(bad("`revision` needs `hf`".into()))
                        }
                        None => Location::Local(base.to_path_buf()),
                    };
                    let file = match &location {
                        Location::Local(base) => base.join(&file),
                        Location::Hub { .. } => PathBuf::from(&file),
                    };
                    refuse_pickle(&file).map_err(|e| bad(e.to_string()))?;
                    let config = self
                        .config
                        .map(|c| parse_config_location(&c, base))
                        .transpose()
                        .map_err(bad)?;
                    VaeSource::SingleFile {
                        location,
                        file,
                        config,
                    }
                }
                _ => return Err(bad(
                    "give exactly one source: `hf` (a hub repo holding an AutoencoderKL), `path` \
                     (an AutoencoderKL folder) or `file` (a single .safetensors VAE, optionally \
                     inside an `hf` repo)"
                        .into(),
                )),
            };
        Ok(VaeEntry {
            id: self.id,
            aliases: self.aliases,
            family: self.family,
            source,
            scaling_factor: self.scaling_factor,
            force_upcast: self.force_upcast,
            description: self.description,
        })
    }
}

impl VaeEntry {
    /// Whether the VAE can encode and decode the latents of a `family` model: the same family,
    /// or SD 1.x with SD 2.x, which were trained on the same autoencoder's latent space.
    pub fn fits(&self, family: Family) -> bool {
        let shared = |f: Family| if f == Family::Sd2 { Family::Sd1 } else { f };
        shared(self.family) == shared(family)
    }

    /// Loads the VAE's config (with this entry's overrides) and weights onto `device` in
    /// `dtype`, fetching hub files as needed (hub settings from the environment).
    pub fn load(&self, device: &Device, dtype: DType) -> Result<Component> {
        let hub = HubOptions::from_env()?;
        let context = |e: Error| Error::model(format!("vae `{}`: {e}", self.id));
        let mut component = match &self.source {
            VaeSource::Folder(dir) => load_component(dir, None, device, dtype).map_err(context)?,
            VaeSource::Hub { repo, revision } => {
                let dir = HubRepo::new(&hub, repo, revision)?
                    .fetch_root_component()
                    .map_err(context)?;
                load_component(&dir, None, device, dtype).map_err(context)?
            }
            VaeSource::SingleFile {
                location,
                file,
                config,
            } => {
                let path = match location {
                    Location::Local(_) => file.clone(),
                    Location::Hub { repo, revision } => {
                        let name = file.to_str().ok_or_else(|| {
                            Error::model(format!("vae `{}`: file name is not UTF-8", self.id))
                        })?;
                        HubRepo::new(&hub, repo, revision)?.get(name)?
                    }
                };
                if !path.is_file() {
                    return Err(Error::model(format!(
                        "vae `{}`: file {} does not exist",
                        self.id,
                        path.display()
                    )));
                }
                let config = match config {
                    Some(Location::Local(dir)) => read_json(&dir.join("config.json")),
                    Some(Location::Hub { repo, revision }) => HubRepo::new(&hub, repo, revision)?
                        .get("config.json")
                        .and_then(|p| read_json(&p)),
                    None => Ok(builtin_config(self.family, "vae")
                        .expect("every family has a built-in VAE config; this is a bug")),
                }
                .map_err(context)?;
                load_vae_file(&path, config, device, dtype).map_err(context)?
            }
        };
        if let Some(obj) = component.config.as_object_mut() {
            if let Some(f) = self.scaling_factor {
                obj.insert("scaling_factor".into(), f.into());
            }
            if let Some(u) = self.force_upcast {
                obj.insert("force_upcast".into(), u.into());
            }
        }
        Ok(component)
    }
}

impl EmbeddingEntry {
    /// The local path of the embedding file, fetched from the hub when needed.
    pub fn local_path(&self) -> Result<PathBuf> {
        source_path(&self.source, "embedding", &self.id)
    }
}

/// The local path of a LoRA or embedding file, fetched from the hub when needed (hub settings
/// from the environment, see [`HubOptions::from_env`]).
fn source_path(source: &LoraSource, kind: &str, id: &str) -> Result<PathBuf> {
    let path = match source {
        LoraSource::File(path) => path.clone(),
        LoraSource::Hub {
            repo,
            revision,
            file,
        } => HubRepo::new(&HubOptions::from_env()?, repo, revision)?.get(file)?,
    };
    if !path.is_file() {
        return Err(Error::model(format!(
            "{kind} `{id}`: file {} does not exist",
            path.display()
        )));
    }
    Ok(path)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryToml {
    id: String,
    #[serde(default)]
    aliases: Vec<String>,
    family: Option<Family>,
    hf: Option<String>,
    revision: Option<String>,
    variant: Option<String>,
    path: Option<String>,
    file: Option<String>,
    config: Option<String>,
    prediction_type: Option<String>,
    description: Option<String>,
    #[serde(default)]
    defaults: ModelDefaults,
}

impl EntryToml {
    fn into_entry(self, base: &Path) -> Result<ModelEntry> {
        let id = self.id.clone();
        let bad = |msg: String| Error::model(format!("models.toml, model `{id}`: {msg}"));
        if id.trim().is_empty() || id.trim() != id {
            return Err(bad(
                "`id` must be non-empty, without surrounding spaces".into()
            ));
        }
        if let Some(p) = &self.prediction_type {
            if p != "epsilon" && p != "v_prediction" && p != "sample" {
                return Err(bad(format!(
                    "`prediction_type` must be \"epsilon\", \"v_prediction\" or \"sample\", not \"{p}\""
                )));
            }
        }
        let source = match (self.hf, self.path, self.file) {
            (Some(repo), None, None) => {
                if self.config.is_some() {
                    return Err(bad("`config` applies to `file` entries only".into()));
                }
                check_repo_id(&repo).map_err(bad)?;
                ModelSource::Hub {
                    repo,
                    revision: self.revision.unwrap_or_else(|| DEFAULT_REVISION.into()),
                    variant: self.variant,
                }
            }
            (None, Some(path), None) => {
                if self.revision.is_some() || self.variant.is_some() || self.config.is_some() {
                    return Err(bad(
                        "`revision`, `variant` and `config` do not apply to `path` entries".into(),
                    ));
                }
                ModelSource::Folder(base.join(path))
            }
            (hf, None, Some(file)) => {
                if self.variant.is_some() {
                    return Err(bad("`variant` does not apply to `file` entries".into()));
                }
                let config = self
                    .config
                    .map(|c| parse_config_location(&c, base))
                    .transpose()
                    .map_err(bad)?;
                let location = match hf {
                    Some(repo) => {
                        check_repo_id(&repo).map_err(bad)?;
                        Location::Hub {
                            repo,
                            revision: self.revision.unwrap_or_else(|| DEFAULT_REVISION.into()),
                        }
                    }
                    None => {
                        if self.revision.is_some() {
                            return Err(bad("`revision` needs `hf`".into()));
                        }
                        Location::Local(base.to_path_buf())
                    }
                };
                let file = match &location {
                    Location::Local(base) => base.join(&file),
                    Location::Hub { .. } => PathBuf::from(&file),
                };
                refuse_pickle(&file).map_err(|e| bad(e.to_string()))?;
                ModelSource::SingleFile {
                    location,
                    file,
                    config,
                }
            }
            _ => {
                return Err(bad(
                    "give exactly one source: `hf` (a hub repo), `path` (a diffusers folder) or \
                     `file` (a single .safetensors checkpoint, optionally inside an `hf` repo)"
                        .into(),
                ))
            }
        };
        Ok(ModelEntry {
            id: self.id,
            aliases: self.aliases,
            family: self.family,
            source,
            prediction_type: self.prediction_type,
            description: self.description,
            defaults: self.defaults,
        })
    }
}

fn check_repo_id(repo: &str) -> std::result::Result<(), String> {
    let ok = repo.split('/').count() == 2
        && repo.split('/').all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        });
    if ok {
        Ok(())
    } else {
        Err(format!("`{repo}` is not a hub repo id (`org/name`)"))
    }
}

/// `config`: an existing folder (relative to the toml), `hf:org/repo`, or `org/repo`.
fn parse_config_location(value: &str, base: &Path) -> std::result::Result<Location, String> {
    if let Some(repo) = value.strip_prefix("hf:") {
        check_repo_id(repo)?;
        return Ok(hub_location(repo));
    }
    let local = base.join(value);
    if local.is_dir() {
        return Ok(Location::Local(local));
    }
    if check_repo_id(value).is_ok() && !value.starts_with('.') {
        return Ok(hub_location(value));
    }
    Err(format!(
        "`config` {value}: no such folder ({}) and not a hub repo id",
        local.display()
    ))
}

fn hub_location(repo: &str) -> Location {
    Location::Hub {
        repo: repo.to_string(),
        revision: DEFAULT_REVISION.to_string(),
    }
}

/// What every kind of registry entry has: an id, aliases, and the names messages give its kind.
trait Named: Clone {
    /// The kind as `models.toml` spells its table (`[[lora]]`).
    const TABLE: &'static str;
    /// The kind as messages to clients spell it ("LoRA").
    const LABEL: &'static str;
    fn id(&self) -> &str;
    fn aliases(&self) -> &[String];
}

macro_rules! named {
    ($($entry:ty => $table:literal, $label:literal;)*) => {$(
        impl Named for $entry {
            const TABLE: &'static str = $table;
            const LABEL: &'static str = $label;
            fn id(&self) -> &str {
                &self.id
            }
            fn aliases(&self) -> &[String] {
                &self.aliases
            }
        }
    )*};
}

named! {
    ModelEntry => "model", "model";
    LoraEntry => "lora", "LoRA";
    VaeEntry => "vae", "VAE";
    EmbeddingEntry => "embedding", "embedding";
    ControlNetEntry => "controlnet", "ControlNet";
    IpAdapterEntry => "ip_adapter", "IP-Adapter";
    PreprocessorEntry => "preprocessor", "preprocessor";
}

/// The entry whose id, else whose alias, is exactly `name`.
fn find<'a, T: Named>(entries: &'a [T], name: &str) -> Option<&'a T> {
    entries.iter().find(|e| e.id() == name).or_else(|| {
        entries
            .iter()
            .find(|e| e.aliases().iter().any(|a| a == name))
    })
}

/// A new entry's id and aliases are distinct and name no entry of its kind yet.
fn check_names<T: Named>(entries: &[T], entry: &T) -> Result<()> {
    let mut seen = HashSet::new();
    for name in std::iter::once(entry.id()).chain(entry.aliases().iter().map(String::as_str)) {
        if !seen.insert(name) {
            return Err(Error::model(format!(
                "{} `{}` lists the name `{name}` twice",
                T::TABLE,
                entry.id()
            )));
        }
        if let Some(other) = find(entries, name) {
            return Err(Error::model(format!(
                "{} name `{name}` is used by both `{}` and `{}`",
                T::TABLE,
                other.id(),
                entry.id()
            )));
        }
    }
    Ok(())
}

/// A registered id or alias (never a path); an unknown name is an invalid request listing the
/// known ids of its kind.
fn resolve<T: Named>(entries: &[T], name: &str) -> Result<T> {
    find(entries, name).cloned().ok_or_else(|| {
        let known: Vec<&str> = entries.iter().map(Named::id).collect();
        let known = if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        };
        Error::invalid(format!(
            "unknown {label} `{name}` (ids are case-sensitive). Known {label}s: {known}",
            label = T::LABEL
        ))
    })
}

/// The set of models a server can load, by id and alias.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    entries: Vec<ModelEntry>,
    loras: Vec<LoraEntry>,
    vaes: Vec<VaeEntry>,
    embeddings: Vec<EmbeddingEntry>,
    controlnets: Vec<ControlNetEntry>,
    ip_adapters: Vec<IpAdapterEntry>,
    preprocessors: Vec<PreprocessorEntry>,
}

impl Registry {
    /// The registry shipped with sd-serve (the top-level `models.toml`).
    pub fn builtin() -> Self {
        let cwd = std::env::current_dir().unwrap_or_default();
        Self::from_toml_str(include_str!("../models.toml"), &cwd)
            .expect("the shipped models.toml is valid; this is a bug")
    }

    /// Reads a `models.toml`; relative paths in it resolve against its folder.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::model(format!("cannot read {}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml_str(&text, base)
            .map_err(|e| Error::model(format!("{}: {e}", path.display())))
    }

    /// Parses `models.toml` text; relative paths resolve against `base`.
    pub fn from_toml_str(text: &str, base: &Path) -> Result<Self> {
        let parsed: RegistryToml =
            toml::from_str(text).map_err(|e| Error::model(format!("invalid models.toml: {e}")))?;
        let mut reg = Registry::default();
        for raw in parsed.models {
            reg.add(raw.into_entry(base)?)?;
        }
        for raw in parsed.loras {
            reg.add_lora(raw.into_entry(base)?)?;
        }
        for raw in parsed.vaes {
            reg.add_vae(raw.into_entry(base)?)?;
        }
        for raw in parsed.embeddings {
            reg.add_embedding(raw.into_entry(base)?)?;
        }
        for raw in parsed.controlnets {
            reg.add_controlnet(raw.into_entry(base)?)?;
        }
        for raw in parsed.ip_adapters {
            reg.add_ip_adapter(raw.into_entry(base)?)?;
        }
        for raw in parsed.preprocessors {
            reg.add_preprocessor(raw.into_entry(base)?)?;
        }
        Ok(reg)
    }

    /// Adds an entry; its id and aliases must not collide with known names.
    pub fn add(&mut self, entry: ModelEntry) -> Result<()> {
        check_names(&self.entries, &entry)?;
        self.entries.push(entry);
        Ok(())
    }

    /// Adds a LoRA entry; its id and aliases must not collide with known LoRA names.
    pub fn add_lora(&mut self, entry: LoraEntry) -> Result<()> {
        check_names(&self.loras, &entry)?;
        if entry.lcm {
            if let Some(other) = self.lcm_lora(entry.family) {
                return Err(Error::model(format!(
                    "loras `{}` and `{}` are both marked `lcm` for {} models; mark one",
                    other.id, entry.id, entry.family
                )));
            }
        }
        self.loras.push(entry);
        Ok(())
    }

    /// Adds a VAE entry; its id and aliases must not collide with known VAE names.
    pub fn add_vae(&mut self, entry: VaeEntry) -> Result<()> {
        check_names(&self.vaes, &entry)?;
        self.vaes.push(entry);
        Ok(())
    }

    /// Adds the entries of `other`; an entry whose id already exists replaces the old one
    /// (a server's own models.toml overrides the shipped defaults).
    pub fn extend_overriding(&mut self, other: Registry) -> Result<()> {
        for entry in other.entries {
            self.entries.retain(|e| e.id != entry.id);
            self.add(entry)?;
        }
        for entry in other.loras {
            self.loras.retain(|e| e.id != entry.id);
            if entry.lcm {
                // The server's own LCM-LoRA of a family replaces the shipped one.
                self.loras.retain(|e| !(e.lcm && e.family == entry.family));
            }
            self.add_lora(entry)?;
        }
        for entry in other.vaes {
            self.vaes.retain(|e| e.id != entry.id);
            self.add_vae(entry)?;
        }
        for entry in other.embeddings {
            self.embeddings.retain(|e| e.id != entry.id);
            self.add_embedding(entry)?;
        }
        for entry in other.controlnets {
            self.controlnets.retain(|e| e.id != entry.id);
            self.add_controlnet(entry)?;
        }
        for entry in other.ip_adapters {
            self.ip_adapters.retain(|e| e.id != entry.id);
            self.add_ip_adapter(entry)?;
        }
        for entry in other.preprocessors {
            self.preprocessors.retain(|e| e.id != entry.id);
            self.add_preprocessor(entry)?;
        }
        Ok(())
    }

    /// Adds a preprocessor entry; its name must not collide with known preprocessor names.
    pub fn add_preprocessor(&mut self, entry: PreprocessorEntry) -> Result<()> {
        check_names(&self.preprocessors, &entry)?;
        self.preprocessors.push(entry);
        Ok(())
    }

    /// The registered preprocessors, in file order.
    pub fn preprocessors(&self) -> impl Iterator<Item = &PreprocessorEntry> {
        self.preprocessors.iter()
    }

    /// The entry that provides the weights of `kind`: the first of that type, else the first
    /// whose type runs the same weights (`hed`, `softedge` and `scribble` share HED's).
    pub fn preprocessor_for(&self, kind: DetectorKind) -> Option<&PreprocessorEntry> {
        self.preprocessors
            .iter()
            .find(|e| e.kind == kind)
            .or_else(|| {
                self.preprocessors
                    .iter()
                    .find(|e| e.kind.weights() == kind.weights())
            })
    }

    /// Adds an IP-Adapter entry; its id and aliases must not collide with known IP-Adapter names.
    pub fn add_ip_adapter(&mut self, entry: IpAdapterEntry) -> Result<()> {
        check_names(&self.ip_adapters, &entry)?;
        self.ip_adapters.push(entry);
        Ok(())
    }

    /// The registered IP-Adapters, in file order.
    pub fn ip_adapters(&self) -> impl Iterator<Item = &IpAdapterEntry> {
        self.ip_adapters.iter()
    }

    /// The IP-Adapter whose id or alias is exactly `name`.
    pub fn ip_adapter(&self, name: &str) -> Option<&IpAdapterEntry> {
        find(&self.ip_adapters, name)
    }

    /// Looks up a registered IP-Adapter id or alias (never a path); an unknown name is an
    /// invalid request listing the known IP-Adapters.
    pub fn resolve_ip_adapter(&self, name: &str) -> Result<IpAdapterEntry> {
        resolve(&self.ip_adapters, name)
    }

    /// Adds an embedding entry; its id and aliases must not collide with known embedding names.
    pub fn add_embedding(&mut self, entry: EmbeddingEntry) -> Result<()> {
        check_names(&self.embeddings, &entry)?;
        self.embeddings.push(entry);
        Ok(())
    }

    pub fn embeddings(&self) -> impl Iterator<Item = &EmbeddingEntry> {
        self.embeddings.iter()
    }

    /// The embedding whose id or alias is exactly `name`.
    pub fn embedding(&self, name: &str) -> Option<&EmbeddingEntry> {
        find(&self.embeddings, name)
    }

    /// Looks up a registered embedding id or alias (never a path); an unknown name is an invalid
    /// request listing the known embeddings.
    pub fn resolve_embedding(&self, name: &str) -> Result<EmbeddingEntry> {
        resolve(&self.embeddings, name)
    }

    /// Adds a ControlNet entry; its id and aliases must not collide with known ControlNet names.
    pub fn add_controlnet(&mut self, entry: ControlNetEntry) -> Result<()> {
        check_names(&self.controlnets, &entry)?;
        self.controlnets.push(entry);
        Ok(())
    }

    pub fn controlnets(&self) -> impl Iterator<Item = &ControlNetEntry> {
        self.controlnets.iter()
    }

    /// The ControlNet whose id or alias is exactly `name`.
    pub fn controlnet(&self, name: &str) -> Option<&ControlNetEntry> {
        find(&self.controlnets, name)
    }

    /// Looks up a registered ControlNet id or alias (never a path); an unknown name is an
    /// invalid request listing the known ControlNets.
    pub fn resolve_controlnet(&self, name: &str) -> Result<ControlNetEntry> {
        resolve(&self.controlnets, name)
    }

    /// The ControlNet for `family` that reads `preprocessor` images (the first registered), for
    /// dialects that name a control type instead of a model.
    pub fn controlnet_for(&self, family: Family, preprocessor: &str) -> Option<&ControlNetEntry> {
        self.controlnets
            .iter()
            .find(|e| e.family == family && e.expects(preprocessor))
    }

    pub fn loras(&self) -> impl Iterator<Item = &LoraEntry> {
        self.loras.iter()
    }

    /// The LoRA whose id or alias is exactly `name`.
    pub fn lora(&self, name: &str) -> Option<&LoraEntry> {
        find(&self.loras, name)
    }

    /// Looks up a registered LoRA id or alias (never a path); an unknown name is an invalid
    /// request listing the known LoRAs.
    pub fn resolve_lora(&self, name: &str) -> Result<LoraEntry> {
        resolve(&self.loras, name)
    }

    /// The LoRA marked `lcm` for `family`, which the LCM sampling mode merges.
    pub fn lcm_lora(&self, family: Family) -> Option<&LoraEntry> {
        self.loras.iter().find(|e| e.lcm && e.family == family)
    }

    pub fn vaes(&self) -> impl Iterator<Item = &VaeEntry> {
        self.vaes.iter()
    }

    /// The VAE whose id or alias is exactly `name`.
    pub fn vae(&self, name: &str) -> Option<&VaeEntry> {
        find(&self.vaes, name)
    }

    /// Looks up a registered VAE id or alias (never a path); an unknown name is an invalid
    /// request listing the known VAEs.
    pub fn resolve_vae(&self, name: &str) -> Result<VaeEntry> {
        resolve(&self.vaes, name)
    }

    pub fn models(&self) -> impl Iterator<Item = &ModelEntry> {
        self.entries.iter()
    }

    /// The entry whose id or alias is exactly `name`.
    pub fn get(&self, name: &str) -> Option<&ModelEntry> {
        find(&self.entries, name)
    }

    /// Looks up a registered id or alias only (for request handlers: no file paths).
    pub fn resolve_id(&self, id: &str) -> Result<ModelEntry> {
        self.get(id).cloned().ok_or_else(|| self.unknown(id))
    }

    /// An id or alias, else a local diffusers folder or `.safetensors` checkpoint path.
    pub fn resolve(&self, id_or_path: &str) -> Result<ModelEntry> {
        if let Some(e) = self.get(id_or_path) {
            return Ok(e.clone());
        }
        let path = Path::new(id_or_path);
        if path.is_dir() {
            return Ok(ModelEntry::ad_hoc(
                id_or_path,
                ModelSource::Folder(path.to_path_buf()),
            ));
        }
        if path.is_file() {
            refuse_pickle(path)?;
            let is_safetensors = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
            if !is_safetensors {
                return Err(Error::model(format!(
                    "{} is not a model: expected a diffusers folder or a .safetensors checkpoint",
                    path.display()
                )));
            }
            let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            return Ok(ModelEntry::ad_hoc(
                id_or_path,
                ModelSource::SingleFile {
                    location: Location::Local(dir),
                    file: path.to_path_buf(),
                    config: None,
                },
            ));
        }
        Err(self.unknown(id_or_path))
    }

    fn unknown(&self, name: &str) -> Error {
        let known: Vec<String> = self
            .entries
            .iter()
            .map(|e| {
                if e.aliases.is_empty() {
                    e.id.clone()
                } else {
                    format!("{} (aliases: {})", e.id, e.aliases.join(", "))
                }
            })
            .collect();
        let known = if known.is_empty() {
            "none".to_string()
        } else {
            known.join("; ")
        };
        Error::UnknownModel(format!(
            "unknown model `{name}` (ids are case-sensitive). Known models: {known}. To add one, \
             add a [[model]] entry with `hf`, `path` or `file` to models.toml, or give the path \
             of a diffusers folder or .safetensors checkpoint."
        ))
    }
}

/// How the hub is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// The hub cache (`.../huggingface/hub`).
    pub cache_dir: PathBuf,
    /// Only files already in the cache are used (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    pub endpoint: Option<String>,
    pub token: Option<String>,
}

impl HubOptions {
    /// From the environment: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub`; `HF_HUB_OFFLINE`; `HF_ENDPOINT`; `HF_TOKEN`.
    pub fn from_env() -> Result<Self> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let cache_dir = if let Some(c) = var("HF_HUB_CACHE") {
            PathBuf::from(c)
        } else if let Some(h) = var("HF_HOME") {
            PathBuf::from(h).join("hub")
        } else if let Some(home) = var("HOME") {
            PathBuf::from(home)
                .join(".cache")
                .join("huggingface")
                .join("hub")
        } else {
            return Err(Error::model(
                "cannot locate the Hugging Face cache: set HF_HOME or HF_HUB_CACHE",
            ));
        };
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
        });
        Ok(Self {
            cache_dir,
            offline,
            endpoint: var("HF_ENDPOINT"),
            token: var("HF_TOKEN"),
        })
    }
}

impl ModelEntry {
    fn ad_hoc(id: &str, source: ModelSource) -> Self {
        ModelEntry {
            id: id.to_string(),
            aliases: Vec::new(),
            family: None,
            source,
            prediction_type: None,
            description: None,
            defaults: ModelDefaults::default(),
        }
    }

    /// Loads the model's files onto `device` in `dtype`, fetching hub files as needed
    /// (hub settings from the environment, see [`HubOptions::from_env`]).
    pub fn load(&self, device: &Device, dtype: DType) -> Result<PipelineFiles> {
        self.load_with(&HubOptions::from_env()?, device, dtype)
    }

    /// Like [`ModelEntry::load`], with explicit hub settings.
    pub fn load_with(
        &self,
        hub: &HubOptions,
        device: &Device,
        dtype: DType,
    ) -> Result<PipelineFiles> {
        let mut files = match &self.source {
            ModelSource::Folder(dir) => {
                if !dir.is_dir() {
                    return Err(Error::model(format!(
                        "model `{}`: folder {} does not exist",
                        self.id,
                        dir.display()
                    )));
                }
                load_diffusers_folder_variant(dir, None, device, dtype)?
            }
            ModelSource::Hub {
                repo,
                revision,
                variant,
            } => {
                let dir = HubRepo::new(hub, repo, revision)?.fetch_pipeline(variant.as_deref())?;
                load_diffusers_folder_variant(&dir, variant.as_deref(), device, dtype)?
            }
            ModelSource::SingleFile {
                location,
                file,
                config,
            } => {
                let path = match location {
                    Location::Local(_) => file.clone(),
                    Location::Hub { repo, revision } => {
                        let name = file.to_str().ok_or_else(|| {
                            Error::model(format!("model `{}`: file name is not UTF-8", self.id))
                        })?;
                        HubRepo::new(hub, repo, revision)?.get(name)?
                    }
                };
                if !path.is_file() {
                    return Err(Error::model(format!(
                        "model `{}`: checkpoint {} does not exist",
                        self.id,
                        path.display()
                    )));
                }
                match config {
                    Some(Location::Local(dir)) => {
                        load_single_file_with_tokenizers(&path, Some(dir), None, device, dtype)?
                    }
                    Some(Location::Hub { repo, revision }) => {
                        let dir = HubRepo::new(hub, repo, revision)?.fetch_configs()?;
                        load_single_file_with_tokenizers(&path, Some(&dir), None, device, dtype)?
                    }
                    None => {
                        let family = single_file_family(&path)?;
                        let repo = reference_repo(family);
                        let tok_dir = HubRepo::new(hub, repo, DEFAULT_REVISION)?
                            .fetch_tokenizers()
                            .map_err(|e| {
                                Error::model(format!(
                                    "model `{}`: a single-file checkpoint without `config` takes \
                                     its tokenizers from {repo}: {e}",
                                    self.id
                                ))
                            })?;
                        load_single_file_with_tokenizers(
                            &path,
                            None,
                            Some(&tok_dir),
                            device,
                            dtype,
                        )?
                    }
                }
            }
        };
        if let Some(family) = self.family {
            // A refiner's files hold other components than a base model's: no declaration
            // turns one into the other.
            if (family == Family::SdxlRefiner) != (files.family == Family::SdxlRefiner) {
                return Err(Error::model(format!(
                    "model `{}` is declared {family} but its files are an {} model",
                    self.id, files.family
                )));
            }
            if family != files.family {
                tracing::warn!(
                    "model `{}` is declared {family} but its files look like {}; using {family}",
                    self.id,
                    files.family
                );
                files.family = family;
            }
        }
        if let Some(p) = &self.prediction_type {
            if let Some(obj) = files.scheduler_config.as_object_mut() {
                obj.insert("prediction_type".into(), p.clone().into());
            }
        }
        Ok(files)
    }
}

/// One hub repo at one revision: cached files, fetched when missing unless offline.
struct HubRepo<'a> {
    opts: &'a HubOptions,
    repo_id: String,
    revision: String,
    api: Option<hf_hub::api::sync::ApiRepo>,
}

impl<'a> HubRepo<'a> {
    fn new(opts: &'a HubOptions, repo_id: &str, revision: &str) -> Result<Self> {
        let api = if opts.offline {
            None
        } else {
            let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(
                opts.cache_dir.clone(),
            ))
            .with_progress(false);
            if let Some(e) = &opts.endpoint {
                builder = builder.with_endpoint(e.clone());
            }
            if opts.token.is_some() {
                builder = builder.with_token(opts.token.clone());
            }
            let api = builder
                .build()
                .map_err(|e| Error::model(format!("hub client: {e}")))?;
            Some(api.repo(hf_hub::Repo::with_revision(
                repo_id.to_string(),
                hf_hub::RepoType::Model,
                revision.to_string(),
            )))
        };
        Ok(Self {
            opts,
            repo_id: repo_id.to_string(),
            revision: revision.to_string(),
            api,
        })
    }

    /// The cached snapshot folder of this revision, if the cache has one.
    fn snapshot_dir(&self) -> Option<PathBuf> {
        let repo_dir = self
            .opts
            .cache_dir
            .join(format!("models--{}", self.repo_id.replace('/', "--")));
        let commit = std::fs::read_to_string(repo_dir.join("refs").join(&self.revision))
            .ok()
            .map(|s| s.trim().to_string())
            .or_else(|| {
                let is_hash = self.revision.len() == 40
                    && self.revision.chars().all(|c| c.is_ascii_hexdigit());
                is_hash.then(|| self.revision.clone())
            })?;
        let dir = repo_dir.join("snapshots").join(commit);
        dir.is_dir().then_some(dir)
    }

    /// The repo's file list (from the hub, or from the cached snapshot when offline).
    fn list_files(&self) -> Result<Vec<String>> {
        match &self.api {
            Some(api) => {
                let info = api.info().map_err(|e| self.hub_error("list files of", e))?;
                Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
            }
            None => {
                let dir = self
                    .snapshot_dir()
                    .ok_or_else(|| self.not_cached("model_index.json"))?;
                let mut out = Vec::new();
                walk(&dir, "", &mut out)?;
                Ok(out)
            }
        }
    }

    /// A local path of `name`, downloading it when online and not cached.
    fn get(&self, name: &str) -> Result<PathBuf> {
        if let Some(dir) = self.snapshot_dir() {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
        match &self.api {
            Some(api) => api
                .get(name)
                .map_err(|e| self.hub_error(&format!("download {name} from"), e)),
            None => Err(self.not_cached(name)),
        }
    }

    fn not_cached(&self, name: &str) -> Error {
        Error::model(format!(
            "{name} of hub repo {}@{} is not in the local cache {} and HF_HUB_OFFLINE is set: \
             download it first (unset HF_HUB_OFFLINE, or copy the repo into the cache), or use a \
             local `path`",
            self.repo_id,
            self.revision,
            self.opts.cache_dir.display()
        ))
    }

    fn hub_error(&self, what: &str, e: hf_hub::api::sync::ApiError) -> Error {
        Error::model(format!(
            "cannot {what} hub repo {}@{}: {e} (set HF_TOKEN for gated repos, HF_HUB_OFFLINE=1 to \
             use only the cache)",
            self.repo_id, self.revision
        ))
    }

    /// Fetches `model_index.json`; returns the snapshot folder and the parsed index.
    fn fetch_index(&self) -> Result<(PathBuf, ModelIndex)> {
        let index_path = self.get("model_index.json")?;
        let dir = index_path
            .parent()
            .expect("a cached file has a parent folder; this is a bug")
            .to_path_buf();
        let index = ModelIndex::read(&dir)?;
        Ok((dir, index))
    }

    /// Fetches what a diffusers pipeline needs (configs, tokenizers, chosen weights); returns
    /// the snapshot folder.
    fn fetch_pipeline(&self, variant: Option<&str>) -> Result<PathBuf> {
        let (dir, index) = self.fetch_index()?;
        index.check_supported(&dir)?;
        let listing = self.list_files()?;
        for component in ["unet", "vae", "text_encoder", "text_encoder_2"] {
            if !index.has(component) {
                continue;
            }
            self.get(&format!("{component}/config.json"))?;
            let names = component_paths(&listing, component);
            match choose_weight_file(&names, variant) {
                Some(WeightChoice::Single(f)) => {
                    self.get(&format!("{component}/{f}"))?;
                }
                Some(WeightChoice::Sharded(f)) => {
                    let index_file = self.get(&format!("{component}/{f}"))?;
                    for shard in shard_files(&index_file)? {
                        self.get(&format!("{component}/{shard}"))?;
                    }
                }
                None => {
                    return Err(Error::model(format!(
                        "hub repo {}@{} has no safetensors weights for `{component}`",
                        self.repo_id, self.revision
                    )))
                }
            }
        }
        self.fetch_tokenizer_files(&listing, &index)?;
        self.get("scheduler/scheduler_config.json")?;
        Ok(dir)
    }

    /// Fetches configs and tokenizers (no weights): a `config` for single-file checkpoints.
    fn fetch_configs(&self) -> Result<PathBuf> {
        let (dir, index) = self.fetch_index()?;
        for component in ["unet", "vae", "text_encoder", "text_encoder_2"] {
            if index.has(component) {
                self.get(&format!("{component}/config.json"))?;
            }
        }
        self.get("scheduler/scheduler_config.json")?;
        let listing = self.list_files()?;
        self.fetch_tokenizer_files(&listing, &index)?;
        Ok(dir)
    }

    /// Fetches a repo holding one diffusers model at its root (`config.json` + weights, as VAE
    /// repos are); returns the snapshot folder.
    fn fetch_root_component(&self) -> Result<PathBuf> {
        let config = self.get("config.json")?;
        let listing = self.list_files()?;
        let names: Vec<String> = listing.into_iter().filter(|f| !f.contains('/')).collect();
        match choose_weight_file(&names, None) {
            Some(WeightChoice::Single(f)) => {
                self.get(&f)?;
            }
            Some(WeightChoice::Sharded(f)) => {
                let index_file = self.get(&f)?;
                for shard in shard_files(&index_file)? {
                    self.get(&shard)?;
                }
            }
            None => {
                return Err(Error::model(format!(
                    "hub repo {}@{} has no safetensors weights at its root",
                    self.repo_id, self.revision
                )))
            }
        }
        Ok(config
            .parent()
            .expect("a cached file has a parent folder; this is a bug")
            .to_path_buf())
    }

    /// Fetches only the tokenizer folders; returns the snapshot folder.
    fn fetch_tokenizers(&self) -> Result<PathBuf> {
        let (dir, index) = self.fetch_index()?;
        let listing = self.list_files()?;
        self.fetch_tokenizer_files(&listing, &index)?;
        Ok(dir)
    }

    fn fetch_tokenizer_files(&self, listing: &[String], index: &ModelIndex) -> Result<()> {
        for tok in ["tokenizer", "tokenizer_2"] {
            if !index.has(tok) {
                continue;
            }
            let present = component_paths(listing, tok);
            for name in crate::weights::TOKENIZER_FILE_NAMES {
                if present.iter().any(|p| p == name) {
                    self.get(&format!("{tok}/{name}"))?;
                }
            }
        }
        Ok(())
    }
}

/// Relative paths of the files under `dir` (following the cache's symlinks).
fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let path = entry.path();
        if path.is_dir() {
            walk(&path, &rel, out)?;
        } else if path.is_file() {
            out.push(rel);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_registry_parses() {
        let reg = Registry::builtin();
        let e = reg.resolve_id("sd15").unwrap();
        assert_eq!(e.id, "stable-diffusion-v1-5");
        assert_eq!(
            reg.resolve_id("runwayml/stable-diffusion-v1-5").unwrap().id,
            e.id
        );
        let turbo = reg.resolve_id("sdxl-turbo").unwrap();
        assert_eq!(turbo.defaults.steps, Some(1));
        assert_eq!(turbo.defaults.guidance, Some(0.0));
        assert_eq!(turbo.defaults.scheduler.as_deref(), Some("Euler a"));
        assert_eq!(
            (turbo.defaults.width, turbo.defaults.height),
            (Some(512), Some(512))
        );
    }

    #[test]
    fn exactly_one_source() {
        let t = "[[model]]\nid = \"x\"\nhf = \"a/b\"\npath = \"c\"\n";
        let e = Registry::from_toml_str(t, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("exactly one source"), "{e}");
        let t = "[[model]]\nid = \"x\"\n";
        assert!(Registry::from_toml_str(t, Path::new(".")).is_err());
    }

    #[test]
    fn preprocessor_entries() {
        let t = "[[preprocessor]]\ntype = \"hed\"\npath = \"annotators/ControlNetHED.pth\"\n\n\
                 [[preprocessor]]\ntype = \"depth\"\nname = \"dpt\"\nhf = \"Intel/dpt-large\"\n\n\
                 [[preprocessor]]\ntype = \"segmentation\"\npath = \"upernet\"\n";
        let reg = Registry::from_toml_str(t, Path::new("/m")).unwrap();
        let hed = reg.preprocessor_for(DetectorKind::Hed).unwrap();
        assert_eq!(hed.id, "hed");
        assert_eq!(
            hed.source,
            LoraSource::File(PathBuf::from("/m/annotators/ControlNetHED.pth"))
        );
        // softedge and scribble run HED's weights.
        assert_eq!(
            reg.preprocessor_for(DetectorKind::Scribble).unwrap().id,
            "hed"
        );
        assert_eq!(
            reg.preprocessor_for(DetectorKind::SoftEdge).unwrap().id,
            "hed"
        );
        let depth = reg.preprocessor_for(DetectorKind::Depth).unwrap();
        assert_eq!(depth.id, "dpt");
        // No `file`: the repo itself is the transformers folder.
        assert!(matches!(&depth.source, LoraSource::Hub { repo, file, .. }
            if repo == "Intel/dpt-large" && file.is_empty()));
        assert_eq!(
            reg.preprocessor_for(DetectorKind::Segmentation)
                .unwrap()
                .source,
            LoraSource::File(PathBuf::from("/m/upernet"))
        );
        assert!(reg.preprocessor_for(DetectorKind::OpenPose).is_none());
        // A one-file detector needs `file`; a folder detector takes none or a folder.
        let no_file = "[[preprocessor]]\ntype = \"mlsd\"\nhf = \"lllyasviel/Annotators\"\n";
        let err = Registry::from_toml_str(no_file, Path::new("/m"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("mlsd_large_512_fp32.pth"), "{err}");
        let file = "[[preprocessor]]\ntype = \"normal\"\nhf = \"Intel/dpt-large\"\n\
                    file = \"model.safetensors\"\n";
        let err = Registry::from_toml_str(file, Path::new("/m"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("transformers folder"), "{err}");
        let sub = "[[preprocessor]]\ntype = \"normal\"\nhf = \"a/b\"\nfile = \"dpt/\"\n";
        assert!(Registry::from_toml_str(sub, Path::new("/m")).is_ok());

        let unknown = "[[preprocessor]]\ntype = \"sketch\"\npath = \"x.pth\"\n";
        let err = Registry::from_toml_str(unknown, Path::new("/m"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown type `sketch`"), "{err}");
        let both =
            "[[preprocessor]]\ntype = \"hed\"\npath = \"x.pth\"\nhf = \"a/b\"\nfile = \"x\"\n";
        assert!(Registry::from_toml_str(both, Path::new("/m")).is_err());
        let twice = format!("{t}\n[[preprocessor]]\ntype = \"hed\"\npath = \"y.pth\"\n");
        let err = Registry::from_toml_str(&twice, Path::new("/m"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`hed`"), "{err}");
    }

    #[test]
    fn ip_adapter_entries() {
        let t = "[[ip_adapter]]\nid = \"ip\"\naliases = [\"runware:55@5\"]\nfamily = \"sd1\"\n\
                 file = \"a/ip.safetensors\"\nimage_encoder = \"a/enc\"\n";
        let reg = Registry::from_toml_str(t, Path::new("/m")).unwrap();
        let e = reg.resolve_ip_adapter("runware:55@5").unwrap();
        assert_eq!(e.id, "ip");
        assert_eq!(
            e.source,
            LoraSource::File(PathBuf::from("/m/a/ip.safetensors"))
        );
        assert_eq!(e.image_encoder, LoraSource::File(PathBuf::from("/m/a/enc")));
        let err = reg.resolve_ip_adapter("nope").unwrap_err().to_string();
        assert!(err.contains("Known IP-Adapters: ip"), "{err}");
        let hub = "[[ip_adapter]]\nid = \"h\"\nfamily = \"sdxl\"\nhf = \"h94/IP-Adapter\"\n\
                   file = \"sdxl_models/ip-adapter_sdxl.safetensors\"\n\
                   image_encoder = \"sdxl_models/image_encoder\"\n";
        let reg = Registry::from_toml_str(hub, Path::new("/m")).unwrap();
        let e = reg.resolve_ip_adapter("h").unwrap();
        assert!(
            matches!(e.image_encoder, LoraSource::Hub { ref file, .. } if file == "sdxl_models/image_encoder")
        );
        let pickle = t.replace("ip.safetensors", "ip.bin");
        assert!(Registry::from_toml_str(&pickle, Path::new("/m")).is_err());
        let twice = format!("{t}{t}");
        assert!(Registry::from_toml_str(&twice, Path::new("/m")).is_err());
    }

    #[test]
    fn controlnet_entries() {
        let t = "[[controlnet]]\nid = \"cn\"\naliases = [\"civitai:9@9\"]\nfamily = \"sd1\"\n\
                 path = \"cn-folder\"\npreprocessor = \"Canny\"\n";
        let reg = Registry::from_toml_str(t, Path::new("/m")).unwrap();
        let e = reg.resolve_controlnet("civitai:9@9").unwrap();
        assert_eq!(e.id, "cn");
        assert_eq!(
            e.source,
            ControlNetSource::Folder(PathBuf::from("/m/cn-folder"))
        );
        assert!(e.expects("canny"));
        assert_eq!(
            reg.controlnet_for(Family::Sd1, "canny")
                .map(|e| e.id.as_str()),
            Some("cn")
        );
        assert!(reg.controlnet_for(Family::Sdxl, "canny").is_none());
        let err = reg.resolve_controlnet("nope").unwrap_err().to_string();
        assert!(err.contains("Known ControlNets: cn"), "{err}");
        let both = "[[controlnet]]\nid = \"a\"\nfamily = \"sd1\"\npath = \"x\"\nhf = \"o/r\"\n";
        assert!(Registry::from_toml_str(both, Path::new("/m")).is_err());
    }

    #[test]
    fn single_file_controlnet_entries() {
        let head = "[[controlnet]]\nid = \"c\"\nfamily = \"sd1\"\n";
        let t = format!("{head}file = \"control_canny.safetensors\"\nconfig = \"cfg\"\n");
        let reg = Registry::from_toml_str(&t, Path::new("/m")).unwrap();
        assert_eq!(
            reg.resolve_controlnet("c").unwrap().source,
            ControlNetSource::File {
                path: PathBuf::from("/m/control_canny.safetensors"),
                config: Some(PathBuf::from("/m/cfg")),
            }
        );
        let t = format!("{head}file = \"c.safetensors\"\n");
        let reg = Registry::from_toml_str(&t, Path::new("/m")).unwrap();
        let entry = reg.resolve_controlnet("c").unwrap();
        assert!(matches!(
            entry.source,
            ControlNetSource::File { config: None, .. }
        ));
        assert!(entry.local_dir().is_err(), "a file is not a folder");
        for (bad, needle) in [
            (format!("{head}file = \"c.pth\"\n"), "pickle"),
            (
                format!("{head}path = \"x\"\nconfig = \"cfg\"\n"),
                "`config`",
            ),
            (
                format!("{head}path = \"x\"\nfile = \"c.safetensors\"\n"),
                "exactly one",
            ),
        ] {
            let err = Registry::from_toml_str(&bad, Path::new("/m"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn lora_entries() {
        let t = "[[lora]]\nid = \"a\"\naliases = [\"civitai:1@2\"]\nfamily = \"sdxl\"\n\
                 file = \"a.safetensors\"\ntrigger_words = [\"w\"]\n";
        let reg = Registry::from_toml_str(t, Path::new("/m")).unwrap();
        let e = reg.resolve_lora("civitai:1@2").unwrap();
        assert_eq!(e.id, "a");
        assert_eq!(e.family, Family::Sdxl);
        assert_eq!(e.default_weight, 1.0);
        assert_eq!(
            e.source,
            LoraSource::File(PathBuf::from("/m/a.safetensors"))
        );
        let err = reg
            .resolve_lora("/m/a.safetensors")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown LoRA") && err.contains("Known LoRAs: a"),
            "{err}"
        );
        // A LoRA id is not a model id.
        assert!(reg.resolve_id("a").is_err());
        let no_family = "[[lora]]\nid = \"a\"\nfile = \"a.safetensors\"\n";
        assert!(Registry::from_toml_str(no_family, Path::new(".")).is_err());
        let pickle = "[[lora]]\nid = \"a\"\nfamily = \"sd1\"\nfile = \"a.ckpt\"\n";
        assert!(Registry::from_toml_str(pickle, Path::new(".")).is_err());
    }

    #[test]
    fn vae_entries() {
        let t = "[[vae]]\nid = \"v\"\naliases = [\"civitai:1@2\"]\nfamily = \"sd1\"\n\
                 path = \"vaes/v\"\n\
                 [[vae]]\nid = \"w\"\nfamily = \"sdxl\"\nhf = \"org/vae\"\n\
                 file = \"w.safetensors\"\nforce_upcast = false\n\
                 [[vae]]\nid = \"x\"\nfamily = \"sd2\"\nhf = \"org/x\"\nscaling_factor = 0.2\n";
        let reg = Registry::from_toml_str(t, Path::new("/m")).unwrap();
        let v = reg.resolve_vae("civitai:1@2").unwrap();
        assert_eq!(v.source, VaeSource::Folder(PathBuf::from("/m/vaes/v")));
        assert!(v.fits(Family::Sd2) && !v.fits(Family::Sdxl));
        let w = reg.resolve_vae("w").unwrap();
        assert_eq!(w.force_upcast, Some(false));
        assert!(matches!(
            &w.source,
            VaeSource::SingleFile { location: Location::Hub { repo, .. }, file, config: None }
                if repo == "org/vae" && file == Path::new("w.safetensors")
        ));
        assert!(w.fits(Family::Sdxl) && !w.fits(Family::Sd1));
        assert_eq!(reg.resolve_vae("x").unwrap().scaling_factor, Some(0.2));
        let err = reg.resolve_vae("/m/vaes/v").unwrap_err().to_string();
        assert!(
            err.contains("unknown VAE") && err.contains("Known VAEs: v, w, x"),
            "{err}"
        );
        // VAE names are their own: a VAE id is not a model or a LoRA.
        assert!(reg.resolve_id("v").is_err() && reg.resolve_lora("v").is_err());
        for (bad, says) in [
            ("[[vae]]\nid = \"v\"\nfamily = \"sd1\"\npath = \"a\"\nhf = \"o/r\"\n", "exactly one source"),
            ("[[vae]]\nid = \"v\"\npath = \"a\"\n", "family"),
            ("[[vae]]\nid = \"v\"\nfamily = \"sd1\"\npath = \"a\"\nconfig = \"b\"\n", "`config` applies"),
            ("[[vae]]\nid = \"v\"\nfamily = \"sd1\"\nfile = \"v.ckpt\"\n", "pickle"),
            ("[[vae]]\nid = \"v\"\nfamily = \"sd1\"\npath = \"a\"\nscaling_factor = 0\n", "positive"),
            ("[[vae]]\nid = \"v\"\nfamily = \"sd1\"\npath = \"a\"\n[[vae]]\nid = \"v\"\nfamily = \"sd1\"\npath = \"b\"\n", "used by both"),
        ] {
            let err = Registry::from_toml_str(bad, Path::new(".")).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn one_lcm_lora_per_family() {
        let lora = |id: &str, family: &str, lcm: bool| {
            format!("[[lora]]\nid = \"{id}\"\nfamily = \"{family}\"\nfile = \"{id}.safetensors\"\nlcm = {lcm}\n")
        };
        let t = lora("a", "sd1", true) + &lora("b", "sdxl", true) + &lora("c", "sd1", false);
        let mut reg = Registry::from_toml_str(&t, Path::new(".")).unwrap();
        assert_eq!(reg.lcm_lora(Family::Sd1).unwrap().id, "a");
        assert_eq!(reg.lcm_lora(Family::Sdxl).unwrap().id, "b");
        assert!(reg.lcm_lora(Family::Sd2).is_none());
        assert!(!reg.resolve_lora("c").unwrap().lcm);
        let two = lora("a", "sd1", true) + &lora("d", "sd1", true);
        let err = Registry::from_toml_str(&two, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(err.contains("both marked `lcm` for sd1"), "{err}");
        // A server's own LCM-LoRA of a family replaces the shipped one.
        let own = Registry::from_toml_str(&lora("mine", "sd1", true), Path::new(".")).unwrap();
        reg.extend_overriding(own).unwrap();
        assert_eq!(reg.lcm_lora(Family::Sd1).unwrap().id, "mine");
        assert!(reg.resolve_lora("a").is_err());
    }

    #[test]
    fn builtin_registry_has_lcm_loras_and_vaes() {
        let reg = Registry::builtin();
        assert_eq!(reg.lcm_lora(Family::Sd1).unwrap().id, "lcm-lora-sdv1-5");
        assert_eq!(reg.lcm_lora(Family::Sdxl).unwrap().id, "lcm-lora-sdxl");
        assert_eq!(
            reg.resolve_vae("stabilityai/sd-vae-ft-mse").unwrap().family,
            Family::Sd1
        );
        assert_eq!(
            reg.resolve_vae("sdxl-vae-fp16-fix").unwrap().family,
            Family::Sdxl
        );
    }

    #[test]
    fn embedding_entries() {
        let t = "[[embedding]]\nid = \"neg\"\naliases = [\"civitai:7@8\"]\nfamily = \"sd1\"\n\
                 file = \"neg.pt\"\nnegative = true\n\n[[embedding]]\nid = \"b\"\n\
                 family = \"sdxl\"\nhf = \"o/r\"\nfile = \"b.safetensors\"\ntoken = \"<b>\"\n\
                 default_weight = 0.5\n";
        let reg = Registry::from_toml_str(t, Path::new("/m")).unwrap();
        let e = reg.resolve_embedding("civitai:7@8").unwrap();
        assert_eq!((e.id.as_str(), e.token.as_str()), ("neg", "neg"));
        assert!(e.negative);
        assert_eq!(e.source, LoraSource::File(PathBuf::from("/m/neg.pt")));
        let b = reg.resolve_embedding("b").unwrap();
        assert_eq!((b.token.as_str(), b.default_weight), ("<b>", 0.5));
        assert!(!b.negative);
        let err = reg.resolve_embedding("c").unwrap_err().to_string();
        assert!(
            err.contains("unknown embedding `c`") && err.contains("neg, b"),
            "{err}"
        );
        // An embedding id is neither a model nor a LoRA.
        assert!(reg.resolve_id("neg").is_err() && reg.resolve_lora("neg").is_err());
        let blank = "[[embedding]]\nid = \"x\"\nfamily = \"sd1\"\nfile = \"x.pt\"\ntoken = \" \"\n";
        assert!(Registry::from_toml_str(blank, Path::new(".")).is_err());
    }

    #[test]
    fn repo_ids() {
        assert!(check_repo_id("stabilityai/sdxl-turbo").is_ok());
        assert!(check_repo_id("sdxl-turbo").is_err());
        assert!(check_repo_id("../etc/passwd").is_err());
    }
}
