//! The convolutional parts of the U-Net (Ronneberger et al. 2015) as Stable Diffusion uses
//! them: the time-conditioned residual block of DDPM (Ho et al. 2020; He et al. 2016 for the
//! residual form), and the stride-2 convolution / nearest-neighbour upsampling between levels.

use candle_core::Tensor;
use candle_nn::{Module, VarBuilder};

use super::Activation;
use crate::models::layers::{conv2d, group_norm, linear, Conv2d, GroupNorm, Linear};
use crate::Result;

/// How a ResNet block injects the time embedding (diffusers' `resnet_time_scale_shift`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimeEmbeddingNorm {
    /// Added to the features before the second group norm.
    Default,
    /// Projected to a scale and a shift applied after the second group norm.
    ScaleShift,
}

/// What every ResNet block of one U-Net level shares.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResnetSettings {
    pub groups: usize,
    pub eps: f64,
    pub act: Activation,
    pub temb_channels: usize,
    pub time_embedding_norm: TimeEmbeddingNorm,
    pub output_scale_factor: f64,
}

/// diffusers' `ResnetBlock2D`: GroupNorm, act, conv, + time embedding, GroupNorm, act, conv,
/// added to the (1x1-projected when the width changes) input.
#[derive(Debug, Clone)]
pub(crate) struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    act: Activation,
    time_embedding_norm: TimeEmbeddingNorm,
    out_channels: usize,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub(crate) fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        s: &ResnetSettings,
    ) -> Result<Self> {
        let temb_out = match s.time_embedding_norm {
            TimeEmbeddingNorm::Default => out_channels,
            TimeEmbeddingNorm::ScaleShift => 2 * out_channels,
        };
        let conv_shortcut = if in_channels != out_channels {
            Some(conv2d(
                vb.pp("conv_shortcut"),
                in_channels,
                out_channels,
                1,
                0,
                1,
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(s.groups, in_channels, s.eps, vb.pp("norm1"))?,
            conv1: conv2d(vb.pp("conv1"), in_channels, out_channels, 3, 1, 1)?,
            time_emb_proj: linear(s.temb_channels, temb_out, vb.pp("time_emb_proj"))?,
            norm2: group_norm(s.groups, out_channels, s.eps, vb.pp("norm2"))?,
            conv2: conv2d(vb.pp("conv2"), out_channels, out_channels, 3, 1, 1)?,
            conv_shortcut,
            act: s.act,
            time_embedding_norm: s.time_embedding_norm,
            out_channels,
            output_scale_factor: s.output_scale_factor,
        })
    }

    /// `temb_act`: the time embedding `[1 or B, temb_channels]` with the block's activation
    /// already applied (every block applies the same one, so the model does it once).
    pub(crate) fn forward(&self, x: &Tensor, temb_act: &Tensor) -> Result<Tensor> {
        let h = self.act.after_norm(&self.norm1, x)?;
        let h = self.conv1.forward(&h)?;
        let t = self
            .time_emb_proj
            .forward(temb_act)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        let h = match self.time_embedding_norm {
            TimeEmbeddingNorm::Default => {
                self.act.after_norm(&self.norm2, &h.broadcast_add(&t)?)?
            }
            TimeEmbeddingNorm::ScaleShift => {
                let scale = (t.narrow(1, 0, self.out_channels)? + 1.0)?;
                let shift = t.narrow(1, self.out_channels, self.out_channels)?;
                let h = self
                    .norm2
                    .forward(&h)?
                    .broadcast_mul(&scale)?
                    .broadcast_add(&shift)?;
                self.act.apply(&h)?
            }
        };
        let h = self.conv2.forward(&h)?;
        let out = match &self.conv_shortcut {
            Some(conv) => (conv.forward(x)? + h)?,
            None => (x + h)?,
        };
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            Ok((out / self.output_scale_factor)?)
        }
    }
}

/// Stride-2 3x3 convolution halving the resolution (diffusers' `Downsample2D` with a conv).
#[derive(Debug, Clone)]
pub(crate) struct Downsample2D {
    conv: Conv2d,
    /// With no padding configured, diffusers pads one zero row/column at the bottom/right only.
    pad_bottom_right: bool,
}

impl Downsample2D {
    pub(crate) fn new(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: conv2d(vb.pp("conv"), channels, channels, 3, padding, 2)?,
            pad_bottom_right: padding == 0,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_bottom_right {
            let x = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            Ok(self.conv.forward(&x)?)
        } else {
            Ok(self.conv.forward(x)?)
        }
    }
}

/// Nearest-neighbour upsampling then a 3x3 convolution (diffusers' `Upsample2D` with a conv).
#[derive(Debug, Clone)]
pub(crate) struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub(crate) fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv2d(vb.pp("conv"), channels, channels, 3, 1, 1)?,
        })
    }

    /// `size`: the output resolution, that of the skip connection the next block concatenates;
    /// twice the input unless the latent had a side that does not halve evenly.
    pub(crate) fn forward(&self, x: &Tensor, size: (usize, usize)) -> Result<Tensor> {
        let x = x.upsample_nearest2d(size.0, size.1)?;
        Ok(self.conv.forward(&x)?)
    }
}
