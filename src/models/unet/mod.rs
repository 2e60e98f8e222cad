//! UNet2DConditionModel, the denoiser of Stable Diffusion: a U-Net (Ronneberger et al. 2015) of
//! time-conditioned ResNet blocks and spatial transformers attending to the text embeddings, in
//! latent space (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
//! Models"). SD 1.x, SD 2.x and SDXL (Podell et al. 2023, "SDXL: Improving Latent Diffusion
//! Models for High-Resolution Image Synthesis", which adds size and crop conditioning to the time
//! embedding) differ only in configuration.
//!
//! Weights use diffusers' names (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight`),
//! the config mirrors diffusers' `config.json`.

mod attention;
mod blocks;
mod embeddings;
mod resnet;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

pub use attention::ImageAttention;
use attention::TransformerSettings;
use blocks::{CrossAttention, DownBlock, MidBlock, UpBlock};
use embeddings::{SinusoidalEmbedding, TimestepEmbedding};
use resnet::{ResnetSettings, TimeEmbeddingNorm};

use crate::models::layers::{conv2d, group_norm, Conv2d, GroupNorm};
use crate::{Error, Result};

/// A setting given once for all blocks or once per block (or layer).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    // `Many` first: untagged enums take the first variant that parses, and for nested values a
    // list must not be taken as a single value of a list type.
    Many(Vec<T>),
    One(T),
}

impl<T: Clone + std::fmt::Debug> OneOrMany<T> {
    /// The value for each of `n` items; a list must have exactly `n` entries.
    pub(crate) fn expand(&self, n: usize, setting: &str) -> Result<Vec<T>> {
        match self {
            OneOrMany::One(v) => Ok(vec![v.clone(); n]),
            OneOrMany::Many(vs) if vs.len() == n => Ok(vs.clone()),
            OneOrMany::Many(vs) => Err(Error::model(format!(
                "unet config: `{setting}` has {} entries ({vs:?}), expected {n}",
                vs.len()
            ))),
        }
    }
}

/// Published configs write `null` for some flags (SDXL base: `"upcast_attention": null`), which
/// diffusers reads as false.
fn null_is_false<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

/// diffusers' `UNet2DConditionModel` `config.json`, with diffusers' defaults for missing keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UNet2DConditionConfig {
    /// The training resolution in latents; informative only.
    pub sample_size: Option<serde_json::Value>,
    pub in_channels: usize,
    pub out_channels: usize,
    #[serde(deserialize_with = "null_is_false")]
    pub center_input_sample: bool,
    #[serde(deserialize_with = "null_is_false")]
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    /// None (JSON null): no middle block.
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: OneOrMany<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: OneOrMany<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    /// Training only.
    pub dropout: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    pub cross_attention_dim: OneOrMany<usize>,
    /// Per block, or per block and layer (asymmetric UNets, with the reverse list given).
    pub transformer_layers_per_block: OneOrMany<OneOrMany<usize>>,
    pub reverse_transformer_layers_per_block: Option<Vec<OneOrMany<usize>>>,
    pub encoder_hid_dim: Option<usize>,
    pub encoder_hid_dim_type: Option<String>,
    /// When `num_attention_heads` is null this is, despite its name, the number of heads
    /// (a naming slip diffusers keeps for compatibility).
    pub attention_head_dim: OneOrMany<usize>,
    pub num_attention_heads: Option<OneOrMany<usize>>,
    #[serde(deserialize_with = "null_is_false")]
    pub dual_cross_attention: bool,
    #[serde(deserialize_with = "null_is_false")]
    pub use_linear_projection: bool,
    pub class_embed_type: Option<String>,
    /// "text_time" for SDXL.
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<usize>,
    pub num_class_embeds: Option<usize>,
    #[serde(deserialize_with = "null_is_false")]
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    #[serde(deserialize_with = "null_is_false")]
    /// Only read by block types not implemented here (refused by name).
    pub resnet_skip_time_act: bool,
    /// Only read by block types not implemented here (refused by name).
    pub resnet_out_scale_factor: f64,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<usize>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub time_cond_proj_dim: Option<usize>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub projection_class_embeddings_input_dim: Option<usize>,
    pub attention_type: String,
    #[serde(deserialize_with = "null_is_false")]
    /// Only read with class conditioning (refused).
    pub class_embeddings_concat: bool,
    /// Only read by `UNetMidBlock2DSimpleCrossAttn` (refused).
    pub mid_block_only_cross_attention: Option<bool>,
    pub cross_attention_norm: Option<String>,
    /// Only read with `addition_embed_type` "text" (refused).
    pub addition_embed_type_num_heads: usize,
    /// Keys of `config.json` not listed above. `_`-prefixed ones are diffusers' metadata
    /// (`_class_name`, `_diffusers_version`); any other makes [`UNet2DConditionModel::new`] fail
    /// rather than ignore a setting it does not implement.
    #[serde(flatten)]
    pub unrecognized: BTreeMap<String, serde_json::Value>,
}

