//! The levels of the U-Net: down blocks (ResNet blocks, each optionally followed by a spatial
//! transformer, then a downsampler) whose outputs become skip connections, the middle block,
//! and up blocks that concatenate those skips back in reverse order.
//!
//! diffusers has a class per variant (`DownBlock2D` / `CrossAttnDownBlock2D`, `UpBlock2D` /
//! `CrossAttnUpBlock2D`, `UNetMidBlock2D` / `UNetMidBlock2DCrossAttn`); here the variants differ
//! only in whether their transformer list is empty.

use candle_core::Tensor;

use super::attention::{ImageAttention, Transformer2DModel, TransformerSettings};
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetSettings, Upsample2D};
use candle_nn::VarBuilder;

use crate::Result;

/// Cross-attention of one level: its settings and the number of transformer blocks behind each
/// of its ResNet blocks.
#[derive(Debug, Clone)]
pub(crate) struct CrossAttention {
    pub settings: TransformerSettings,
    pub layers_per_resnet: Vec<usize>,
}

/// The next `n` layers' image-prompt keys of `images` (nothing when there are none).
pub(crate) fn take_images<'a>(
    images: &mut &'a [Vec<ImageAttention>],
    n: usize,
) -> &'a [Vec<ImageAttention>] {
    if images.is_empty() {
        return &[];
    }
    let (own, rest) = images.split_at(n.min(images.len()));
    *images = rest;
    own
}

/// Cross-attention layers of `transformers`, for the IP-Adapter layer count.
pub(crate) fn depth(transformers: &[Transformer2DModel]) -> usize {
    transformers.iter().map(Transformer2DModel::depth).sum()
}

fn transformers(
    vb: &VarBuilder,
    channels: usize,
    cross_attention: Option<&CrossAttention>,
) -> Result<Vec<Transformer2DModel>> {
    let Some(ca) = cross_attention else {
        return Ok(Vec::new());
    };
    ca.layers_per_resnet
        .iter()
        .enumerate()
        .map(|(i, &layers)| {
            Transformer2DModel::new(
                vb.pp(format!("attentions.{i}")),
                channels,
                layers,
                &ca.settings,
            )
        })
        .collect()
}

