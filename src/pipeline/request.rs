//! The canonical generation request every dialect fills, and its validation.
//!
//! Values arriving here are typed; the checks below are the engine's own limits (shapes the
//! models can run), each failing with a message that names the field and the limit.

use candle_core::Tensor;

use super::controlnet::{self, ControlNetUnit};
use super::inpaint::{self, MaskImage, Outpaint};
use crate::schedulers::SchedulerSpec;
use crate::{Error, Result};

/// The latent space is the image downscaled by 8 (the VAE's three downsampling stages).
pub const VAE_SCALE_FACTOR: usize = 8;
/// Largest side accepted by the engine; dialects apply their own, tighter limits first.
pub const MAX_SIDE: usize = 4096;
pub const MAX_STEPS: usize = 1000;
pub const MAX_IMAGES: usize = 64;

/// An image to start from (img2img): RGB pixels and how much of the schedule to run on it.
#[derive(Debug, Clone)]
pub struct InitImage {
    pub image: image::RgbImage,
    /// Fraction of the schedule to run, 0 < strength <= 1; 1 ignores the image's content.
    pub strength: f64,
}

/// An SDXL refiner taking over the last part of the denoising (diffusers' `denoising_end` on
/// the base model and `denoising_start` on the refiner, both `start`).
#[derive(Debug, Clone, PartialEq)]
pub struct Refiner {
    /// Registry id (or alias) of an `sdxl-refiner` (or `sdxl`) model.
    pub model: String,
    /// Where the refiner starts, as a fraction of the schedule in (0, 1]: the base model runs
    /// the timesteps >= `round(T * (1 - start))` (T = training timesteps, 1000), the refiner the
    /// rest. 1 leaves the refiner no step (it only decodes).
    pub start: f64,
}

#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: String,
    /// `None`: no negative prompt (SDXL then uses zero embeddings, as diffusers does).
    pub negative_prompt: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    /// `None`: the model's own scheduler (`scheduler_config.json`).
    pub scheduler: Option<SchedulerSpec>,
    /// Image i of the request uses `seed + i`.
    pub seed: u64,
    pub num_images: usize,
    /// Number of final CLIP layers skipped (diffusers' convention: 1 = penultimate layer).
    pub clip_skip: Option<usize>,
    pub init_image: Option<InitImage>,
    /// Inpainting: which pixels of `init_image` to repaint (needs `init_image`).
    pub mask: Option<MaskImage>,
    /// Outpainting: how far to extend `init_image`; `width` x `height` must be its size plus
    /// the extension.
    pub outpaint: Option<Outpaint>,
    /// Explicit initial latents `[num_images, C, height/8, width/8]`, unscaled standard normal
    /// noise as diffusers' `latents=` takes them. Replaces drawing noise from the seed.
    pub latents: Option<Tensor>,
    /// LoRAs to merge into the model for this request: registry id (or alias) and weight
    /// (negative weights subtract). The empty list runs the plain model.
    pub loras: Vec<(String, f64)>,
    /// A registry VAE (id or alias) that encodes the seed image and decodes the results instead
    /// of the model's own; `None` keeps the model's.
    pub vae: Option<String>,
    /// Also merge the LCM-LoRA of the model's family (the registry `[[lora]]` marked `lcm`) at
    /// weight 1, after `loras`. The caller picks the LCM scheduler, steps and guidance.
    pub lcm_lora: bool,
    /// The syntax `prompt` and `negative_prompt` are read in; `None` is plain text truncated to
    /// 75 tokens, the weighted syntaxes also take longer prompts.
    pub prompt_weighting: super::PromptWeighting,
    /// Textual inversion embeddings for this request: registry id (or alias) and weight, which
    /// multiplies the vectors (0 leaves the embedding out). See
    /// [`super::textual_inversion`] for where their tokens go.
    pub embeddings: Vec<(String, f64)>,
    /// ControlNets guiding this request, their residuals summed (empty: none).
    pub controlnets: Vec<ControlNetUnit>,
    /// An SDXL refiner for the last steps; `None`: the model denoises alone.
    pub refiner: Option<Refiner>,
    /// IP-Adapter image prompts, their attentions added together (empty: none). The refiner's
    /// share runs without them.
    pub ip_adapters: Vec<super::ip_adapter::IpAdapterUnit>,
}

