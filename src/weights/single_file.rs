//! Single-file checkpoints (the civitai distribution format) in the original LDM / SGM key layout.
//!
//! One `.safetensors` holds every component under the prefixes of the original training code
//! (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", and the
//! SGM code of Podell et al. 2023, "SDXL"):
//!
//! ```text
//! model.diffusion_model.*                 UNet      (input_blocks / middle_block / output_blocks)
//! first_stage_model.*                     VAE       (encoder.down / decoder.up / mid)
//! cond_stage_model.transformer.*          SD1 text encoder: OpenAI CLIP, HF transformers names
//! cond_stage_model.model.*                SD2 text encoder: OpenCLIP (transformer.resblocks.N)
//! conditioner.embedders.0.transformer.*   SDXL text encoder 1 (OpenAI CLIP)
//! conditioner.embedders.1.model.*         SDXL text encoder 2 (OpenCLIP ViT-bigG)
//! ```
//!
//! [`detect_family`] tells the family from those prefixes; the conversion renames every key to its
//! diffusers name by rules over the key's structure (block index arithmetic for the UNet, the
//! reversed up-block order of the VAE decoder, the fused attention projection of OpenCLIP split
//! into q/k/v). Keys no rule knows are counted and listed at debug level; a key a module needs
//! and the checkpoint lacks fails when that module is built.
//!
//! Pickle checkpoints (`.ckpt`, `.pt`, `.bin`) are refused: reading them can execute code.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::folder::{family_from_configs, max_positions, ModelIndex};
use super::tokenizer::load_tokenizer_dir;
use super::{read_json, Component, Family, MappedFiles, PipelineFiles, WeightStore};
use crate::{Error, Result};

const UNET_PREFIX: &str = "model.diffusion_model.";
const VAE_PREFIXES: &[&str] = &["first_stage_model.", "vae."];
const SD1_CLIP_PREFIX: &str = "cond_stage_model.transformer.";
const SD2_OPENCLIP_PREFIX: &str = "cond_stage_model.model.";
const SDXL_CLIP_PREFIX: &str = "conditioner.embedders.0.transformer.";
const SDXL_OPENCLIP_PREFIX: &str = "conditioner.embedders.1.model.";
const SDXL_REFINER_OPENCLIP_PREFIX: &str = "conditioner.embedders.0.model.";

/// Tells the model family from the key names of a single-file checkpoint.
///
/// SDXL: `conditioner.embedders.1.model.*` (OpenCLIP bigG beside the OpenAI CLIP);
/// SD2: `cond_stage_model.model.*` (OpenCLIP ViT-H); SD1: `cond_stage_model.transformer.*`.
/// Refiners, SD3 / Flux and files that are not full checkpoints (a LoRA, a lone VAE) get an
/// error saying what they look like.
pub fn detect_family<'a, I>(keys: I) -> Result<Family>
where
    I: IntoIterator<Item = &'a str>,
{
    let (mut unet, mut sd1, mut sd2, mut xl_clip, mut xl_big, mut refiner) =
        (false, false, false, false, false, false);
    let (mut lora, mut mmdit, mut vae, mut edm) = (false, false, false, false);
    for k in keys {
        unet |= k.starts_with(UNET_PREFIX);
        sd1 |= k.starts_with(SD1_CLIP_PREFIX);
        sd2 |= k.starts_with(SD2_OPENCLIP_PREFIX);
        xl_clip |= k.starts_with(SDXL_CLIP_PREFIX);
        xl_big |= k.starts_with(SDXL_OPENCLIP_PREFIX);
        refiner |= k.starts_with(SDXL_REFINER_OPENCLIP_PREFIX);
        lora |= k.starts_with("lora_") || k.contains(".lora_down.") || k.contains(".lora_A.");
        mmdit |= k.contains("joint_blocks.") || k.contains("double_blocks.");
        vae |= VAE_PREFIXES.iter().any(|p| k.starts_with(p)) || k.starts_with("encoder.down.");
        edm |= k == "edm_mean";
    }
    if mmdit {
        return Err(Error::model(
            "unsupported checkpoint: it has MMDiT transformer blocks (SD3 / Flux); sd-serve runs \
             Stable Diffusion 1.x, 2.x and SDXL UNet checkpoints",
        ));
    }
    if lora && !unet {
        return Err(Error::model(
            "this file is a LoRA, not a model checkpoint: load it as a LoRA on top of a model",
        ));
    }
    if !unet {
        let what = if vae {
            " (it looks like a standalone VAE)"
        } else {
            ""
        };
        return Err(Error::model(format!(
            "not a Stable Diffusion checkpoint: no `{UNET_PREFIX}*` UNet weights{what}"
        )));
    }
    if edm {
        return Err(Error::model(
            "unsupported checkpoint: EDM-parameterised SDXL (Playground v2.5) is not supported",
        ));
    }
    if xl_big || xl_clip {
        return Ok(Family::Sdxl);
    }
    if refiner {
        return Err(Error::model(
            "unsupported checkpoint: this is a single-file SDXL refiner (only the OpenCLIP bigG \
             encoder, `conditioner.embedders.0.model.*`); single-file refiners are not supported \
             yet: use the refiner's diffusers folder or hub repo \
             (stabilityai/stable-diffusion-xl-refiner-1.0)",
        ));
    }
    if sd2 {
        return Ok(Family::Sd2);
    }
    if sd1 {
        return Ok(Family::Sd1);
    }
    Err(Error::model(
        "checkpoint has UNet weights but no text encoder (`cond_stage_model.*` or \
         `conditioner.embedders.*`); sd-serve needs full single-file checkpoints",
    ))
}

/// The family of a single-file checkpoint, reading only its header.
pub fn single_file_family(path: &Path) -> Result<Family> {
    let files = MappedFiles::open(&[path.to_path_buf()])?;
    let shapes = files.shapes();
    detect_family(shapes.iter().map(|(k, _)| k.as_str()))
}

