//! Timestep embeddings: the sinusoidal position encoding of "Attention Is All You Need"
//! (Vaswani et al. 2017) as used by DDPM (Ho et al. 2020) for the diffusion timestep, and the
//! two-layer MLP that maps it to the embedding every ResNet block receives.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Module, VarBuilder};

use super::Activation;
use crate::models::layers::{linear, Linear};
use crate::Result;

/// Fixed sinusoidal embedding of scalar positions (timesteps, or SDXL's size/crop ids).
///
/// Always computed in f32, whatever the model dtype: timesteps up to 1000 times frequencies near
/// 1 need the mantissa.
#[derive(Debug, Clone)]
pub(crate) struct SinusoidalEmbedding {
    /// `[1, dim / 2]`, f32.
    frequencies: Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
}

impl SinusoidalEmbedding {
    pub(crate) fn new(
        dim: usize,
        flip_sin_to_cos: bool,
        freq_shift: f64,
        device: &Device,
    ) -> Result<Self> {
        const MAX_PERIOD: f64 = 10_000.0;
        let half = dim / 2;
        // Same f32 operation order as diffusers, so the frequencies agree to the last bit.
        let log_period = -(MAX_PERIOD.ln() as f32);
        let denominator = (half as f64 - freq_shift) as f32;
        let frequencies: Vec<f32> = (0..half)
            .map(|i| (log_period * i as f32 / denominator).exp())
            .collect();
        Ok(Self {
            frequencies: Tensor::from_vec(frequencies, (1, half), device)?,
            dim,
            flip_sin_to_cos,
        })
    }

    /// `positions`: `[n]` of any float dtype; returns `[n, dim]` f32.
    pub(crate) fn forward(&self, positions: &Tensor) -> Result<Tensor> {
        let angles = positions
            .to_dtype(DType::F32)?
            .unsqueeze(1)?
            .broadcast_mul(&self.frequencies)?;
        let (sin, cos) = (angles.sin()?, angles.cos()?);
        let halves = if self.flip_sin_to_cos {
            [cos, sin]
        } else {
            [sin, cos]
        };
        let embedding = Tensor::cat(&halves, 1)?;
        if self.dim % 2 == 1 {
            Ok(embedding.pad_with_zeros(1, 0, 1)?)
        } else {
            Ok(embedding)
        }
    }
}

/// `linear_1 -> act -> linear_2`, diffusers' `TimestepEmbedding` (also its SDXL `add_embedding`).
#[derive(Debug, Clone)]
pub(crate) struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    act: Activation,
}

impl TimestepEmbedding {
    pub(crate) fn new(
        vb: VarBuilder,
        in_dim: usize,
        embed_dim: usize,
        act: Activation,
    ) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_dim, embed_dim, vb.pp("linear_1"))?,
            linear_2: linear(embed_dim, embed_dim, vb.pp("linear_2"))?,
            act,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.act.apply(&self.linear_1.forward(x)?)?;
        Ok(self.linear_2.forward(&h)?)
    }
}