impl Default for UNet2DConditionConfig {
    fn default() -> Self {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: strings(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".to_string()),
            up_block_types: strings(&[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]),
            only_cross_attention: OneOrMany::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: OneOrMany::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            dropout: 0.0,
            act_fn: "silu".to_string(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: OneOrMany::One(1280),
            transformer_layers_per_block: OneOrMany::One(OneOrMany::One(1)),
            reverse_transformer_layers_per_block: None,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: OneOrMany::One(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            upcast_attention: false,
            resnet_time_scale_shift: "default".to_string(),
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: "positional".to_string(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            projection_class_embeddings_input_dim: None,
            attention_type: "default".to_string(),
            class_embeddings_concat: false,
            mid_block_only_cross_attention: None,
            cross_attention_norm: None,
            addition_embed_type_num_heads: 64,
            unrecognized: BTreeMap::new(),
        }
    }
}

/// An activation named in a config (`act_fn`, `time_embedding_act_fn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    Silu,
    /// Exact (erf) GELU, as `torch.nn.GELU()`.
    Gelu,
    Relu,
}

impl Activation {
    fn parse(name: &str, setting: &str) -> Result<Self> {
        match name {
            "silu" | "swish" => Ok(Self::Silu),
            "gelu" => Ok(Self::Gelu),
            "relu" => Ok(Self::Relu),
            other => Err(Error::model(format!(
                "unet config: `{setting}` = {other:?} is not supported (silu, swish, gelu, relu)"
            ))),
        }
    }

    pub(crate) fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Silu => crate::models::cpu::silu(x),
            Self::Gelu => x.gelu_erf(),
            Self::Relu => x.relu(),
        }
    }

    /// `apply(norm(x))`, fused where the CPU kernels have the pair.
    pub(crate) fn after_norm(self, norm: &GroupNorm, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Silu => norm.forward_silu(x),
            _ => self.apply(&candle_core::Module::forward(norm, x)?),
        }
    }
}

/// The down/up block variants this implementation has.
fn block_has_cross_attention(block_type: &str, setting: &str, direction: &str) -> Result<bool> {
    // diffusers accepts an old "UNetRes" prefix on block names.
    let name = block_type.strip_prefix("UNetRes").unwrap_or(block_type);
    match (direction, name) {
        ("Down", "CrossAttnDownBlock2D") | ("Up", "CrossAttnUpBlock2D") => Ok(true),
        ("Down", "DownBlock2D") | ("Up", "UpBlock2D") => Ok(false),
        _ => Err(Error::model(format!(
            "unet config: `{setting}` contains {block_type:?}, which is not supported \
             ({direction}Block2D and CrossAttn{direction}Block2D are)"
        ))),
    }
}

