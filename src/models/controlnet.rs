//! ControlNet (Zhang, Rao and Agrawala 2023, "Adding Conditional Control to Text-to-Image
//! Diffusion Models"): a trainable copy of the UNet's encoder (time embedding, down blocks,
//! middle block) that also reads a control image (edges, depth, pose ...). The image enters
//! through a small convolutional embedding added after `conv_in`; every skip connection and the
//! middle block's output leave through a 1x1 "zero convolution" (zero-initialised in training)
//! and are added to the frozen UNet's own skips and middle output.
//!
//! Weights and config use diffusers' `ControlNetModel` names (`controlnet_cond_embedding.*`,
//! `controlnet_down_blocks.N`, `controlnet_mid_block`, the rest as in the UNet). SD 1.x/2.x and
//! SDXL ControlNets (with SDXL's added conditions) differ only in configuration.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::models::layers::{conv2d, Conv2d};
use crate::models::unet::{AddedConditions, UNet2DConditionConfig, UNet2DConditionModel};
use crate::registry::{ControlNetEntry, ControlNetSource};
use crate::weights::folder::load_component;
use crate::weights::single_file::builtin_config;
use crate::weights::{load_controlnet_file, read_json, Component, Family};
use crate::{Error, Result};

fn default_conditioning_channels() -> usize {
    3
}

fn default_embedding_channels() -> Vec<usize> {
    vec![16, 32, 96, 256]
}

fn default_channel_order() -> String {
    "rgb".to_string()
}

/// diffusers' `ControlNetModel` `config.json`: the UNet encoder's settings plus the control
/// image's embedding. Keys the UNet config does not know and this struct does not name make
/// [`ControlNetModel::new`] fail (as the UNet does).
#[derive(Debug, Clone, Deserialize)]
pub struct ControlNetConfig {
    /// Channels of the control image (3, RGB).
    #[serde(default = "default_conditioning_channels")]
    pub conditioning_channels: usize,
    /// Widths of the control image embedding's levels; each level after the first halves the
    /// resolution, so `n` entries map an image to 1 / 2^(n-1) of its size (8 for the VAE).
    #[serde(default = "default_embedding_channels")]
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// "rgb", or "bgr" for ControlNets trained on BGR images (the channels are flipped).
    #[serde(default = "default_channel_order")]
    pub controlnet_conditioning_channel_order: String,
    /// Shuffle-type ControlNets average their outputs over the image (not supported here).
    #[serde(default)]
    pub global_pool_conditions: bool,
    /// The encoder's settings, named as in the UNet's config.
    #[serde(flatten)]
    pub unet: UNet2DConditionConfig,
}

impl ControlNetConfig {
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        serde_json::from_value(v.clone())
            .map_err(|e| Error::model(format!("controlnet config.json: {e}")))
    }
}

/// A ControlNet config given as a `config.json` file or a folder holding one.
fn controlnet_config_file(path: &Path) -> Result<serde_json::Value> {
    if path.is_dir() {
        read_json(&path.join("config.json"))
    } else {
        read_json(path)
    }
}

/// The config of a single-file ControlNet given without one: the family's reference ControlNet
/// (`lllyasviel/control_v11p_sd15_canny` for SD 1.x, `thibaud/controlnet-sd21` for SD 2.x,
/// `diffusers/controlnet-canny-sdxl-1.0` for SDXL), which copy their base model's UNet encoder
/// settings and use diffusers' default control image embedding (16, 32, 96, 256).
fn reference_config(family: Family) -> Result<serde_json::Value> {
    let mut config = builtin_config(family, "unet").ok_or_else(|| {
        Error::model(format!(
            "no reference ControlNet config for {family} models"
        ))
    })?;
    if let Some(map) = config.as_object_mut() {
        map.insert("_class_name".into(), "ControlNetModel".into());
    }
    Ok(config)
}

