//! Model ids and aliases -> where the model's files are (`models.toml`).
//!
//! A `[[model]]` entry names one source: a diffusers repo on the Hugging Face Hub (`hf`, fetched
//! with `hf-hub` into the standard hub cache), a local diffusers folder (`path`), or a single-file
//! checkpoint (`file`, local or inside an `hf` repo, with an optional `config` folder / repo).
//! A `[[lora]]` entry names a LoRA file (`file`, local or inside an `hf` repo) with the family
//! of models it adapts. The format is documented in the shipped `models.toml`.
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

use crate::weights::folder::{
    choose_weight_file, component_paths, shard_files, ModelIndex, WeightChoice,
};
use crate::weights::single_file::single_file_family;
use crate::weights::{
    load_diffusers_folder_variant, load_single_file_with_tokenizers, refuse_pickle, Family,
    PipelineFiles,
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
        })
    }
}

impl LoraEntry {
    /// The local path of the LoRA file, fetched from the hub when needed (hub settings from the
    /// environment, see [`HubOptions::from_env`]).
    pub fn local_path(&self) -> Result<PathBuf> {
        let path = match &self.source {
            LoraSource::File(path) => path.clone(),
            LoraSource::Hub {
                repo,
                revision,
                file,
            } => HubRepo::new(&HubOptions::from_env()?, repo, revision)?.get(file)?,
        };
        if !path.is_file() {
            return Err(Error::model(format!(
                "lora `{}`: file {} does not exist",
                self.id,
                path.display()
            )));
        }
        Ok(path)
    }
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

/// The set of models a server can load, by id and alias.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    entries: Vec<ModelEntry>,
    loras: Vec<LoraEntry>,
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
        Ok(reg)
    }

    /// Adds an entry; its id and aliases must not collide with known names.
    pub fn add(&mut self, entry: ModelEntry) -> Result<()> {
        let mut seen = HashSet::new();
        for name in std::iter::once(&entry.id).chain(&entry.aliases) {
            if !seen.insert(name.as_str()) {
                return Err(Error::model(format!(
                    "model `{}` lists the name `{name}` twice",
                    entry.id
                )));
            }
            if let Some(other) = self.get(name) {
                return Err(Error::model(format!(
                    "model name `{name}` is used by both `{}` and `{}`",
                    other.id, entry.id
                )));
            }
        }
        self.entries.push(entry);
        Ok(())
    }

    /// Adds a LoRA entry; its id and aliases must not collide with known LoRA names.
    pub fn add_lora(&mut self, entry: LoraEntry) -> Result<()> {
        let mut seen = HashSet::new();
        for name in std::iter::once(&entry.id).chain(&entry.aliases) {
            if !seen.insert(name.as_str()) {
                return Err(Error::model(format!(
                    "lora `{}` lists the name `{name}` twice",
                    entry.id
                )));
            }
            if let Some(other) = self.lora(name) {
                return Err(Error::model(format!(
                    "lora name `{name}` is used by both `{}` and `{}`",
                    other.id, entry.id
                )));
            }
        }
        self.loras.push(entry);
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
            self.add_lora(entry)?;
        }
        Ok(())
    }

    pub fn loras(&self) -> impl Iterator<Item = &LoraEntry> {
        self.loras.iter()
    }

    /// The LoRA whose id or alias is exactly `name`.
    pub fn lora(&self, name: &str) -> Option<&LoraEntry> {
        self.loras.iter().find(|e| e.id == name).or_else(|| {
            self.loras
                .iter()
                .find(|e| e.aliases.iter().any(|a| a == name))
        })
    }

    /// Looks up a registered LoRA id or alias (never a path); an unknown name is an invalid
    /// request listing the known LoRAs.
    pub fn resolve_lora(&self, name: &str) -> Result<LoraEntry> {
        self.lora(name).cloned().ok_or_else(|| {
            let known: Vec<&str> = self.loras.iter().map(|e| e.id.as_str()).collect();
            let known = if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            };
            Error::invalid(format!(
                "unknown LoRA `{name}` (ids are case-sensitive). Known LoRAs: {known}"
            ))
        })
    }

    pub fn models(&self) -> impl Iterator<Item = &ModelEntry> {
        self.entries.iter()
    }

    /// The entry whose id or alias is exactly `name`.
    pub fn get(&self, name: &str) -> Option<&ModelEntry> {
        self.entries.iter().find(|e| e.id == name).or_else(|| {
            self.entries
                .iter()
                .find(|e| e.aliases.iter().any(|a| a == name))
        })
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
    fn repo_ids() {
        assert!(check_repo_id("stabilityai/sdxl-turbo").is_ok());
        assert!(check_repo_id("sdxl-turbo").is_err());
        assert!(check_repo_id("../etc/passwd").is_err());
    }
}
