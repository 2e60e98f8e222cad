//! LoRA files merged into, and taken out of, the weights of a loaded model.
//!
//! A LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") stores, for some
//! linear or convolution layers `W` of the UNet and the text encoders, a pair `down` `[r, in(, k,
//! k)]` and `up` `[out, r(, 1, 1)]` of rank `r` and a scalar `alpha`. Applying it with a user weight
//! `w` replaces `W` by `W + w * (alpha / r) * up @ down` (the convolution kernels flattened to
//! `[out, in * k * k]`, so a 3x3 `down` with a 1x1 `up` is a 3x3 update).
//!
//! Two file layouts are read:
//!
//! * kohya / A1111 (sd-scripts, civitai): `lora_unet_<module>`, `lora_te_<module>` (SDXL:
//!   `lora_te1_` and `lora_te2_`) with `.lora_down.weight`, `.lora_up.weight` and `.alpha`, where
//!   `<module>` is the module path with `.` written `_`. SD1/SD2 UNets are named after diffusers
//!   (`down_blocks_0_attentions_0_proj_in`), SDXL UNets after the original SGM code
//!   (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`); both are understood for every family.
//!   A missing `alpha` means `alpha = r`.
//! * diffusers / PEFT (`save_lora_weights`): `unet.<module>`, `text_encoder.<module>`,
//!   `text_encoder_2.<module>` with `.lora_A.weight` (down) and `.lora_B.weight` (up). `alpha`
//!   comes from the `lora_adapter_metadata` JSON of the file header (`lora_alpha`, `alpha_pattern`,
//!   `use_rslora`), else from `.alpha` tensors, else `alpha = r`. The older diffusers spellings
//!   (`...attn1.processor.to_q_lora.down.weight`, `.lora.down.weight`,
//!   `.lora_linear_layer.down.weight`) are read too.
//!
//! A module is matched to a weight of the model by its path with every `.` and `_` alike, so the
//! same lookup serves both layouts; a 1x1 convolution and a linear layer with the same numbers
//! of inputs and outputs take each other's updates (SD1's `proj_in`/`proj_out` are 1x1
//! convolutions, SD2's and SDXL's linear layers). A module that matches no weight, a shape that
//! does not fit, and LyCORIS variants (LoHa, LoKr, DoRA, CP-decomposed LoCon) are errors naming the
//! keys: nothing in a LoRA file is dropped silently.
//!
//! # How a loaded model switches LoRAs
//!
//! The candle modules hold plain `Tensor`s that share their storage with the [`WeightStore`]s they
//! were built from (building is `Arc` clones, no copy). [`merge_loras`] therefore computes each
//! merged weight out of place, `W' = round_to_dtype(f32(W) + sum_i w_i * s_i * up_i @ down_i)`
//! (one rounding to the weight's dtype, the update in f32), puts `W'` into the store and keeps the
//! original `W` tensor itself in the returned [`MergedLoras`]. [`MergedLoras::unmerge`] puts those
//! originals back, so unmerging restores every weight bit for bit in any dtype, and costs nothing
//! to compute. The caller then rebuilds the modules from the stores
//! (`StableDiffusion::rebuild_adapted`, which rebuilds the UNet and the text encoders only): this
//! takes milliseconds, because no weight is copied. Writing into the shared storage in place would
//! spare that rebuild but would make every module silently depend on sharing storage with the
//! store (any dtype conversion at build time breaks it), and an exact unmerge needs the original
//! values kept either way. The memory cost while LoRAs are merged is one extra copy of the layers
//! they touch, reported by [`MergedLoras::backup_bytes`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::single_file::unet_key;
use super::{refuse_pickle, PipelineFiles, WeightStore};
use crate::{Error, Result};

/// How many unmatched keys an error message lists before it only counts the rest.
const LISTED_KEYS: usize = 40;

/// The layout a LoRA file was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// kohya sd-scripts / A1111: `lora_unet_*`, `lora_te*_*`, `.lora_down` / `.lora_up` / `.alpha`.
    Kohya,
    /// diffusers with PEFT: `unet.*`, `text_encoder*.*`, `.lora_A` / `.lora_B`.
    Peft,
    /// diffusers before PEFT: `.to_q_lora.down`, `.lora.down`, `.lora_linear_layer.down`.
    DiffusersLegacy,
}