/// Which component a converted tensor belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    Unet,
    Vae,
    TextEncoder,
    TextEncoder2,
}

/// How a checkpoint tensor becomes diffusers tensors.
#[derive(Debug, Clone, PartialEq)]
pub enum Conversion {
    /// Same values under a new name.
    Rename(String),
    /// A 1x1 convolution kernel used as a linear layer (VAE mid attention): trailing unit dims
    /// dropped.
    ToLinear(String),
    /// OpenCLIP's `text_projection` is applied as `x @ P`; a linear layer stores `P^T`.
    Transpose(String),
    /// OpenCLIP's fused `in_proj` split into equal q, k, v thirds along dim 0.
    SplitQkv([String; 3]),
}

/// What the conversion needs to know about the target models.
#[derive(Debug, Clone)]
pub struct ConversionContext {
    pub family: Family,
    /// UNet `layers_per_block` (LDM numbers down-block layers consecutively).
    pub unet_layers_per_block: usize,
    /// Number of VAE decoder up blocks (LDM numbers them in reverse).
    pub vae_up_blocks: usize,
    /// Layers of the OpenCLIP encoder that the diffusers model keeps (SD2 drops the last one).
    pub openclip_layers: usize,
}

impl ConversionContext {
    fn from_configs(
        family: Family,
        unet: &Value,
        vae: &Value,
        openclip: Option<&Value>,
    ) -> Result<Self> {
        let layers_per_block = match unet.get("layers_per_block") {
            Some(Value::Number(n)) => n.as_u64(),
            // A per-block list is only used by other UNets; SD checkpoints share one value.
            Some(Value::Array(a)) => a.first().and_then(Value::as_u64),
            _ => Some(2),
        }
        .ok_or_else(|| Error::model("UNet config: `layers_per_block` must be an integer"))?;
        let vae_up_blocks = vae
            .get("up_block_types")
            .or_else(|| vae.get("block_out_channels"))
            .and_then(Value::as_array)
            .map(|a| a.len())
            .unwrap_or(4);
        let openclip_layers = openclip
            .and_then(|c| c.get("num_hidden_layers"))
            .and_then(Value::as_u64)
            .map(|n| n as usize)
            .unwrap_or(usize::MAX);
        Ok(Self {
            family,
            unet_layers_per_block: layers_per_block as usize,
            vae_up_blocks,
            openclip_layers,
        })
    }
}

/// Maps one checkpoint key to its component and conversion; `None` for keys sd-serve does not
/// use (EMA copies, LDM noise-schedule buffers, unknown extras).
pub fn convert_key(key: &str, ctx: &ConversionContext) -> Option<(Target, Conversion)> {
    if let Some(rest) = key.strip_prefix(UNET_PREFIX) {
        return unet_key(rest, ctx.unet_layers_per_block)
            .map(|k| (Target::Unet, Conversion::Rename(k)));
    }
    if let Some(rest) = VAE_PREFIXES.iter().find_map(|p| key.strip_prefix(p)) {
        return vae_key(rest, ctx.vae_up_blocks);
    }
    match ctx.family {
        Family::Sd1 => key
            .strip_prefix(SD1_CLIP_PREFIX)
            .and_then(clip_key)
            .map(|k| (Target::TextEncoder, Conversion::Rename(k))),
        Family::Sd2 => key
            .strip_prefix(SD2_OPENCLIP_PREFIX)
            .and_then(|r| openclip_key(r, ctx.openclip_layers, false))
            .map(|c| (Target::TextEncoder, c)),
        // Never reached: `detect_family` refuses single-file refiners.
        Family::SdxlRefiner => None,
        Family::Sdxl => {
            if let Some(rest) = key.strip_prefix(SDXL_CLIP_PREFIX) {
                clip_key(rest).map(|k| (Target::TextEncoder, Conversion::Rename(k)))
            } else {
                key.strip_prefix(SDXL_OPENCLIP_PREFIX)
                    .and_then(|r| openclip_key(r, ctx.openclip_layers, true))
                    .map(|c| (Target::TextEncoder2, c))
            }
        }
    }
}

/// Splits `a.b.rest` into (`a`, `b`, `rest`) where `b` is a number.
fn split_indexed(s: &str) -> Option<(&str, usize, &str)> {
    let (head, tail) = s.split_once('.')?;
    let (idx, rest) = tail.split_once('.').unwrap_or((tail, ""));
    Some((head, idx.parse().ok()?, rest))
}

/// LDM `ResBlock` parameter names -> diffusers `ResnetBlock2D` names.
fn unet_resnet_param(p: &str) -> String {
    const RULES: &[(&str, &str)] = &[
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ];
    for (from, to) in RULES {
        if let Some(rest) = p.strip_prefix(from) {
            return format!("{to}{rest}");
        }
    }
    p.to_string()
}

