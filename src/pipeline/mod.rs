//! The generation pipeline: prompt encoding, latent preparation, the denoising loop with
//! classifier-free guidance, decoding. txt2img and img2img are one loop with different starts.

pub mod conditioning;
pub mod images;
pub mod noise;
pub mod prompt;
pub mod request;

use candle_core::{DType, Device, Tensor};

use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKl, AutoencoderKlConfig};
use crate::schedulers::{self, Scheduler, SchedulerConfig, SchedulerSpec};
use crate::weights::{Component, Family, PipelineFiles, TokenizerFiles};
use crate::{Error, Result};

use conditioning::{PromptEmbeddings, TextEncoder};
use noise::BatchNoise;
use prompt::ClipTokenizer;
pub use request::{GenerationRequest, InitImage};

/// What the denoising loop reports after each step; returning `false` cancels the job.
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize) -> bool;

/// A loaded Stable Diffusion model: text encoder(s), UNet, VAE and the scheduler defaults.
pub struct StableDiffusion {
    pub family: Family,
    device: Device,
    dtype: DType,
    text_encoder: TextEncoder,
    text_encoder_2: Option<TextEncoder>,
    unet: UNet2DConditionModel,
    vae: AutoencoderKl,
    vae_config: AutoencoderKlConfig,
    /// The VAE's dtype: f32 for an SDXL VAE that must not run in f16 (see [`vae_dtype`]).
    vae_dtype: DType,
    scheduler_config: SchedulerConfig,
    /// The scheduler a request without one gets, or why there is none.
    default_scheduler: std::result::Result<SchedulerSpec, String>,
    /// SDXL: no negative prompt means zero embeddings rather than the encoded empty prompt.
    force_zeros_for_empty_prompt: bool,
}

/// The images of one request as floats `[N, H, W, 3]` in 0..1, with the seed of each.
#[derive(Debug)]
pub struct GenerationOutput {
    pub images: Tensor,
    pub seeds: Vec<u64>,
}

impl GenerationOutput {
    pub fn to_rgb(&self) -> Result<Vec<image::RgbImage>> {
        images::unit_to_rgb(&self.images)
    }
}

/// The dtype the VAE runs in for a pipeline in `dtype`. SDXL's original VAE overflows f16 (its
/// decoder activations pass 65504 and come out as NaN), so, as diffusers' SDXL pipelines do, an
/// f16 SDXL pipeline keeps its VAE in f32 unless the VAE's config says `force_upcast: false`
/// (the fp16-fix VAE). SD 1.x/2.x VAEs are fine in f16 and diffusers never upcasts them; bf16
/// has f32's range.
pub fn vae_dtype(family: Family, dtype: DType, vae_config: &AutoencoderKlConfig) -> DType {
    if family == Family::Sdxl && dtype == DType::F16 && vae_config.force_upcast {
        DType::F32
    } else {
        dtype
    }
}

fn load_text_encoder(
    component: &Component,
    tokenizer: &TokenizerFiles,
    dtype: DType,
    device: &Device,
) -> Result<TextEncoder> {
    let config = ClipTextConfig::from_json(&component.config)?;
    let model = ClipTextModel::new(component.weights.var_builder(dtype, device), &config)?;
    let tokenizer = ClipTokenizer::new(
        &tokenizer.tokenizer_json,
        &tokenizer.pad_token,
        tokenizer.model_max_length,
    )?;
    Ok(TextEncoder { tokenizer, model })
}