impl GenerationRequest {
    /// A request with diffusers' defaults for the rest of the fields.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: None,
            width: 512,
            height: 512,
            steps: 30,
            guidance_scale: 7.5,
            scheduler: None,
            seed: 0,
            num_images: 1,
            clip_skip: None,
            init_image: None,
            mask: None,
            outpaint: None,
            latents: None,
            loras: Vec::new(),
            vae: None,
            lcm_lora: false,
            prompt_weighting: super::PromptWeighting::None,
            embeddings: Vec::new(),
            controlnets: Vec::new(),
            refiner: None,
            ip_adapters: Vec::new(),
        }
    }

    /// The engine's limits. Dialects validate their documented limits before this.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("width", self.width), ("height", self.height)] {
            if v == 0 || !v.is_multiple_of(VAE_SCALE_FACTOR) {
                return Err(Error::invalid(format!(
                    "`{name}` must be a positive multiple of {VAE_SCALE_FACTOR}. Given: {v}"
                )));
            }
            if v > MAX_SIDE {
                return Err(Error::invalid(format!(
                    "`{name}` must be <= {MAX_SIDE}. Given: {v}"
                )));
            }
        }
        if self.steps == 0 || self.steps > MAX_STEPS {
            return Err(Error::invalid(format!(
                "`steps` must be between 1 and {MAX_STEPS}. Given: {}",
                self.steps
            )));
        }
        if self.num_images == 0 || self.num_images > MAX_IMAGES {
            return Err(Error::invalid(format!(
                "`num_images` must be between 1 and {MAX_IMAGES}. Given: {}",
                self.num_images
            )));
        }
        if !self.guidance_scale.is_finite() || self.guidance_scale < 0.0 {
            return Err(Error::invalid(format!(
                "`guidance_scale` must be a finite number >= 0. Given: {}",
                self.guidance_scale
            )));
        }
        if let Some(init) = &self.init_image {
            if !(init.strength > 0.0 && init.strength <= 1.0) {
                return Err(Error::invalid(format!(
                    "`strength` must be > 0 and <= 1. Given: {}",
                    init.strength
                )));
            }
            if (self.steps as f64 * init.strength) < 1.0 {
                return Err(Error::invalid(format!(
                    "`strength` {} with {} steps runs no denoising step: steps * strength must be >= 1",
                    init.strength, self.steps
                )));
            }
        }
        for (id, weight) in &self.loras {
            if !weight.is_finite() {
                return Err(Error::invalid(format!(
                    "the weight of LoRA `{id}` must be a finite number. Given: {weight}"
                )));
            }
        }
        if let Some(vae) = &self.vae {
            if vae.trim().is_empty() || vae.trim() != vae {
                return Err(Error::invalid(format!(
                    "`vae` must be a VAE id without surrounding spaces. Given: {vae:?}"
                )));
            }
        }
        for (i, (id, weight)) in self.embeddings.iter().enumerate() {
            if !weight.is_finite() {
                return Err(Error::invalid(format!(
                    "the weight of embedding `{id}` must be a finite number. Given: {weight}"
                )));
            }
            if self.embeddings[..i].iter().any(|(other, _)| other == id) {
                return Err(Error::invalid(format!(
                    "embedding `{id}` is listed twice: give it once, with one weight"
                )));
            }
        }
        inpaint::check(self)?;
        self.prompt_weighting.check_prompt(&self.prompt)?;
        if let Some(negative) = &self.negative_prompt {
            self.prompt_weighting.check_prompt(negative)?;
        }
        controlnet::check(&self.controlnets)?;
        let repaints =
            self.init_image.is_some() && (self.mask.is_some() || self.outpaint.is_some());
        controlnet::check_conditions(&self.controlnets, repaints)?;
        super::ip_adapter::check(&self.ip_adapters)?;
        if let Some(refiner) = &self.refiner {
            if !(refiner.start > 0.0 && refiner.start <= 1.0) {
                return Err(Error::invalid(format!(
                    "the refiner's start must be > 0 and <= 1 (a fraction of the steps). \
                     Given: {}",
                    refiner.start
                )));
            }
            if refiner.model.trim().is_empty() {
                return Err(Error::invalid("the refiner's `model` must not be empty"));
            }
            if self.mask.is_some() || self.outpaint.is_some() {
                return Err(Error::invalid(
                    "a refiner cannot be combined with inpainting or outpainting",
                ));
            }
        }
        if let Some(latents) = &self.latents {
            let want = [
                self.num_images,
                0,
                self.height / VAE_SCALE_FACTOR,
                self.width / VAE_SCALE_FACTOR,
            ];
            let dims = latents.dims();
            if dims.len() != 4 || dims[0] != want[0] || dims[2] != want[2] || dims[3] != want[3] {
                return Err(Error::invalid(format!(
                    "`latents` must have shape [{}, C, {}, {}]. Given: {:?}",
                    want[0], want[2], want[3], dims
                )));
            }
        }
        Ok(())
    }

    /// Seeds of the request's images, `seed + i` (wrapping, as a u64 counter would).
    pub fn seeds(&self) -> Vec<u64> {
        (0..self.num_images as u64)
            .map(|i| self.seed.wrapping_add(i))
            .collect()
    }
}