impl UNet2DConditionConfig {
    /// Refuses settings this implementation does not have, naming them.
    fn check_supported(&self) -> Result<()> {
        let unsupported = |setting: &str, why: &str| {
            Err(Error::model(format!(
                "unet config: `{setting}` {why} is not supported"
            )))
        };
        if let Some(key) = self.unrecognized.keys().find(|k| !k.starts_with('_')) {
            return unsupported(key, "(an unknown setting)");
        }
        if self.dual_cross_attention {
            return unsupported("dual_cross_attention", "= true");
        }
        if let Some(v) = &self.class_embed_type {
            return unsupported("class_embed_type", &format!("= {v:?} (class conditioning)"));
        }
        if let Some(v) = self.num_class_embeds {
            return unsupported("num_class_embeds", &format!("= {v} (class conditioning)"));
        }
        if let Some(v) = &self.addition_embed_type {
            if v != "text_time" {
                return unsupported(
                    "addition_embed_type",
                    &format!("= {v:?} (only \"text_time\")"),
                );
            }
        }
        if let Some(v) = self.encoder_hid_dim {
            return unsupported("encoder_hid_dim", &format!("= {v}"));
        }
        if let Some(v) = &self.encoder_hid_dim_type {
            return unsupported("encoder_hid_dim_type", &format!("= {v:?}"));
        }
        if self.time_embedding_type != "positional" {
            return unsupported(
                "time_embedding_type",
                &format!("= {:?} (only \"positional\")", self.time_embedding_type),
            );
        }
        if let Some(v) = &self.timestep_post_act {
            return unsupported("timestep_post_act", &format!("= {v:?}"));
        }
        if let Some(v) = self.time_cond_proj_dim {
            return unsupported("time_cond_proj_dim", &format!("= {v} (guidance embedding)"));
        }
        if self.attention_type != "default" {
            return unsupported(
                "attention_type",
                &format!("= {:?} (only \"default\")", self.attention_type),
            );
        }
        if let Some(v) = &self.cross_attention_norm {
            return unsupported("cross_attention_norm", &format!("= {v:?}"));
        }
        match self.norm_num_groups {
            None => return unsupported("norm_num_groups", "= null"),
            Some(0) => return unsupported("norm_num_groups", "= 0"),
            Some(groups) => {
                if let Some(ch) = self
                    .block_out_channels
                    .iter()
                    .find(|c| !c.is_multiple_of(groups))
                {
                    return Err(Error::model(format!(
                        "unet config: {ch} channels do not split into `norm_num_groups` = {groups}"
                    )));
                }
            }
        }
        for (setting, kernel) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if kernel.is_multiple_of(2) {
                return unsupported(setting, &format!("= {kernel} (an even kernel)"));
            }
        }
        Ok(())
    }

    fn resnet_time_embedding_norm(&self) -> Result<TimeEmbeddingNorm> {
        match self.resnet_time_scale_shift.as_str() {
            "default" => Ok(TimeEmbeddingNorm::Default),
            "scale_shift" => Ok(TimeEmbeddingNorm::ScaleShift),
            other => Err(Error::model(format!(
                "unet config: `resnet_time_scale_shift` = {other:?} is not supported \
                 (\"default\", \"scale_shift\")"
            ))),
        }
    }

    /// Heads of each down block's transformers (see `attention_head_dim`).
    fn heads_per_block(&self, n: usize) -> Result<Vec<usize>> {
        match &self.num_attention_heads {
            Some(heads) => heads.expand(n, "num_attention_heads"),
            None => self.attention_head_dim.expand(n, "attention_head_dim"),
        }
    }

    /// Transformer depth behind each ResNet block, per down block.
    fn transformer_layers_down(&self, layers: &[usize]) -> Result<Vec<Vec<usize>>> {
        let per_block = self
            .transformer_layers_per_block
            .expand(layers.len(), "transformer_layers_per_block")?;
        per_block
            .iter()
            .zip(layers)
            .map(|(v, &n)| v.expand(n, "transformer_layers_per_block"))
            .collect()
    }

    /// Transformer depth behind each ResNet block, per up block (in up order).
    fn transformer_layers_up(&self, layers: &[usize]) -> Result<Vec<Vec<usize>>> {
        let n = layers.len();
        let reversed: Vec<OneOrMany<usize>> = match &self.reverse_transformer_layers_per_block {
            Some(v) if v.len() == n => v.clone(),
            Some(v) => {
                return Err(Error::model(format!(
                    "unet config: `reverse_transformer_layers_per_block` has {} entries, \
                     expected {n}",
                    v.len()
                )))
            }
            None => {
                let mut per_block = self
                    .transformer_layers_per_block
                    .expand(n, "transformer_layers_per_block")?;
                if per_block.iter().any(|v| matches!(v, OneOrMany::Many(_))) {
                    return Err(Error::model(
                        "unet config: per-layer `transformer_layers_per_block` needs \
                         `reverse_transformer_layers_per_block`",
                    ));
                }
                per_block.reverse();
                per_block
            }
        };
        reversed
            .iter()
            .zip(layers.iter().rev())
            .map(|(v, &n)| v.expand(n + 1, "reverse_transformer_layers_per_block"))
            .collect()
    }
}