/// The model component a LoRA layer adapts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraTarget {
    Unet,
    TextEncoder,
    /// SDXL's second text encoder (OpenCLIP bigG).
    TextEncoder2,
}

impl LoraTarget {
    fn as_str(self) -> &'static str {
        match self {
            LoraTarget::Unet => "unet",
            LoraTarget::TextEncoder => "text_encoder",
            LoraTarget::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// One adapted layer: the low-rank pair, flattened to matrices, and its `alpha / r`.
#[derive(Debug, Clone)]
struct LoraModule {
    /// The module's key in the file (for messages).
    key: String,
    target: LoraTarget,
    /// The module path with `.` written `_`, as the weights are looked up.
    path: String,
    /// `[r, in * k * k]`, f32.
    down: Tensor,
    /// `[out, r]`, f32.
    up: Tensor,
    /// The shape of `down` in the file (its kernel, for convolutions).
    down_shape: Vec<usize>,
    scale: f64,
}

/// A parsed LoRA file, its tensors in f32 on one device.
#[derive(Debug, Clone)]
pub struct Lora {
    name: String,
    format: LoraFormat,
    modules: Vec<LoraModule>,
}

impl Lora {
    /// Reads a `.safetensors` LoRA onto `device` (pickle files are refused). `name` (the file's
    /// stem) names it in messages.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        refuse_pickle(path)?;
        let bytes = std::fs::read(path)
            .map_err(|e| Error::model(format!("cannot read LoRA {}: {e}", path.display())))?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let bad = |e: &dyn std::fmt::Display| {
            Error::model(format!(
                "LoRA {} is not a safetensors file: {e}",
                path.display()
            ))
        };
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(&e))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| bad(&e))?;
        Self::from_tensors(&name, tensors, header.metadata().as_ref())
    }

    /// Parses named tensors (and the file header's `__metadata__`, if any) into a LoRA.
    pub fn from_tensors(
        name: &str,
        tensors: HashMap<String, Tensor>,
        metadata: Option<&HashMap<String, String>>,
    ) -> Result<Self> {
        let fail = |msg: String| Error::model(format!("LoRA `{name}`: {msg}"));
        let peft_configs = match metadata.and_then(|m| m.get("lora_adapter_metadata")) {
            Some(text) => PeftConfigs::parse(text).map_err(fail)?,
            None => PeftConfigs::default(),
        };

        // Group the tensors by module.
        let mut groups: BTreeMap<String, Parts> = BTreeMap::new();
        let mut unknown = Vec::new();
        let mut unsupported = Vec::new();
        for (key, tensor) in tensors {
            if let Some(kind) = lycoris_kind(&key) {
                unsupported.push(format!("{key} ({kind})"));
                continue;
            }
            match split_key(&key) {
                Some((module, part, format)) => {
                    let parts = groups.entry(module).or_default();
                    if part != Part::Alpha {
                        parts.formats.push(format);
                    }
                    let slot = match part {
                        Part::Down => &mut parts.down,
                        Part::Up => &mut parts.up,
                        Part::Alpha => &mut parts.alpha,
                    };
                    *slot = Some(tensor);
                }
                None => unknown.push(key),
            }
        }
        if !unsupported.is_empty() {
            unsupported.sort();
            return Err(fail(format!(
                "uses layer types sd-serve does not merge: {}",
                list(&unsupported)
            )));
        }
        if !unknown.is_empty() {
            unknown.sort();
            return Err(fail(format!(
                "{} tensor(s) are not LoRA weights of a known layout: {}",
                unknown.len(),
                list(&unknown)
            )));
        }
        if groups.is_empty() {
            return Err(fail("the file holds no LoRA layers".into()));
        }

        let mut formats: Vec<LoraFormat> = groups
            .values()
            .flat_map(|p| p.formats.iter().copied())
            .collect();
        formats.sort_by_key(|f| *f as u8);
        formats.dedup();
        let format = match formats.as_slice() {
            [one] => *one,
            [LoraFormat::Peft, LoraFormat::DiffusersLegacy] => LoraFormat::Peft,
            [] => return Err(fail("the file holds alphas but no LoRA layers".into())),
            _ => {
                return Err(fail(format!(
                    "mixes LoRA layouts ({formats:?}) in one file"
                )))
            }
        };

        let mut modules = Vec::with_capacity(groups.len());
        for (key, parts) in groups {
            let (down, up) = match (parts.down, parts.up) {
                (Some(d), Some(u)) => (d, u),
                (d, _) => {
                    let missing = if d.is_none() { "down (A)" } else { "up (B)" };
                    return Err(fail(format!("layer `{key}` has no {missing} matrix")));
                }
            };
            let (target, dotted) = module_target(&key, format)
                .ok_or_else(|| fail(format!("layer `{key}` names no UNet or text encoder")))?;
            let down_shape = down.dims().to_vec();
            let rank = down_shape.first().copied().unwrap_or(0);
            let up_dims = up.dims().to_vec();
            let up_ok = matches!(up_dims.as_slice(), [_, r] | [_, r, 1, 1] if *r == rank);
            if !matches!(down_shape.len(), 2 | 4) || !up_ok || rank == 0 {
                return Err(fail(format!(
                    "layer `{key}` has down {down_shape:?} and up {up_dims:?}, not a rank-r pair \
                     ([r, in] or [r, in, k, k] with [out, r] or [out, r, 1, 1])"
                )));
            }
            let alpha = match parts.alpha {
                Some(a) => Some(scalar(&a).map_err(|e| fail(format!("`{key}.alpha`: {e}")))?),
                None => None,
            };
            let scale = match (alpha, format) {
                (Some(alpha), _) => alpha / rank as f64,
                (None, LoraFormat::Peft | LoraFormat::DiffusersLegacy) => {
                    peft_configs.scale(target, &dotted, rank)
                }
                (None, LoraFormat::Kohya) => 1.0,
            };
            let out = up_dims[0];
            let down = down.to_dtype(DType::F32)?.reshape((rank, ()))?;
            let up = up.to_dtype(DType::F32)?.reshape((out, rank))?;
            modules.push(LoraModule {
                key,
                target,
                path: dotted.replace('.', "_"),
                down,
                up,
                down_shape,
                scale,
            });
        }
        Ok(Self {
            name: name.to_string(),
            format,
            modules,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn format(&self) -> LoraFormat {
        self.format
    }

    /// Number of adapted layers.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// Whether the LoRA adapts SDXL's second text encoder (so is an SDXL LoRA).
    pub fn adapts_second_text_encoder(&self) -> bool {
        self.modules
            .iter()
            .any(|m| m.target == LoraTarget::TextEncoder2)
    }
}

#[derive(Default)]
struct Parts {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<Tensor>,
    formats: Vec<LoraFormat>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
}

/// Splits a tensor key into its module key, which part of the pair it is, and the layout.
fn split_key(key: &str) -> Option<(String, Part, LoraFormat)> {
    use LoraFormat::*;
    const SUFFIXES: &[(&str, Part, LoraFormat)] = &[
        (".lora_down.weight", Part::Down, Kohya),
        (".lora_up.weight", Part::Up, Kohya),
        (".lora_A.weight", Part::Down, Peft),
        (".lora_B.weight", Part::Up, Peft),
        (
            ".lora_linear_layer.down.weight",
            Part::Down,
            DiffusersLegacy,
        ),
        (".lora_linear_layer.up.weight", Part::Up, DiffusersLegacy),
        (".lora.down.weight", Part::Down, DiffusersLegacy),
        (".lora.up.weight", Part::Up, DiffusersLegacy),
        ("_lora.down.weight", Part::Down, DiffusersLegacy),
        ("_lora.up.weight", Part::Up, DiffusersLegacy),
        (".alpha", Part::Alpha, Kohya),
    ];
    SUFFIXES.iter().find_map(|(suffix, part, format)| {
        let module = key.strip_suffix(suffix)?;
        // The attention-processor spelling keeps `_lora` on the module (`to_q_lora`): mark it so
        // the module path can be rewritten.
        let module = if suffix.starts_with("_lora") {
            format!("{module}_lora")
        } else {
            module.to_string()
        };
        Some((module, *part, *format))
    })
}

/// Names the LyCORIS (or DoRA) layer type of a key, if it is one.
fn lycoris_kind(key: &str) -> Option<&'static str> {
    const KINDS: &[(&str, &str)] = &[
        (".hada_", "LyCORIS LoHa"),
        (".lokr_", "LyCORIS LoKr"),
        (".lora_mid.", "LyCORIS LoCon with a CP-decomposed kernel"),
        (".dora_scale", "DoRA"),
        (".lora_magnitude_vector", "DoRA"),
        (".oft_", "OFT"),
    ];
    if key.ends_with(".diff") || key.ends_with(".diff_b") {
        return Some("full weight difference");
    }
    KINDS
        .iter()
        .find(|(marker, _)| key.contains(marker))
        .map(|(_, kind)| *kind)
}

/// The component and dotted (or, for kohya, underscored) module path of a module key.
fn module_target(module: &str, format: LoraFormat) -> Option<(LoraTarget, String)> {
    match format {
        LoraFormat::Kohya => {
            const PREFIXES: &[(&str, LoraTarget)] = &[
                ("lora_unet_", LoraTarget::Unet),
                ("lora_te1_", LoraTarget::TextEncoder),
                ("lora_te2_", LoraTarget::TextEncoder2),
                ("lora_te_", LoraTarget::TextEncoder),
            ];
            PREFIXES.iter().find_map(|(prefix, target)| {
                module
                    .strip_prefix(prefix)
                    .map(|rest| (*target, rest.to_string()))
            })
        }
        LoraFormat::Peft | LoraFormat::DiffusersLegacy => {
            let (target, rest) = if let Some(rest) = module.strip_prefix("text_encoder_2.") {
                (LoraTarget::TextEncoder2, rest)
            } else if let Some(rest) = module.strip_prefix("text_encoder.") {
                (LoraTarget::TextEncoder, rest)
            } else if let Some(rest) = module.strip_prefix("unet.") {
                (LoraTarget::Unet, rest)
            } else if ["down_blocks.", "mid_block.", "up_blocks."]
                .iter()
                .any(|p| module.starts_with(p))
            {
                // The oldest diffusers files hold UNet attention processors without a prefix.
                (LoraTarget::Unet, module)
            } else {
                return None;
            };
            Some((target, legacy_module_path(target, rest)))
        }
    }
}

/// Module paths of the attention-processor layout (`attn1.processor.to_q_lora`,
/// `self_attn.to_q_lora`) as the layers they adapt.
fn legacy_module_path(target: LoraTarget, path: &str) -> String {
    let Some(stem) = path.strip_suffix("_lora") else {
        return path.to_string();
    };
    let (parent, proj) = stem.rsplit_once('.').unwrap_or(("", stem));
    let parent = parent.strip_suffix(".processor").unwrap_or(parent);
    let proj = match (target, proj) {
        (LoraTarget::Unet, "to_out") => "to_out.0",
        (LoraTarget::Unet, p) => p,
        (_, "to_q") => "q_proj",
        (_, "to_k") => "k_proj",
        (_, "to_v") => "v_proj",
        (_, "to_out") => "out_proj",
        (_, p) => p,
    };
    if parent.is_empty() {
        proj.to_string()
    } else {
        format!("{parent}.{proj}")
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    let values = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    match values.as_slice() {
        [v] if v.is_finite() => Ok(*v),
        _ => Err(Error::model(format!(
            "expected one finite number, got {:?}",
            t.dims()
        ))),
    }
}

/// The PEFT `LoraConfig` of each component, as diffusers writes it into the file header.
#[derive(Debug, Default)]
struct PeftConfigs {
    by_target: HashMap<LoraTarget, PeftConfig>,
}

#[derive(Debug, Default)]
struct PeftConfig {
    lora_alpha: Option<f64>,
    /// Module-name patterns with their own alpha, in the file's order (the first match wins).
    alpha_pattern: Vec<(String, f64)>,
    use_rslora: bool,
}

impl PeftConfigs {
    /// Parses `lora_adapter_metadata`: a JSON object of `<component>.<LoraConfig field>` keys.
    fn parse(text: &str) -> std::result::Result<Self, String> {
        let json: serde_json::Map<String, Value> = serde_json::from_str(text)
            .map_err(|e| format!("invalid `lora_adapter_metadata` JSON: {e}"))?;
        let mut by_target: HashMap<LoraTarget, PeftConfig> = HashMap::new();
        for (key, value) in &json {
            let Some((component, field)) = key.rsplit_once('.') else {
                continue;
            };
            let target = match component {
                "unet" => LoraTarget::Unet,
                "text_encoder" => LoraTarget::TextEncoder,
                "text_encoder_2" => LoraTarget::TextEncoder2,
                _ => continue,
            };
            let config = by_target.entry(target).or_default();
            match field {
                "lora_alpha" => config.lora_alpha = value.as_f64(),
                "use_rslora" => config.use_rslora = value.as_bool().unwrap_or(false),
                "use_dora" if value.as_bool() == Some(true) => {
                    return Err("DoRA adapters (`use_dora`) are not merged by sd-serve".into())
                }
                "alpha_pattern" => {
                    for (pattern, alpha) in value.as_object().into_iter().flatten() {
                        let alpha = alpha
                            .as_f64()
                            .ok_or_else(|| format!("alpha_pattern `{pattern}` is not a number"))?;
                        if pattern
                            .chars()
                            .any(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
                        {
                            return Err(format!(
                                "alpha_pattern `{pattern}` is a regular expression; only module \
                                 names and name suffixes are supported"
                            ));
                        }
                        config.alpha_pattern.push((pattern.clone(), alpha));
                    }
                }
                _ => {}
            }
        }
        Ok(Self { by_target })
    }

    /// `alpha / r` (or `alpha / sqrt(r)` with rsLoRA) of a module; `alpha = r` without a config.
    fn scale(&self, target: LoraTarget, module: &str, rank: usize) -> f64 {
        let Some(config) = self.by_target.get(&target) else {
            return 1.0;
        };
        // PEFT matches a pattern against the end of the module name, at a `.` boundary.
        let alpha = config
            .alpha_pattern
            .iter()
            .find(|(p, _)| module == p || module.ends_with(&format!(".{p}")))
            .map(|(_, a)| *a)
            .or(config.lora_alpha)
            .unwrap_or(rank as f64);
        let r = rank as f64;
        if config.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }
}

fn list(items: &[String]) -> String {
    let mut s = items
        .iter()
        .take(LISTED_KEYS)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > LISTED_KEYS {
        s.push_str(&format!(" and {} more", items.len() - LISTED_KEYS));
    }
    s
}

/// The weights of a model's components by their paths with `.` written `_`.
struct WeightIndex {
    /// `None` where two weights would share a key (then the key cannot be used).
    by_flat: HashMap<String, Option<String>>,
}

impl WeightIndex {
    fn new(store: &WeightStore) -> Self {
        let mut by_flat: HashMap<String, Option<String>> = HashMap::new();
        for name in store.names() {
            let Some(module) = name.strip_suffix(".weight") else {
                continue;
            };
            by_flat
                .entry(module.replace('.', "_"))
                .and_modify(|e| *e = None)
                .or_insert_with(|| Some(name.to_string()));
        }
        Self { by_flat }
    }

    fn get(&self, flat: &str) -> Option<&str> {
        self.by_flat.get(flat).and_then(|n| n.as_deref())
    }
}

/// The weight a module adapts, by its flattened path.
fn resolve(
    index: &WeightIndex,
    target: LoraTarget,
    path: &str,
    unet_layers_per_block: usize,
) -> Option<String> {
    if let Some(name) = index.get(path) {
        return Some(name.to_string());
    }
    match target {
        LoraTarget::Unet => {
            let diffusers = sgm_unet_path(path, unet_layers_per_block)?;
            index.get(&diffusers).map(str::to_string)
        }
        // transformers' own `CLIPTextModel` paths lack the `text_model.` root of published ones.
        LoraTarget::TextEncoder | LoraTarget::TextEncoder2 => {
            index.get(&format!("text_model_{path}")).map(str::to_string)
        }
    }
}

/// An SGM (original SDXL code) UNet module path, underscored, as the diffusers path, underscored:
/// `input_blocks_4_1_transformer_blocks_0_attn1_to_q` ->
/// `down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`.
fn sgm_unet_path(path: &str, layers_per_block: usize) -> Option<String> {
    // Modules outside the numbered blocks.
    const TOP: &[(&str, &str)] = &[
        ("time_embed_0", "time_embed.0"),
        ("time_embed_2", "time_embed.2"),
        ("label_emb_0_0", "label_emb.0.0"),
        ("label_emb_0_2", "label_emb.0.2"),
        ("input_blocks_0_0", "input_blocks.0.0"),
        ("out_0", "out.0"),
        ("out_2", "out.2"),
    ];
    let number = |s: &str| -> Option<(usize, String)> {
        let (n, rest) = s.split_once('_').unwrap_or((s, ""));
        Some((n.parse().ok()?, rest.to_string()))
    };
    let dotted = if let Some((_, ldm)) = TOP.iter().find(|(flat, _)| *flat == path) {
        ldm.to_string()
    } else if let Some(rest) = path.strip_prefix("middle_block_") {
        let (index, param) = number(rest)?;
        format!("middle_block.{index}.{}", sgm_param(&param))
    } else {
        let (section, rest) = ["input_blocks", "output_blocks"]
            .iter()
            .find_map(|s| Some((*s, path.strip_prefix(s)?.strip_prefix('_')?)))?;
        let (index, rest) = number(rest)?;
        let (layer, param) = number(&rest)?;
        format!("{section}.{index}.{layer}.{}", sgm_param(&param))
    };
    let diffusers = unet_key(&format!("{dotted}.weight"), layers_per_block)?;
    Some(diffusers.strip_suffix(".weight")?.replace('.', "_"))
}

/// The parameter part of an SGM resnet path with the dots `unet_key` expects
/// (`in_layers_2` -> `in_layers.2`); attention paths stay underscored.
fn sgm_param(param: &str) -> String {
    for numbered in ["in_layers_", "out_layers_", "emb_layers_"] {
        if let Some(n) = param.strip_prefix(numbered) {
            return format!("{}.{n}", &numbered[..numbered.len() - 1]);
        }
    }
    param.to_string()
}

/// One weight to rewrite and the LoRA layers that add to it.
struct Plan {
    target: LoraTarget,
    weight: String,
    /// (LoRA index, module index, user weight x alpha / r)
    terms: Vec<(usize, usize, f64)>,
}

/// LoRAs merged into a model's weights, with what is needed to take them out again exactly.
#[must_use = "dropping MergedLoras leaves the LoRAs merged with no way to take them out"]
#[derive(Debug)]
pub struct MergedLoras {
    /// The weights as they were before the merge (the very tensors, not copies).
    originals: Vec<(LoraTarget, String, Tensor)>,
    loras: Vec<(String, f64)>,
}

impl MergedLoras {
    /// Restores every weight the merge changed to its original tensor, bit for bit. `files` must
    /// be the files the merge was applied to.
    pub fn unmerge(self, files: &mut PipelineFiles) {
        for (target, name, tensor) in self.originals {
            store_mut(files, target)
                .expect("a merged component is still there; this is a bug")
                .insert(name, tensor);
        }
    }

    /// The merged LoRAs by name, with their weights.
    pub fn loras(&self) -> &[(String, f64)] {
        &self.loras
    }

    /// The weights the merge changed, by component.
    pub fn layers(&self) -> impl Iterator<Item = (LoraTarget, &str)> {
        self.originals.iter().map(|(t, n, _)| (*t, n.as_str()))
    }

    /// Bytes of the original weights kept for [`Self::unmerge`] (the memory a merge adds).
    pub fn backup_bytes(&self) -> usize {
        self.originals
            .iter()
            .map(|(_, _, t)| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

fn store_mut(files: &mut PipelineFiles, target: LoraTarget) -> Option<&mut WeightStore> {
    match target {
        LoraTarget::Unet => Some(&mut files.unet.weights),
        LoraTarget::TextEncoder => Some(&mut files.text_encoder.weights),
        LoraTarget::TextEncoder2 => files.text_encoder_2.as_mut().map(|c| &mut c.weights),
    }
}

fn store(files: &PipelineFiles, target: LoraTarget) -> Option<&WeightStore> {
    match target {
        LoraTarget::Unet => Some(&files.unet.weights),
        LoraTarget::TextEncoder => Some(&files.text_encoder.weights),
        LoraTarget::TextEncoder2 => files.text_encoder_2.as_ref().map(|c| &c.weights),
    }
}

/// Merges `loras`, each with its user weight (negative weights subtract), into the UNet and text
/// encoder weights of `files`.
///
/// Every layer of every LoRA must match a weight of the model with a fitting shape; otherwise
/// nothing is changed and the error lists the layers that did not fit. The returned value takes
/// the LoRAs out again ([`MergedLoras::unmerge`]); modules built from `files` before the merge do
/// not see it until they are rebuilt.
pub fn merge_loras(files: &mut PipelineFiles, loras: &[(&Lora, f64)]) -> Result<MergedLoras> {
    let plans = plan(files, loras)?;
    let mut originals = Vec::with_capacity(plans.len());
    for plan in plans {
        match merged_weight(files, loras, &plan) {
            Ok((original, merged)) => {
                let store =
                    store_mut(files, plan.target).expect("planned components exist; this is a bug");
                store.insert(plan.weight.clone(), merged);
                originals.push((plan.target, plan.weight, original));
            }
            Err(e) => {
                // Leave the model as it was.
                MergedLoras {
                    originals,
                    loras: Vec::new(),
                }
                .unmerge(files);
                return Err(e);
            }
        }
    }
    Ok(MergedLoras {
        originals,
        loras: loras.iter().map(|(l, w)| (l.name.clone(), *w)).collect(),
    })
}

/// Matches every LoRA layer to a weight and checks the shapes, without computing anything.
fn plan(files: &PipelineFiles, loras: &[(&Lora, f64)]) -> Result<Vec<Plan>> {
    let family = files.family;
    let layers_per_block = unet_layers_per_block(&files.unet.config);
    let mut indexes: HashMap<LoraTarget, WeightIndex> = HashMap::new();
    let mut plans: BTreeMap<(LoraTarget, String), Plan> = BTreeMap::new();
    for (li, (lora, weight)) in loras.iter().enumerate() {
        let fail = |msg: String| Error::model(format!("LoRA `{}`: {msg}", lora.name));
        if !weight.is_finite() {
            return Err(fail(format!("weight {weight} is not a finite number")));
        }
        if files.text_encoder_2.is_none() && lora.adapts_second_text_encoder() {
            return Err(fail(format!(
                "it adapts a second text encoder, so it is an SDXL LoRA, and the model is {family}"
            )));
        }
        let mut unmatched = Vec::new();
        let mut misfits = Vec::new();
        for (mi, module) in lora.modules.iter().enumerate() {
            let Some(store) = store(files, module.target) else {
                unmatched.push(module.key.clone());
                continue;
            };
            let index = indexes
                .entry(module.target)
                .or_insert_with(|| WeightIndex::new(store));
            let Some(name) = resolve(index, module.target, &module.path, layers_per_block) else {
                unmatched.push(module.key.clone());
                continue;
            };
            let w = store
                .get(&name)
                .expect("indexed weights exist; this is a bug");
            if let Err(why) = check_shape(module, w.dims()) {
                misfits.push(format!(
                    "{} -> {}.{name}: {why}",
                    module.key,
                    module.target.as_str()
                ));
                continue;
            }
            let plan = plans
                .entry((module.target, name.clone()))
                .or_insert_with(|| Plan {
                    target: module.target,
                    weight: name.clone(),
                    terms: Vec::new(),
                });
            if plan.terms.iter().any(|(l, _, _)| *l == li) {
                return Err(fail(format!(
                    "two of its layers adapt the same weight {}.{name} (one is `{}`)",
                    module.target.as_str(),
                    module.key
                )));
            }
            plan.terms.push((li, mi, weight * module.scale));
        }
        if !unmatched.is_empty() {
            unmatched.sort();
            return Err(fail(format!(
                "{} of its {} layers match no weight of this {family} model (is it a LoRA for \
                 another model family?): {}",
                unmatched.len(),
                lora.modules.len(),
                list(&unmatched)
            )));
        }
        if !misfits.is_empty() {
            return Err(fail(format!(
                "{} layer(s) do not fit the shapes of this {family} model (is it a LoRA for \
                 another model family?): {}",
                misfits.len(),
                list(&misfits)
            )));
        }
    }
    Ok(plans.into_values().collect())
}

/// Whether `up @ down` can be written as a weight of shape `dims` (a 1x1 convolution and a linear
/// layer take each other's updates).
fn check_shape(module: &LoraModule, dims: &[usize]) -> std::result::Result<(), String> {
    let out = module.up.dim(0).map_err(|e| e.to_string())?;
    let inputs = module.down.dim(1).map_err(|e| e.to_string())?;
    let fits = match dims {
        [o, i] => *o == out && *i == inputs,
        [o, i, kh, kw] => {
            *o == out
                && i * kh * kw == inputs
                && match module.down_shape.as_slice() {
                    [_, _, dh, dw] => (dh, dw) == (kh, kw),
                    _ => *kh == 1 && *kw == 1,
                }
        }
        _ => false,
    };
    if fits {
        Ok(())
    } else {
        Err(format!(
            "update [{out}, {:?}] for a weight of shape {dims:?}",
            &module.down_shape[1..]
        ))
    }
}

fn unet_layers_per_block(config: &Value) -> usize {
    match config.get("layers_per_block") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::Array(a)) => a.first().and_then(Value::as_u64),
        _ => None,
    }
    .unwrap_or(2) as usize
}

/// The original weight and the merged one, `f32(W) + sum of terms` rounded once to W's dtype.
fn merged_weight(
    files: &PipelineFiles,
    loras: &[(&Lora, f64)],
    plan: &Plan,
) -> Result<(Tensor, Tensor)> {
    let original = store(files, plan.target)
        .and_then(|s| s.get(&plan.weight))
        .expect("planned weights exist; this is a bug")
        .clone();
    let device = original.device();
    let mut delta: Option<Tensor> = None;
    for &(li, mi, factor) in &plan.terms {
        let module = &loras[li].0.modules[mi];
        let up = module.up.to_device(device)?;
        let down = module.down.to_device(device)?;
        let term = (up.matmul(&down)? * factor)?;
        delta = Some(match delta {
            None => term,
            Some(d) => (d + term)?,
        });
    }
    let delta = delta
        .expect("a planned weight has at least one term; this is a bug")
        .reshape(original.dims())?;
    let merged = (original.to_dtype(DType::F32)? + delta)?.to_dtype(original.dtype())?;
    Ok((original, merged))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgm_paths() {
        let cases = [
            (
                "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
            ),
            (
                "input_blocks_1_0_in_layers_2",
                "down_blocks_0_resnets_0_conv1",
            ),
            ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
            (
                "middle_block_0_emb_layers_1",
                "mid_block_resnets_0_time_emb_proj",
            ),
            ("middle_block_1_proj_in", "mid_block_attentions_0_proj_in"),
            (
                "output_blocks_3_0_skip_connection",
                "up_blocks_1_resnets_0_conv_shortcut",
            ),
            ("output_blocks_2_2_conv", "up_blocks_0_upsamplers_0_conv"),
            (
                "output_blocks_5_0_out_layers_3",
                "up_blocks_1_resnets_2_conv2",
            ),
            ("label_emb_0_0", "add_embedding_linear_1"),
            ("time_embed_2", "time_embedding_linear_2"),
            ("out_2", "conv_out"),
        ];
        for (sgm, diffusers) in cases {
            assert_eq!(sgm_unet_path(sgm, 2).as_deref(), Some(diffusers), "{sgm}");
        }
        assert_eq!(sgm_unet_path("down_blocks_0_attentions_0_proj_in", 2), None);
    }

    #[test]
    fn legacy_paths() {
        assert_eq!(
            legacy_module_path(
                LoraTarget::Unet,
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora"
            ),
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
        );
        assert_eq!(
            legacy_module_path(
                LoraTarget::TextEncoder,
                "text_model.encoder.layers.0.self_attn.to_k_lora"
            ),
            "text_model.encoder.layers.0.self_attn.k_proj"
        );
        assert_eq!(
            legacy_module_path(
                LoraTarget::TextEncoder,
                "text_model.encoder.layers.0.mlp.fc1"
            ),
            "text_model.encoder.layers.0.mlp.fc1"
        );
    }

    #[test]
    fn peft_alpha() {
        let configs = PeftConfigs::parse(
            r#"{"unet.lora_alpha": 8, "unet.r": 4, "unet.alpha_pattern": {"proj_in": 2},
                "text_encoder.lora_alpha": 16, "text_encoder.use_rslora": true}"#,
        )
        .unwrap();
        let unet = LoraTarget::Unet;
        assert_eq!(
            configs.scale(unet, "down_blocks.0.attentions.0.proj_in", 4),
            0.5
        );
        assert_eq!(
            configs.scale(unet, "down_blocks.0.attentions.0.xproj_in", 4),
            2.0
        );
        assert_eq!(
            configs.scale(LoraTarget::TextEncoder, "encoder.layers.0.mlp.fc1", 4),
            8.0
        );
        assert_eq!(configs.scale(LoraTarget::TextEncoder2, "x", 4), 1.0);
        assert!(PeftConfigs::parse(r#"{"unet.use_dora": true}"#).is_err());
        assert!(PeftConfigs::parse(r#"{"unet.alpha_pattern": {"to_.*": 3}}"#).is_err());
    }
}