impl StableDiffusion {
    pub fn load(files: &PipelineFiles, device: &Device, dtype: DType) -> Result<Self> {
        let text_encoder = load_text_encoder(&files.text_encoder, &files.tokenizer, dtype, device)?;
        let text_encoder_2 = match (&files.text_encoder_2, &files.tokenizer_2) {
            (Some(c), Some(t)) => Some(load_text_encoder(c, t, dtype, device)?),
            (None, None) => None,
            _ => {
                return Err(Error::model(
                    "text_encoder_2 and tokenizer_2 must come together",
                ))
            }
        };
        if (files.family == Family::Sdxl) != text_encoder_2.is_some() {
            return Err(Error::model(
                "SDXL models have two text encoders, SD1/SD2 models one",
            ));
        }
        let unet_config: UNet2DConditionConfig = serde_json::from_value(files.unet.config.clone())
            .map_err(|e| Error::model(format!("unet config.json: {e}")))?;
        let unet =
            UNet2DConditionModel::new(files.unet.weights.var_builder(dtype, device), &unet_config)?;
        let vae_config = AutoencoderKlConfig::from_json(&files.vae.config)?;
        let vae_dtype = vae_dtype(files.family, dtype, &vae_config);
        let vae = AutoencoderKl::new(
            files.vae.weights.var_builder(vae_dtype, device),
            &vae_config,
        )?;
        let scheduler_config = SchedulerConfig::from_json(&files.scheduler_config)?;
        // The model's own scheduler class; one sd-serve does not run (or a config without
        // `_class_name`) leaves the model usable with an explicit scheduler in each request.
        let default_scheduler = match scheduler_config.class_name.as_deref() {
            Some(name) => SchedulerSpec::parse(name).map_err(|e| {
                tracing::warn!("model scheduler {name} is not available: {e}");
                format!("the model's scheduler {name} is not available: name one with `scheduler`")
            }),
            None => Err(
                "the model's scheduler config names no scheduler class: name one with `scheduler`"
                    .to_string(),
            ),
        };
        let force_zeros_for_empty_prompt = files.force_zeros_for_empty_prompt;
        Ok(Self {
            family: files.family,
            device: device.clone(),
            dtype,
            text_encoder,
            text_encoder_2,
            unet,
            vae,
            vae_config,
            vae_dtype,
            scheduler_config,
            default_scheduler,
            force_zeros_for_empty_prompt,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The dtype the VAE runs in: [`Self::dtype`], or f32 for an upcast SDXL VAE.
    pub fn vae_dtype(&self) -> DType {
        self.vae_dtype
    }

    pub fn default_scheduler(&self) -> Option<&SchedulerSpec> {
        self.default_scheduler.as_ref().ok()
    }

    fn encode_prompt(&self, prompt: &str, clip_skip: Option<usize>) -> Result<PromptEmbeddings> {
        match &self.text_encoder_2 {
            None => {
                conditioning::encode_single(&self.text_encoder, prompt, clip_skip, &self.device)
            }
            Some(second) => conditioning::encode_dual(
                &self.text_encoder,
                second,
                prompt,
                clip_skip,
                &self.device,
            ),
        }
    }

    /// Prompt embeddings for `[uncond; cond]` (when guidance is on) of `n` images.
    fn conditioning(
        &self,
        req: &GenerationRequest,
        guided: bool,
    ) -> Result<conditioning::BatchConditioning> {
        let cond = self.encode_prompt(&req.prompt, req.clip_skip)?;
        let uncond = if !guided {
            None
        } else if req.negative_prompt.is_none() && self.force_zeros_for_empty_prompt {
            Some(cond.zeros_like()?)
        } else {
            let negative = req.negative_prompt.as_deref().unwrap_or("");
            // diffusers applies `clip_skip` to the prompt only; the negative prompt keeps the
            // encoder's default layer. Same seed, same image means following it here.
            Some(self.encode_prompt(negative, None)?)
        };
        conditioning::batch_conditioning(
            &cond,
            uncond.as_ref(),
            req.num_images,
            (req.height, req.width),
            self.dtype,
        )
    }

    /// Runs a request to float images. `progress(step, total)` is called after every denoising
    /// step; when it returns false the job stops with `Error::Cancelled`.
    pub fn generate(
        &self,
        req: &GenerationRequest,
        progress: Progress,
    ) -> Result<GenerationOutput> {
        let latents = self.denoise_latents(req, progress)?;
        let images = self.decode(&latents)?;
        Ok(GenerationOutput {
            images,
            seeds: req.seeds(),
        })
    }

    /// The denoising part of [`Self::generate`]: the final latents, before decoding.
    pub fn denoise_latents(&self, req: &GenerationRequest, progress: Progress) -> Result<Tensor> {
        req.validate()?;
        let spec = match (&req.scheduler, &self.default_scheduler) {
            (Some(spec), _) | (None, Ok(spec)) => spec,
            (None, Err(why)) => return Err(Error::Scheduler(why.clone())),
        };
        let scheduler = schedulers::build(spec, &self.scheduler_config, req.steps)?;
        self.denoise_latents_with(req, scheduler, progress)
    }

    /// The model's own scheduler config (`scheduler_config.json`), which request options override.
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    /// [`Self::denoise_latents`] with a scheduler built by the caller for `req.steps` steps
    /// (`req.scheduler` is then not read), e.g. one with its own noise source.
    pub fn denoise_latents_with(
        &self,
        req: &GenerationRequest,
        mut scheduler: Box<dyn Scheduler>,
        progress: Progress,
    ) -> Result<Tensor> {
        req.validate()?;
        // diffusers turns guidance off at scale <= 1 (one UNet pass instead of two).
        let guided = req.guidance_scale > 1.0;
        let cond = self.conditioning(req, guided)?;

        let seeds = req.seeds();
        let mut noise = BatchNoise::from_seeds(&seeds);
        let latent_channels = self.vae_config.latent_channels;
        let latent_shape = [
            latent_channels,
            req.height / request::VAE_SCALE_FACTOR,
            req.width / request::VAE_SCALE_FACTOR,
        ];

        let timesteps = scheduler.timesteps().to_vec();
        if let Some(latents) = &req.latents {
            if latents.dim(1)? != latent_channels {
                return Err(Error::invalid(format!(
                    "`latents` must have {latent_channels} channels for this model. Given: {:?}",
                    latents.dims()
                )));
            }
        }
        let (start, mut latents) = match &req.init_image {
            None => {
                let initial = match &req.latents {
                    Some(l) => l.to_device(&self.device)?.to_dtype(DType::F32)?,
                    None => noise.randn(&latent_shape, &self.device, DType::F32)?,
                };
                (0, (initial * scheduler.init_noise_sigma())?)
            }
            Some(init) => {
                // diffusers: run the last int(steps * strength) steps of the schedule.
                let run = ((req.steps as f64 * init.strength) as usize).min(req.steps);
                let start = (req.steps - run) * scheduler.order();
                let pixels =
                    images::image_to_tensor(&init.image, req.width, req.height, &self.device)?
                        .to_dtype(self.vae_dtype)?;
                let dist = self.vae.encode(&pixels)?;
                // One encoding, sampled per image with that image's own generator.
                let mean = dist.mean.to_dtype(DType::F32)?;
                let std = dist.std.to_dtype(DType::F32)?;
                let eps = noise.randn(&latent_shape, &self.device, DType::F32)?;
                let sampled = eps.broadcast_mul(&std)?.broadcast_add(&mean)?;
                let mut encoded = (sampled * self.vae_config.scaling_factor)?;
                if let Some(shift) = self.vae_config.shift_factor {
                    encoded = (encoded - shift * self.vae_config.scaling_factor)?;
                }
                let initial = match &req.latents {
                    Some(l) => l.to_device(&self.device)?.to_dtype(DType::F32)?,
                    None => noise.randn(&latent_shape, &self.device, DType::F32)?,
                };
                (start, scheduler.add_noise(&encoded, &initial, start)?)
            }
        };
        latents = latents.to_dtype(self.dtype)?;

        let total = timesteps.len().saturating_sub(start);
        if total == 0 {
            return Err(Error::invalid(format!(
                "`strength` leaves no denoising step of the {} scheduled",
                timesteps.len()
            )));
        }
        for (index, &t) in timesteps.iter().enumerate().skip(start) {
            let model_input = if guided {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let model_input = scheduler.scale_model_input(&model_input, index)?;
            let prediction =
                self.unet
                    .forward(&model_input, t, &cond.hidden, cond.added.as_ref())?;
            let prediction = if guided {
                let n = req.num_images;
                let uncond = prediction.narrow(0, 0, n)?;
                let text = prediction.narrow(0, n, n)?;
                (&uncond + ((text - &uncond)? * req.guidance_scale)?)?
            } else {
                prediction
            };
            latents = scheduler.step(&prediction, index, &latents, &mut noise)?;
            if !progress(index - start + 1, total) {
                return Err(Error::Cancelled);
            }
        }

        Ok(latents)
    }

    /// Latents to float images `[N, H, W, 3]` in 0..1.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let mut latents = (latents.to_dtype(self.vae_dtype)? / self.vae_config.scaling_factor)?;
        if let Some(shift) = self.vae_config.shift_factor {
            latents = (latents + shift)?;
        }
        // One image at a time keeps the decoder's activation peak at one image's worth.
        let mut out = Vec::with_capacity(latents.dim(0)?);
        for i in 0..latents.dim(0)? {
            let decoded = self.vae.decode(&latents.narrow(0, i, 1)?)?;
            out.push(images::decoded_to_unit(&decoded)?);
        }
        Ok(Tensor::cat(&out, 0)?)
    }
}