/// What the down path and middle block leave for the up path (or a ControlNet's projections).
pub(crate) struct Encoded {
    /// The middle block's output (the last down block's without a middle block).
    pub h: Tensor,
    /// The skip connections in down-path order: the `conv_in` output, then each ResNet block's
    /// and downsampler's output.
    pub skips: Vec<Tensor>,
    /// The time embedding after the ResNet blocks' activation.
    pub temb_act: Tensor,
    /// The text embeddings in the model dtype.
    pub context: Tensor,
}

/// SDXL's extra conditioning (`added_cond_kwargs` in diffusers).
#[derive(Debug, Clone)]
pub struct AddedConditions {
    /// Pooled embedding of the second text encoder, `[B, P]`.
    pub text_embeds: Tensor,
    /// Original size, crop top-left and target size, `[B, 6]`.
    pub time_ids: Tensor,
}

/// SDXL's `add_time_proj` + `add_embedding`.
#[derive(Debug, Clone)]
struct AddedEmbedding {
    time_proj: SinusoidalEmbedding,
    embedding: TimestepEmbedding,
    input_dim: usize,
}

/// The denoising UNet; build it with [`UNet2DConditionModel::new`], run it with
/// [`UNet2DConditionModel::forward`].
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_proj: SinusoidalEmbedding,
    time_embedding: TimestepEmbedding,
    added_embedding: Option<AddedEmbedding>,
    time_embed_act: Option<Activation>,
    resnet_act: Activation,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    /// `conv_norm_out` and `conv_out`; None for the encoder half a ControlNet copies.
    head: Option<(GroupNorm, Conv2d)>,
    in_channels: usize,
    cross_attention_dims: Vec<usize>,
    center_input_sample: bool,
    dtype: DType,
}

impl UNet2DConditionModel {
    /// `vb` is rooted at the UNet's weights and fixes the dtype and device the model runs in.
    pub fn new(vb: VarBuilder, cfg: &UNet2DConditionConfig) -> Result<Self> {
        Self::build(vb, cfg, true)
    }

    /// The down path and middle block only (time embedding included): the part of the UNet a
    /// ControlNet copies. `up_block_types`, `out_channels` and `conv_out_kernel` are not read.
    pub(crate) fn new_encoder(vb: VarBuilder, cfg: &UNet2DConditionConfig) -> Result<Self> {
        Self::build(vb, cfg, false)
    }