/// UNet key (without `model.diffusion_model.`) -> diffusers name.
///
/// `input_blocks.0` is `conv_in`; after it, each down block has `layers_per_block` layers
/// (`.0` resnet, `.1` attention) and, except the last block, one more layer holding the
/// downsampler (`.0.op`). Each up block has `layers_per_block + 1` layers; its upsampler (`.N.conv`)
/// sits after the resnet and the attention, if any, of its last layer.
pub(crate) fn unet_key(rest: &str, layers_per_block: usize) -> Option<String> {
    const TOP: &[(&str, &str)] = &[
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ];
    for (from, to) in TOP {
        if let Some(p) = rest.strip_prefix(from) {
            return Some(format!("{to}{p}"));
        }
    }
    let (section, index, tail) = split_indexed(rest)?;
    // Inside input and output blocks, `tail` is `<layer>.<param>`.
    let layer_param = || -> Option<(usize, &str)> {
        let (layer, param) = tail.split_once('.')?;
        Some((layer.parse().ok()?, param))
    };
    match section {
        "input_blocks" => {
            let (layer, param) = layer_param()?;
            let i = index.checked_sub(1)?;
            let (block, pos) = (i / (layers_per_block + 1), i % (layers_per_block + 1));
            match layer {
                0 => match param.strip_prefix("op.") {
                    Some(p) => Some(format!("down_blocks.{block}.downsamplers.0.conv.{p}")),
                    None => Some(format!(
                        "down_blocks.{block}.resnets.{pos}.{}",
                        unet_resnet_param(param)
                    )),
                },
                1 => Some(format!("down_blocks.{block}.attentions.{pos}.{param}")),
                _ => None,
            }
        }
        "middle_block" => match index {
            0 | 2 => Some(format!(
                "mid_block.resnets.{}.{}",
                index / 2,
                unet_resnet_param(tail)
            )),
            1 => Some(format!("mid_block.attentions.0.{tail}")),
            _ => None,
        },
        "output_blocks" => {
            let (layer, param) = layer_param()?;
            let (block, pos) = (
                index / (layers_per_block + 1),
                index % (layers_per_block + 1),
            );
            match (layer, param.strip_prefix("conv.")) {
                (0, _) => Some(format!(
                    "up_blocks.{block}.resnets.{pos}.{}",
                    unet_resnet_param(param)
                )),
                (1 | 2, Some(p)) => Some(format!("up_blocks.{block}.upsamplers.0.conv.{p}")),
                (1, None) => Some(format!("up_blocks.{block}.attentions.{pos}.{param}")),
                _ => None,
            }
        }
        _ => None,
    }
}

