//! Candle modules of the Stable Diffusion parts, one file per part, configs mirroring diffusers
//! `config.json`, constructors taking a `VarBuilder` over diffusers-named weights.

pub mod clip;
pub mod controlnet;
/// The f32 CPU kernels (its own crate, so that it is optimised even in test builds).
pub use sd_serve_kernels as cpu;
pub mod ip_adapter;
pub mod layers;
pub mod unet;
pub mod vae;