/// `controlnet_cond_embedding`: conv, SiLU, then pairs of (conv, SiLU, stride-2 conv, SiLU),
/// then the output conv to the UNet's first width.
#[derive(Debug, Clone)]
struct ConditioningEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl ConditioningEmbedding {
    fn new(
        vb: VarBuilder,
        in_channels: usize,
        widths: &[usize],
        out_channels: usize,
    ) -> Result<Self> {
        let (first, last) = match (widths.first(), widths.last()) {
            (Some(&first), Some(&last)) => (first, last),
            _ => {
                return Err(Error::model(
                    "controlnet config: `conditioning_embedding_out_channels` is empty",
                ))
            }
        };
        let mut blocks = Vec::with_capacity(2 * (widths.len() - 1));
        for (i, pair) in widths.windows(2).enumerate() {
            let (c_in, c_out) = (pair[0], pair[1]);
            blocks.push(conv2d(
                vb.pp(format!("blocks.{}", 2 * i)),
                c_in,
                c_in,
                3,
                1,
                1,
            )?);
            blocks.push(conv2d(
                vb.pp(format!("blocks.{}", 2 * i + 1)),
                c_in,
                c_out,
                3,
                1,
                2,
            )?);
        }
        Ok(Self {
            conv_in: conv2d(vb.pp("conv_in"), in_channels, first, 3, 1, 1)?,
            blocks,
            conv_out: conv2d(vb.pp("conv_out"), last, out_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, image: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(image)?.silu()?;
        for block in &self.blocks {
            h = block.forward(&h)?.silu()?;
        }
        Ok(self.conv_out.forward(&h)?)
    }

    /// How much the embedding shrinks the image: 2 per strided convolution.
    fn downscale(&self) -> usize {
        1 << (self.blocks.len() / 2)
    }
}

/// What a ControlNet adds to the UNet at one step: one residual per skip connection (in the
/// UNet's down-path order) and one for the middle block's output.
#[derive(Debug, Clone)]
pub struct ControlResiduals {
    pub down: Vec<Tensor>,
    pub mid: Tensor,
}

impl ControlResiduals {
    /// The element-wise sum of two sets (multi-ControlNet).
    pub fn add(&self, other: &ControlResiduals) -> Result<ControlResiduals> {
        if self.down.len() != other.down.len() {
            return Err(Error::model(format!(
                "controlnet: residual sets of {} and {} skips cannot be added (ControlNets for \
                 different UNets)",
                self.down.len(),
                other.down.len()
            )));
        }
        let down = self
            .down
            .iter()
            .zip(&other.down)
            .map(|(a, b)| Ok((a + b)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(ControlResiduals {
            down,
            mid: (&self.mid + &other.mid)?,
        })
    }

    /// `[zeros; self]` on the batch axis: guess mode runs the ControlNet on the conditional half
    /// of a classifier-free-guidance batch only, and leaves the unconditional half unchanged.
    pub fn with_zero_uncond(&self) -> Result<ControlResiduals> {
        let pad = |t: &Tensor| -> Result<Tensor> { Ok(Tensor::cat(&[&t.zeros_like()?, t], 0)?) };
        Ok(ControlResiduals {
            down: self.down.iter().map(pad).collect::<Result<Vec<_>>>()?,
            mid: pad(&self.mid)?,
        })
    }
}

/// A loaded ControlNet; build it with [`ControlNetModel::new`] or [`ControlNetModel::load`].
#[derive(Debug, Clone)]
pub struct ControlNetModel {
    /// The UNet encoder copy (no up path).
    encoder: UNet2DConditionModel,
    cond_embedding: ConditioningEmbedding,
    /// One 1x1 convolution per skip connection.
    down_projections: Vec<Conv2d>,
    mid_projection: Conv2d,
    bgr: bool,
    conditioning_channels: usize,
    dtype: DType,
}

impl ControlNetModel {
    /// `vb` is rooted at the ControlNet's weights and fixes the dtype and device it runs in.
    pub fn new(vb: VarBuilder, cfg: &ControlNetConfig) -> Result<Self> {
        if cfg.global_pool_conditions {
            return Err(Error::model(
                "controlnet config: `global_pool_conditions` = true (shuffle-type ControlNets) \
                 is not supported",
            ));
        }
        let bgr = match cfg.controlnet_conditioning_channel_order.as_str() {
            "rgb" => false,
            "bgr" => true,
            other => {
                return Err(Error::model(format!(
                    "controlnet config: `controlnet_conditioning_channel_order` = {other:?} is \
                     not supported (\"rgb\", \"bgr\")"
                )))
            }
        };
        let unet = &cfg.unet;
        // diffusers' ControlNetModel fixes these; a config that sets them otherwise is not one.
        if unet.time_embedding_dim.is_some() || unet.time_embedding_act_fn.is_some() {
            return Err(Error::model(
                "controlnet config: `time_embedding_dim` / `time_embedding_act_fn` are not \
                 ControlNet settings",
            ));
        }
        let encoder = UNet2DConditionModel::new_encoder(vb.clone(), unet)?;
        let channels = &unet.block_out_channels;
        let n = channels.len();
        let layers = unet.layers_per_block.expand(n, "layers_per_block")?;
        let cond_embedding = ConditioningEmbedding::new(
            vb.pp("controlnet_cond_embedding"),
            cfg.conditioning_channels,
            &cfg.conditioning_embedding_out_channels,
            channels[0],
        )?;
        // The widths of the skips, in the UNet's down-path order.
        let mut skip_channels = vec![channels[0]];
        for (i, &c) in channels.iter().enumerate() {
            skip_channels.extend(std::iter::repeat_n(c, layers[i]));
            if i + 1 < n {
                skip_channels.push(c);
            }
        }
        let down_projections = skip_channels
            .iter()
            .enumerate()
            .map(|(i, &c)| conv2d(vb.pp(format!("controlnet_down_blocks.{i}")), c, c, 1, 0, 1))
            .collect::<Result<Vec<_>>>()?;
        let mid_projection = conv2d(
            vb.pp("controlnet_mid_block"),
            channels[n - 1],
            channels[n - 1],
            1,
            0,
            1,
        )?;
        Ok(Self {
            encoder,
            cond_embedding,
            down_projections,
            mid_projection,
            bgr,
            conditioning_channels: cfg.conditioning_channels,
            dtype: vb.dtype(),
        })
    }

    /// Loads a diffusers ControlNet folder (`config.json` + `diffusion_pytorch_model.safetensors`).
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let component = load_component(dir, None, device, dtype)?;
        Self::from_component(&component, device, dtype)
    }

    /// Loads a single-file ControlNet in the original layout (`control_*.safetensors`, see
    /// [`load_controlnet_file`]) described by the diffusers `config`.
    pub fn load_file(
        path: &Path,
        config: serde_json::Value,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let component = load_controlnet_file(path, config, device, dtype)?;
        Self::from_component(&component, device, dtype)
    }

    /// Loads the ControlNet a registry entry names: its diffusers folder or its single file.
    pub fn load_entry(entry: &ControlNetEntry, device: &Device, dtype: DType) -> Result<Self> {
        match &entry.source {
            ControlNetSource::File { path, config } => {
                let config = match config {
                    Some(p) => controlnet_config_file(p)?,
                    None => reference_config(entry.family)?,
                };
                Self::load_file(path, config, device, dtype)
            }
            _ => Self::load(&entry.local_dir()?, device, dtype),
        }
    }

    fn from_component(component: &Component, device: &Device, dtype: DType) -> Result<Self> {
        let config = ControlNetConfig::from_json(&component.config)?;
        Self::new(component.weights.var_builder(dtype, device), &config)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        self.encoder.device()
    }

    /// Whether the ControlNet needs SDXL's [`AddedConditions`].
    pub fn needs_added_conditions(&self) -> bool {
        self.encoder.needs_added_conditions()
    }

    /// Number of down residuals it produces (the UNet it pairs with must have as many skips).
    pub fn num_down_residuals(&self) -> usize {
        self.down_projections.len()
    }

    /// Embeds a control image `[B, 3, H, W]` with values in 0..1 (H and W multiples of 8). The
    /// embedding does not depend on the timestep: compute it once per request and pass it to
    /// [`Self::forward`] at every step.
    pub fn embed_condition(&self, image: &Tensor) -> Result<Tensor> {
        let (_, channels, height, width) = image.dims4()?;
        if channels != self.conditioning_channels {
            return Err(Error::model(format!(
                "controlnet: control image has {channels} channels, the model takes {}",
                self.conditioning_channels
            )));
        }
        let scale = self.cond_embedding.downscale();
        if !height.is_multiple_of(scale) || !width.is_multiple_of(scale) {
            return Err(Error::invalid(format!(
                "controlnet: the control image must be a multiple of {scale} in both sides. \
                 Given: {width}x{height}"
            )));
        }
        let mut image = image.to_dtype(self.dtype)?;
        if self.bgr {
            let c = self.conditioning_channels;
            let flipped: Vec<Tensor> = (0..c)
                .rev()
                .map(|i| image.narrow(1, i, 1))
                .collect::<candle_core::Result<_>>()?;
            image = Tensor::cat(&flipped, 1)?;
        }
        self.cond_embedding.forward(&image)
    }

    /// The residuals for `sample` at `timestep`: `conditioning` is [`Self::embed_condition`]'s
    /// output (any batch of one image broadcasts). Every residual is multiplied by `scale`; with
    /// `ramp` (diffusers' guess mode) the scales instead rise geometrically from 0.1 x `scale` on
    /// the first skip to `scale` on the middle block (`logspace(-1, 0)`), so coarse features
    /// dominate.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditions>,
        conditioning: &Tensor,
        scale: f64,
        ramp: bool,
    ) -> Result<ControlResiduals> {
        let encoded = self.encoder.encode(
            sample,
            timestep,
            encoder_hidden_states,
            added,
            Some(conditioning),
        )?;
        if encoded.skips.len() != self.down_projections.len() {
            return Err(Error::model(format!(
                "controlnet: {} skips for {} projections, this is a bug",
                encoded.skips.len(),
                self.down_projections.len()
            )));
        }
        let n = self.down_projections.len();
        let scales: Vec<f64> = if ramp {
            // torch.logspace(-1, 0, n + 1) in f32, times the scale.
            (0..=n)
                .map(|i| {
                    let exponent = -1.0 + i as f64 / n as f64;
                    f64::from(10f64.powf(exponent) as f32) * scale
                })
                .collect()
        } else {
            vec![scale; n + 1]
        };
        let down = encoded
            .skips
            .iter()
            .zip(&self.down_projections)
            .zip(&scales)
            .map(|((skip, projection), &s)| Ok((projection.forward(skip)? * s)?))
            .collect::<Result<Vec<_>>>()?;
        let mid = (self.mid_projection.forward(&encoded.h)? * scales[n])?;
        Ok(ControlResiduals { down, mid })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_keeps_controlnet_and_unet_settings_apart() {
        let json = serde_json::json!({
            "_class_name": "ControlNetModel",
            "block_out_channels": [8, 16],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "conditioning_embedding_out_channels": [4, 8],
            "controlnet_conditioning_channel_order": "bgr",
            "global_pool_conditions": false,
            "layers_per_block": 1
        });
        let cfg = ControlNetConfig::from_json(&json).unwrap();
        assert_eq!(cfg.conditioning_embedding_out_channels, vec![4, 8]);
        assert_eq!(cfg.controlnet_conditioning_channel_order, "bgr");
        assert_eq!(cfg.conditioning_channels, 3);
        assert_eq!(cfg.unet.block_out_channels, vec![8, 16]);
        // Only diffusers' metadata is left over for the UNet settings.
        assert!(cfg.unet.unrecognized.keys().all(|k| k.starts_with('_')));

        let unknown = serde_json::json!({"some_new_setting": 1});
        let cfg = ControlNetConfig::from_json(&unknown).unwrap();
        assert!(cfg.unet.unrecognized.contains_key("some_new_setting"));
    }

    #[test]
    fn reference_configs_are_the_families_unet_encoders() {
        let cfg = ControlNetConfig::from_json(&reference_config(Family::Sd1).unwrap()).unwrap();
        assert_eq!(cfg.unet.block_out_channels, vec![320, 640, 1280, 1280]);
        assert_eq!(
            cfg.conditioning_embedding_out_channels,
            vec![16, 32, 96, 256]
        );
        assert_eq!(cfg.conditioning_channels, 3);
        for family in [Family::Sd1, Family::Sd2, Family::Sdxl] {
            let cfg = ControlNetConfig::from_json(&reference_config(family).unwrap()).unwrap();
            assert!(
                cfg.unet.unrecognized.keys().all(|k| k.starts_with('_')),
                "{family}: {:?}",
                cfg.unet.unrecognized.keys().collect::<Vec<_>>()
            );
        }
    }
}