/// VAE key (without `first_stage_model.`) -> component and conversion.
fn vae_key(rest: &str, up_blocks: usize) -> Option<(Target, Conversion)> {
    let rename = |k: String| Some((Target::Vae, Conversion::Rename(k)));
    for direct in ["quant_conv.", "post_quant_conv."] {
        if rest.starts_with(direct) {
            return rename(rest.to_string());
        }
    }
    let (coder, tail) = rest.split_once('.')?;
    if coder != "encoder" && coder != "decoder" {
        return None;
    }
    let resnet_param = |p: &str| match p.strip_prefix("nin_shortcut.") {
        Some(r) => format!("conv_shortcut.{r}"),
        None => p.to_string(),
    };
    for same in ["conv_in.", "conv_out."] {
        if tail.starts_with(same) {
            return rename(format!("{coder}.{tail}"));
        }
    }
    if let Some(p) = tail.strip_prefix("norm_out.") {
        return rename(format!("{coder}.conv_norm_out.{p}"));
    }
    if let Some(mid) = tail.strip_prefix("mid.") {
        if let Some(p) = mid.strip_prefix("block_1.") {
            return rename(format!("{coder}.mid_block.resnets.0.{}", resnet_param(p)));
        }
        if let Some(p) = mid.strip_prefix("block_2.") {
            return rename(format!("{coder}.mid_block.resnets.1.{}", resnet_param(p)));
        }
        let p = mid.strip_prefix("attn_1.")?;
        let (module, param) = p.split_once('.')?;
        let new = match module {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        let name = format!("{coder}.mid_block.attentions.0.{new}.{param}");
        return Some((Target::Vae, Conversion::ToLinear(name)));
    }
    let (section, index, inner) = split_indexed(tail)?;
    match (coder, section) {
        ("encoder", "down") => {
            if let Some(p) = inner.strip_prefix("downsample.conv.") {
                return rename(format!(
                    "encoder.down_blocks.{index}.downsamplers.0.conv.{p}"
                ));
            }
            let (_, j, p) = split_indexed(inner).filter(|(b, _, _)| *b == "block")?;
            rename(format!(
                "encoder.down_blocks.{index}.resnets.{j}.{}",
                resnet_param(p)
            ))
        }
        ("decoder", "up") => {
            // LDM counts decoder levels from the lowest resolution up; diffusers in run order.
            let block = up_blocks.checked_sub(1)?.checked_sub(index)?;
            if let Some(p) = inner.strip_prefix("upsample.conv.") {
                return rename(format!("decoder.up_blocks.{block}.upsamplers.0.conv.{p}"));
            }
            let (_, j, p) = split_indexed(inner).filter(|(b, _, _)| *b == "block")?;
            rename(format!(
                "decoder.up_blocks.{block}.resnets.{j}.{}",
                resnet_param(p)
            ))
        }
        _ => None,
    }
}

/// OpenAI CLIP keys are already transformers names; only the `text_model.` root is ensured
/// (some exports omit it). The `position_ids` buffer is not a weight.
fn clip_key(rest: &str) -> Option<String> {
    let k = if rest.starts_with("text_model.") {
        rest.to_string()
    } else {
        format!("text_model.{rest}")
    };
    (!k.ends_with("position_ids")).then_some(k)
}

/// OpenCLIP text tower key (without its prefix) -> transformers CLIP conversion.
fn openclip_key(rest: &str, kept_layers: usize, with_projection: bool) -> Option<Conversion> {
    let rename = |k: &str| Some(Conversion::Rename(k.to_string()));
    match rest {
        "token_embedding.weight" => return rename("text_model.embeddings.token_embedding.weight"),
        "positional_embedding" => return rename("text_model.embeddings.position_embedding.weight"),
        "ln_final.weight" => return rename("text_model.final_layer_norm.weight"),
        "ln_final.bias" => return rename("text_model.final_layer_norm.bias"),
        // SD2 uses the hidden states only; SDXL's second encoder projects the pooled output.
        "text_projection" if with_projection => {
            return Some(Conversion::Transpose("text_projection.weight".to_string()))
        }
        _ => {}
    }
    let block = rest.strip_prefix("transformer.resblocks.")?;
    let (n, param) = block.split_once('.')?;
    let n: usize = n.parse().ok()?;
    if n >= kept_layers {
        return None;
    }
    let layer = format!("text_model.encoder.layers.{n}");
    let qkv = |suffix: &str| {
        Some(Conversion::SplitQkv(
            ["q", "k", "v"].map(|p| format!("{layer}.self_attn.{p}_proj.{suffix}")),
        ))
    };
    const RULES: &[(&str, &str)] = &[
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("attn.out_proj.", "self_attn.out_proj."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
    ];
    match param {
        "attn.in_proj_weight" => qkv("weight"),
        "attn.in_proj_bias" => qkv("bias"),
        _ => RULES.iter().find_map(|(from, to)| {
            param
                .strip_prefix(from)
                .map(|p| Conversion::Rename(format!("{layer}.{to}{p}")))
        }),
    }
}

/// Keys of the original training code that carry no inference weights.
fn is_known_unused(key: &str) -> bool {
    const BUFFERS: &[&str] = &[
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "v_pred",
        "ztsnr",
    ];
    key.starts_with("model_ema.")
        || BUFFERS.contains(&key)
        || key.ends_with("position_ids")
        || key.ends_with(".logit_scale")
        || key.ends_with(".attn_mask")
        || key == format!("{SD2_OPENCLIP_PREFIX}text_projection")
        || key.starts_with(SD2_OPENCLIP_PREFIX) && key.contains("transformer.resblocks.")
        || key.starts_with(SDXL_OPENCLIP_PREFIX) && key.contains("transformer.resblocks.")
}

/// Built-in configs of the reference model of each family (stable-diffusion-v1-5,
/// stable-diffusion-2-1, stable-diffusion-xl-base-1.0), used when no config folder is given.
struct BuiltinConfigs {
    unet: &'static str,
    vae: &'static str,
    text_encoder: &'static str,
    text_encoder_2: Option<&'static str>,
    scheduler: &'static str,
}

fn builtin(family: Family) -> BuiltinConfigs {
    match family {
        Family::Sd1 => BuiltinConfigs {
            unet: include_str!("configs/sd15/unet.json"),
            vae: include_str!("configs/sd15/vae.json"),
            text_encoder: include_str!("configs/sd15/text_encoder.json"),
            text_encoder_2: None,
            scheduler: include_str!("configs/sd15/scheduler.json"),
        },
        Family::Sd2 => BuiltinConfigs {
            unet: include_str!("configs/sd21/unet.json"),
            vae: include_str!("configs/sd21/vae.json"),
            text_encoder: include_str!("configs/sd21/text_encoder.json"),
            text_encoder_2: None,
            scheduler: include_str!("configs/sd21/scheduler.json"),
        },
        // Refiners have no built-in single-file configs (`detect_family` refuses them); a
        // refiner family declared for an SDXL file reads as SDXL here and fails its load check.
        Family::Sdxl | Family::SdxlRefiner => BuiltinConfigs {
            unet: include_str!("configs/sdxl/unet.json"),
            vae: include_str!("configs/sdxl/vae.json"),
            text_encoder: include_str!("configs/sdxl/text_encoder.json"),
            text_encoder_2: Some(include_str!("configs/sdxl/text_encoder_2.json")),
            scheduler: include_str!("configs/sdxl/scheduler.json"),
        },
    }
}

fn parse_builtin(text: &str) -> Value {
    serde_json::from_str(text).expect("built-in configs are valid JSON; this is a bug")
}

/// The built-in config of one component of `family` (`unet`, `vae`, `text_encoder`,
/// `text_encoder_2`, `scheduler`), as shipped with sd-serve.
pub fn builtin_config(family: Family, component: &str) -> Option<Value> {
    let b = builtin(family);
    let text = match component {
        "unet" => b.unet,
        "vae" => b.vae,
        "text_encoder" => b.text_encoder,
        "text_encoder_2" => b.text_encoder_2?,
        "scheduler" => b.scheduler,
        _ => return None,
    };
    Some(parse_builtin(text))
}

/// Configs for a checkpoint: from `config_dir` where it has them, else built in.
struct Configs {
    unet: Value,
    vae: Value,
    text_encoder: Value,
    text_encoder_2: Option<Value>,
    scheduler: Value,
    /// `force_zeros_for_empty_prompt` of the config folder's `model_index.json`, if set.
    force_zeros_for_empty_prompt: Option<bool>,
    /// True when the configs came from the built-in set (then checkpoint markers may adjust them).
    builtin: bool,
}

fn configs_for(family: Family, config_dir: Option<&Path>) -> Result<Configs> {
    let Some(dir) = config_dir else {
        return Ok(Configs {
            unet: builtin_config(family, "unet").expect("unet config exists; this is a bug"),
            vae: builtin_config(family, "vae").expect("vae config exists; this is a bug"),
            text_encoder: builtin_config(family, "text_encoder")
                .expect("text encoder config exists; this is a bug"),
            text_encoder_2: builtin_config(family, "text_encoder_2"),
            scheduler: builtin_config(family, "scheduler")
                .expect("scheduler config exists; this is a bug"),
            force_zeros_for_empty_prompt: None,
            builtin: true,
        });
    };
    if !dir.is_dir() {
        return Err(Error::model(format!(
            "config folder {} does not exist",
            dir.display()
        )));
    }
    let read = |rel: &str| -> Result<Value> {
        let p = dir.join(rel);
        if !p.is_file() {
            return Err(Error::model(format!("missing config file {}", p.display())));
        }
        read_json(&p)
    };
    let index = ModelIndex::read(dir)?;
    let unet = read("unet/config.json")?;
    let text_encoder = read("text_encoder/config.json")?;
    let text_encoder_2 = if index.has("text_encoder_2") {
        Some(read("text_encoder_2/config.json")?)
    } else {
        None
    };
    let dir_family = family_from_configs(text_encoder_2.is_some(), &unet, &text_encoder);
    if dir_family != family {
        return Err(Error::model(format!(
            "the checkpoint is {family} but the config folder {} describes a {dir_family} model",
            dir.display()
        )));
    }
    Ok(Configs {
        unet,
        vae: read("vae/config.json")?,
        text_encoder,
        text_encoder_2,
        scheduler: read("scheduler/scheduler_config.json")?,
        force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt,
        builtin: false,
    })
}

/// Adjusts built-in configs to what the checkpoint itself says.
fn adapt_builtin_configs(configs: &mut Configs, shapes: &HashMap<String, Vec<usize>>) {
    // Inpainting UNets take 9 input channels (latents + mask + masked-image latents).
    if let Some(shape) = shapes.get("model.diffusion_model.input_blocks.0.0.weight") {
        if let (Some(&c), Some(obj)) = (shape.get(1), configs.unet.as_object_mut()) {
            obj.insert("in_channels".into(), c.into());
        }
    }
    let sched = configs
        .scheduler
        .as_object_mut()
        .expect("built-in scheduler config is an object; this is a bug");
    // Some v-prediction fine-tunes (mostly SDXL) mark themselves with empty `v_pred` / `ztsnr`
    // tensors, read by ComfyUI-style loaders.
    if shapes.contains_key("v_pred") {
        sched.insert("prediction_type".into(), "v_prediction".into());
    }
    if shapes.contains_key("ztsnr") {
        sched.insert("rescale_betas_zero_snr".into(), true.into());
    }
}

/// Loads a single-file checkpoint with configs and tokenizers from `config_dir` (a diffusers
/// folder describing the same model, like diffusers' `from_single_file(config=...)`).
///
/// With `config_dir = None` the built-in configs of the detected family are used, but a
/// tokenizer is still needed: use [`load_single_file_with_tokenizers`] (the registry fetches the
/// family's reference repo's tokenizer folders for a `file` entry without `config`).
pub fn load_single_file(
    path: &Path,
    config_dir: Option<&Path>,
    device: &Device,
    dtype: DType,
) -> Result<PipelineFiles> {
    load_single_file_with_tokenizers(path, config_dir, None, device, dtype)
}

/// Like [`load_single_file`], with the tokenizer folders (`tokenizer/`, and `tokenizer_2/` for
/// SDXL) taken from `tokenizer_dir` when given, else from `config_dir`.
///
/// Without `config_dir` the SD2 configs are those of stable-diffusion-2-1 (768 px,
/// v-prediction), as diffusers does for safetensors files, which carry no training step to tell
/// the 512 px epsilon base model apart; a registry entry can override `prediction_type`.
pub fn load_single_file_with_tokenizers(
    path: &Path,
    config_dir: Option<&Path>,
    tokenizer_dir: Option<&Path>,
    device: &Device,
    dtype: DType,
) -> Result<PipelineFiles> {
    let files = MappedFiles::open(&[path.to_path_buf()])?;
    let shapes: HashMap<String, Vec<usize>> = files.shapes().into_iter().collect();
    let family = detect_family(shapes.keys().map(String::as_str))?;
    let mut configs = configs_for(family, config_dir)?;
    if configs.builtin {
        adapt_builtin_configs(&mut configs, &shapes);
    }
    let openclip_config = match family {
        Family::Sd1 => None,
        Family::Sd2 => Some(&configs.text_encoder),
        Family::Sdxl | Family::SdxlRefiner => configs.text_encoder_2.as_ref(),
    };
    let ctx =
        ConversionContext::from_configs(family, &configs.unet, &configs.vae, openclip_config)?;

    let mut stores: HashMap<Target, WeightStore> = HashMap::new();
    let mut unknown: Vec<&str> = Vec::new();
    let mut names: Vec<&String> = shapes.keys().collect();
    names.sort();
    for key in names {
        let Some((target, conversion)) = convert_key(key, &ctx) else {
            if !is_known_unused(key) {
                unknown.push(key);
            }
            continue;
        };
        let t = files.load(key, device, dtype)?;
        let store = stores.entry(target).or_default();
        for (name, tensor) in apply(conversion, t, key)? {
            store.insert(name, tensor);
        }
    }
    log_unused_keys(path, &unknown);

    let mut take = |t: Target| stores.remove(&t).unwrap_or_default();
    let unet = Component {
        config: configs.unet,
        weights: take(Target::Unet),
    };
    let vae = Component {
        config: configs.vae,
        weights: take(Target::Vae),
    };
    let text_encoder = Component {
        config: configs.text_encoder,
        weights: take(Target::TextEncoder),
    };
    let te2_weights = take(Target::TextEncoder2);
    let text_encoder_2 = configs.text_encoder_2.map(|config| Component {
        config,
        weights: te2_weights,
    });

    let tok_root = tokenizer_dir.or(config_dir).ok_or_else(|| {
        Error::model(format!(
            "single-file checkpoint {} needs a tokenizer: give it a `config` (a diffusers folder \
             or hub repo of the same model family) in models.toml",
            path.display()
        ))
    })?;
    let tokenizer = load_tokenizer_dir(
        &tok_root.join("tokenizer"),
        max_positions(&text_encoder.config),
    )?;
    let tokenizer_2 = match &text_encoder_2 {
        Some(te2) => {
            let dir = tok_root.join("tokenizer_2");
            let dir = if dir.is_dir() {
                dir
            } else {
                tok_root.join("tokenizer")
            };
            Some(load_tokenizer_dir(&dir, max_positions(&te2.config))?)
        }
        None => None,
    };
    tracing::info!(
        "loaded {family} single-file checkpoint {} ({} configs)",
        path.display(),
        if configs.builtin {
            "built-in"
        } else {
            "folder"
        }
    );
    Ok(PipelineFiles {
        family,
        unet,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        scheduler_config: configs.scheduler,
        force_zeros_for_empty_prompt: configs
            .force_zeros_for_empty_prompt
            .unwrap_or(family == Family::Sdxl),
    })
}

/// Loads a standalone VAE file, as VAEs are distributed apart from checkpoints
/// (`vae-ft-mse-840000-ema-pruned.safetensors`): keys in the original LDM layout
/// (`encoder.down.0.block.0.conv1.weight`, `decoder.up.3...`, `quant_conv`, `post_quant_conv`),
/// with or without the `first_stage_model.` prefix of a full checkpoint, or already in diffusers
/// names. `config` is the `AutoencoderKL` config describing it (the decoder's up-block count
/// decides how LDM's reversed levels are renumbered). Keys of neither coder (training losses,
/// EMA bookkeeping) are skipped and listed at debug level.
pub fn load_vae_file(
    path: &Path,
    config: Value,
    device: &Device,
    dtype: DType,
) -> Result<Component> {
    let files = MappedFiles::open(&[path.to_path_buf()])?;
    let mut names: Vec<String> = files.shapes().into_iter().map(|(k, _)| k).collect();
    names.sort();
    let up_blocks = config
        .get("up_block_types")
        .or_else(|| config.get("block_out_channels"))
        .and_then(Value::as_array)
        .map_or(4, Vec::len);
    let strip = |k: &str| -> String {
        VAE_PREFIXES
            .iter()
            .find_map(|p| k.strip_prefix(p))
            .unwrap_or(k)
            .to_string()
    };
    let diffusers_names = names
        .iter()
        .any(|k| strip(k).starts_with("encoder.down_blocks."));
    let mut weights = WeightStore::default();
    let mut unknown: Vec<&str> = Vec::new();
    for key in &names {
        let rest = strip(key);
        let conversion = if diffusers_names {
            ["encoder.", "decoder.", "quant_conv.", "post_quant_conv."]
                .iter()
                .any(|p| rest.starts_with(p))
                .then(|| Conversion::Rename(rest.clone()))
        } else {
            vae_key(&rest, up_blocks).map(|(_, c)| c)
        };
        let Some(conversion) = conversion else {
            unknown.push(key);
            continue;
        };
        let t = files.load(key, device, dtype)?;
        for (name, tensor) in apply(conversion, t, key)? {
            weights.insert(name, tensor);
        }
    }
    if weights.is_empty() {
        return Err(Error::model(format!(
            "{} holds no VAE weights: expected `encoder.*` and `decoder.*` keys (LDM or diffusers \
             names, optionally under `first_stage_model.`)",
            path.display()
        )));
    }
    log_unused_keys(path, &unknown);
    Ok(Component { config, weights })
}

/// The prefix of the ControlNet in the original ControlNet checkpoints (`control_sd15_canny.pth`
/// and its safetensors conversions); standalone files (`control_v11p_sd15_canny`) may lack it.
const CONTROLNET_PREFIX: &str = "control_model.";

/// The diffusers name of a key of an original-layout ControlNet (without `control_model.`):
/// the UNet encoder's keys as [`unet_key`] maps them, plus the ControlNet's own modules:
/// `input_hint_block.0` / `.2k` / the last one (`hint_last`) are the conditioning embedding's
/// `conv_in`, `blocks.{k-1}` and `conv_out` (the SiLUs between them hold no weights);
/// `zero_convs.N.0` is `controlnet_down_blocks.N`; `middle_block_out.0` is
/// `controlnet_mid_block`.
pub(crate) fn controlnet_key(
    rest: &str,
    layers_per_block: usize,
    hint_last: usize,
) -> Option<String> {
    if let Some(tail) = rest.strip_prefix("input_hint_block.") {
        let (index, param) = tail.split_once('.')?;
        let index: usize = index.parse().ok()?;
        return match index {
            0 => Some(format!("controlnet_cond_embedding.conv_in.{param}")),
            i if i == hint_last => Some(format!("controlnet_cond_embedding.conv_out.{param}")),
            i if i % 2 == 0 => Some(format!(
                "controlnet_cond_embedding.blocks.{}.{param}",
                i / 2 - 1
            )),
            _ => None,
        };
    }
    if let Some(tail) = rest.strip_prefix("zero_convs.") {
        let (index, tail) = tail.split_once('.')?;
        let param = tail.strip_prefix("0.")?;
        let index: usize = index.parse().ok()?;
        return Some(format!("controlnet_down_blocks.{index}.{param}"));
    }
    if let Some(param) = rest.strip_prefix("middle_block_out.0.") {
        return Some(format!("controlnet_mid_block.{param}"));
    }
    if rest.starts_with("output_blocks.") || rest.starts_with("out.") {
        return None;
    }
    unet_key(rest, layers_per_block)
}

/// Loads a ControlNet file in the original layout of the ControlNet code (Zhang et al.'s
/// `control_*.pth`, converted to safetensors): the UNet encoder under its LDM names
/// (`input_blocks`, `middle_block`, `time_embed`, `label_emb`), the control image's embedding
/// (`input_hint_block`), the zero convolutions (`zero_convs`, `middle_block_out`), all with or
/// without the `control_model.` prefix (with it, the file's other keys, e.g. a whole SD model
/// beside the ControlNet, are skipped). A file already in diffusers' names loads as it is.
/// `config` is the diffusers `ControlNetModel` config describing it (`layers_per_block`
/// decides the encoder's block numbering).
pub fn load_controlnet_file(
    path: &Path,
    config: Value,
    device: &Device,
    dtype: DType,
) -> Result<Component> {
    let files = MappedFiles::open(&[path.to_path_buf()])?;
    let mut names: Vec<String> = files.shapes().into_iter().map(|(k, _)| k).collect();
    names.sort();
    let layers_per_block = match config.get("layers_per_block") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::Array(a)) => a.first().and_then(Value::as_u64),
        _ => Some(2),
    }
    .ok_or_else(|| Error::model("ControlNet config: `layers_per_block` must be an integer"))?
        as usize;
    let prefixed = names.iter().any(|k| k.starts_with(CONTROLNET_PREFIX));
    let strip = |k: &str| -> Option<String> {
        if prefixed {
            k.strip_prefix(CONTROLNET_PREFIX).map(str::to_string)
        } else {
            Some(k.to_string())
        }
    };
    let diffusers_names = names
        .iter()
        .filter_map(|k| strip(k))
        .any(|k| k.starts_with("controlnet_cond_embedding."));
    let hint_last = names
        .iter()
        .filter_map(|k| strip(k))
        .filter_map(|k| {
            let tail = k.strip_prefix("input_hint_block.")?;
            tail.split_once('.')?.0.parse::<usize>().ok()
        })
        .max()
        .unwrap_or(0);
    let mut weights = WeightStore::default();
    let mut unknown: Vec<&str> = Vec::new();
    for key in &names {
        let Some(rest) = strip(key) else {
            continue;
        };
        let name = if diffusers_names {
            Some(rest)
        } else {
            controlnet_key(&rest, layers_per_block, hint_last)
        };
        let Some(name) = name else {
            unknown.push(key);
            continue;
        };
        weights.insert(name, files.load(key, device, dtype)?);
    }
    if !diffusers_names && (hint_last == 0 || weights.is_empty()) {
        return Err(Error::model(format!(
            "{} holds no ControlNet: expected `input_hint_block.*`, `zero_convs.*` and \
             `input_blocks.*` keys (optionally under `control_model.`) or diffusers' \
             `controlnet_cond_embedding.*` names",
            path.display()
        )));
    }
    log_unused_keys(path, &unknown);
    Ok(Component { config, weights })
}

