//! The generation pipeline: prompt encoding, latent preparation, the denoising loop, decoding.

pub mod noise;
pub mod prompt;