#[derive(Debug, Clone)]
pub(crate) struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    /// Empty for `DownBlock2D`, one per ResNet block for `CrossAttnDownBlock2D`.
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    /// `downsample_padding`: None for the last level, which keeps its resolution.
    pub(crate) fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        num_resnets: usize,
        resnet: &ResnetSettings,
        cross_attention: Option<&CrossAttention>,
        downsample_padding: Option<usize>,
    ) -> Result<Self> {
        let resnets = (0..num_resnets)
            .map(|i| {
                let in_ch = if i == 0 { in_channels } else { out_channels };
                ResnetBlock2D::new(vb.pp(format!("resnets.{i}")), in_ch, out_channels, resnet)
            })
            .collect::<Result<Vec<_>>>()?;
        let downsampler = downsample_padding
            .map(|padding| Downsample2D::new(vb.pp("downsamplers.0"), out_channels, padding))
            .transpose()?;
        Ok(Self {
            resnets,
            attentions: transformers(&vb, out_channels, cross_attention)?,
            downsampler,
        })
    }

    /// Cross-attention layers of the block.
    pub(crate) fn cross_attention_layers(&self) -> usize {
        depth(&self.attentions)
    }

    /// Appends each intermediate output (the skip connections) to `skips`. `images`: empty, or
    /// the IP-Adapter keys of each cross-attention layer of the block, in order.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        temb_act: &Tensor,
        context: &Tensor,
        mut images: &[Vec<ImageAttention>],
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, temb_act)?;
            if let Some(attention) = self.attentions.get(i) {
                let own = take_images(&mut images, attention.depth());
                h = attention.forward(&h, context, own)?;
            }
            skips.push(h.clone());
        }
        if let Some(downsampler) = &self.downsampler {
            h = downsampler.forward(&h)?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct MidBlock {
    first: ResnetBlock2D,
    /// (transformer, ResNet block) pairs; none for `UNetMidBlock2D` as the UNet configures it.
    layers: Vec<(Transformer2DModel, ResnetBlock2D)>,
}

impl MidBlock {
    pub(crate) fn new(
        vb: VarBuilder,
        channels: usize,
        resnet: &ResnetSettings,
        cross_attention: Option<&CrossAttention>,
    ) -> Result<Self> {
        let first = ResnetBlock2D::new(vb.pp("resnets.0"), channels, channels, resnet)?;
        let layers = transformers(&vb, channels, cross_attention)?
            .into_iter()
            .enumerate()
            .map(|(i, attention)| {
                let resnet = ResnetBlock2D::new(
                    vb.pp(format!("resnets.{}", i + 1)),
                    channels,
                    channels,
                    resnet,
                )?;
                Ok((attention, resnet))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { first, layers })
    }

    /// Cross-attention layers of the block.
    pub(crate) fn cross_attention_layers(&self) -> usize {
        self.layers.iter().map(|(a, _)| a.depth()).sum()
    }

    pub(crate) fn forward(
        &self,
        x: &Tensor,
        temb_act: &Tensor,
        context: &Tensor,
        mut images: &[Vec<ImageAttention>],
    ) -> Result<Tensor> {
        let mut h = self.first.forward(x, temb_act)?;
        for (attention, resnet) in &self.layers {
            let own = take_images(&mut images, attention.depth());
            h = attention.forward(&h, context, own)?;
            h = resnet.forward(&h, temb_act)?;
        }
        Ok(h)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    /// Empty for `UpBlock2D`, one per ResNet block for `CrossAttnUpBlock2D`.
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// `prev_out_channels`: width of the incoming features; `skip_in_channels`: width of the
    /// down level this block mirrors (its last skip connection comes from the level below).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        vb: VarBuilder,
        prev_out_channels: usize,
        out_channels: usize,
        skip_in_channels: usize,
        num_resnets: usize,
        resnet: &ResnetSettings,
        cross_attention: Option<&CrossAttention>,
        add_upsample: bool,
    ) -> Result<Self> {
        let resnets = (0..num_resnets)
            .map(|i| {
                let skip = if i + 1 == num_resnets {
                    skip_in_channels
                } else {
                    out_channels
                };
                let input = if i == 0 {
                    prev_out_channels
                } else {
                    out_channels
                };
                ResnetBlock2D::new(
                    vb.pp(format!("resnets.{i}")),
                    input + skip,
                    out_channels,
                    resnet,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let upsampler = add_upsample
            .then(|| Upsample2D::new(vb.pp("upsamplers.0"), out_channels))
            .transpose()?;
        Ok(Self {
            resnets,
            attentions: transformers(&vb, out_channels, cross_attention)?,
            upsampler,
        })
    }

    pub(crate) fn num_resnets(&self) -> usize {
        self.resnets.len()
    }

    /// Cross-attention layers of the block.
    pub(crate) fn cross_attention_layers(&self) -> usize {
        depth(&self.attentions)
    }

    /// `skips`: this block's skip connections in the order the down path produced them (it
    /// consumes them last first). `upsample_to`: the resolution of the next block's skips.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        temb_act: &Tensor,
        context: &Tensor,
        mut images: &[Vec<ImageAttention>],
        upsample_to: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, (resnet, skip)) in self.resnets.iter().zip(skips.iter().rev()).enumerate() {
            h = resnet.forward(&Tensor::cat(&[&h, skip], 1)?, temb_act)?;
            if let Some(attention) = self.attentions.get(i) {
                let own = take_images(&mut images, attention.depth());
                h = attention.forward(&h, context, own)?;
            }
        }
        if let Some(upsampler) = &self.upsampler {
            let (_, _, height, width) = h.dims4()?;
            h = upsampler.forward(&h, upsample_to.unwrap_or((2 * height, 2 * width)))?;
        }
        Ok(h)
    }
}