    fn build(vb: VarBuilder, cfg: &UNet2DConditionConfig, with_up_path: bool) -> Result<Self> {
        cfg.check_supported()?;
        let n = cfg.down_block_types.len();
        let up_blocks_given = if with_up_path {
            cfg.up_block_types.len()
        } else {
            n
        };
        if n == 0 || cfg.block_out_channels.len() != n || up_blocks_given != n {
            return Err(Error::model(format!(
                "unet config: `down_block_types` ({n}), `up_block_types` ({}) and \
                 `block_out_channels` ({}) must have the same, non-zero length",
                cfg.up_block_types.len(),
                cfg.block_out_channels.len()
            )));
        }
        let channels = &cfg.block_out_channels;
        let act = Activation::parse(&cfg.act_fn, "act_fn")?;
        let time_embed_act = cfg
            .time_embedding_act_fn
            .as_deref()
            .map(|name| Activation::parse(name, "time_embedding_act_fn"))
            .transpose()?;
        let layers = cfg.layers_per_block.expand(n, "layers_per_block")?;
        let heads = cfg.heads_per_block(n)?;
        let cross_attention_dims = cfg.cross_attention_dim.expand(n, "cross_attention_dim")?;
        let only_cross = cfg.only_cross_attention.expand(n, "only_cross_attention")?;
        let transformer_layers_down = cfg.transformer_layers_down(&layers)?;
        let transformer_layers_up = cfg.transformer_layers_up(&layers)?;
        let norm_groups = cfg
            .norm_num_groups
            .expect("checked by check_supported, this is a bug");
        let device = vb.device().clone();

        // Time embedding.
        let time_embed_dim = cfg.time_embedding_dim.unwrap_or(4 * channels[0]);
        let time_proj =
            SinusoidalEmbedding::new(channels[0], cfg.flip_sin_to_cos, cfg.freq_shift, &device)?;
        let time_embedding =
            TimestepEmbedding::new(vb.pp("time_embedding"), channels[0], time_embed_dim, act)?;
        let added_embedding = match cfg.addition_embed_type.as_deref() {
            Some(_) => {
                let missing = |setting: &str| {
                    Error::model(format!(
                        "unet config: `addition_embed_type` = \"text_time\" needs `{setting}`"
                    ))
                };
                let time_dim = cfg
                    .addition_time_embed_dim
                    .ok_or_else(|| missing("addition_time_embed_dim"))?;
                let input_dim = cfg
                    .projection_class_embeddings_input_dim
                    .ok_or_else(|| missing("projection_class_embeddings_input_dim"))?;
                Some(AddedEmbedding {
                    time_proj: SinusoidalEmbedding::new(
                        time_dim,
                        cfg.flip_sin_to_cos,
                        cfg.freq_shift,
                        &device,
                    )?,
                    // diffusers builds this MLP with its default activation, not `act_fn`.
                    embedding: TimestepEmbedding::new(
                        vb.pp("add_embedding"),
                        input_dim,
                        time_embed_dim,
                        Activation::Silu,
                    )?,
                    input_dim,
                })
            }
            None => None,
        };

        let resnet = ResnetSettings {
            groups: norm_groups,
            eps: cfg.norm_eps,
            act,
            temb_channels: time_embed_dim,
            time_embedding_norm: cfg.resnet_time_embedding_norm()?,
            output_scale_factor: 1.0,
        };
        let cross_attention = |i: usize, channels: usize, layers: Vec<usize>| -> Result<_> {
            if heads[i] == 0 || !channels.is_multiple_of(heads[i]) {
                return Err(Error::model(format!(
                    "unet config: {channels} channels do not split into {} attention heads",
                    heads[i]
                )));
            }
            Ok(CrossAttention {
                settings: TransformerSettings {
                    heads: heads[i],
                    head_dim: channels / heads[i],
                    cross_attention_dim: cross_attention_dims[i],
                    norm_groups,
                    use_linear_projection: cfg.use_linear_projection,
                    only_cross_attention: only_cross[i],
                    upcast_attention: cfg.upcast_attention,
                },
                layers_per_resnet: layers,
            })
        };

        // Down path.
        let mut down_blocks = Vec::with_capacity(n);
        for (i, block_type) in cfg.down_block_types.iter().enumerate() {
            let in_ch = if i == 0 { channels[0] } else { channels[i - 1] };
            let ca = if block_has_cross_attention(block_type, "down_block_types", "Down")? {
                Some(cross_attention(
                    i,
                    channels[i],
                    transformer_layers_down[i].clone(),
                )?)
            } else {
                None
            };
            let is_last = i + 1 == n;
            down_blocks.push(DownBlock::new(
                vb.pp(format!("down_blocks.{i}")),
                in_ch,
                channels[i],
                layers[i],
                &resnet,
                ca.as_ref(),
                (!is_last).then_some(cfg.downsample_padding),
            )?);
        }

        // Middle.
        let last = n - 1;
        let mid_resnet = ResnetSettings {
            output_scale_factor: cfg.mid_block_scale_factor,
            ..resnet
        };
        let mid_block = match cfg.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {
                let layers = transformer_layers_down[last].first().copied().unwrap_or(1);
                // The middle transformer never uses `only_cross_attention`.
                let mut ca = cross_attention(last, channels[last], vec![layers])?;
                ca.settings.only_cross_attention = false;
                Some(MidBlock::new(
                    vb.pp("mid_block"),
                    channels[last],
                    &mid_resnet,
                    Some(&ca),
                )?)
            }
            Some("UNetMidBlock2D") => Some(MidBlock::new(
                vb.pp("mid_block"),
                channels[last],
                &mid_resnet,
                None,
            )?),
            None => None,
            Some(other) => {
                return Err(Error::model(format!(
                    "unet config: `mid_block_type` = {other:?} is not supported \
                     (UNetMidBlock2DCrossAttn, UNetMidBlock2D or null)"
                )))
            }
        };