/// Logs (at debug level) the keys of a checkpoint that no conversion used, the first 20 named.
fn log_unused_keys(path: &Path, unknown: &[&str]) {
    if unknown.is_empty() {
        return;
    }
    let shown = unknown
        .iter()
        .take(20)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    let more = if unknown.len() > 20 { ", ..." } else { "" };
    tracing::debug!(
        "{}: {} keys not used: {shown}{more}",
        path.display(),
        unknown.len()
    );
}

/// Applies a conversion to a loaded tensor.
fn apply(conversion: Conversion, t: Tensor, key: &str) -> Result<Vec<(String, Tensor)>> {
    Ok(match conversion {
        Conversion::Rename(name) => vec![(name, t)],
        Conversion::ToLinear(name) => {
            let dims = t.dims().to_vec();
            let t = if dims.len() > 2 && dims[2..].iter().all(|&d| d == 1) {
                t.reshape(&dims[..2])?
            } else {
                t
            };
            vec![(name, t)]
        }
        Conversion::Transpose(name) => vec![(name, t.t()?.contiguous()?)],
        Conversion::SplitQkv(names) => {
            let rows = t.dim(0)?;
            if rows % 3 != 0 {
                return Err(Error::model(format!(
                    "`{key}` has {rows} rows, not a multiple of 3 (fused q/k/v projection)"
                )));
            }
            let n = rows / 3;
            let [q, k, v] = names;
            vec![
                (q, t.narrow(0, 0, n)?.contiguous()?),
                (k, t.narrow(0, n, n)?.contiguous()?),
                (v, t.narrow(0, 2 * n, n)?.contiguous()?),
            ]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(family: Family) -> ConversionContext {
        ConversionContext {
            family,
            unet_layers_per_block: 2,
            vae_up_blocks: 4,
            openclip_layers: 23,
        }
    }

    fn renamed(key: &str, family: Family) -> String {
        match convert_key(key, &ctx(family)) {
            Some((_, Conversion::Rename(n))) | Some((_, Conversion::ToLinear(n))) => n,
            other => panic!("{key}: {other:?}"),
        }
    }

    #[test]
    fn controlnet_keys() {
        let cases = [
            (
                "input_hint_block.0.weight",
                "controlnet_cond_embedding.conv_in.weight",
            ),
            (
                "input_hint_block.2.bias",
                "controlnet_cond_embedding.blocks.0.bias",
            ),
            (
                "input_hint_block.12.weight",
                "controlnet_cond_embedding.blocks.5.weight",
            ),
            (
                "input_hint_block.14.weight",
                "controlnet_cond_embedding.conv_out.weight",
            ),
            ("zero_convs.11.0.weight", "controlnet_down_blocks.11.weight"),
            ("middle_block_out.0.bias", "controlnet_mid_block.bias"),
            ("time_embed.0.weight", "time_embedding.linear_1.weight"),
            ("input_blocks.0.0.weight", "conv_in.weight"),
            (
                "input_blocks.4.0.in_layers.2.weight",
                "down_blocks.1.resnets.0.conv1.weight",
            ),
            (
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            ),
            (
                "middle_block.2.out_layers.3.bias",
                "mid_block.resnets.1.conv2.bias",
            ),
        ];
        for (from, to) in cases {
            assert_eq!(controlnet_key(from, 2, 14).as_deref(), Some(to), "{from}");
        }
        assert_eq!(controlnet_key("input_hint_block.1.weight", 2, 14), None);
        assert_eq!(
            controlnet_key("output_blocks.0.0.in_layers.0.weight", 2, 14),
            None
        );
    }

    #[test]
    fn unet_keys() {
        let cases = [
            ("input_blocks.0.0.weight", "conv_in.weight"),
            ("time_embed.2.bias", "time_embedding.linear_2.bias"),
            ("label_emb.0.0.weight", "add_embedding.linear_1.weight"),
            (
                "input_blocks.1.0.in_layers.0.weight",
                "down_blocks.0.resnets.0.norm1.weight",
            ),
            (
                "input_blocks.2.0.emb_layers.1.bias",
                "down_blocks.0.resnets.1.time_emb_proj.bias",
            ),
            (
                "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
                "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "input_blocks.4.0.skip_connection.weight",
                "down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "middle_block.0.out_layers.3.weight",
                "mid_block.resnets.0.conv2.weight",
            ),
            (
                "middle_block.1.proj_in.weight",
                "mid_block.attentions.0.proj_in.weight",
            ),
            (
                "middle_block.2.in_layers.2.bias",
                "mid_block.resnets.1.conv1.bias",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "output_blocks.5.1.norm.weight",
                "up_blocks.1.attentions.2.norm.weight",
            ),
            (
                "output_blocks.11.0.skip_connection.weight",
                "up_blocks.3.resnets.2.conv_shortcut.weight",
            ),
            ("out.0.weight", "conv_norm_out.weight"),
            ("out.2.bias", "conv_out.bias"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(
                renamed(&format!("{UNET_PREFIX}{ldm}"), Family::Sd1),
                diffusers
            );
        }
    }

    #[test]
    fn vae_keys() {
        let cases = [
            (
                "encoder.down.0.block.1.norm1.weight",
                "encoder.down_blocks.0.resnets.1.norm1.weight",
            ),
            (
                "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "encoder.down.2.downsample.conv.bias",
                "encoder.down_blocks.2.downsamplers.0.conv.bias",
            ),
            (
                "decoder.up.3.block.2.conv2.weight",
                "decoder.up_blocks.0.resnets.2.conv2.weight",
            ),
            (
                "decoder.up.1.upsample.conv.weight",
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
            ),
            (
                "decoder.mid.block_2.conv1.weight",
                "decoder.mid_block.resnets.1.conv1.weight",
            ),
            (
                "encoder.mid.attn_1.proj_out.weight",
                "encoder.mid_block.attentions.0.to_out.0.weight",
            ),
            (
                "encoder.mid.attn_1.norm.bias",
                "encoder.mid_block.attentions.0.group_norm.bias",
            ),
            ("decoder.norm_out.weight", "decoder.conv_norm_out.weight"),
            ("quant_conv.weight", "quant_conv.weight"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(
                renamed(&format!("first_stage_model.{ldm}"), Family::Sd1),
                diffusers
            );
        }
    }

    #[test]
    fn openclip_keys() {
        let p = SD2_OPENCLIP_PREFIX;
        assert_eq!(
            renamed(
                &format!("{p}transformer.resblocks.3.mlp.c_fc.weight"),
                Family::Sd2
            ),
            "text_model.encoder.layers.3.mlp.fc1.weight"
        );
        assert_eq!(
            renamed(&format!("{p}positional_embedding"), Family::Sd2),
            "text_model.embeddings.position_embedding.weight"
        );
        // SD2's diffusers encoder keeps 23 of the 24 OpenCLIP layers and no projection.
        assert!(convert_key(
            &format!("{p}transformer.resblocks.23.ln_1.weight"),
            &ctx(Family::Sd2)
        )
        .is_none());
        assert!(convert_key(&format!("{p}text_projection"), &ctx(Family::Sd2)).is_none());
        match convert_key(
            &format!("{p}transformer.resblocks.0.attn.in_proj_weight"),
            &ctx(Family::Sd2),
        ) {
            Some((Target::TextEncoder, Conversion::SplitQkv(n))) => {
                assert_eq!(n[1], "text_model.encoder.layers.0.self_attn.k_proj.weight")
            }
            other => panic!("{other:?}"),
        }
        match convert_key(
            &format!("{SDXL_OPENCLIP_PREFIX}text_projection"),
            &ctx(Family::Sdxl),
        ) {
            Some((Target::TextEncoder2, Conversion::Transpose(n))) => {
                assert_eq!(n, "text_projection.weight")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            renamed(
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.bias",
                Family::Sdxl
            ),
            "text_model.final_layer_norm.bias"
        );
    }

    #[test]
    fn family_from_keys() {
        let sd1 = [
            "model.diffusion_model.out.0.weight",
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        ];
        assert_eq!(detect_family(sd1).unwrap(), Family::Sd1);
        let sd2 = [
            "model.diffusion_model.out.0.weight",
            "cond_stage_model.model.transformer.resblocks.0.ln_1.weight",
        ];
        assert_eq!(detect_family(sd2).unwrap(), Family::Sd2);
        let xl = [
            "model.diffusion_model.out.0.weight",
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
            "conditioner.embedders.1.model.ln_final.weight",
        ];
        assert_eq!(detect_family(xl).unwrap(), Family::Sdxl);
        let refiner = [
            "model.diffusion_model.out.0.weight",
            "conditioner.embedders.0.model.ln_final.weight",
        ];
        let e = detect_family(refiner).unwrap_err().to_string();
        assert!(e.contains("refiner"), "{e}");
        let lora = ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"];
        assert!(detect_family(lora)
            .unwrap_err()
            .to_string()
            .contains("LoRA"));
        let unet_only = ["model.diffusion_model.out.0.weight"];
        assert!(detect_family(unet_only)
            .unwrap_err()
            .to_string()
            .contains("no text encoder"));
    }

    #[test]
    fn split_qkv_values() {
        let t = Tensor::arange(0f32, 12., &Device::Cpu)
            .unwrap()
            .reshape((6, 2))
            .unwrap();
        let names = ["q", "k", "v"].map(String::from);
        let out = apply(Conversion::SplitQkv(names), t, "x").unwrap();
        assert_eq!(
            out[1].1.to_vec2::<f32>().unwrap(),
            vec![vec![4., 5.], vec![6., 7.]]
        );
        let t = Tensor::zeros((3, 3, 1, 1), DType::F32, &Device::Cpu).unwrap();
        let out = apply(Conversion::ToLinear("w".into()), t, "x").unwrap();
        assert_eq!(out[0].1.dims(), &[3, 3]);
    }
}