        // Up path, mirroring the down path.
        let mut up_blocks = Vec::with_capacity(n);
        let up_block_types: &[String] = if with_up_path {
            &cfg.up_block_types
        } else {
            &[]
        };
        for (i, block_type) in up_block_types.iter().enumerate() {
            let level = last - i;
            let prev_out = channels[(level + 1).min(last)];
            let skip_in = channels[level.saturating_sub(1)];
            let ca = if block_has_cross_attention(block_type, "up_block_types", "Up")? {
                Some(cross_attention(
                    level,
                    channels[level],
                    transformer_layers_up[i].clone(),
                )?)
            } else {
                None
            };
            up_blocks.push(UpBlock::new(
                vb.pp(format!("up_blocks.{i}")),
                prev_out,
                channels[level],
                skip_in,
                layers[level] + 1,
                &resnet,
                ca.as_ref(),
                i != last,
            )?);
        }

        let conv_padding = |kernel: usize| (kernel - 1) / 2;
        Ok(Self {
            conv_in: conv2d(
                vb.pp("conv_in"),
                cfg.in_channels,
                channels[0],
                cfg.conv_in_kernel,
                conv_padding(cfg.conv_in_kernel),
                1,
            )?,
            time_proj,
            time_embedding,
            added_embedding,
            time_embed_act,
            resnet_act: act,
            down_blocks,
            mid_block,
            up_blocks,
            head: if with_up_path {
                Some((
                    group_norm(
                        norm_groups,
                        channels[0],
                        cfg.norm_eps,
                        vb.pp("conv_norm_out"),
                    )?,
                    conv2d(
                        vb.pp("conv_out"),
                        channels[0],
                        cfg.out_channels,
                        cfg.conv_out_kernel,
                        conv_padding(cfg.conv_out_kernel),
                        1,
                    )?,
                ))
            } else {
                None
            },
            in_channels: cfg.in_channels,
            cross_attention_dims,
            center_input_sample: cfg.center_input_sample,
            dtype: vb.dtype(),
        })
    }

    /// The dtype the weights and activations are in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        self.conv_in.weight().device()
    }

    /// Latent channels the model takes (4; 9 for inpainting models: latents, mask, masked image).
    pub fn in_channels(&self) -> usize {
        self.in_channels
    }

    /// Whether the model needs [`AddedConditions`] (SDXL).
    pub fn needs_added_conditions(&self) -> bool {
        self.added_embedding.is_some()
    }

    /// Predicts the noise (or v, or x0, per the checkpoint) for `sample` `[B, C, H, W]` at
    /// `timestep`, conditioned on the text `encoder_hidden_states` `[B, tokens, dim]`. Inputs
    /// are cast to the model dtype; the output is in the model dtype. Any latent size works.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditions>,
    ) -> Result<Tensor> {
        self.forward_with_residuals(sample, timestep, encoder_hidden_states, added, None, None)
    }

    /// [`Self::forward`] with ControlNet outputs: `down_residuals` are added to the skip
    /// connections (one per skip, in down-path order: the `conv_in` output, then each ResNet
    /// block and downsampler output), `mid_residual` to the middle block's output.
    pub fn forward_with_residuals(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditions>,
        down_residuals: Option<&[Tensor]>,
        mid_residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_with_image_prompt(
            sample,
            timestep,
            encoder_hidden_states,
            added,
            down_residuals,
            mid_residual,
            &[],
        )
    }

    /// Cross-attention layers of the model (the transformer blocks), which IP-Adapters extend.
    pub fn cross_attention_layers(&self) -> usize {
        self.down_blocks
            .iter()
            .map(DownBlock::cross_attention_layers)
            .chain(self.up_blocks.iter().map(UpBlock::cross_attention_layers))
            .sum::<usize>()
            + self
                .mid_block
                .as_ref()
                .map_or(0, MidBlock::cross_attention_layers)
    }

    /// The width of the text embeddings the model attends to.
    pub fn cross_attention_dim(&self) -> usize {
        self.cross_attention_dims.first().copied().unwrap_or(0)
    }

    /// [`Self::forward_with_residuals`] with IP-Adapter image prompts: `images` is empty, or
    /// holds for every cross-attention layer ([`Self::cross_attention_layers`]) the keys and
    /// values of each image prompt, in the order diffusers numbers attention processors (down
    /// blocks, up blocks, then the middle block).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_with_image_prompt(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditions>,
        down_residuals: Option<&[Tensor]>,
        mid_residual: Option<&Tensor>,
        images: &[Vec<ImageAttention>],
    ) -> Result<Tensor> {
        if !images.is_empty() && images.len() != self.cross_attention_layers() {
            return Err(Error::model(format!(
                "unet: image-prompt keys for {} cross-attention layers, the model has {}",
                images.len(),
                self.cross_attention_layers()
            )));
        }
        // diffusers' processor order is down, up, middle; the forward pass runs down, middle, up.
        let down_layers: usize = self
            .down_blocks
            .iter()
            .map(DownBlock::cross_attention_layers)
            .sum();
        let up_layers: usize = self
            .up_blocks
            .iter()
            .map(UpBlock::cross_attention_layers)
            .sum();
        let (down_images, up_images, mid_images) = if images.is_empty() {
            (images, images, images)
        } else {
            (
                &images[..down_layers],
                &images[down_layers..down_layers + up_layers],
                &images[down_layers + up_layers..],
            )
        };
        let Encoded {
            mut h,
            mut skips,
            temb_act,
            context,
        } = self.encode_with_images(
            sample,
            timestep,
            encoder_hidden_states,
            added,
            None,
            down_images,
            mid_images,
        )?;
        if let Some(residuals) = down_residuals {
            if residuals.len() != skips.len() {
                return Err(Error::model(format!(
                    "unet: {} down-block residuals given, the model has {} skip connections",
                    residuals.len(),
                    skips.len()
                )));
            }
            for (skip, residual) in skips.iter_mut().zip(residuals) {
                *skip = (&*skip + residual.to_dtype(self.dtype)?)?;
            }
        }
        if let Some(residual) = mid_residual {
            h = (h + residual.to_dtype(self.dtype)?)?;
        }
        let Some((conv_norm_out, conv_out)) = &self.head else {
            return Err(Error::model(
                "unet: this is the encoder half of a UNet (a ControlNet), it has no up path",
            ));
        };

        // Up path: each block takes back as many skips as it has ResNet blocks, and upsamples
        // to the size of the skips the next block will take (odd sizes round up on the way down).
        let mut up_images = up_images;
        for block in &self.up_blocks {
            let own_images = blocks::take_images(&mut up_images, block.cross_attention_layers());
            let taken = skips
                .len()
                .checked_sub(block.num_resnets())
                .expect("skip count follows the block layout, this is a bug");
            let own = skips.split_off(taken);
            let upsample_to = match skips.last() {
                Some(next) => {
                    let (_, _, height, width) = next.dims4()?;
                    Some((height, width))
                }
                None => None,
            };
            h = block.forward(&h, &own, &temb_act, &context, own_images, upsample_to)?;
        }

        let h = self.resnet_act.after_norm(conv_norm_out, &h)?;
        Ok(conv_out.forward(&h)?)
    }

    /// The down path and middle block: checks the inputs, embeds the time (and SDXL's added
    /// conditions), runs `conv_in`, adds `conditioning` (a ControlNet's embedded control image,
    /// `[B, C0, H, W]`) to its output, then the down blocks and the middle block.
    pub(crate) fn encode(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditions>,
        conditioning: Option<&Tensor>,
    ) -> Result<Encoded> {
        self.encode_with_images(
            sample,
            timestep,
            encoder_hidden_states,
            added,
            conditioning,
            &[],
            &[],
        )
    }

    /// [`Self::encode`] with the IP-Adapter keys of the down blocks' and the middle block's
    /// cross-attention layers (each empty, or one entry per layer).
    #[allow(clippy::too_many_arguments)]
    fn encode_with_images(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditions>,
        conditioning: Option<&Tensor>,
        mut down_images: &[Vec<ImageAttention>],
        mid_images: &[Vec<ImageAttention>],
    ) -> Result<Encoded> {
        let (batch, channels, _, _) = sample.dims4()?;
        if channels != self.in_channels {
            return Err(Error::model(format!(
                "unet: sample has {channels} channels, the model takes {}",
                self.in_channels
            )));
        }
        let (context_batch, _, context_dim) = encoder_hidden_states.dims3()?;
        if context_batch != batch {
            return Err(Error::model(format!(
                "unet: {context_batch} text embeddings for a batch of {batch} latents"
            )));
        }
        if let Some(expected) = self
            .cross_attention_dims
            .iter()
            .find(|&&d| d != context_dim)
        {
            return Err(Error::model(format!(
                "unet: text embeddings of width {context_dim}, the model attends to width \
                 {expected}"
            )));
        }
        let sample = sample.to_dtype(self.dtype)?;
        let context = encoder_hidden_states.to_dtype(self.dtype)?;
        let sample = if self.center_input_sample {
            sample.affine(2.0, -1.0)?
        } else {
            sample
        };

        // Time embedding: [1, D] shared by the batch, [B, D] once SDXL's conditioning joins.
        let emb = self.time_embedding(timestep, batch, added)?;
        let temb_act = self.resnet_act.apply(&emb)?;

        // Down path; every intermediate output is kept for the skip connections.
        let mut h = self.conv_in.forward(&sample)?;
        if let Some(conditioning) = conditioning {
            h = h.broadcast_add(&conditioning.to_dtype(self.dtype)?)?;
        }
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            let own = blocks::take_images(&mut down_images, block.cross_attention_layers());
            h = block.forward(&h, &temb_act, &context, own, &mut skips)?;
        }
        if let Some(mid) = &self.mid_block {
            h = mid.forward(&h, &temb_act, &context, mid_images)?;
        }
        Ok(Encoded {
            h,
            skips,
            temb_act,
            context,
        })
    }

    /// The time embedding before the ResNet blocks' activation.
    fn time_embedding(
        &self,
        timestep: f64,
        batch: usize,
        added: Option<&AddedConditions>,
    ) -> Result<Tensor> {
        // diffusers turns the timestep into f32 before the sinusoids.
        let t = Tensor::new(&[timestep as f32], self.device())?;
        let t_emb = self.time_proj.forward(&t)?.to_dtype(self.dtype)?;
        let mut emb = self.time_embedding.forward(&t_emb)?;

        match (&self.added_embedding, added) {
            (Some(add), Some(added)) => {
                let (text_batch, _) = added.text_embeds.dims2()?;
                let (ids_batch, ids) = added.time_ids.dims2()?;
                if text_batch != batch || ids_batch != batch {
                    return Err(Error::model(format!(
                        "unet: added conditions for batches of {text_batch} (text_embeds) and \
                         {ids_batch} (time_ids), the latents are a batch of {batch}"
                    )));
                }
                let time_embeds = add
                    .time_proj
                    .forward(&added.time_ids.flatten_all()?)?
                    .reshape((batch, ()))?
                    .to_dtype(self.dtype)?;
                let add_embeds =
                    Tensor::cat(&[&added.text_embeds.to_dtype(self.dtype)?, &time_embeds], 1)?;
                if add_embeds.dim(1)? != add.input_dim {
                    return Err(Error::model(format!(
                        "unet: text_embeds and {ids} time ids make {} added features, the model \
                         takes {}",
                        add_embeds.dim(1)?,
                        add.input_dim
                    )));
                }
                emb = emb.broadcast_add(&add.embedding.forward(&add_embeds)?)?;
            }
            (Some(_), None) => {
                return Err(Error::model(
                    "unet: this model (SDXL) needs added conditions: text_embeds and time_ids",
                ))
            }
            (None, Some(_)) => {
                return Err(Error::model(
                    "unet: added conditions given to a model without addition_embed_type",
                ))
            }
            (None, None) => {}
        }
        match self.time_embed_act {
            Some(act) => Ok(act.apply(&emb)?),
            None => Ok(emb),
        }
    }
}
